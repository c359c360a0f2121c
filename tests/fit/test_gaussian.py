import math
import warnings

import numpy as np
import pytest
import torch

from erf_callback import ERFWarning, compute_erf, fit_gaussian
from tests.helpers.maps import gaussian_map, half_normal_floor, rotated_cov
from tests.helpers.nets import conv_net, stack_closed_form, uniform_stack


@pytest.mark.parametrize(
    ("shape", "mean", "sy", "sx", "theta"),
    [
        ((64, 64), (31.0, 33.5), 3.0, 6.0, 0.0),
        ((64, 96), (30.2, 50.7), 4.0, 9.0, 0.6),
        ((128, 128), (60.0, 70.0), 12.0, 5.0, -1.1),
        ((48, 80), (20.0, 41.0), 2.0, 2.0, 0.3),
    ],
)
@pytest.mark.parametrize("method", ["robust", "moments", "least_squares"])
def test_rotated_anisotropic_gaussian(shape, mean, sy, sx, theta, method):
    cov = rotated_cov(sy, sx, theta)
    fit = fit_gaussian(gaussian_map(shape, mean, cov), method)
    np.testing.assert_allclose(fit.mean, mean, atol=1e-3)
    np.testing.assert_allclose(fit.cov, cov, rtol=1e-3, atol=1e-3 * cov.max())
    np.testing.assert_allclose(fit.sigma, np.sqrt(np.diag(cov)), rtol=1e-3)
    np.testing.assert_allclose(sorted(fit.principal_sigmas), sorted([sy, sx]), rtol=1e-3)
    assert fit.r2 == pytest.approx(1.0, abs=1e-6)
    assert fit.amplitude == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize(
    ("shape", "sigma"), [((64, 64), 3.0), ((128, 128), 5.0), ((128, 96), 10.0), ((256, 256), 8.0)]
)
def test_robust_fit_ignores_a_floor(shape, sigma):
    # A uniform floor at 0.2% of the peak: plain moments are off by 60-1000% here.
    cov = rotated_cov(sigma, 1.5 * sigma, 0.4)
    center = (shape[0] / 2 + 0.3, shape[1] / 2 - 1.2)
    erf = gaussian_map(shape, center, cov) + 0.002
    robust = fit_gaussian(erf)
    moments = fit_gaussian(erf, "moments")
    truth = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(robust.sigma, truth, rtol=0.02)
    assert robust.floor == pytest.approx(0.002, rel=1e-3)
    assert np.max(np.abs(moments.sigma / truth - 1)) > 0.05  # the problem is real


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("depth", "k"), [(1, 3), (2, 3), (1, 5), (3, 5), (6, 3)])
def test_robust_fit_has_moment_semantics_on_shallow_stacks(dims, depth, k):
    # Shallow stacks are far from Gaussian; the sigmas must still be the exact std.
    size = 48 if dims < 3 else 24
    x = torch.zeros((1, 1) + (size,) * dims, dtype=torch.float64)
    x[(0, 0) + (size // 2,) * dims] = 1.0
    net = uniform_stack([k] * depth, dims=dims).double()
    with torch.no_grad():
        erf = net(x)[0, 0]
    var = stack_closed_form([k] * depth)[0].variance
    fit = fit_gaussian(erf)
    np.testing.assert_allclose(fit.sigma, math.sqrt(var), rtol=1e-3)


@pytest.mark.parametrize(("depth", "k"), [(2, 3), (2, 7), (3, 3), (4, 5), (5, 5), (8, 3), (10, 3)])
@pytest.mark.parametrize("margin", [1, 2, 3])
def test_a_stack_whose_field_nearly_fills_the_input_keeps_the_closed_form(depth, k, margin):
    # The input is the TRF plus a few zero pixels on each side, through compute_erf: fewer
    # than 8 pixels lie beyond the 5-sigma window, so the clean-map test reads the map's
    # zero frame. Before, these maps went to the floor + Gaussian model (2 layers of 7 x 7
    # on a 17 x 17 input came out 29% too wide in variance).
    size = depth * (k - 1) + 1 + 2 * margin
    net = uniform_stack([k] * depth).double()
    maps = compute_erf(net, torch.randn(2, 1, size, size, dtype=torch.float64))
    fit = fit_gaussian(next(iter(maps.values())).grad)
    var = stack_closed_form([k] * depth)[0].variance
    np.testing.assert_allclose(np.diag(fit.cov), [var, var], rtol=1e-9)
    assert fit.floor == 0.0


@pytest.mark.parametrize(
    ("kernels", "dilations", "strides", "size"),
    [
        ([5], [2], [1], 18),  # a dilated conv: a 5 x 5 lattice of taps, 2 apart
        ([3, 3], [2, 1], [2, 1], 15),
        ([3, 1, 3], [2, 1, 2], [2, 2, 1], 37),
        ([5, 1, 3, 5], [1, 1, 1, 1], [2, 1, 2, 1], 33),
    ],
)
def test_dilated_and_strided_stacks_on_small_inputs_keep_the_closed_form(
    kernels, dilations, strides, size
):
    # Lattice ERFs (holes between the taps) a few pixels smaller than the input: no pixel is
    # beyond the 5-sigma window, and the floor + Gaussian model of a lattice was 30-170% off.
    net = uniform_stack(kernels, dilations, strides).double()
    maps = compute_erf(net, torch.randn(2, 1, size, size, dtype=torch.float64))
    var = stack_closed_form(kernels, dilations, strides)[0].variance
    fit = fit_gaussian(next(iter(maps.values())).grad)
    np.testing.assert_allclose(np.diag(fit.cov), [var, var], rtol=1e-9)


@pytest.mark.parametrize(("ky", "kx"), [(3, 3), (5, 9), (7, 4)])
def test_one_box_with_a_one_pixel_margin_keeps_its_moments(ky, kx):
    # One convolution's ERF is flat; its zero frame marks the map as clean.
    fit = fit_gaussian(np.pad(np.ones((ky, kx)), 1))
    np.testing.assert_allclose(np.diag(fit.cov), [(ky**2 - 1) / 12, (kx**2 - 1) / 12], rtol=1e-9)
    assert fit.floor == 0.0


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize(("depth", "k", "margin"), [(2, 5, 1), (3, 3, 2), (2, 7, 3), (6, 3, 1)])
def test_stacks_that_nearly_fill_lines_and_volumes_keep_the_closed_form(dims, depth, k, margin):
    # 1-D: two zero pixels (the ends of the line) are the whole frame.
    size = depth * (k - 1) + 1 + 2 * margin
    x = torch.zeros((1, 1) + (size,) * dims, dtype=torch.float64)
    x[(0, 0) + (size // 2,) * dims] = 1.0
    with torch.no_grad():
        erf = uniform_stack([k] * depth, dims=dims).double()(x)[0, 0]
    var = stack_closed_form([k] * depth)[0].variance
    np.testing.assert_allclose(np.diag(fit_gaussian(erf).cov), [var] * dims, rtol=1e-9)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("depth", "k", "margin"), [(1, 9, 6), (2, 5, 9), (3, 3, 4), (6, 3, 3)])
@pytest.mark.parametrize("pedestal", [2e-3, 0.05, 1.0])
def test_a_constant_pedestal_keeps_a_stack_s_closed_form(dims, depth, k, margin, pedestal):
    # A conv stack's field on a constant pedestal (a unit that also sees the whole input
    # through a global path adds one gradient value to every pixel): the pedestal is the
    # floor, and the field keeps the moments it has without it, not the variance of the best
    # Gaussian through its shape (a 9-px box: 10.35 instead of 6.67). Off-centre by one.
    size = depth * (k - 1) + 1 + 2 * margin
    x = torch.zeros((1, 1) + (size,) * dims, dtype=torch.float64)
    x[(0, 0) + (size // 2 + 1,) * dims] = 1.0
    with torch.no_grad():
        erf = uniform_stack([k] * depth, dims=dims).double()(x)[0, 0].numpy()
    erf = erf / erf.max()
    var = stack_closed_form([k] * depth)[0].variance
    fit = fit_gaussian(erf + pedestal)
    np.testing.assert_allclose(np.diag(fit.cov), [var] * dims, rtol=1e-9)
    np.testing.assert_allclose(fit.mean, [size // 2 + 1] * dims, rtol=0, atol=1e-9)
    assert fit.floor == pytest.approx(pedestal, rel=1e-12)


@pytest.mark.parametrize(
    ("sigma", "mean"), [((4.0, 5.0, 4.5), (12.0, 12.0, 21.0)), ((5.0, 4.0, 4.0), (3.0, 12.0, 12.0))]
)
def test_a_clean_volume_cut_by_the_edge_is_recovered_to_rounding(sigma, mean):
    # A rotated 3-D Gaussian that fills a 24^3 map and is cut by one face: too few pixels
    # are far from it for the clean test, so it takes the model fit, on 3 x 3 x 3 block means
    # (12 per axis). Their own misfit to a Gaussian (~1e-8 of the total sum of squares here)
    # had to stay below 1e-8 for the exact refit on single pixels; it was 4.5e-4 off.
    c, s = math.cos(0.5), math.sin(0.5)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    cov = rot @ np.diag(np.square(sigma)) @ rot.T
    fit = fit_gaussian(gaussian_map((24, 24, 24), mean, cov))
    np.testing.assert_allclose(fit.cov, cov, atol=1e-9 * cov.max())


@pytest.mark.parametrize(("ky", "kx"), [(3, 3), (5, 5), (7, 3), (3, 9)])
def test_a_floor_far_below_every_pixel_is_no_floor(ky, kx):
    # A flat box against the bottom edge of a small map: few pixels are far from it, none of
    # them at the bottom. The model bends the flat top into a broad Gaussian on a floor far
    # below every pixel (for 5 x 5: variances 20x too large, floor -5 under a peak of 1).
    # Such a floor is no floor; the windowed moments are exact.
    fit = fit_gaussian(np.pad(np.ones((ky, kx)), ((1, 0), (1, 1))))
    np.testing.assert_allclose(np.diag(fit.cov), [(ky**2 - 1) / 12, (kx**2 - 1) / 12], rtol=1e-9)
    assert fit.floor == 0.0
    assert fit.converged


def test_windowed_moments_recognise_limit_cycles_longer_than_two():
    # A noisy ring on a floor: the window's edge pixels flip in and out and the iteration
    # settles into a 3-cycle (689.0, 690.6, 689.6 in variance), which a test for 2-cycles
    # alone ran into the iteration cap.
    from erf_callback.fit import gaussian as fg

    rng = np.random.default_rng(5)
    h, w = (int(v) for v in rng.integers(40, 200, 2))
    y, x = np.mgrid[:h, :w]
    ring = np.exp(-0.5 * (np.hypot(y - h / 2, x - w / 2) - min(h, w) / 4) ** 2 / 4)
    a = ring + 0.01 + 0.005 * rng.normal(0, 1, (h, w))
    coords = [np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)]
    result = fg._windowed_moments(a, coords, float(a.min()), float(a.max()), 5.0, 50, 1e-6)
    assert result is not None
    _, cov, _, converged = result
    assert converged
    # The moment semantics of a ring of radius R: per-axis variance R^2 / 2.
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), min(h, w) / 4 / math.sqrt(2), rtol=0.03)


@pytest.mark.parametrize(("noise", "tolerance"), [(0.01, 0.02), (0.05, 0.06)])
def test_noise_clipped_at_zero_is_noise_not_a_clean_map(noise, tolerance):
    # A ReLU of the gradient (reduction="replknet" on few samples) leaves noise clipped at
    # zero: half of the far pixels are exactly 0, which passed the clean-map test (plain
    # moments with the noise in: 84% and 205% too wide), and the MAD of the far pixels
    # collapsed to 0, so the floor came out as the zeros' level (the model was then dropped
    # for windowed moments on that floor).
    y, x = np.mgrid[:128, :128]
    erf = np.exp(-0.5 * (((y - 60) / 8.0) ** 2 + ((x - 70) / 10.0) ** 2))
    for seed in range(4):
        noisy = np.maximum(erf + np.random.default_rng(seed).normal(0, noise, erf.shape), 0)
        fit = fit_gaussian(noisy)
        np.testing.assert_allclose(fit.sigma, [8.0, 10.0], rtol=tolerance)
        # The floor is the clipped noise's mean, noise / sqrt(2 pi).
        assert fit.floor == pytest.approx(noise / math.sqrt(2 * math.pi), rel=0.2)


def test_floor_statistics_keep_the_scale_of_zero_inflated_noise():
    from erf_callback.fit.gaussian import _clipped_stats

    clipped = np.maximum(np.random.default_rng(0).normal(0, 1, 20000), 0)
    level, spread, kept, median = _clipped_stats(clipped)
    assert median == 0.0
    # The mean of clipped N(0, 1) is 1 / sqrt(2 pi); the clip at 5 spreads (2.5 sigma here)
    # drops the top 1.2% of the values, which holds it 2.4% below.
    assert level == pytest.approx(1 / math.sqrt(2 * math.pi), rel=0.04)
    assert spread == pytest.approx(0.6745 / 1.349, rel=0.05)  # upper quartile of N(0, 1)
    assert kept > 0.99 * clipped.size
    # Normal noise: the spread is its standard deviation (1.4826 MAD).
    assert _clipped_stats(np.random.default_rng(1).normal(3, 2, 20000))[1] == pytest.approx(
        2.0, rel=0.03
    )
    # Heavy-tailed values without a point mass (a ResNet's broad base far from the peak:
    # mostly faint, some bright) keep the MAD, though it is below half of the quartiles'
    # spread here: its clip drops more of the bright tail, and the windowed moments of such
    # maps stay where they were.
    rng = np.random.default_rng(2)
    tail = np.abs(np.concatenate([rng.normal(0, 0.1, 12000), rng.normal(0, 5, 8000)]))
    mad = 1.4826 * np.median(np.abs(tail - np.median(tail)))
    assert mad < 0.5 * (np.quantile(tail, 0.75) - np.quantile(tail, 0.25)) / 1.349
    assert _clipped_stats(tail)[1] == pytest.approx(mad, rel=1e-12)


def test_least_squares_lacks_moment_semantics_on_a_box():
    # Documented trade-off: why least squares is not the default.
    box = torch.zeros(32, 32, dtype=torch.float64)
    box[14:19, 14:19] = 1.0
    assert fit_gaussian(box).sigma[0] == pytest.approx(math.sqrt(2.0), rel=1e-4)
    assert abs(fit_gaussian(box, "least_squares").sigma[0] / math.sqrt(2.0) - 1) > 0.1


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 4)])
def test_an_empty_map_is_named_empty(shape):
    with pytest.warns(ERFWarning, match="the map is empty"):
        fit = fit_gaussian(np.zeros(shape))
    assert not fit.ok and fit.mean.shape == (len(shape),)


@pytest.mark.parametrize(
    ("erf", "error", "match"),
    [
        (torch.empty(8, 8, device="meta"), ValueError, "meta device"),
        (torch.ones(8, 8, dtype=torch.complex64), TypeError, "real-valued"),
        (np.ones((8, 8), dtype=np.complex128), TypeError, "real-valued"),
    ],
    ids=["meta", "complex-tensor", "complex-array"],
)
def test_maps_without_real_values_get_a_clear_error(erf, error, match):
    # Before: "Cannot copy out of meta tensor; no data!" from deep in torch, and complex maps
    # silently lost their imaginary part.
    with pytest.raises(error, match=match):
        fit_gaussian(erf)


def test_degenerate_maps_do_not_crash():
    with pytest.warns(ERFWarning, match="all zeros"):
        zero = fit_gaussian(torch.zeros(16, 16))
    assert not zero.ok and math.isnan(zero.r2) and "zeros" in zero.message

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixel = torch.zeros(16, 16)
        pixel[5, 7] = 3.0
        fit = fit_gaussian(pixel)
        np.testing.assert_allclose(fit.mean, [5.0, 7.0])
        np.testing.assert_allclose(fit.sigma, [0.0, 0.0], atol=1e-9)
        assert fit.r2 == pytest.approx(1.0)

        line = torch.zeros(16, 16)
        line[8, 2:13] = 1.0
        fit = fit_gaussian(line)
        assert fit.sigma[0] == pytest.approx(0.0, abs=1e-9)
        assert fit.sigma[1] == pytest.approx(math.sqrt((11**2 - 1) / 12))

    nan = torch.ones(8, 8)
    nan[0, 0] = float("nan")
    with pytest.warns(ERFWarning, match="NaN"):
        assert not fit_gaussian(nan).ok


def test_bad_arguments():
    with pytest.raises(ValueError, match="1-, 2- or 3-D"):
        fit_gaussian(torch.ones(2, 2, 2, 2))
    with pytest.raises(ValueError, match="unknown method"):
        fit_gaussian(torch.ones(4, 4), "gauss")


@pytest.mark.parametrize(
    ("center", "sigma"), [((20.0, 4.0), 3.0), ((33.0, 20.0), 2.5), ((5.0, 36.0), 3.0)]
)
def test_gaussian_tails_cut_by_the_image_edge_are_restored(center, sigma):
    # Plain moments see only the visible part (std 2-21% too small when cut at 1-3 sigma); the
    # edge evidence says the tail goes on, so the untruncated Gaussian is recovered, up to the
    # pixel sampling of a 2.5-3.6 px profile at the cut.
    cov = np.diag([sigma**2, (1.2 * sigma) ** 2])
    erf = gaussian_map((40, 40), center, cov)
    truth = np.sqrt(np.diag(cov))
    fit = fit_gaussian(erf)
    np.testing.assert_allclose(fit.sigma, truth, rtol=3e-3)
    np.testing.assert_allclose(fit.mean, center, atol=1e-2)
    visible = fit_gaussian(erf, "moments")
    assert np.max(np.abs(visible.sigma / truth - 1)) > 0.015


def test_a_band_cut_by_the_edges_is_not_extrapolated_as_a_gaussian():
    band = torch.zeros(16, 16, dtype=torch.float64)
    band[6:9, :] = 1.0  # uniform along x, across the whole map
    fit = fit_gaussian(band)
    assert fit.sigma[1] == pytest.approx(math.sqrt((16**2 - 1) / 12), rel=1e-9)
    assert fit.sigma[0] == pytest.approx(math.sqrt((3**2 - 1) / 12), rel=1e-9)
    assert fit_gaussian(torch.ones(5, 5)).sigma[0] == pytest.approx(math.sqrt(2.0))


def test_compact_map_touching_no_edge_keeps_its_exact_moments():
    box = torch.zeros(20, 20, dtype=torch.float64)
    box[1:19, 5:8] = 1.0  # one pixel clear of the top and bottom edges
    fit = fit_gaussian(box)
    assert fit.sigma[0] == pytest.approx(math.sqrt((18**2 - 1) / 12), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_floor_of_skewed_noise_is_its_mean_not_its_median(seed):
    # |gradient| noise is half-normal: its median is 15.5% below its mean, and it is the mean
    # that sits under the ERF. Measured here: floor within 0.4%, sigmas within 0.3% (about
    # 16 000 far pixels average the noise); a median-based floor is 15% low.
    mean_noise = 2e-3
    cov = rotated_cov(4.0, 6.0, 0.5)
    erf = gaussian_map((128, 128), (60.3, 66.8), cov)
    erf = erf + half_normal_floor(erf.shape, mean_noise, seed)
    fit = fit_gaussian(erf)
    assert fit.floor == pytest.approx(mean_noise, rel=0.02)
    np.testing.assert_allclose(fit.sigma, np.sqrt(np.diag(cov)), rtol=0.006)


@pytest.mark.parametrize("floor", [1e-2, 1e-3])
def test_floor_under_an_erf_that_nearly_fills_a_line(floor):
    # 60 pixels, sigma 7: no pixel lies beyond 5 sigma and only 4 beyond 4, so the floor comes
    # from the pixels beyond 3 sigma, where the Gaussian tail (1.1% of the peak at 3 sigma)
    # must be subtracted first. Measured: floor within 0.7%, sigma within 0.03%; without the
    # subtraction the floor is 26-260% high and sigma 2.3% low.
    sigma = 7.0
    erf = gaussian_map((60,), (29.5,), np.array([[sigma**2]])) + floor
    fit = fit_gaussian(erf)
    assert fit.floor == pytest.approx(floor, rel=0.02)
    np.testing.assert_allclose(fit.sigma, sigma, rtol=2e-3)


@pytest.mark.parametrize(("shape", "sigma"), [((48, 48), (7.0, 7.7)), ((40, 56), (6.0, 8.0))])
def test_floor_under_an_erf_that_nearly_fills_a_map(shape, sigma):
    # The map's half-diagonal is under 5 sigma, so the floor comes from the corners beyond
    # 4 sigma with the Gaussian tail subtracted. Measured: floor within 1.8%, sigmas within
    # 1% (the edge cuts 0.1% of the mass); without the subtraction the floor is 16-18% high.
    floor = 1e-3
    center = [(n - 1) / 2 for n in shape]
    erf = gaussian_map(shape, center, np.diag(np.square(sigma))) + floor
    fit = fit_gaussian(erf)
    assert fit.floor == pytest.approx(floor, rel=0.06)
    np.testing.assert_allclose(fit.sigma, sigma, rtol=0.015)


@pytest.mark.parametrize(("base_sigma", "base_height"), [(12.0, 0.05), (20.0, 0.02), (9.0, 0.1)])
@pytest.mark.parametrize("noise", [0.0, 2e-3])
def test_a_sharp_peak_on_a_broad_base_is_fitted_as_the_whole_distribution(
    base_sigma, base_height, noise
):
    # A ResNet's skip path at initialisation: a 1.5 px peak on a broad Gaussian base holding
    # far more of the mass. A floor + Gaussian model fits the peak and calls the base near
    # it a floor; the ERF is the whole distribution, whose variance is the mass-weighted mix
    # of the two. Measured: within 4% of the mix (the window trims the base's far tail);
    # the peak alone is 6-13x narrower.
    shape, centre = (160, 160), (79.0, 80.0)
    peak_sigma = 1.5
    erf = gaussian_map(shape, centre, np.eye(2) * peak_sigma**2)
    erf = erf + base_height * gaussian_map(shape, centre, np.eye(2) * base_sigma**2)
    erf = erf + np.random.default_rng(0).normal(0.0, noise, shape)
    m_peak, m_base = peak_sigma**2, base_height * base_sigma**2
    mix = math.sqrt((m_peak * peak_sigma**2 + m_base * base_sigma**2) / (m_peak + m_base))
    fit = fit_gaussian(erf)
    np.testing.assert_allclose(fit.sigma, mix, rtol=0.04)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("floor", [0.0, 0.03])
def test_a_noisy_gaussian_on_a_floor_keeps_the_model_fit(seed, floor):
    # The peak-on-a-base check must not take a plain Gaussian + floor + noise for one: the
    # result is the least-squares model (the floor is fitted, not the windowed moments').
    cov = rotated_cov(5.0, 8.0, 0.4)
    erf = gaussian_map((80, 96), (38.0, 50.0), cov) + floor
    erf = erf + np.random.default_rng(seed).normal(0.0, 0.03, erf.shape)
    fit = fit_gaussian(erf)
    assert fit.floor == pytest.approx(floor, abs=3e-3)
    np.testing.assert_allclose(fit.sigma, np.sqrt(np.diag(cov)), rtol=0.04)


def test_zero_mean_noise_skips_the_clean_path_check(monkeypatch):
    # The clean path needs far pixels that are zero to rounding; zero-mean noise leaves none,
    # so the plain moments that check would need are not computed at all (they were ~10% of
    # such a fit). A clean map still takes that path, exactly.
    from erf_callback.fit import gaussian as fg

    calls = []
    moments = fg._moments
    monkeypatch.setattr(fg, "_moments", lambda *a: calls.append(1) or moments(*a))
    cov = rotated_cov(5.0, 8.0, 0.4)
    clean = gaussian_map((80, 96), (38.0, 50.0), cov)
    noisy = clean + np.random.default_rng(0).normal(0.0, 0.01, clean.shape)
    fit = fit_gaussian(noisy)
    assert calls == []
    np.testing.assert_allclose(fit.cov, cov, rtol=0.03, atol=0.03 * cov.max())
    exact = fit_gaussian(clean)
    assert calls == [1]
    np.testing.assert_allclose(exact.cov, cov, rtol=0, atol=1e-6 * cov.max())


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 2000, 2001])
def test_fast_median_equals_numpy_median(n):
    from erf_callback.fit.gaussian import _median

    values = np.random.default_rng(n).normal(size=n)
    assert _median(values) == np.median(values)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_noisy_erf_filling_the_map_keeps_the_model_fit(seed):
    # No pixel lies 3 sigma from the ERF, so nothing tells the floor apart from a tail but
    # the model; the floor-corrected windowed moments would assume no floor at all. The model
    # is kept (its floor is fitted) unless it is far narrower than the plain moments.
    shape, sigma, floor = (48, 48), (12.0, 12.0), 0.01
    erf = gaussian_map(shape, (23.5, 23.5), np.diag(np.square(sigma))) + floor
    erf = erf + np.abs(np.random.default_rng(seed).normal(0.0, 0.005, shape))
    fit = fit_gaussian(erf)
    assert fit.floor == pytest.approx(floor + 0.005 * math.sqrt(2 / math.pi), abs=2e-3)
    np.testing.assert_allclose(fit.sigma, sigma, rtol=0.03)


@pytest.mark.parametrize("shape", [(64, 64), (129, 161)])
def test_r2_is_the_coefficient_of_determination_of_the_fitted_model(shape):
    # R^2 may come from the model fit's last evaluation (small maps) or from a fresh one
    # (large maps): either way it is 1 - RSS / TSS of floor + amplitude * Gaussian, with
    # the amplitude that is least squares given the floor.
    rng = np.random.default_rng(3)
    cov = rotated_cov(shape[0] / 12, shape[1] / 9, 0.4)
    erf = gaussian_map(shape, (shape[0] / 2 - 3, shape[1] / 2 + 5), cov)
    erf = erf + 0.01 + np.abs(rng.normal(0.0, 0.01, shape))
    fit = fit_gaussian(erf)
    g = gaussian_map(shape, fit.mean, fit.cov)
    r = erf - fit.floor
    amplitude = float(np.sum(r * g) / np.sum(g * g))
    rss = float(np.sum((r - amplitude * g) ** 2))
    tss = float(np.sum((erf - erf.mean()) ** 2))
    assert fit.amplitude == pytest.approx(amplitude, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0 - rss / tss, abs=1e-12)


def test_huge_finite_maps_are_not_taken_for_non_finite_ones():
    # The finite check reads the sum first; a sum that overflows must not fail a finite map,
    # and a map whose values cancel to a zero sum is not "all zeros".
    y, x = np.mgrid[:32, :32]
    g = np.exp(-((y - 15.0) ** 2 + (x - 16.0) ** 2) / 18.0)
    huge = 4e306 * g
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the sum and the moments overflow
        assert not np.isfinite(huge.sum()) and np.all(np.isfinite(huge))
        assert "NaN or Inf" not in fit_gaussian(huge).message
    signed = np.zeros((8, 8))
    signed[2, 2], signed[5, 5] = 1.0, -1.0
    assert "zeros" not in fit_gaussian(signed).message
    inf = np.ones((8, 8))
    inf[3, 3] = np.inf
    with pytest.warns(ERFWarning, match="NaN or Inf"):
        assert not fit_gaussian(inf).ok


def test_the_message_names_the_iteration_that_did_not_converge(monkeypatch) -> None:
    from erf_callback.fit import gauss_newton
    from erf_callback.fit import gaussian as fit_module

    # A sharp peak on a broad base ends in the windowed moments: their cap is max_iter.
    shape, centre = (120, 120), (59.0, 60.0)
    spike = gaussian_map(shape, centre, np.eye(2) * 1.5**2)
    spike = spike + 0.2 * gaussian_map(shape, centre, np.eye(2) * 20.0**2)
    spike = spike + np.random.default_rng(0).normal(0.0, 0.002, shape)
    fit = fit_gaussian(spike, max_iter=2)
    assert not fit.converged
    assert fit.message == "robust fit: the windowed moments did not converge in 2 iterations"
    # A noisy Gaussian ends in the model fit: its cap is the Levenberg-Marquardt one.
    monkeypatch.setattr(gauss_newton, "MODEL_MAX_ITER", 1)
    monkeypatch.setattr(fit_module, "MODEL_MAX_ITER", 1)
    noisy = gaussian_map((64, 64), (30.0, 33.0), rotated_cov(6.0, 4.0, 0.4))
    noisy = noisy + 0.02 + half_normal_floor((64, 64), 0.02)
    fit = fit_gaussian(noisy)
    assert not fit.converged
    assert fit.message == (
        "robust fit: the floor + Gaussian model fit did not converge in 1 iterations"
    )


@pytest.mark.parametrize(
    ("spec", "size"),
    [
        ([(4, 7, 1, 1, "gelu", False), (4, 5, 2, 1, "relu", False), (4, 5, 1, 2, "id", False)], 24),
        (
            [
                (8, 5, 1, 1, "relu", False),
                (8, 5, 2, 2, "relu", False),
                (8, 1, 1, 1, "id", True),
                (4, 7, 1, 1, "id", True),
            ],
            24,
        ),
        (
            [
                (8, 3, 1, 1, "id", False),
                (8, 3, 2, 1, "id", False),
                (4, 1, 1, 2, "gelu", False),
                (4, 3, 2, 1, "gelu", False),
                (4, 7, 2, 1, "id", True),
            ],
            32,
        ),
        ([(8, 7, 2, 1, "id", False), (4, 7, 1, 2, "gelu", True), (8, 3, 1, 2, "id", False)], 48),
    ],
)
def test_small_inputs_give_the_erf_size_that_a_large_input_shows(spec, size):
    # Random conv nets whose field is about the size of a 24-48 px input: their ERFs are
    # flat-topped there, and the floor + Gaussian model bent that top into a broad Gaussian on
    # a floor far below every pixel: sigma 40-330% larger than the same net's on a 256 px
    # input, where the whole ERF is inside. Those floors are refused (the windowed moments
    # stand), and maps with a zero frame are clean.
    torch.manual_seed(0)
    net = conv_net(spec)
    generator = torch.Generator().manual_seed(1)
    small = compute_erf(net, torch.randn(8, 3, size, size, generator=generator))["output"]
    large = compute_erf(net, torch.randn(8, 3, 256, 256, generator=generator))["output"]
    np.testing.assert_allclose(small.gaussian.sigma, large.gaussian.sigma, rtol=0.1)


@pytest.mark.parametrize(
    "erf",
    [
        np.full((20, 30), 0.3),
        np.full((7, 11, 5), 1.0 / 3.0),
        np.full(13, 1e-20),
        np.full((9, 9), 7.0),
    ],
    ids=["0.3", "1/3 in 3-D", "1e-20 on a line", "7.0"],
)
def test_a_constant_map_has_no_r2(erf):
    # Every pixel alike (a unit behind a global pooling sees the whole input alike): the box's
    # moments, and R² undefined. 0.3 on 20 x 30 gave -4.5e14, a ratio of rounding errors.
    fit = fit_gaussian(erf)
    assert math.isnan(fit.r2)
    sides = np.array(erf.shape, dtype=float)
    np.testing.assert_allclose(np.diag(fit.cov), (sides**2 - 1) / 12, rtol=1e-12)


@pytest.mark.parametrize("seed", [3, 5])
def test_a_noisy_3d_map_fitted_in_blocks_is_the_least_squares_fit(seed):
    # 26 x 17 x 19 voxels (above the pixel-by-pixel limit), a rotated Gaussian, 2% noise: with
    # 1600 blocks (12 per axis, about one sigma) the block fit was up to 3.4% of the largest
    # variance away from the maximum-likelihood fit; with 8000 (20 per axis) within 0.25%.
    from scipy.optimize import least_squares

    cov = np.array([[15.1, 4.6, -2.1], [4.6, 10.0, 5.8], [-2.1, 5.8, 22.4]])
    mean, shape = np.array([15.4, 4.8, 17.3]), (26, 17, 19)
    erf = gaussian_map(shape, mean, cov) + np.random.default_rng(seed).normal(0, 0.02, shape)
    tri = np.tril_indices(3)

    def residual(p: np.ndarray) -> np.ndarray:
        low = np.zeros((3, 3))
        low[tri] = p[4:10]
        return (p[10] + p[0] * gaussian_map(shape, p[1:4], low @ low.T) - erf).ravel()

    start = np.concatenate([[1.0], mean, np.linalg.cholesky(cov)[tri], [0.0]])
    low = np.zeros((3, 3))
    low[tri] = least_squares(residual, start).x[4:10]
    best = low @ low.T
    fit = fit_gaussian(erf)
    assert np.max(np.abs(fit.cov - best)) < 5e-3 * np.max(np.diag(best))


@pytest.mark.parametrize("shape", [(400,), (64, 64), (16, 20, 24)])
def test_pixel_noise_variance_reads_the_noise_not_the_map(shape):
    # Independent normal noise on a smooth map: the median absolute second difference gives
    # its variance (within 20% on these 400-7680 pixels); a noiseless box gives 0, its edges
    # being a minority of the second differences along every axis taken together.
    from erf_callback.fit import gaussian as fg

    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    smooth = np.exp(
        -sum((g - n / 2) ** 2 / (2 * (n / 4) ** 2) for g, n in zip(grids, shape, strict=True))
    )
    noise = np.random.default_rng(0).normal(0.0, 0.03, shape)
    assert fg._pixel_noise_variance(smooth + noise) == pytest.approx(0.03**2, rel=0.2)
    side = 9 if len(shape) == 1 else 3  # a line's box needs more inside than edge
    box = np.pad(np.ones([side] * len(shape)), [(1, 0)] + [(1, 1)] * (len(shape) - 1))
    assert fg._pixel_noise_variance(box) == 0.0


def test_the_f_quantile_is_student_t_squared_and_errs_low():
    from scipy.stats import f

    from erf_callback.fit import gaussian as fg

    for dof in (5, 8, 13, 30, 100, 10_000):
        exact = f.ppf(0.99, 1, dof)
        assert fg._f1_quantile_99(dof) <= exact
        assert fg._f1_quantile_99(dof) == pytest.approx(exact, rel=0.06 if dof < 13 else 0.005)


@pytest.mark.parametrize("sigma", [1.0, 1.68, 2.5])
@pytest.mark.parametrize("depth", [4.4, 4.6, 4.8, 5.0])
def test_a_narrow_clean_gaussian_grazing_the_edge_is_exact(sigma, depth):
    # The edge cuts 3e-7 to 5e-6 of its mass. The per-axis edge correction of the moments,
    # kept for axis-aligned Gaussians below a cut of 1e-5, is continuous: on sampled tails of
    # a 1-1.7 px Gaussian it left up to 9e-6 of the variance. Narrow ones take the model fit.
    y, x = np.mgrid[:81, :120]
    mx = depth * sigma - 0.5  # the edge is at -0.5
    a = np.exp(-0.5 * ((y - 40.0) ** 2 / 4.0 + (x - mx) ** 2 / sigma**2))
    fit = fit_gaussian(a)
    np.testing.assert_allclose(np.diag(fit.cov), [4.0, sigma**2], rtol=1e-9)


@pytest.mark.parametrize("shape", [(1, 25), (25, 1), (1, 1, 25), (1, 25, 1)])
def test_one_pixel_axes_are_lines_not_unknown_widths(shape):
    # An axis of one pixel carries no extent: variance 0 there and the fit of the map without
    # it. Before, a noisy line given as 1 x 25 kept the start's width along the first axis
    # (sigma 0.5), and a clean 1 x 5 bump was fitted as a Gaussian on a negative floor.
    line = np.exp(-0.5 * (np.arange(25) - 11.2) ** 2 / 12.2**2)
    line = line + np.random.default_rng(0).normal(0.0, 0.006, 25)
    along = shape.index(25)
    one_d = fit_gaussian(line)
    fit = fit_gaussian(line.reshape(shape))
    want_cov = np.zeros((len(shape), len(shape)))
    want_cov[along, along] = one_d.cov[0, 0]
    want_mean = np.zeros(len(shape))
    want_mean[along] = one_d.mean[0]
    np.testing.assert_array_equal(fit.cov, want_cov)
    np.testing.assert_array_equal(fit.mean, want_mean)
    assert (fit.floor, fit.r2) == (one_d.floor, one_d.r2)
    bump = fit_gaussian(np.array([[0.0, 1.0, 3.0, 1.0, 0.0]]))
    np.testing.assert_allclose(np.diag(bump.cov), [0.0, 0.4], atol=1e-12)  # the moments
    assert bump.floor == 0.0


def test_a_failed_fit_of_a_one_pixel_axis_map_warns_from_the_callers_line():
    with pytest.warns(ERFWarning, match="all zeros") as caught:
        fit = fit_gaussian(np.zeros((1, 5)))
    assert caught[0].filename == __file__
    assert fit.mean.shape == (2,) and not fit.ok
