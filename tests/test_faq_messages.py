"""Every error and warning that docs/faq.md quotes, and every message of the errors table of
docs/engine.md, is one the code really gives.

The FAQ is looked up by the text of a message, so a quoted message that drifted from the
code (a rewording, a new option in it) sends the reader nowhere. Each quoted message
(``**`Type: message`**``) is matched, as a pattern, against the messages of a set of calls
that raise or warn: ``<...>``, ``...`` and ``[...]`` stand for any text, everything else must
be there as written, and the exception type must be the one named. A quoted message that no
call produces fails the test, except the few in ``NOT_TRIGGERED`` that need a training run
or a missing package (each with the test that covers it).

The errors table of docs/engine.md shows messages with concrete values (``'layer_3'``,
``(32, 32)``): there, quoted names and numbers match any name and number too.
"""

from __future__ import annotations

import builtins
import pathlib
import re
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from erf_callback import (
    ERFMonitor,
    ERFWarning,
    MetricConfig,
    ProbeConfig,
    compute_erf,
    fit_gaussian,
    tokens_to_grid,
)
from erf_callback.callback.inputs import extract_input, gather_inputs
from erf_callback.engine.layers import deepest_spatial_layer
from tests.helpers.nets import KeepsAndWrites

FAQ = pathlib.Path(__file__).resolve().parents[1] / "docs" / "faq.md"
_QUOTED = re.compile(r"\*\*`([^`]+)`\*\*")
_TYPED = re.compile(r"^(\w+(?:Error|Warning)):\s*(.*)$", re.S)

# Quoted messages no cheap call gives, by their first words, and where they are tested.
NOT_TRIGGERED = {
    "ImportError: fit_gaussian(method='least_squares') needs scipy": "scipy is installed here",
    "ERF probe at step": "tests/callback/test_monitor.py (a probe failing mid-training)",
    "ERF probe of '<name>' at step": "tests/callback/test_monitor.py (NaN mid-training)",
    "ERFMonitor calls the LightningModule's forward(x)": "tests/callback/test_monitor.py",
    "ERFMonitor(module='<m>') probes a ModuleDict": "tests/callback/test_monitor.py",
}


def _grey_net(dims: int) -> nn.Sequential:  # takes single-channel images (or signals)
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    return nn.Sequential(conv(1, 8, 5), nn.ReLU(), conv(8, 8, 5))


def _conv_net(seed: int | None = None) -> nn.Sequential:
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
        )


def _named_net() -> nn.Sequential:
    layers = {"layer1": nn.Conv2d(3, 4, 3, padding=1), "layer2": nn.Conv2d(4, 4, 3, padding=1)}
    return nn.Sequential(OrderedDict(layers))


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).detach()


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Seeded per call: a message that depends on the values (the border warning's share)
    # must not depend on what the calls before drew.
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _monitor_setup(**kwargs: Any) -> None:
    module = nn.Module()
    module.net = _conv_net()
    ERFMonitor(**kwargs).setup(types.SimpleNamespace(fast_dev_run=False), module, "fit")


def _load_state_of_another_version() -> None:
    monitor = ERFMonitor(layers=["0"])
    state = monitor.state_dict()
    state["version"] = 99
    monitor.load_state_dict(state)


def _first_batch_of_persistent_workers() -> None:
    # The first training batch has 4 samples and the loader cannot be read again.
    monitor = ERFMonitor(layers=["0"], num_samples=8)
    loader = types.SimpleNamespace(persistent_workers=True, num_workers=2)
    monitor._capture_inputs(types.SimpleNamespace(train_dataloader=loader), (_x(4, 3, 8, 8),))


def _dead_net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    nn.init.zeros_(net[0].weight)
    nn.init.constant_(net[0].bias, -1.0)
    return net


def _nan_net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float("nan")
    return net


CALLS: list[Callable[[], object]] = [
    lambda: compute_erf(_named_net(), _x(2, 3, 8, 8), ["layer5"]),  # close: layer1, layer2
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), ["nope"]),
    lambda: compute_erf(_Head(), _x(2, 3, 8, 8), ["fc"]),
    lambda: compute_erf(_Unused(), _x(2, 3, 8, 8), ["b"]),
    lambda: compute_erf(_Detached(), _x(2, 3, 8, 8)),
    lambda: deepest_spatial_layer(_Flat(), _x(2, 3, 8, 8)),
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), []),
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), ["0", "0"]),
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), [1]),  # type: ignore[list-item]
    lambda: compute_erf(_conv_net(), _x(3, 224, 224)),
    lambda: compute_erf(nn.Sequential(nn.BatchNorm2d(3), _conv_net()).eval(), _x(3, 32, 32)),
    lambda: compute_erf(_conv_net(), _x(224, 224)),
    lambda: compute_erf(_grey_net(2), _x(8, 28, 28)),
    lambda: compute_erf(_grey_net(1), _x(4, 100)),
    lambda: compute_erf(_conv_net(), _x(5, 32, 32)),
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8, dtype=torch.uint8)),
    lambda: compute_erf(nn.Conv2d(3, 8, 3), _x(16, 4, 32, 32)),
    lambda: compute_erf(_conv_net(), _x(0, 3, 8, 8)),
    lambda: compute_erf(_conv_net(), [_x(3, 8, 8)]),  # type: ignore[arg-type]
    lambda: extract_input({"image": _x(2, 3, 8, 8)}, "img"),
    lambda: extract_input({"label": torch.tensor([1, 2])}, "label"),
    lambda: ERFMonitor(inputs="val"),  # type: ignore[arg-type]
    lambda: ERFMonitor(inputs=_x(8)),
    lambda: gather_inputs([], None, 4),
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), ["0"], position=(8, 0)),
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), ["0"], channels=[9]),
    lambda: ProbeConfig(reduction="max"),  # type: ignore[arg-type]
    lambda: ProbeConfig(chunk_size=2.5),  # type: ignore[arg-type]
    lambda: ProbeConfig(memory_budget=0),
    lambda: ProbeConfig(metrics={}),  # type: ignore[arg-type]
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), ["0"], position={"2": (1, 1)}),
    lambda: tokens_to_grid()(_x(2, 8)),
    lambda: tokens_to_grid(grid_size=(8, 8), num_prefix_tokens=0)(_x(2, 65, 4)),
    lambda: compute_erf(_DictOut(), _x(2, 3, 8, 8)),
    lambda: _monitor_setup(layers=["0"], module="backbone"),
    lambda: ERFMonitor(every_n_steps=0),
    lambda: ERFMonitor(max_overhead=2.0),
    lambda: ERFMonitor(at_steps=[-1]),
    lambda: ERFMonitor(num_samples=0),
    lambda: ERFMonitor(images_every_n_probes=0),
    lambda: ERFMonitor(tag_prefix="erf/"),
    _load_state_of_another_version,
    lambda: fit_gaussian(torch.zeros(2, 2, 2, 2)),
    lambda: fit_gaussian(torch.ones(4, 4), method="median"),  # type: ignore[arg-type]
    lambda: MetricConfig(radius_factor=0.0),
    lambda: MetricConfig(energy_fraction=1.5),
    lambda: MetricConfig(area_thresholds=(1.5,)),
    lambda: compute_erf(_dead_net(), _x(2, 3, 8, 8)),
    lambda: compute_erf(_nan_net(), _x(2, 3, 8, 8)),
    lambda: compute_erf(_conv_net(seed=0), _x(2, 3, 5, 5), ["2"])["2"].metrics(),
    _first_batch_of_persistent_workers,
]


def _produced() -> list[tuple[str, str]]:
    """``(type name, message)`` of every error and warning the calls give."""
    out: list[tuple[str, str]] = []
    for i, call in enumerate(CALLS):
        before = len(out)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call()
            except Exception as err:  # the point: collect whatever it raises
                text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                out.append((type(err).__name__, str(text)))
        out += [(w.category.__name__, str(w.message)) for w in caught]
        assert len(out) > before, f"call {i} gave no error and no warning"
    return out


# An abridgement ("...") may stand where the message has punctuation before the next words.
_PLACEHOLDER = re.compile(r" ?\[\.\.\.\]| ?\.\.\.|<[^>]*>")


def _pattern(quoted: str) -> re.Pattern[str]:
    """The quoted message as a pattern: its placeholders match any text, the rest itself."""
    return re.compile(".*?".join(map(re.escape, _PLACEHOLDER.split(quoted))), re.S)


def _quoted() -> list[tuple[str | None, str]]:
    """``(type name or None, message)`` of every message the FAQ quotes."""
    out = []
    for raw in _QUOTED.findall(FAQ.read_text()):
        typed = _TYPED.match(raw)
        out.append((typed.group(1), typed.group(2)) if typed else (None, raw))
    return out


def test_the_faq_quotes_messages() -> None:
    assert len(_quoted()) >= 40  # the parser still finds them


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_quoted_message_is_one_the_code_gives() -> None:
    produced = _produced()
    stale = []
    for kind, message in _quoted():
        if any(message.startswith(k) or f"{kind}: {message}".startswith(k) for k in NOT_TRIGGERED):
            continue
        pattern = _pattern(message)
        hits = [(t, m) for t, m in produced if pattern.search(m)]
        types_ok = [t for t, _ in hits if kind is None or t == kind or _is_subclass(t, kind)]
        if not types_ok:
            got = f" (as {sorted({t for t, _ in hits})})" if hits else ""
            stale.append(f"{kind or ''}: {message[:110]}{got}")
    assert not stale, "quoted in docs/faq.md but not given by the code:\n" + "\n".join(stale)


def _is_subclass(child: str, parent: str) -> bool:
    """Whether the exception class named ``child`` (ours or a builtin) derives from ``parent``."""
    from erf_callback.engine import validate

    cls = getattr(validate, child, None) or getattr(builtins, child, None)
    base = getattr(builtins, parent, None)
    return isinstance(cls, type) and isinstance(base, type) and issubclass(cls, base)


def test_the_quoted_warnings_are_erf_warnings() -> None:
    # The FAQ says numerical trouble "warns once with ERFWarning": the untyped quotes of its
    # warnings section are ERFWarnings in the code.
    produced = dict((m, t) for t, m in _produced())
    for message in ("is zero everywhere", "contains NaN/Inf", "reaches the input's border"):
        kinds = {t for m, t in produced.items() if message in m}
        assert kinds == {ERFWarning.__name__}, (message, kinds)


# ---- docs/engine.md, "Errors"

ENGINE = FAQ.parent / "engine.md"
_ROW = re.compile(r"^\| `(\w+)` \| .*? \| (.*) \|$")
# A quote opens after a non-letter: the apostrophe of "model's" opens nothing.
_CONCRETE = re.compile(r" ?\[\.\.\.\]| ?\.\.\.|<[^>]*>|(?<![A-Za-z])'[^']*'|\d+")


class Net(nn.Module):  # a forward that needs more than the image
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x, mask):  # unannotated, as the table's example: Net.forward(x, mask)
        return self.head(self.backbone(x)) * mask


class _Lift(nn.Module):  # adds a leading axis of its own: takes one unbatched image
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0) * 2


def _scripted() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in recent torch
        net = nn.Sequential()
        net.block = torch.jit.script(nn.Conv2d(3, 4, 3))
    return net


def _inference_mode_net() -> nn.Module:
    with torch.inference_mode():
        return _conv_net()


def _nan_samples() -> torch.Tensor:
    x = _x(6, 3, 8, 8)
    x[1, 0, 0, 0] = x[4, 1, 2, 3] = float("nan")
    return x


ENGINE_CALLS: list[Callable[[], object]] = [
    lambda: compute_erf(_named_net(), _x(2, 3, 8, 8), ["layer_2"]),
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), 2),  # type: ignore[arg-type]
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), [nn.Conv2d(3, 4, 3)]),  # type: ignore[list-item]
    lambda: (lambda n: compute_erf(n, _x(2, 3, 8, 8), [n[0]]))(_conv_net()),  # type: ignore[list-item]
    lambda: compute_erf(Net(), _x(2, 3, 8, 8)),
    lambda: compute_erf(_scripted(), _x(2, 3, 8, 8)),
    lambda: compute_erf(lambda x: x, _x(2, 3, 8, 8)),  # type: ignore[arg-type]
    lambda: ProbeConfig(output_transform={"2": "flatten"}),  # type: ignore[dict-item]
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8).to_sparse()),
    lambda: compute_erf(_conv_net(), _x(4, 3, 0, 16)),
    lambda: compute_erf(_conv_net(), _nan_samples()),
    lambda: compute_erf(_conv_net(), _x(2, 3, 4, 16, 16)),
    lambda: compute_erf(nn.Sequential(nn.LazyConv2d(4, 3)), _x(2, 3, 8, 8)),
    lambda: compute_erf(_inference_mode_net(), _x(2, 3, 8, 8)),
    lambda: compute_erf(nn.Conv2d(3, 4, 3, device="meta"), _x(2, 3, 8, 8)),
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), ["0"], position=(3.5, 2)),
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), ["0"], channels=[0, 0]),
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), ["0"], position=(1, 2, 3)),
    lambda: compute_erf(_conv_net(), _x(2, 3, 8, 8), ["0"], output_transform=lambda o: o[:, 0]),
    lambda: compute_erf(_conv_net(), _x(32)),
    lambda: compute_erf(_Lift(), _x(3, 8, 8)),
    lambda: compute_erf(KeepsAndWrites(), _x(2, 1, 8, 8), ["a", "output"]),
]


def _engine_rows() -> list[tuple[str, str]]:
    """``(exception name, message)`` of every message quoted in the table's last column."""
    text = ENGINE.read_text()
    table = text[text.index("## Errors") : text.index("## NaN and zero maps")]
    out = []
    for line in table.splitlines():
        row = _ROW.match(line)
        if row:
            out += [(row.group(1), m) for m in re.findall(r"`([^`]{20,})`", row.group(2))]
    return out


def _loose(quoted: str) -> re.Pattern[str]:
    """Like :func:`_pattern`, and quoted names and numbers match any."""
    return re.compile(".*?".join(map(re.escape, _CONCRETE.split(quoted))), re.S)


def test_the_engine_errors_table_quotes_messages() -> None:
    assert len(_engine_rows()) >= 30


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_message_of_the_engine_errors_table_is_one_the_code_gives() -> None:
    saved, CALLS[:] = list(CALLS), CALLS + ENGINE_CALLS
    try:
        produced = _produced()
    finally:
        CALLS[:] = saved
    stale = []
    for kind, message in _engine_rows():
        if message == "torch.fx.GraphModule":  # a name in the row's text, not a message
            continue
        pattern = _loose(message)
        hits = [t for t, m in produced if pattern.search(m)]
        if not any(t == kind or _is_subclass(t, kind) for t in hits):
            stale.append(
                f"{kind}: {message[:110]}" + (f" (as {sorted(set(hits))})" if hits else "")
            )
    assert not stale, "in docs/engine.md's errors table but not given by the code:\n" + "\n".join(
        stale
    )
