"""ERFHistory: records, change-since-init metrics, downsampled maps, state and files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from erf_callback.callback.history import CHANGE_METRICS, ERFHistory


def metrics(radius: float, cy: float = 8.0, cx: float = 8.0, **extra: float) -> dict[str, float]:
    return {"radius": radius, "center_y": cy, "center_x": cx, "center_offset": 0.5, **extra}


def blob(shift: float = 0.0, size: int = 16) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    return torch.exp(-((yy - 8) ** 2 + (xx - 8 - shift) ** 2) / 8).double()


def test_records_number_probes_and_keep_metrics_as_floats() -> None:
    h = ERFHistory()
    a = h.add(0, 0, "l1", "ok", metrics(2), blob())
    b = h.add(0, 0, "l2", "ok", metrics(3), blob(), probe=0)  # same probe, second layer
    c = h.add(10, 1, "l1", "ok", {"radius": np.float32(4.0)}, blob())
    assert [r["probe"] for r in (a, b, c)] == [0, 0, 1]
    assert (c["step"], c["epoch"], c["layer"], c["status"]) == (10, 1, "l1", "ok")
    assert type(c["radius"]) is float and c["radius"] == 4.0
    assert len(h) == 3 and h.num_probes == 2 and h.steps() == [0, 10]
    assert h.first("l2") is b and h.first("nope") is None


def test_change_metrics_against_the_first_valid_probe() -> None:
    h = ERFHistory()
    first = h.add(0, 0, "l", "ok", metrics(2.0, 8.0, 8.0), blob())
    assert {k: first[k] for k in CHANGE_METRICS} == {
        "radius_growth": 1.0,
        "map_correlation": 1.0,
        "center_shift": 0.0,
    }
    later = h.add(5, 0, "l", "ok", metrics(3.0, 11.0, 12.0), blob(shift=2.0))
    assert later["radius_growth"] == pytest.approx(1.5, rel=1e-12)
    assert later["center_shift"] == pytest.approx(5.0, rel=1e-12)  # a 3-4-5 move
    # Pearson correlation of the stored (float32) maps, computed by numpy.
    expected = np.corrcoef(blob().float().numpy().ravel(), blob(2.0).float().numpy().ravel())
    assert later["map_correlation"] == pytest.approx(expected[0, 1], rel=1e-6)
    assert later["map_correlation"] < 0.99  # the shifted map really differs


def test_failed_probes_get_nan_changes_and_do_not_become_the_baseline() -> None:
    h = ERFHistory()
    bad = h.add(0, 0, "l", "nonfinite", metrics(math.nan), torch.full((16, 16), math.nan))
    assert all(math.isnan(bad[k]) for k in CHANGE_METRICS)
    assert "l" not in h.maps  # no map is kept for a failed probe
    base = h.add(1, 0, "l", "ok", metrics(2.0), blob())
    assert h.first("l") is base and base["radius_growth"] == 1.0
    assert h.add(2, 0, "l", "ok", metrics(5.0), blob())["radius_growth"] == 2.5
    assert [s for s, _ in h.maps["l"]] == [1, 2]


def test_zero_base_radius_and_missing_centres_give_nan_not_an_error() -> None:
    h = ERFHistory()
    h.add(0, 0, "l", "ok", {"radius": 0.0}, blob())
    later = h.add(1, 0, "l", "ok", {"radius": 2.0}, blob())
    assert math.isnan(later["radius_growth"])
    assert math.isnan(later["center_shift"])  # no center_* metric to compare


def test_maps_are_block_means_at_most_map_size_per_side() -> None:
    h = ERFHistory(map_size=8)
    big = torch.arange(32 * 24, dtype=torch.float64).reshape(32, 24)
    h.add(0, 0, "l", "ok", metrics(1), big)
    ((step, small),) = h.maps["l"]
    assert step == 0 and small.dtype == torch.float32 and tuple(small.shape) == (8, 8)
    expected = big.reshape(8, 4, 8, 3).mean(dim=(1, 3)).float()
    torch.testing.assert_close(small, expected)


def test_state_dict_round_trip_through_a_weights_only_checkpoint(tmp_path) -> None:
    h = ERFHistory(map_size=8)
    h.add(0, 0, "l", "ok", metrics(2.0), blob())
    h.add(3, 0, "l", "zero", metrics(math.nan), torch.zeros(16, 16))
    h.add(6, 1, "l", "ok", metrics(2.5), blob(1.0))
    path = tmp_path / "state.pt"
    torch.save(h.state_dict(), path)
    restored = ERFHistory()
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.map_size == 8
    assert len(restored.records) == 3
    for got, want in zip(restored.records, h.records, strict=True):
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == v or (isinstance(v, float) and math.isnan(v) and math.isnan(got[k]))
    assert [s for s, _ in restored.maps["l"]] == [0, 6]
    for (_, a), (_, b) in zip(restored.maps["l"], h.maps["l"], strict=True):
        assert torch.equal(a, b)
    # The restored history continues: growth is still measured against step 0.
    assert restored.add(9, 1, "l", "ok", metrics(3.0), blob())["radius_growth"] == 1.5


def test_state_dict_is_a_copy() -> None:
    h = ERFHistory()
    h.add(0, 0, "l", "ok", metrics(2.0), blob())
    state = h.state_dict()
    state["records"][0]["radius"] = 99.0
    state["maps"]["l"][0][1].zero_()
    assert h.records[0]["radius"] == 2.0 and h.maps["l"][0][1].max() > 0.9


def test_write_csv_and_json_with_nan_as_null(tmp_path) -> None:
    h = ERFHistory(map_size=4)
    h.add(0, 0, "a", "ok", metrics(2.0, trf_x=math.inf), blob())
    h.add(0, 0, "b", "nonfinite", {"radius": math.nan}, torch.full((16, 16), math.nan), probe=0)
    h.add(4, 0, "a", "ok", metrics(3.0, extra=np.float64(7.5)), blob(1.0))
    csv_path, json_path = h.write(str(tmp_path / "out"), basename="hist")
    assert csv_path == str(tmp_path / "out" / "hist.csv")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hist.csv", "hist.json"]

    frame = pd.read_csv(csv_path)
    assert list(frame.layer) == ["a", "b", "a"] and list(frame.step) == [0, 0, 4]
    # Columns are the union over records, in first-seen order ("extra" only in the last row).
    assert list(frame.columns[:5]) == ["probe", "step", "epoch", "layer", "status"]
    assert frame.columns[-1] == "extra" and math.isnan(frame.extra[0]) and frame.extra[2] == 7.5
    assert math.isnan(frame.radius[1]) and frame.radius[2] == 3.0
    assert frame.radius_growth[2] == pytest.approx(1.5)

    text = Path(json_path).read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    payload = json.loads(text)
    assert payload["format"] == "erf-callback history v1"
    assert payload["records"][1]["radius"] is None  # NaN
    assert payload["records"][0]["trf_x"] is None  # inf
    assert payload["records"][2]["extra"] == 7.5
    assert [m["step"] for m in payload["maps"]["a"]] == [0, 4] and "b" not in payload["maps"]
    np.testing.assert_allclose(payload["maps"]["a"][1]["map"], h.maps["a"][1][1].numpy())
