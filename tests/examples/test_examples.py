"""Smoke tests of the examples gallery: each example runs with a tiny setting into tmp_path and
its documented claims hold (orderings, exact zeros, closed forms)."""

from __future__ import annotations

import ast
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Small models run fastest on one thread (and the machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.syspath_prepend(str(EXAMPLES))  # examples import the gallery's shared task
    yield
    torch.set_num_threads(threads)


def test_plain_pytorch_loop_logs_to_tensorboard_without_lightning(tmp_path):
    example = load_example("plain_pytorch")
    argv = ["--steps", "4", "--every", "2", "--num-samples", "4", "--logdir", str(tmp_path)]
    result = example.main(argv)
    assert set(result) == set(example.LAYERS)
    acc = EventAccumulator(str(tmp_path / "squares"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    layer = example.LAYERS[-1]
    assert [e.step for e in acc.Scalars(f"erf/{layer}/radius")] == [0, 2, 4]
    assert len(acc.Images(f"erf/{layer}/evolution")) == 2  # from the second probe on
    assert len(acc.Scalars("train/loss")) == 4
    assert (tmp_path / "squares" / "erf_history.json").is_file()
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse((EXAMPLES / "plain_pytorch.py").read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])
    }
    assert not imported & {"lightning", "pytorch_lightning"}


def test_tcn_erf_is_causal_and_learns_the_target_lags(tmp_path):
    example = load_example("tcn_1d")
    result = example.main(["--steps", "60", "--out", str(tmp_path)])
    t = example.LENGTH - 20
    for r in result.values():
        assert r["future_mass"] == 0.0  # causal: exactly no gradient from the future
        assert r["trf"] == 31  # 1 + 2 * (1 + 2 + 4 + 8)
        assert r["trf_box"] == (t - 30, t)  # the TRF ends at the probed step
        assert r["centre_lag"] > 0  # the ERF's centre is behind the unit
    assert result["trained"]["target_mass"] > 0.5 > result["init"]["target_mass"]
    assert (tmp_path / "tcn_erf.png").is_file()


def test_vit_patch_token_sees_its_patch_then_the_whole_image(tmp_path):
    example = load_example("vit_patch")
    result = example.main(["--depth", "2", "--num-samples", "4", "--out", str(tmp_path)])
    embed, b0, b1 = result["patch_embed"], result["blocks.0"], result["blocks.1"]
    assert embed["patch_share"] == pytest.approx(1.0, abs=1e-12)  # a stride-4 4x4 conv
    assert embed["trf_x"] == example.PATCH
    assert b0["patch_share"] < 0.9  # attention reaches other patches after one block
    assert b1["patch_share"] < b0["patch_share"]
    assert math.isinf(b0["trf_x"])  # self-attention: the whole input
    assert (tmp_path / "vit_patch_erf.png").is_file()


def test_luo_qualitative_results(tmp_path):
    example = load_example("luo_replication")
    argv = ["--depths", "2", "4", "8", "--size", "48", "--num-samples", "4"]
    out = example.main([*argv, "--train-steps", "80", "--out", str(tmp_path)])
    rows = {(r["variant"], r["depth"]): r for r in out["rows"]}
    plain = [rows["plain 3x3", d] for d in (2, 4, 8)]
    radii = [r["radius"] for r in plain]
    assert radii == sorted(radii)  # deeper: wider
    # sqrt law: log-log slope 0.5; measured 0.5-0.65 (radius = 2 sigma of small discrete maps)
    assert 0.35 < out["slopes"]["plain 3x3"] < 0.75
    ratios = [r["erf_trf_ratio"] for r in plain]
    assert ratios == sorted(ratios, reverse=True)  # relative ERF shrinks with depth
    for depth in (4, 8):
        base = rows["plain 3x3", depth]["radius"]
        for variant in ("dilated 3x3 (d=2)", "strided 3x3 (s=2 twice)", "large kernel 7x7"):
            assert rows[variant, depth]["radius"] > base, (variant, depth)
    training = out["training"]
    assert training["trained"]["radius"] > training["init"]["radius"]
    assert (tmp_path / "luo_table.md").read_text().startswith("| variant | depth |")
    assert (tmp_path / "luo_replication.png").is_file()


def test_torchvision_resnet18_trf_matches_the_known_values():
    pytest.importorskip("torchvision")
    example = load_example("torchvision_models")
    result = example.main(["--size", "64", "--num-samples", "2"])
    assert {k: v["trf_x"] for k, v in result.items()} == example.RESNET18_TRF


def test_torchvision_example_skips_cleanly_without_torchvision(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    assert load_example("torchvision_models").main([]) is None
    assert "pip install torchvision" in capsys.readouterr().out
