import math

import numpy as np
import pytest

from erf_callback.fit.metrics import MetricConfig, area_ratio, border_mass, energy_radius
from tests.helpers.maps import gaussian_map


def replknet_get_rectangle(data: np.ndarray, thresh: float):
    """RepLKNet erf/analyze_erf.py, verbatim logic."""
    h, w = data.shape
    all_sum = np.sum(data)
    for i in range(1, h // 2):
        selected_area = data[h // 2 - i : h // 2 + 1 + i, w // 2 - i : w // 2 + 1 + i]
        area_sum = np.sum(selected_area)
        if area_sum / all_sum > thresh:
            return i * 2 + 1, (i * 2 + 1) / h * (i * 2 + 1) / w
    return None


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("size", [31, 64])
def test_area_ratio_matches_replknet(seed, size):
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(2, size / 5)
    erf = gaussian_map((size, size), (size // 2, size // 2), np.eye(2) * sigma**2)
    erf = erf * rng.uniform(0.5, 50) + rng.uniform(0, 0.01, erf.shape)
    ours = area_ratio(erf)
    scaled = np.log10(erf + 1)
    scaled = scaled / scaled.max()
    for t in (0.2, 0.3, 0.5, 0.99):
        _, expected = replknet_get_rectangle(scaled, t)
        assert ours[t] == pytest.approx(expected, rel=1e-12)


def test_area_ratio_in_1d_and_3d():
    line = np.zeros(21)
    line[9:12] = 1.0
    assert area_ratio(line, (0.5,))[0.5] == pytest.approx(3 / 21)
    cube = np.zeros((9, 9, 9))
    cube[3:6, 3:6, 3:6] = 1.0
    assert area_ratio(cube, (0.9,))[0.9] == pytest.approx(27 / 729)


def test_energy_radius_is_exact_for_a_gaussian():
    # A 2-D Gaussian disc of radius r holds 1 - exp(-r^2 / (2 sigma^2)): 95% at 2.4477 sigma.
    sigma = 6.0
    erf = gaussian_map((128, 128), (64.0, 64.0), np.eye(2) * sigma**2)
    r = energy_radius(erf, (64.0, 64.0), 0.95)
    assert r == pytest.approx(sigma * math.sqrt(-2 * math.log(0.05)), rel=0.01)


def test_energy_radius_brute_force():
    rng = np.random.default_rng(3)
    erf = rng.random((17, 23))
    center = (7.3, 12.1)
    yy, xx = np.mgrid[:17, :23]
    dist = np.hypot(yy - center[0], xx - center[1]).ravel()
    order = np.argsort(dist, kind="stable")
    cum = np.cumsum(erf.ravel()[order])
    expected = dist[order][np.searchsorted(cum, 0.8 * erf.sum())]
    assert energy_radius(erf, center, 0.8) == pytest.approx(expected)


def test_border_mass():
    cov = np.eye(2) * 9.0
    assert border_mass(np.array([32.0, 32.0]), cov, (64, 64)) < 1e-12
    # Centred on the left edge: half of the x marginal is outside.
    assert border_mass(np.array([32.0, -0.5]), cov, (64, 64)) == pytest.approx(0.5, abs=1e-9)


def test_metric_config_validation():
    with pytest.raises(ValueError, match="radius_factor"):
        MetricConfig(radius_factor=0)
    with pytest.raises(ValueError, match="energy_fraction"):
        MetricConfig(energy_fraction=1.5)
    with pytest.raises(ValueError, match="thresholds"):
        MetricConfig(area_thresholds=(0.5, 1.0))
