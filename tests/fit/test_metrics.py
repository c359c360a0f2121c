import math
import warnings

import numpy as np
import pytest
from scipy.stats import norm

from erf_callback.fit.metrics import (
    MetricConfig,
    area_ratio,
    border_mass,
    energy_radius,
    radius_from_sigmas,
)
from tests.helpers.maps import gaussian_map, rotated_cov
from tests.helpers.replknet import replknet_area_ratio


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("size", [31, 64])
def test_area_ratio_matches_replknet(seed, size):
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(2, size / 5)
    erf = gaussian_map((size, size), (size // 2, size // 2), np.eye(2) * sigma**2)
    erf = erf * rng.uniform(0.5, 50) + rng.uniform(0, 0.01, erf.shape)
    ours = area_ratio(erf)
    for t in (0.2, 0.3, 0.5, 0.99):
        assert ours[t] == pytest.approx(replknet_area_ratio(erf, t), rel=1e-12)


@pytest.mark.parametrize(("center", "t"), [((5, 22), 0.5), ((20, 4), 0.3), ((3, 3), 0.99)])
def test_area_ratio_square_is_centred_on_the_given_position(center, t):
    # An ERF far from the map centre: the squares grow around ``center``, not (H // 2, W // 2).
    erf = gaussian_map((32, 40), center, rotated_cov(2.0, 3.0, 0.7)) * 20
    ours = area_ratio(erf, (t,), center)[t]
    assert ours == pytest.approx(replknet_area_ratio(erf, t, center), rel=1e-12)
    assert ours != pytest.approx(area_ratio(erf, (t,))[t], rel=1e-3)  # the centre matters


def test_area_ratio_threshold_is_strict():
    # log10(9 + 1) = 1 exactly, so the scaled map is exactly 0/1 and the sums are integers.
    # Three of the four unit pixels are in the first 3-pixel window: 3/4 = 0.75 exactly, which
    # does not *exceed* t = 0.75 (RepLKNet compares with ">"); the square must grow to 11.
    line = np.zeros(21)
    line[[5, 9, 10, 11]] = 9.0
    assert area_ratio(line, (0.75, 0.74))[0.75] == pytest.approx(11 / 21, rel=1e-12)
    assert area_ratio(line, (0.74,))[0.74] == pytest.approx(3 / 21, rel=1e-12)
    square = np.zeros((15, 15))
    square[6:9, 6:9] = 9.0  # the central 3x3: 9 of 12 units
    square[[0, 0, 14], [0, 14, 7]] = 9.0
    assert area_ratio(square, (0.75,))[0.75] == pytest.approx(1.0, rel=1e-12)  # 15x15
    assert replknet_area_ratio(square, 0.75, (7, 7)) == pytest.approx(1.0, rel=1e-12)
    assert area_ratio(square, (0.7,))[0.7] == pytest.approx(9 / 225, rel=1e-12)


@pytest.mark.parametrize(
    ("sigmas", "factor", "expected"),
    [((2.0, 8.0), 2.0, 8.0), ((1.0, 4.0, 16.0), 1.0, 4.0), ((3.0,), 2.5, 7.5)],
)
def test_radius_is_the_geometric_mean_of_the_sigmas(sigmas, factor, expected):
    # Anisotropic on purpose: the arithmetic mean (10 and 7 in the first two rows) differs.
    assert radius_from_sigmas(sigmas, factor) == pytest.approx(expected, rel=1e-12)


def test_radius_default_factor_zero_width_and_invalid_sigmas():
    assert radius_from_sigmas([2.0, 8.0]) == pytest.approx(8.0, rel=1e-12)  # factor 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no log(0) warning on the way to 0
        assert radius_from_sigmas([0.0, 3.0]) == 0.0
        assert radius_from_sigmas([3.0, -1e-300]) == 0.0
    for bad in ([math.nan, 2.0], [math.inf, 2.0], [2.0, -math.inf], []):
        assert math.isnan(radius_from_sigmas(bad)), bad


@pytest.mark.parametrize(
    "erf",
    [np.zeros((8, 8)), np.full((4, 4), np.nan), np.full((3, 5), np.inf), np.zeros((0, 6))],
    ids=["zeros", "nan", "inf", "empty"],
)
def test_area_ratio_of_a_map_without_finite_mass_is_nan(erf):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = area_ratio(erf, (0.2, 0.5))
    assert list(got) == [0.2, 0.5] and all(math.isnan(v) for v in got.values())


def test_area_ratio_smallest_square_is_3_and_largest_is_the_map():
    dot = np.zeros((11, 11))
    dot[5, 5] = 4.0  # all mass in the centre pixel: RepLKNet's first square is already 3x3
    assert area_ratio(dot, (0.5,))[0.5] == pytest.approx(9 / 121, rel=1e-12)
    assert replknet_area_ratio(dot, 0.5) == pytest.approx(9 / 121, rel=1e-12)
    ends = np.zeros(11)
    ends[[0, 10]] = 1.0  # probed at pixel 0: the square must reach pixel 10 (side 21 > 11)
    assert area_ratio(ends, (0.6,), center=(0,))[0.6] == 1.0
    # No square holds more than all of the mass: the ratio is the whole map, capped at 1.
    assert area_ratio(ends, (1.0,))[1.0] == 1.0
    assert area_ratio(np.ones((9, 9)), (1.0,), center=(2, 6))[1.0] == 1.0


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


def brute_force_energy_radius(mass, center, fraction):
    """Sort every pixel by distance; the radius of the pixel that brings the cumulative mass
    to ``fraction`` of the total."""
    coords = np.indices(mass.shape).reshape(mass.ndim, -1).T
    dist = np.sqrt(((coords - np.asarray(center)) ** 2).sum(axis=1))
    order = np.argsort(dist, kind="stable")
    cum = np.cumsum(mass.ravel()[order])
    return dist[order][np.searchsorted(cum, fraction * mass.sum() * (1 - 1e-12))]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.3, 0.8, 0.95, 1.0])
def test_energy_radius_brute_force(seed, fraction):
    # Random maps and centres, 1- to 3-D: many pixels share a distance shell, so the answer is
    # rarely the shell's first pixel.
    rng = np.random.default_rng(seed)
    shape = [(41,), (17, 23), (9, 11, 7)][seed % 3]
    erf = rng.random(shape) ** 3
    center = [rng.uniform(0, n - 1) for n in shape]
    expected = brute_force_energy_radius(erf, center, fraction)
    assert energy_radius(erf, center, fraction) == pytest.approx(expected, rel=1e-12)


def test_energy_radius_mass_that_reaches_the_goal_exactly():
    # Unit masses at distances 0..3: half the mass is reached exactly by the second pixel.
    line = np.ones(4)
    assert energy_radius(line, (0.0,), 0.5) == 1.0
    assert energy_radius(line, (0.0,), 0.75) == 2.0
    assert energy_radius(line, (0.0,), 1.0) == 3.0  # the goal is in the last shell
    corners = np.zeros((7, 7))
    corners[0, 0] = corners[6, 6] = 1.0
    assert energy_radius(corners, (3.0, 3.0), 1.0) == pytest.approx(math.sqrt(18), rel=1e-15)


def test_energy_radius_goal_reached_exactly_inside_a_shell():
    # Pixels at r = 1, 1 and sqrt(2) share one distance shell; the first r = 1 pixel brings the
    # mass to exactly half: the answer is 1, not the next pixel's sqrt(2).
    square = np.array([[1.0, 1.0], [0.0, 2.0]])
    assert energy_radius(square, (0.0, 0.0), 0.5) == 1.0
    assert brute_force_energy_radius(square, (0.0, 0.0), 0.5) == 1.0


def test_energy_radius_defaults_floor_and_degenerate_maps():
    sigma = 4.0
    erf = gaussian_map((64, 64), (30.0, 33.0), np.eye(2) * sigma**2)
    assert energy_radius(erf, (30.0, 33.0)) == energy_radius(erf, (30.0, 33.0), 0.95)
    # The floor is subtracted and what falls below it counts as 0, not as negative mass.
    floored = erf + 0.01
    expected = brute_force_energy_radius(np.clip(floored - 0.01, 0, None), (30.0, 33.0), 0.9)
    assert energy_radius(floored, (30.0, 33.0), 0.9, floor=0.01) == pytest.approx(expected)
    signed = erf - 0.02  # a negative pedestal must not cancel mass
    expected = brute_force_energy_radius(np.clip(signed, 0, None), (30.0, 33.0), 0.9)
    assert energy_radius(signed, (30.0, 33.0), 0.9) == pytest.approx(expected)
    small = erf * 1e-3 / erf.sum()  # total mass 0.001: a scale, not a failure
    assert energy_radius(small, (30.0, 33.0), 0.9) == energy_radius(erf, (30.0, 33.0), 0.9)
    assert math.isnan(energy_radius(np.zeros((8, 8)), (4.0, 4.0)))
    assert math.isnan(energy_radius(erf, (math.nan, 3.0)))
    assert math.isnan(energy_radius(erf, (30.0, math.inf)))


def outside_mass(mean, sds, shape):
    """1 - prod_axes P(-0.5 <= X_i <= n_i - 0.5) for independent normals (scipy's cdf)."""
    inside = 1.0
    for mu, sd, n in zip(mean, sds, shape, strict=True):
        inside *= norm.cdf(n - 0.5, mu, sd) - norm.cdf(-0.5, mu, sd)
    return 1.0 - inside


@pytest.mark.parametrize(
    ("mean", "sds", "shape"),
    [
        ((32.0, 32.0), (3.0, 3.0), (64, 64)),
        ((3.0, 40.0), (2.0, 5.0), (64, 48)),  # near the top and the right edge
        ((-0.5, 10.0), (3.0, 1.0), (64, 20)),  # centred on the top pixel edge: half outside
        ((7.0,), (4.0,), (10,)),
        ((1.0, 12.0, 30.0), (1.5, 6.0, 2.0), (8, 24, 32)),
    ],
)
def test_border_mass_is_the_gaussian_mass_outside_the_pixel_edges(mean, sds, shape):
    got = border_mass(np.array(mean), np.diag(np.square(sds)), shape)
    assert got == pytest.approx(outside_mass(mean, sds, shape), rel=1e-9, abs=1e-15)


def test_border_mass_of_zero_width_axes_and_bad_fits():
    # A zero-variance axis is all inside or all outside (pixel edges inclusive); it multiplies
    # the other axes' share, whatever the order.
    partial = outside_mass((0.0,), (2.0,), (16,))
    assert border_mass(np.array([0.0, 5.0]), np.diag([4.0, 0.0]), (16, 8)) == pytest.approx(partial)
    assert border_mass(np.array([5.0, 0.0]), np.diag([0.0, 4.0]), (8, 16)) == pytest.approx(partial)
    assert border_mass(np.array([0.0, 7.5]), np.diag([4.0, 0.0]), (16, 8)) == pytest.approx(partial)
    assert border_mass(np.array([0.0, -0.5]), np.diag([4.0, 0.0]), (16, 8)) == pytest.approx(
        partial
    )
    assert border_mass(np.array([0.0, 7.6]), np.diag([4.0, 0.0]), (16, 8)) == 1.0
    assert border_mass(np.array([0.0, -0.6]), np.diag([4.0, 0.0]), (16, 8)) == 1.0
    assert border_mass(np.array([3.0]), np.array([[-1e-12]]), (8,)) == 0.0  # rounding noise
    assert math.isnan(border_mass(np.array([math.nan, 1.0]), np.eye(2), (8, 8)))
    assert math.isnan(border_mass(np.array([1.0, 1.0]), np.diag([1.0, math.inf]), (8, 8)))
    with pytest.raises(ValueError, match="zip"):
        border_mass(np.array([1.0, 1.0]), np.eye(2), (8,))


def test_metric_config_accepts_the_edges_of_the_valid_ranges():
    cfg = MetricConfig(radius_factor=1e-9, energy_fraction=1.0, area_thresholds=(1e-9, 0.999))
    assert (cfg.radius_factor, cfg.energy_fraction) == (1e-9, 1.0)
    assert cfg.area_thresholds == (1e-9, 0.999)
    default = MetricConfig()
    assert (default.radius_factor, default.energy_fraction) == (2.0, 0.95)
    assert default.area_thresholds == (0.2, 0.3, 0.5, 0.99)
    assert (default.fit_method, default.border_warning) == ("robust", 0.01)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"radius_factor": 0}, r"radius_factor must be a finite number > 0; got 0"),
        ({"radius_factor": -1.0}, r"radius_factor must be a finite number > 0; got -1.0"),
        ({"radius_factor": math.nan}, r"radius_factor must be a finite number > 0; got nan"),
        ({"radius_factor": math.inf}, r"radius_factor must be a finite number > 0; got inf"),
        ({"radius_factor": "2"}, r"radius_factor must be a finite number > 0; got '2'"),
        ({"radius_factor": True}, r"radius_factor must be a finite number > 0; got True"),
        ({"energy_fraction": 0.0}, r"energy_fraction must be in \(0, 1\]; got 0.0"),
        ({"energy_fraction": 1.5}, r"energy_fraction must be in \(0, 1\]; got 1.5"),
        ({"area_thresholds": (0.5, 1.0)}, r"area thresholds must be numbers in \(0, 1\); got 1.0"),
        ({"area_thresholds": (0.0,)}, r"area thresholds must be numbers in \(0, 1\); got 0.0"),
        ({"area_thresholds": ("0.5",)}, r"area thresholds must be numbers in \(0, 1\); got '0.5'"),
        ({"area_thresholds": 0.5}, r"area_thresholds must be a sequence of numbers"),
        ({"area_thresholds": (0.5, 0.5)}, r"area_thresholds has duplicates"),
        ({"border_warning": -0.1}, r"border_warning must be a mass fraction in \[0, 1\]"),
        ({"border_warning": math.nan}, r"border_warning must be a mass fraction in \[0, 1\]"),
        ({"fit_method": "gauss"}, r"fit_method must be 'robust', 'moments' or 'least_squares'"),
    ],
)
def test_metric_config_rejects_values_outside_the_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetricConfig(**kwargs)


def test_metric_config_validation():
    with pytest.raises(ValueError, match="radius_factor"):
        MetricConfig(radius_factor=0)
    with pytest.raises(ValueError, match="energy_fraction"):
        MetricConfig(energy_fraction=1.5)
    with pytest.raises(ValueError, match="thresholds"):
        MetricConfig(area_thresholds=(0.5, 1.0))
