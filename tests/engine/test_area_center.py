"""Area-ratio squares on the unit's centre by default, RepLKNet's convention on request (item 6)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from erf_callback import MetricConfig, compute_erf
from erf_callback.fit.metrics import area_ratio
from tests.helpers.nets import ResNet
from tests.helpers.replknet import replknet_get_rectangle

# The 96x96 map is cut by the border (that is why its unit is off-centre): warned, expected.
pytestmark = pytest.mark.filterwarnings("ignore::erf_callback.ERFWarning")


def replknet_analyze_erf(data: np.ndarray, thresholds=(0.2, 0.3, 0.5, 0.99)) -> dict:
    """RepLKNet erf/analyze_erf.py transcribed: its normalisation, then its get_rectangle."""
    data = np.log10(data + 1)
    data = data / np.max(data)
    found = {t: replknet_get_rectangle(data, t) for t in thresholds}
    # Their script crashes where no square of side < H qualifies; such thresholds are left out.
    return {t: r[1] for t, r in found.items() if r is not None}


@pytest.fixture(scope="module")
def off_centre_map():
    torch.manual_seed(0)
    # At 96x96 the last stage is 3x3: the default unit (1, 1) sits at (32, 32), not (48, 48).
    return compute_erf(ResNet(width=4), torch.randn(4, 3, 96, 96), ["layer4"])["layer4"]


def test_default_centres_the_squares_on_the_unit(off_centre_map):
    m = off_centre_map
    assert m.location == (32.0, 32.0)
    metrics = m.metrics()
    want = area_ratio(m.numpy(), MetricConfig().area_thresholds, center=(32, 32))
    for t, v in want.items():
        assert metrics[f"area_ratio@{t:g}"] == v


def test_replknet_convention_is_their_script_bit_for_bit(off_centre_map):
    m = off_centre_map
    r = m.metrics()
    rep = dataclasses.replace(m, config=MetricConfig(area_center="replknet")).metrics()
    theirs = replknet_analyze_erf(m.numpy())
    assert len(theirs) >= 3
    for t, v in theirs.items():
        assert rep[f"area_ratio@{t:g}"] == v  # exact equality, not approx
    # The conventions differ for this off-centre unit: centred on the unit, a square of the
    # same side holds more of the ERF, so the unit's ratios are smaller.
    assert r["area_ratio@0.2"] < rep["area_ratio@0.2"]


@pytest.mark.parametrize("seed", range(6))
def test_replknet_convention_matches_at_ties_and_in_float32(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(20, 80))
    # Quantised values make many partial sums tie with the threshold: the deciding squares
    # must be summed the way RepLKNet sums them.
    erf = np.round(rng.random((size, size)) * 4) / 4
    erf32 = erf.astype(np.float32)
    for data in (erf, erf32):
        ours = area_ratio(data, (0.2, 0.3, 0.5, 0.99))
        theirs = replknet_analyze_erf(data)
        assert len(theirs) >= 3
        assert {t: ours[t] for t in theirs} == theirs


def test_the_unit_centre_is_rounded_half_up_and_kept_inside():
    m = compute_erf(torch.nn.Conv2d(1, 1, 2), torch.randn(2, 1, 9, 9), position=(3, 3))["output"]
    assert m.location == (3.5, 3.5)  # a 2x2 kernel's unit sits between pixels
    assert m._area_center() == (4, 4)
    assert math.isfinite(m.metrics()["area_ratio@0.5"])


def test_trf_is_unclipped_and_documented():
    m = compute_erf(ResNet(width=4), torch.randn(1, 3, 64, 64), ["layer4"])["layer4"]
    assert m.metrics()["trf_x"] == 435.0 > 64  # wider than the input, as the docstring says
    assert "exceed the input" in type(m).trf.__doc__


@pytest.mark.parametrize("seed", range(3))
def test_the_deciding_square_is_rechecked_with_replknet_sums(seed):
    # Where the integral image and np.sum round a tie differently, the first hit it proposes
    # is one off; the re-check with their summation must move it to theirs from either side.
    from erf_callback.fit.metrics import _replknet_first_hit

    rng = np.random.default_rng(seed)
    a = rng.random((41, 41))
    a = np.log10(a + 1) / np.log10(a + 1).max()
    i = np.arange(1, 21)
    total = float(np.sum(a))
    for t in (0.2, 0.5):
        side = {
            2 * int(j) + 1 for j in i if np.sum(a[20 - j : 21 + j, 20 - j : 21 + j]) / total > t
        }
        want = (min(side) - 1) // 2 - 1  # index into i of RepLKNet's first hit
        for proposed in (want - 1, want + 1, want + 3):
            assert _replknet_first_hit(a, (20, 20), i, max(proposed, 0), total, t) == want


@pytest.mark.parametrize("seed", range(4))
def test_replknet_convention_equals_the_script_wherever_its_squares_fit(seed):
    # Their script tries i < H // 2 only (and fails past it), slices data[h // 2 - i : ...,
    # w // 2 - i : ...], whose start goes negative on a map narrower than the square (H > W)
    # and is then counted from the end, and its (2i + 1)^2 / (H W) can exceed 1. There the
    # squares are clipped to the map and the ratio capped at 1 (what the squares mean);
    # everywhere else, their bits.
    rng = np.random.default_rng(seed)
    inside = outside = 0
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(5, 60, 2))
        erf = rng.random((h, w)) ** rng.uniform(1, 10) * 50
        ours = area_ratio(erf, (0.2, 0.3, 0.5, 0.99))
        data = np.log10(erf + 1)
        data = data / np.max(data)
        for t, v in ours.items():
            found = replknet_get_rectangle(data, t)
            clipped = replknet_get_rectangle(data, t, center=(h // 2, w // 2))
            assert clipped is not None
            side = clipped[0]
            i = (side - 1) // 2
            if i < h // 2 and i <= w // 2 and side * side <= h * w:  # their loop, inside
                inside += 1
                assert found is not None and v == found[1]
            else:
                outside += 1
                assert v == min(side / h * side / w, 1.0)
    assert inside > 20 and outside > 20
