"""Gaussian fit of an ERF map with moment semantics and robustness to a floor, noise and cuts.

Three methods, one result type (:class:`GaussianFit`):

* ``"robust"`` (default). On a clean map (the pixels far outside the plain-moment window are
  zero to rounding) the plain moments are returned, in one pass, exact for Gaussians and
  compact maps alike; where a Gaussian tail runs into the image edge, the variance the edge
  cut off is restored per axis in proportion to the mass found at the edge, and a clean map
  that *is* a Gaussian cut by the edge is refitted as one (the model fit below, taken when
  it matches the map to rounding). On a map with a pedestal or noise: least squares of
  ``floor + amplitude * Gaussian`` on the pixels that exist (block means of a box around the
  ERF, Levenberg-Marquardt from a log-linear start, see :mod:`~erf_callback.fit.gauss_newton`),
  so a cut by the image edge costs nothing; floor-corrected windowed moments are the fallback
  for maps where that fit fails.
* ``"moments"``: plain moments of the whole map, no floor, no window.
* ``"least_squares"``: a least-squares fit of ``floor + amplitude * Gaussian(mean, cov)`` to
  the whole map with scipy, seeded by ``"robust"`` (needs scipy). This is what most tools do;
  note it does *not* give moment semantics on maps that are not yet Gaussian (shallow stacks).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from erf_callback.fit import kernels
from erf_callback.fit.gauss_newton import MODEL_MAX_ITER, GaussianModelFit, fit_floor_gaussian
from erf_callback.fit.grid import (
    bounding_box,
    determinant,
    mahalanobis_sq,
    open_grid,
    sum_of_products,
    unit_gaussian,
)
from erf_callback.fit.metrics import axis_mass
from erf_callback.fit.truncation import chi2_cdf, restore_edge_cut, truncated_variance_factor
from erf_callback.warnings import ERFWarning

__all__ = ["FitMethod", "GaussianFit", "fit_gaussian"]

FitMethod = Literal["robust", "moments", "least_squares"]

# Eigenvalues of the covariance below this are treated as zero width when the model is
# evaluated: a single-pixel or one-pixel-wide map then fits exactly instead of dividing by 0.
_MIN_EVAL_VARIANCE = 1e-6
# The search window never gets narrower than a Gaussian of this variance (half a pixel std),
# so sub-pixel ERFs are still seen whole.
_MIN_WINDOW_VARIANCE = 0.25
# Enough far-away pixels to take a median from; fewer and the floor is assumed to be zero.
_MIN_FLOOR_PIXELS = 8
# ... on a line, whose far pixels are its two ends: 8 of them beyond 3 sigma need 14 px more
# than the ERF's +-3 sigma (a 0.8 px ERF on a 10 px line had 4, took the ERF to fill the line
# and came out as the windowed moments with the floor in them, 1.4 px).
_MIN_LINE_PIXELS = 4
# Share of neighbouring far pixels of which one is quiet and the other not, above which the
# quiet ones are clipped noise rather than the zero surroundings of a clean map.
_MAX_MIXED_PAIRS = 0.25
# The floor under the windowed moments is taken on a regular subsample of at most this many
# pixels (its error, times the window's area, goes straight into the variance).
_FLOOR_SAMPLE = 32768
# The checks and the model fit's starting floor read a sparser one (the model fits its own).
_CHECK_SAMPLE = 8192
# A far-pixel median at most this fraction of the peak counts as "no pedestal".
_CLEAN_FLOOR = 1e-6
# The clean path tries the model fit when the edge-corrected Gaussian has more than this
# outside the map, and takes it when the map is that Gaussian to rounding (residual sum of
# squares over total sum of squares at most _EXACT_RESIDUAL).
_EDGE_CUT = 1e-8
# ... or, for an axis-aligned one whose sigmas are all at least _EDGE_CUT_WIDE pixels, this:
# the per-axis edge correction leaves at most 1.1e-7 of the variance there (3 px, cut 5e-6),
# but up to 9e-6 on a 1 px Gaussian (cut 5e-6) and 2e-6 on a 1.7 px one, whose sampled
# tails the continuous correction does not describe to that precision.
_EDGE_CUT_ALIGNED = 1e-5
_EDGE_CUT_WIDE = 3.0
_EXACT_RESIDUAL = 1e-12
# A binned model fit this close to the map (residual / total sum of squares) is refitted on
# point samples, which are exact (and kept if it fits better). Per number of axes: the block
# mean's own misfit to a Gaussian is below 1e-10 in 1-D and 2-D (at least 40 blocks per axis
# of the box, so blocks are at most a quarter sigma) but up to ~3e-6 in 3-D (12 per axis
# before 3-D got 8000 blocks, 20 per axis; the threshold stays, it is only a bound).
_NOISELESS = {1: 1e-8, 2: 1e-8, 3: 1e-5}
# A model fit that puts more than this share of its Gaussian outside the map is not trusted.
_MAX_OUTSIDE = 0.9
# A model fit whose variance is below this share of the windowed moments' (geometric mean
# over axes) fitted a peak, not the map: a Gaussian plus floor or noise, even cut by the edge,
# keeps the ratio near 1 (a cut narrows the moments, never widens them 2x).
_SPIKE_VARIANCE_RATIO = 0.5
# A model floor more than this share of the map's range below both its minimum and zero is
# not a floor: the model has bent a flat top into a broad Gaussian on a negative pedestal (a
# box against an edge, the ERF of a deep net filling a small input), and its sigma is far
# too large.
_FLOOR_BELOW_MIN = 0.05
# A floor held at zero needs a map that the free fit explains to at least this share of its
# variance (R²): Gaussians wider than a line under up to 5% noise had 0.87-1.0; the cut ERFs
# of random 1-D conv nets on short inputs (irregular, striped by strides) 0.05-0.58, and
# held at zero their sigma came out further from the whole ERF's than the windowed
# moments' (up to 2.6x too wide).
_HELD_MIN_R2 = 0.8
# A residual variance above this many times the pixels' own noise variance is a misfit of
# the model, not noise. The median of a few dozen second differences estimates the noise to
# within a factor of 2-3 in variance (an 18 px line under 1.75% noise gave a ratio of 6.2);
# a noiseless flat top has ratio infinity.
_MISFIT_RATIO = 16.0
# A map whose spread (sum of squared deviations) is at most this share of its sum of squares
# is constant to rounding: its R² is NaN, not the ratio of two rounding errors.
_CONSTANT_SPREAD = 1e-12
# Relative change per iteration below which a noise-driven limit cycle is accepted.
_STALL_TOL = 1e-3
# Longest limit cycle of the windowed moments that is recognised as one (in states).
_MAX_CYCLE = 6


@dataclass(frozen=True)
class GaussianFit:
    """A Gaussian fitted to an ERF map.

    Coordinates are input-pixel indices in the map's axis order ((x,), (y, x) or (z, y, x)).

    Attributes:
        mean: centre, shape (d,).
        cov: covariance, shape (d, d): rotated ERFs have non-zero off-diagonal terms.
        floor: constant pedestal removed before the moments (0 for ``"moments"``).
        amplitude: peak height of the Gaussian above the floor (least-squares given the shape).
        r2: coefficient of determination of ``floor + amplitude * gaussian`` against the map
            (1.0 for a perfect Gaussian; NaN for a constant map).
        method: the method that produced the fit.
        converged: whether the iteration met its tolerance.
        message: empty when all went well, else what went wrong or what is degenerate.

    Example:
        >>> import numpy as np
        >>> y, x = np.mgrid[:32, :32]
        >>> fit = fit_gaussian(np.exp(-((y - 15) ** 2 + (x - 16) ** 2) / (2 * 3.0**2)))
        >>> np.round(fit.sigma, 3).tolist(), round(fit.r2, 6)
        ([3.0, 3.0], 1.0)
    """

    mean: np.ndarray
    cov: np.ndarray
    floor: float = 0.0
    amplitude: float = float("nan")
    r2: float = float("nan")
    method: str = "robust"
    converged: bool = True
    message: str = ""
    _extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def sigma(self) -> np.ndarray:
        """Per-axis standard deviation, ``sqrt(diag(cov))``."""
        return np.sqrt(np.clip(np.diag(self.cov), 0.0, None))

    @property
    def principal_sigmas(self) -> np.ndarray:
        """Standard deviations along the principal axes, largest first."""
        eig = np.linalg.eigvalsh(self.cov) if self.ok else np.full(len(self.mean), np.nan)
        return np.sqrt(np.clip(eig, 0.0, None))[::-1]

    @property
    def ok(self) -> bool:
        """True when mean and covariance are finite."""
        return bool(np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.cov)))

    def mahalanobis_sq(self, coords: list[np.ndarray]) -> np.ndarray:
        """Squared Mahalanobis distance on the open grid ``coords`` (one 1-D array per axis)."""
        return mahalanobis_sq(coords, self.mean, _inverse(self.cov, _MIN_EVAL_VARIANCE))


def fit_gaussian(
    erf: torch.Tensor | np.ndarray,
    method: FitMethod = "robust",
    *,
    window: float = 5.0,
    max_iter: int = 50,
    tol: float = 1e-6,
) -> GaussianFit:
    """Fit a Gaussian to a non-negative 1-, 2- or 3-D map.

    Args:
        erf: the map (for example ``ERFMap.grad``).
        method: ``"robust"`` (floor-corrected windowed moments), ``"moments"`` or
            ``"least_squares"``; see the module docstring.
        window: Mahalanobis radius of the moment window of ``"robust"``. The part of a
            Gaussian's variance the window cuts is corrected in proportion to the mass found
            in its outermost ring (exact for Gaussians, no change for compact maps).
        max_iter: iteration cap of ``"robust"``.
        tol: convergence tolerance (relative change of mean and covariance).

    Returns:
        The fit. Degenerate maps never raise: an empty, all-zero or non-finite map gives NaN
        fields, a message and an :class:`ERFWarning`; a single pixel or a line gives zero
        variance along the degenerate directions.

    Raises:
        ValueError: the map has other than 1-3 axes, is a tensor on the meta device, or the
            method is unknown.
        TypeError: the map is complex.

    Example:
        >>> import torch
        >>> from erf_callback import fit_gaussian
        >>> fit = fit_gaussian(torch.ones(5, 5))  # uniform 5x5 box: variance (5^2 - 1) / 12
        >>> fit.cov.round(6).tolist()
        [[2.0, 0.0], [0.0, 2.0]]
    """
    a = _as_float64(erf)
    if a.ndim not in (1, 2, 3):
        raise ValueError(
            f"fit_gaussian takes a 1-, 2- or 3-D map; got shape {tuple(a.shape)}. "
            "Reduce batch and channel dimensions first (ERFMap.grad already is)."
        )
    if method not in ("robust", "moments", "least_squares"):
        raise ValueError(f"unknown method {method!r}; use 'robust', 'moments' or 'least_squares'.")
    d = a.ndim
    if a.size == 0:
        return _failed(d, method, f"the map is empty (shape {tuple(a.shape)})")
    kept = [axis for axis, n in enumerate(a.shape) if n > 1]
    if 0 < len(kept) < d:
        # An axis of one pixel says nothing of the ERF's extent along it: the map is a line
        # (or a plane) there, variance 0, as its moments say. Fitted as it is, the model kept
        # its start's width along it (sigma 0.5), and a 1 x 5 bump got the 5-pixel line's
        # moments only once the axis was gone.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inner = fit_gaussian(
                a.reshape([a.shape[axis] for axis in kept]),
                method,
                window=window,
                max_iter=max_iter,
                tol=tol,
            )
        for w in caught:  # from the caller's line, as the map's own warnings would be
            warnings.warn(w.message, w.category, stacklevel=2)
        return _with_single_pixel_axes(inner, kept, d)
    # One pass for the common case: a finite, non-zero sum settles both checks.
    total = float(a.sum())
    if not math.isfinite(total) and not np.all(np.isfinite(a)):
        return _failed(d, method, "the map contains NaN or Inf")
    if total == 0.0 and not np.any(a):
        return _failed(d, method, "the map is all zeros")
    coords = open_grid(a.shape)

    if method == "moments":
        m0, mean, cov = _moments(a, coords)
        if not m0 > 0:
            return _failed(d, method, "the map has no positive mass")
        return _finish(a, coords, mean, cov, 0.0, method, True, "")

    robust = _fit_robust(a, coords, window, max_iter, tol)
    if robust is None:
        return _failed(d, method, "the map has no positive mass above its floor")
    mean, cov, floor, converged, on_map, stage = robust
    msg = ""
    if not converged:
        cap = max_iter if stage == _WINDOWED else MODEL_MAX_ITER
        msg = f"robust fit: the {stage} did not converge in {cap} iterations"
    if method == "robust":
        return _finish(a, coords, mean, cov, floor, method, converged, msg, on_map)
    return _fit_least_squares(a, coords, mean, cov, floor)


# --------------------------------------------------------------------------------------------
# robust: floor + windowed moments


def _fit_robust(
    a: np.ndarray, coords: list[np.ndarray], window: float, max_iter: int, tol: float
) -> _Robust | None:
    d = a.ndim
    sample_idx, sample_vals = _subsample(a, _CHECK_SAMPLE)
    peak, low = float(a.max()), float(a.min())
    if low == peak:
        # A constant map (a unit behind a global pooling sees every pixel alike): the whole
        # map is the distribution, a box; no floor can be told from it.
        _, mean, cov = _moments(a, coords)
        return mean, cov, 0.0, True, None, _PLAIN
    # A clean map (no pedestal, no noise): the plain moments, exact.
    clean, plain = _clean_fit(a, coords, sample_idx, sample_vals, window, low, peak)
    if clean is not None:
        return clean
    if low > _CLEAN_FLOOR * peak:
        # Every pixel is above zero. If the lowest value is the whole surround, exactly, the
        # map is a clean one on a constant pedestal (a conv stack's field plus one gradient
        # value that a global path adds to every pixel): without the pedestal it takes the
        # clean path, so the pedestal changes no moment (the best Gaussian through a 9-px box
        # would say 10.35, not 6.67). Exactly, not to rounding: a Gaussian's tails never
        # reach one value, and the floor + Gaussian model below is exact for those. A
        # symmetric Gaussian's corners (or a line's two ends) do share its lowest value: the
        # surround must be more pixels than those.
        shifted, _ = _clean_fit(
            a,
            coords,
            sample_idx,
            sample_vals,
            window,
            low,
            peak,
            clean_floor=0.0,
            shift=low,
            min_quiet=4 if d == 1 else _MIN_FLOOR_PIXELS + 1,
        )
        if shifted is not None:
            mean, cov, _, converged, on_map, stage = shifted
            return mean, cov, low, converged, on_map, stage

    init = _half_max_init(a, coords, low, peak)
    if init is None:
        return None
    mean, cov = init
    # A pedestal or noise: least squares of floor + amplitude * Gaussian on the pixels that
    # exist (so a cut by the image edge costs nothing), seeded by the half-maximum region.
    pedestal = _far_floor(
        sample_idx, sample_vals, mean, _inverse(cov, _MIN_WINDOW_VARIANCE), window, peak
    )
    # Far pixels that are one value to within rounding and Gaussian tails (a pedestal without
    # noise) call for point samples, which are exact; noise for block means, which average it
    # like the full map would. Without noise the pedestal is the far pixels' median (most of
    # them are that one value; their mean carries the tails).
    noiseless = pedestal[2] > 0 and pedestal[1] <= _CLEAN_FLOOR * peak
    floor = pedestal[3] if noiseless else pedestal[0]
    model = fit_floor_gaussian(a, mean, cov, floor, max(peak - floor, 1e-300), binned=not noiseless)
    if model is not None and not model.point_samples and model.residual <= _NOISELESS[d]:
        # Floor + Gaussian with no noise: block means cost ~1e-6 of exactness, point samples
        # nothing; one more round from here converges in an iteration or two.
        exact = fit_floor_gaussian(a, model.mean, model.cov, model.floor, model.amplitude)
        if exact is not None and exact.residual <= model.residual:
            model = exact
    if model is not None and not _plausible(model, a.shape, low, peak):
        model = _floor_held_at_zero(a, coords, model, low, peak, binned=not noiseless)
        if model is not None and not _plausible(model, a.shape, low, peak):
            model = None
    if model is None:
        moments = _windowed_moments(a, coords, low, peak, window, max_iter, tol)
        return None if moments is None else (*moments, None, _WINDOWED)
    if _floors_agree(model, pedestal, a.shape):
        return _from_model(model)
    # No pixel is far from the ERF (it fills the map): the windowed moments below would use a
    # zero floor and a window wider than the map, so the plain moments bound their variance
    # from above. A model not far narrower than those is not a peak on a base.
    if pedestal[2] == 0:
        plain_cov = _plain_cov(a, coords) if plain is None else plain[2]
        if np.all(np.isfinite(plain_cov)) and not _narrower(
            model.cov, plain_cov, _SPIKE_VARIANCE_RATIO
        ):
            return _from_model(model)
    # The model's floor is not the far pixels' level: it may have fitted a sharp peak on a
    # broad base (a ResNet's skip path at initialisation) and called the base a floor. If it
    # is far narrower than the floor-corrected windowed moments, those describe the ERF (the
    # whole distribution); else the model stands.
    moments = _windowed_moments(a, coords, low, peak, window, max_iter, tol)
    if moments is not None and _narrower(model.cov, moments[1], _SPIKE_VARIANCE_RATIO):
        return (*moments, None, _WINDOWED)
    return _from_model(model)


def _clean_fit(
    a: np.ndarray,
    coords: list[np.ndarray],
    sample_idx: list[np.ndarray],
    sample_vals: np.ndarray,
    window: float,
    low: float,
    peak: float,
    clean_floor: float = _CLEAN_FLOOR,
    shift: float = 0.0,
    min_quiet: int | None = None,
) -> tuple[_Robust | None, tuple[float, np.ndarray, np.ndarray] | None]:
    """The fast exact path: when the pixels far outside the plain-moment window are zero to
    rounding (no pedestal, no noise), the plain moments are the answer (exact for Gaussians
    and compact maps alike). Returns ``(result or None, plain moments (m0, mean, cov) or
    None)``: the moments where they were computed, for the caller to reuse.

    ``sample_idx`` / ``sample_vals``: the pixels the clean test looks at (see
    :func:`_subsample`); ``low`` and ``peak``: the map's minimum and maximum; ``clean_floor``:
    the fraction of the peak that counts as zero; ``shift``: a constant taken off the map
    first (after the quick test, which costs nothing when it fails); ``min_quiet``: sampled
    pixels at most that level the quick test needs (default: 2 on a line, else 4).
    """
    d = a.ndim
    if shift:
        sample_vals, low, peak = sample_vals - shift, low - shift, peak - shift
    level = clean_floor * peak
    # A map whose every pixel is above the level (a positive floor, |gradient| noise) cannot
    # take the path. It needs pixels at most ``level``: half of at least _MIN_FLOOR_PIXELS far
    # ones, or a whole outer frame (the two ends of a line; at least 8 pixels of a map). A
    # sample with fewer such pixels in all (zero-mean noise has almost none) cannot take it,
    # whatever its moments, so they are not computed for the check.
    quiet = None if low > level else np.abs(sample_vals) <= level
    needed = (2 if d == 1 else 4) if min_quiet is None else min_quiet
    if quiet is None or np.count_nonzero(quiet) < needed:
        return None, None
    if shift:
        a = a - shift
    plain = m0, mean, cov = _moments(a, coords)
    if not (m0 > 0 and np.all(np.isfinite(cov))):
        return None, plain
    d2 = mahalanobis_sq(sample_idx, mean, _inverse(cov, _MIN_WINDOW_VARIANCE))
    if not _far_is_quiet(a, d2, quiet, window, level):
        return None, plain
    mean, cov = restore_edge_cut(a, m0, mean, cov)
    # The edge correction is per axis and continuous: good to 1e-7 of the variance down to a
    # deeper cut for axis-aligned Gaussians of 3 px and more than for rotated or narrower ones.
    rotated = abs(cov[0, 1]) > 1e-9 * math.sqrt(cov[0, 0] * cov[1, 1]) if d > 1 else False
    narrow = min(cov.diagonal().tolist()) < _EDGE_CUT_WIDE**2
    cut = 1.0 - float(np.prod(axis_mass(mean, cov, a.shape)))
    if cut > (_EDGE_CUT if rotated or narrow else _EDGE_CUT_ALIGNED):
        # The edge cuts the map. If it is a Gaussian (the model fits to rounding), the model
        # fit on the visible pixels recovers it whole, however deep the cut; anything else
        # keeps its (edge-corrected) moments. The floor is held at zero, which a clean map's
        # is: free, it let a Gaussian on a negative floor pass through a 5-pixel bump
        # [0, 1, 3, 1, 0] exactly (variance 0.467 for the moments' 0.4).
        model = fit_floor_gaussian(a, mean, cov, 0.0, peak, fit_floor=False)
        if model is not None and model.residual <= _EXACT_RESIDUAL:
            return _from_model(model), plain
    return (mean, cov, 0.0, True, None, _PLAIN), plain


def _far_is_quiet(
    a: np.ndarray, d2: np.ndarray, quiet: np.ndarray, window: float, level: float
) -> bool:
    """Whether the pixels far from the ERF are zero to rounding (``d2``: the squared
    Mahalanobis distance of the sampled pixels from the plain moments; ``quiet``: which of
    them are at most ``level``, the clean level).

    Far means beyond the window, where the test is that the median of ``|far|`` is at most
    the level (counted rather than sorted) over at least ``_MIN_FLOOR_PIXELS`` pixels and,
    when more than a quarter of them are above it, that the zeros form regions
    (:func:`_zeros_form_regions`). When
    fewer lie that far (an ERF that nearly fills the map, such as a conv stack whose field is
    a few pixels smaller than the input), the map's outer frame (its first and last row or
    column along every axis) must be zero to rounding: noise, a pedestal or an ERF cut by
    the edge leave none of it at zero.
    """
    far = d2 > window * window
    n_far = np.count_nonzero(far)
    if n_far >= _MIN_FLOOR_PIXELS:
        noisy = n_far - np.count_nonzero(quiet & far)
        if 2 * noisy > n_far:
            return False
        # Far pixels three quarters zero or more are a clean map's surroundings (a clean
        # Gaussian's tail above the level fills a tenth of them); about half zero may be noise
        # clipped at zero.
        return 4 * noisy <= n_far or _zeros_form_regions(quiet, far)
    return all(
        a.shape[axis] > 2 and float(np.abs(a.take([0, -1], axis=axis)).max()) <= level
        for axis in range(a.ndim)
    )


def _zeros_form_regions(quiet: np.ndarray, far: np.ndarray) -> bool:
    """Whether the quiet far pixels lie in regions rather than scattered among noisy ones.

    A clean map is zero outside the field and beyond its tails: neighbouring far pixels
    differ (one quiet, one not) only along that region's edge. Noise clipped at zero (what a
    ReLU of the gradient leaves, ``reduction="replknet"`` on few samples) is zero on about
    half of the pixels too, which passes the median test, but pixel by pixel: about half of
    the neighbouring pairs differ. Neighbours along the last axis suffice to tell.
    """
    both = far[..., :-1] & far[..., 1:]
    mixed = np.count_nonzero(both & (quiet[..., :-1] != quiet[..., 1:]))
    return bool(mixed <= _MAX_MIXED_PAIRS * np.count_nonzero(both))


# mean, cov, floor, converged, the amplitude and R^2 on the map when the model fit has them
# (see GaussianModelFit.on_map), and the stage that produced the result (named in the
# message when it did not converge).
_Robust = tuple[np.ndarray, np.ndarray, float, bool, tuple[float, float] | None, str]
_PLAIN = "plain moments"
_MODEL = "floor + Gaussian model fit"
_WINDOWED = "windowed moments"


def _from_model(model: GaussianModelFit) -> _Robust:
    return model.mean, model.cov, model.floor, model.converged, model.on_map, _MODEL


def _floors_agree(
    model: GaussianModelFit, far: tuple[float, float, int, float], shape: tuple[int, ...]
) -> bool:
    """Whether the model's floor is the level of the pixels far from the ERF.

    For a constant pedestal under a Gaussian both estimate the same constant; the tolerance
    is four standard errors of the difference (the model's floor taken as known from half
    the pixels of its +-5 sigma box, a conservative count) plus a thousandth of the peak.
    A sharp peak on a broad base fails it: the model's floor is the base near the peak, the
    far pixels are the base's tails.
    """
    level, spread, n_far, _ = far
    n_fit = math.prod(s.stop - s.start for s in _window_box(shape, model.mean, model.cov, 5.0))
    if n_far == 0 or n_fit == 0:
        return False
    stderr = spread * math.sqrt(1.0 / n_far + 2.0 / n_fit)
    return abs(model.floor - level) <= 4.0 * stderr + 1e-3 * abs(model.amplitude)


def _plain_cov(a: np.ndarray, coords: list[np.ndarray]) -> np.ndarray:
    """The map's plain covariance for a comparison by a factor of 2 (:func:`_narrower`);
    NaN when the map's sum is not positive. In 2-D from one product of power sums
    (:func:`_region_moments_2d`): its rounding is nothing to such a comparison, where
    :func:`_moments` centres first at five times the cost."""
    if a.ndim != 2:
        return _moments(a, coords)[2]
    return _region_moments_2d(a, 0, 0)[1]


def _narrower(cov: np.ndarray, reference: np.ndarray, ratio: float) -> bool:
    """True when ``cov``'s geometric-mean variance is below ``ratio`` times ``reference``'s."""
    d = cov.shape[0]
    det, ref = determinant(cov), determinant(reference)
    if not (det > 0 and ref > 0):
        return False
    return bool(det ** (1.0 / d) < ratio * ref ** (1.0 / d))


def _floor_held_at_zero(
    a: np.ndarray,
    coords: list[np.ndarray],
    model: GaussianModelFit,
    low: float,
    peak: float,
    binned: bool,
) -> GaussianModelFit | None:
    """The fit again with its floor held at zero, where only its floor made it implausible
    and the map is a Gaussian that allows a zero floor (``low``, ``peak``: the map's minimum
    and maximum); else None.

    A Gaussian wider than the map, seen on few pixels (a line of a few dozen), trades its
    floor against its width (the top of a broad Gaussian is nearly a parabola), and noise
    can carry the free floor far below zero: a 12.2 px Gaussian on 25 px under 0.6% noise
    came out with floor -0.12 and sigma 13.2, and the windowed moments that stood in for it
    with 6.7. ERF maps have no negative pedestal, so the least-squares fit under that bound
    (the floor at zero) is the fit, if the map allows it. Three tests:

    * the free fit explains at least ``_HELD_MIN_R2`` of the map's variance: held at zero,
      the fit extrapolates the Gaussian past the map, which only a map that is one supports;
    * its residual variance is noise, at most ``_MISFIT_RATIO`` times the pixels' own noise
      variance (:func:`_pixel_noise_variance`): a flat top bent into a broad Gaussian on a
      negative pedestal fails (its misfit is no noise; a noiseless box has none);
    * holding the floor raises the sum of squares by at most the 99% point of F(1, dof)
      residual variances (the F-test of the bound).
    """
    if not _floor_below(model, low, peak) or not _plausible_shape(model, a.shape):
        return None
    d = a.ndim
    dof = a.size - (2 + d + d * (d + 1) // 2)
    if dof <= 0:
        return None
    free_ss = _sum_of_squares(a, coords, model)
    total = float(a.sum())
    if not free_ss <= (1.0 - _HELD_MIN_R2) * (sum_of_products(a, a) - total * total / a.size):
        return None
    free_var = free_ss / dof
    if not free_var <= _MISFIT_RATIO * _pixel_noise_variance(a):
        return None
    held = fit_floor_gaussian(
        a, model.mean, model.cov, 0.0, model.floor + model.amplitude, fit_floor=False, binned=binned
    )
    if held is None or not _sum_of_squares(a, coords, held) - free_ss <= (
        _f1_quantile_99(dof) * free_var
    ):
        return None
    return held


def _f1_quantile_99(dof: int) -> float:
    """99% point of the F(1, dof) distribution: the square of Student's t at 0.995, from its
    Cornish-Fisher expansion in 1 / dof (below the exact value: 6% at 5 dof, under 0.5% from
    13 up, so the test errs towards refusing)."""
    z = 2.5758293035489
    t = z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof * dof)
    return t * t


def _pixel_noise_variance(a: np.ndarray) -> float:
    """Variance of independent pixel noise, from the median absolute second difference along
    every axis (``x[i-1] - 2 x[i] + x[i+1]`` has variance ``6 sigma^2``; the median of its
    absolute value is ``0.6745 sqrt(6) sigma`` for normal noise). A smooth map's own
    curvature and its edges barely move the median of all of them (on a 4 x 5 map holding a
    3 x 3 box, the edges are most second differences along one axis, not along both); a
    noiseless flat map gives 0. Large maps are read on every few lines (the noise is the
    same on all of them)."""
    parts = []
    # Every step-th line along the other axes: about _FLOOR_SAMPLE differences per axis.
    step = max(1, math.ceil((a.size / _FLOOR_SAMPLE) ** (1.0 / max(a.ndim - 1, 1))))
    for axis, n in enumerate(a.shape):
        if n >= 3:
            lines = a[
                tuple(slice(None) if k == axis else slice(None, None, step) for k in range(a.ndim))
            ]
            second = (
                lines.take(range(2, n), axis=axis)
                - 2.0 * lines.take(range(1, n - 1), axis=axis)
                + lines.take(range(n - 2), axis=axis)
            )
            parts.append(np.abs(second).ravel())
    if not parts:
        return 0.0
    return (_median(np.concatenate(parts)) / (0.6745 * math.sqrt(6.0))) ** 2


def _sum_of_squares(a: np.ndarray, coords: list[np.ndarray], model: GaussianModelFit) -> float:
    """Residual sum of squares of ``floor + amplitude * Gaussian`` over the whole map."""
    g = unit_gaussian(coords, model.mean, _inverse(model.cov, _MIN_EVAL_VARIANCE))
    r = np.broadcast_to(a - model.floor - model.amplitude * g, a.shape)
    return sum_of_products(r, r)


def _floor_below(model: GaussianModelFit, low: float, peak: float) -> bool:
    """Whether the model's floor is far below both the map's minimum ``low`` and zero."""
    return model.floor < min(low, 0.0) - _FLOOR_BELOW_MIN * (peak - low)


def _plausible(model: GaussianModelFit, shape: tuple[int, ...], low: float, peak: float) -> bool:
    """A model fit that describes the map: mostly inside it, no wider than a few maps, and on
    a floor that is not far below both the map's minimum ``low`` and zero (``peak``: its
    maximum).

    A floor far below every pixel *and* below zero (ERF maps are never negative) is the model
    bending a flat-topped map (one convolution's box against the edge of a small map) into
    the top of a broad Gaussian on a negative pedestal. A floor far below every pixel but not
    below zero is what a Gaussian that fills the map has: its own tails lift every pixel.
    """
    return _plausible_shape(model, shape) and not _floor_below(model, low, peak)


def _plausible_shape(model: GaussianModelFit, shape: tuple[int, ...]) -> bool:
    """A model Gaussian that is finite, mostly inside the map and no wider than a few maps."""
    cov = model.cov
    widest = 4.0 * max(shape)
    return (
        math.isfinite(sum(cov.ravel().tolist()))
        and max(cov.diagonal().tolist()) <= widest * widest
        and math.prod(axis_mass(model.mean, cov, shape).tolist()) >= 1.0 - _MAX_OUTSIDE
    )


def _windowed_moments(
    a: np.ndarray,
    coords: list[np.ndarray],
    low: float,
    peak: float,
    window: float,
    max_iter: int,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, float, bool] | None:
    """Floor-corrected windowed moments: the fallback where the model fit fails (``low``,
    ``peak``: the map's minimum and maximum)."""
    d = a.ndim
    sample_idx, sample_vals = _subsample(a, _FLOOR_SAMPLE)
    init = _half_max_init(a, coords, low, peak)
    if init is None:
        return None
    mean, cov = init
    floor = 0.0
    amplitude = peak
    r2 = window * window
    # Share of a Gaussian's mass in the outermost unit ring of the window, and the factor by
    # which the window cuts its variance. The cut is corrected in proportion to the mass the
    # ring really holds: fully for Gaussian tails, not at all for compact maps.
    ring_share = (chi2_cdf(d, r2) - chi2_cdf(d, (window - 1) ** 2)) / chi2_cdf(d, r2)
    cut = truncated_variance_factor(d, r2)
    ring_r2 = (window - 1) ** 2
    history: list[float] = []
    visited: list[tuple[np.ndarray, np.ndarray]] = []  # the states before the current one
    for _ in range(max_iter):
        prec = _inverse(cov, _MIN_WINDOW_VARIANCE)
        floor = _far_floor(sample_idx, sample_vals, mean, prec, window, amplitude)[0]
        box = _window_box(a.shape, mean, cov, window)
        box_coords = [c[s] for c, s in zip(coords, box, strict=True)]
        d2 = mahalanobis_sq(box_coords, mean, prec)
        inside = d2 <= r2
        w = np.where(inside, a[box] - floor, 0.0)
        m0, new_mean, new_cov = _moments(w, box_coords)
        if not m0 > 0 or not np.all(np.isfinite(new_cov)):
            return None
        ring_mass = float(w[inside & (d2 > ring_r2)].sum())
        weight = min(max(ring_mass / (ring_share * m0), 0.0), 1.0) if ring_share > 0 else 0.0
        new_cov = new_cov / (1.0 - weight * (1.0 - cut))
        amplitude = _peak_of(m0, new_cov)
        delta = _relative_change((mean, cov), (new_mean, new_cov))
        if delta < tol:
            return new_mean, new_cov, floor, True
        # Noise makes pixels on the window's edge flip in and out: the iteration can settle
        # into a short cycle (or a slow crawl) far below the noise-limited precision. A cycle
        # (the new state back at one of the last few) is answered with the average of its
        # states.
        for back in range(1, min(len(visited), _MAX_CYCLE - 1) + 1):
            if _relative_change(visited[-back], (new_mean, new_cov)) < tol:
                cycle = [*visited[len(visited) - back + 1 :], (mean, cov), (new_mean, new_cov)]
                return (
                    np.mean([m for m, _ in cycle], axis=0),
                    np.mean([c for _, c in cycle], axis=0),
                    floor,
                    True,
                )
        history.append(delta)
        if len(history) >= 3 and max(history[-3:]) < _STALL_TOL:
            return new_mean, new_cov, floor, True
        visited = [*visited[2 - _MAX_CYCLE :], (mean, cov)]
        mean, cov = new_mean, new_cov
    return mean, cov, floor, False


def _relative_change(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    scale = max(float(np.sqrt(np.max(np.abs(np.diag(b[1]))))), 1.0)
    return max(
        float(np.max(np.abs(a[0] - b[0]))) / scale,
        float(np.max(np.abs(a[1] - b[1]))) / (scale * scale),
    )


def _half_max_init(
    a: np.ndarray, coords: list[np.ndarray], low: float, peak: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean and covariance from the region above half maximum (``low``, ``peak``: the map's
    minimum and maximum).

    For a Gaussian that region is the ellipsoid of Mahalanobis radius ``sqrt(2 ln 2)``, whose
    uniform covariance is ``cov * 2 ln 2 / (d + 2)``; inverting that gives a start that is
    close even when a floor dominates the total mass (where plain moments are off by 10x).
    """
    base = max(low, 0.0)
    if not peak > base:  # no positive mass above the floor (constant maps never get here)
        return None
    level = base + 0.5 * (peak - base)
    jit = kernels.compiled() if a.ndim == 2 else None
    if jit is not None:
        sums = np.empty((3, 3))
        row, col = jit.region_sums(kernels.contiguous(a), float(level), sums)
        mean, cov = _moments_from_sums(sums.tolist(), row, col)
    else:
        above = a >= level
        # The moments of the region on its bounding box only (a small part of the map).
        box = bounding_box(above)
        region = above[box].astype(np.float64)
        if a.ndim == 2:
            mean, cov = _region_moments_2d(region, box[0].start, box[1].start)
        else:
            _, mean, cov = _moments(region, [c[s] for c, s in zip(coords, box, strict=True)])
    cov = cov * (a.ndim + 2) / (2.0 * math.log(2.0))
    return mean, cov + np.eye(a.ndim) * _MIN_WINDOW_VARIANCE


def _region_moments_2d(w: np.ndarray, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the weights ``w`` (a 0/1 region, or a whole map) whose first
    pixel is ``(row, col)``; NaN when their sum is not positive.

    All six raw moments come from one product ``[1, i, i^2]^T w [1, j, j^2]`` in the
    weights' own coordinates: taking the squared mean off the second moment costs
    ~(mean / sigma)^2 units of rounding, nothing that matters to a starting point or to a
    comparison by a factor of 2.
    """
    h, width = w.shape
    return _moments_from_sums(
        (_quadratic_powers(h).T @ w @ _quadratic_powers(width)).tolist(), row, col
    )


def _moments_from_sums(m: list[list[float]], row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance from the raw moments ``m[p][q] = sum w i^p j^q`` (``p + q <= 2``)
    taken in coordinates whose origin is pixel ``(row, col)``."""
    n = m[0][0]
    if not n > 0:
        return np.full(2, np.nan), np.full((2, 2), np.nan)
    my, mx = m[1][0] / n, m[0][1] / n
    vyy, vxx, vxy = m[2][0] / n - my * my, m[0][2] / n - mx * mx, m[1][1] / n - my * mx
    return np.array([row + my, col + mx]), np.array([[vyy, vxy], [vxy, vxx]])


@functools.lru_cache(maxsize=32)
def _quadratic_powers(n: int) -> np.ndarray:
    """``[1, k, k^2]`` for ``k < n``, shape ``(n, 3)`` (cached, read-only)."""
    k = np.arange(n, dtype=np.float64)
    out = np.stack([np.ones(n), k, k * k], axis=1)
    out.flags.writeable = False
    return out


def _subsample(a: np.ndarray, size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """A regular grid subsample of at most ``size`` pixels (index arrays per axis, values)."""
    step = max(1, math.ceil((a.size / size) ** (1.0 / a.ndim)))
    idx = [np.arange(0, n, step, dtype=np.float64) for n in a.shape]
    vals = a[tuple(slice(None, None, step) for _ in range(a.ndim))]
    return idx, vals


def _far_floor(
    idx: list[np.ndarray],
    vals: np.ndarray,
    mean: np.ndarray,
    prec: np.ndarray,
    window: float,
    amplitude: float,
) -> tuple[float, float, int, float]:
    """The pedestal under the ERF from the pixels far from it: (level, spread, pixels used,
    median); see :func:`_clipped_stats`.

    Pixels beyond the window are used when there are enough of them. When the ERF nearly fills
    the map, nearer rings (Mahalanobis 4, then 3) are used with the current Gaussian's tail
    subtracted first, so the estimate stays unbiased for a Gaussian plus a floor.
    """
    jit = kernels.compiled() if len(idx) == 2 else None
    if jit is not None:
        radii = np.array([r for r in (window, 4.0, 3.0) if r <= window], dtype=np.float64)
        out = np.empty(vals.size)
        n = jit.far_values(
            *idx,
            kernels.contiguous(vals),
            *mean.tolist(),
            float(prec[0, 0]),
            float(prec[0, 1]),
            float(prec[1, 1]),
            radii,
            _MIN_FLOOR_PIXELS,
            float(amplitude),
            out,
        )
        if not n:
            return 0.0, 0.0, 0, 0.0
        level, spread, kept, med = jit.clipped_stats(out[:n])
        return float(level), float(spread), int(kept), float(med)
    d2 = mahalanobis_sq(idx, mean, prec)
    for radius in (window, 4.0, 3.0):
        if radius > window:
            continue
        outside = d2 > radius * radius
        if np.count_nonzero(outside) >= (_MIN_FLOOR_PIXELS if len(idx) > 1 else _MIN_LINE_PIXELS):
            far = vals[outside]
            if radius < window:
                far = far - amplitude * np.exp(-0.5 * d2[outside])
            return _clipped_stats(far)
    # No pixel is far enough from the ERF to tell a floor from a tail: assume none.
    return 0.0, 0.0, 0, 0.0


def _clipped_stats(values: np.ndarray) -> tuple[float, float, int, float]:
    """Mean, robust spread and count after dropping values more than 5 spreads from the
    median; and the median.

    The mean, not the median, is the pedestal to remove: |gradient| noise is skewed
    (half-normal), and its median sits 15% below its mean. The clip keeps unrelated bright
    structures far from the ERF out of the estimate. The spread is 1.4826 MAD (the standard
    deviation for normal noise), or, when at least a quarter of the values are the lowest
    one and the MAD is below half of it, the interquartile range / 1.349 (the same for normal
    noise): the MAD collapses on such a point mass (noise clipped at zero, as a ReLU of the
    gradient leaves it, is zero on about half of the pixels), and the clip would then keep
    little more than the point mass.
    """
    n = values.size
    med = _median(values)
    deviation = np.abs(values - med)
    spread = 1.4826 * _median(deviation)
    if 4 * np.count_nonzero(values == values.min()) >= n:
        q1, q3 = (n - 1) // 4, (3 * (n - 1)) // 4
        part = np.partition(values, (q1, q3))
        quartiles = (float(part[q3]) - float(part[q1])) / 1.349
        if spread < 0.5 * quartiles:
            spread = quartiles
    if spread == 0.0:
        return med, 0.0, int(n), med
    kept = values[deviation <= 5.0 * spread]
    return float(kept.mean()), spread, int(kept.size), med


def _median(values: np.ndarray) -> float:
    """Median of a non-empty 1-D array without NaN: ``np.median`` without its generality
    (a partition around the middle; 5x faster on the few thousand values here)."""
    n = values.size
    k = n // 2
    if n % 2:
        return float(np.partition(values, k)[k])
    part = np.partition(values, (k - 1, k))
    return 0.5 * (float(part[k - 1]) + float(part[k]))


def _peak_of(mass: float, cov: np.ndarray) -> float:
    """Peak height of the Gaussian with total ``mass`` and covariance ``cov`` (pixel units)."""
    det = determinant(cov)
    if not det > 0:
        return 0.0
    return mass / math.sqrt((2 * math.pi) ** cov.shape[0] * det)


def _window_box(
    shape: tuple[int, ...], mean: np.ndarray, cov: np.ndarray, window: float
) -> tuple[slice, ...]:
    boxes = []
    for m, var, n in zip(mean.tolist(), cov.diagonal().tolist(), shape, strict=True):
        half = window * math.sqrt(max(var, _MIN_WINDOW_VARIANCE))
        if not math.isfinite(m + half):  # no estimate: an empty box, never an exception
            boxes.append(slice(0, 0))
            continue
        lo, hi = math.floor(m - half), math.ceil(m + half) + 1
        boxes.append(slice(min(max(lo, 0), n), min(max(hi, 0), n)))
    return tuple(boxes)


# --------------------------------------------------------------------------------------------
# least squares (scipy)


def _fit_least_squares(
    a: np.ndarray, coords: list[np.ndarray], mean: np.ndarray, cov: np.ndarray, floor: float
) -> GaussianFit:
    try:
        from scipy.optimize import least_squares
    except ImportError as err:  # pragma: no cover - exercised only without scipy
        raise ImportError(
            "fit_gaussian(method='least_squares') needs scipy: pip install 'erf-callback[lsq]'"
        ) from err
    d = a.ndim
    tri = np.tril_indices(d)
    # The precision is parametrised by its Cholesky factor L (P = L L^T), so every step of the
    # solver is a valid covariance; parameters are scaled by the peak so residuals are O(1).
    scale = max(float(a.max()) - floor, 1e-300)
    chol0 = np.linalg.cholesky(_inverse(cov, _MIN_WINDOW_VARIANCE))
    p0 = np.concatenate([[floor / scale, 1.0], mean, chol0[tri]])
    target = a / scale

    def unpack(p: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
        lower = np.zeros((d, d))
        lower[tri] = p[2 + d :]
        return p[0], p[1], p[2 : 2 + d], lower

    def residual(p: np.ndarray) -> np.ndarray:
        b, amp, mu, lower = unpack(p)
        d2 = mahalanobis_sq(coords, mu, lower @ lower.T)
        return (b + amp * np.exp(-0.5 * d2) - target).ravel()

    sol = least_squares(residual, p0, method="trf", x_scale="jac")
    b, _, mu, lower = unpack(sol.x)
    return _finish(
        a,
        coords,
        mu.copy(),
        np.linalg.inv(lower @ lower.T),
        float(b * scale),
        "least_squares",
        bool(sol.success),
        "" if sol.success else f"least squares: {sol.message}",
    )


# --------------------------------------------------------------------------------------------
# shared numerics


def _as_float64(erf: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(erf, torch.Tensor):
        if erf.is_meta:
            raise ValueError(
                "fit_gaussian got a tensor on the meta device, which holds no values; pass the "
                "map itself (e.g. ERFMap.grad of a probe of a materialised model)."
            )
        if erf.is_complex():
            raise TypeError(f"fit_gaussian takes a real-valued map; got {erf.dtype}.")
        return erf.detach().to("cpu", torch.float64).numpy()
    if np.iscomplexobj(erf):
        raise TypeError("fit_gaussian takes a real-valued map; got complex values.")
    return np.asarray(erf, dtype=np.float64)


def _moments(w: np.ndarray, coords: list[np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
    """Total, mean and covariance of the weights ``w`` on the open grid ``coords``.

    Works on marginals (and 2-D marginals for cross terms), so the cost is one pass of sums
    over the array rather than d^2 full-size products.
    """
    d = w.ndim
    m0 = float(w.sum())
    if m0 == 0.0:
        return 0.0, np.full(d, np.nan), np.full((d, d), np.nan)
    axes = range(d)
    marg = [w.sum(axis=tuple(k for k in axes if k != i)) if d > 1 else w for i in axes]
    mean = np.array([float(marg[i] @ coords[i]) / m0 for i in axes])
    centred = [coords[i] - mean[i] for i in axes]
    cov = np.empty((d, d))
    for i in axes:
        cov[i, i] = float(marg[i] @ (centred[i] * centred[i])) / m0
        for j in range(i + 1, d):
            m2 = w.sum(axis=tuple(k for k in axes if k not in (i, j))) if d > 2 else w
            cov[i, j] = cov[j, i] = float(centred[i] @ m2 @ centred[j]) / m0
    return m0, mean, cov


def _inverse(cov: np.ndarray, min_variance: float) -> np.ndarray:
    """Inverse of ``cov`` with eigenvalues floored at ``min_variance`` (degenerate maps)."""
    if cov.shape == (2, 2):
        # Closed form when both eigenvalues clear the floor (numpy.linalg's call overhead is
        # most of the fit's time on small maps).
        a, b, c = float(cov[0, 0]), 0.5 * float(cov[0, 1] + cov[1, 0]), float(cov[1, 1])
        det = a * c - b * b
        half_tr = 0.5 * (a + c)
        largest = half_tr + math.sqrt(max(half_tr * half_tr - det, 0.0))
        if det > 0 and det >= min_variance * largest:  # smallest eigenvalue det / largest
            return np.array([[c / det, -b / det], [-b / det, a / det]])
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    vals = np.maximum(vals, min_variance)
    return (vecs / vals) @ vecs.T


def _finish(
    a: np.ndarray,
    coords: list[np.ndarray],
    mean: np.ndarray,
    cov: np.ndarray,
    floor: float,
    method: str,
    converged: bool,
    message: str,
    on_map: tuple[float, float] | None = None,
) -> GaussianFit:
    """Amplitude and R^2 of ``floor + amplitude * exp(-d^2 / 2)`` against the map.

    The Gaussian is evaluated only inside 8 sigma (exp(-32) ~ 1e-14 beyond); outside it the
    model is the floor alone. ``on_map``, when given, is ``(amplitude, R^2)`` from the model
    fit's last evaluation on every pixel of the map (the same sums), so nothing is evaluated
    again.
    """
    cov = (cov + cov.T) / 2
    amplitude, r2 = _amplitude_r2(a, coords, mean, cov, floor) if on_map is None else on_map
    return GaussianFit(
        mean=np.asarray(mean, dtype=np.float64),
        cov=cov,
        floor=float(floor),
        amplitude=amplitude,
        r2=r2,
        method=method,
        converged=converged,
        message=message,
    )


def _amplitude_r2(
    a: np.ndarray, coords: list[np.ndarray], mean: np.ndarray, cov: np.ndarray, floor: float
) -> tuple[float, float]:
    """For :func:`_finish`: the least-squares amplitude of the Gaussian on ``floor`` and the
    R^2 of that model, in one pass over the map and one over the Gaussian's 8 sigma box."""
    prec = _inverse(cov, _MIN_EVAL_VARIANCE)
    box = _window_box(a.shape, mean, cov, 8.0)
    box_coords = [c[s] for c, s in zip(coords, box, strict=True)]
    g = unit_gaussian(box_coords, mean, prec)
    resid_in = a[box] - floor
    # Sums of squares from a few dot products (no full-size temporaries):
    # sum (r - A g)^2 = sum r^2 - 2 A sum r g + A^2 sum g^2 inside the box; outside it the
    # model is the floor alone.
    dot = sum_of_products
    gg, rg, rr_in = dot(g, g), dot(resid_in, g), dot(resid_in, resid_in)
    amplitude = rg / gg if gg > 0 else float("nan")
    flat = a.reshape(-1)
    total, total_sq, n = float(flat.sum()), dot(flat, flat), flat.size
    total_ss = max(total_sq - total * total / n, 0.0)
    all_ss = total_sq - 2.0 * floor * total + n * floor * floor
    outside_ss = all_ss - rr_in
    inside_ss = rr_in - 2.0 * amplitude * rg + amplitude * amplitude * gg if gg > 0 else 0.0
    residual_ss = max(inside_ss + outside_ss, 0.0)
    # Below this share of the sum of squares the spread is the subtraction's rounding: a
    # constant map (a unit behind a global pooling sees every pixel alike) has no R².
    r2 = 1.0 - residual_ss / total_ss if total_ss > _CONSTANT_SPREAD * total_sq else float("nan")
    return amplitude, r2


def _with_single_pixel_axes(fit: GaussianFit, kept: list[int], d: int) -> GaussianFit:
    """``fit`` of the map without its one-pixel axes, back on all ``d`` axes: mean 0 (the
    only index) and no variance along the others."""
    if not fit.ok:
        return replace(fit, mean=np.full(d, np.nan), cov=np.full((d, d), np.nan))
    mean, cov = np.zeros(d), np.zeros((d, d))
    mean[kept] = fit.mean
    cov[np.ix_(kept, kept)] = fit.cov
    return replace(fit, mean=mean, cov=cov)


def _failed(d: int, method: str, why: str) -> GaussianFit:
    warnings.warn(f"fit_gaussian: {why}; returning NaN.", ERFWarning, stacklevel=3)
    return GaussianFit(
        mean=np.full(d, np.nan),
        cov=np.full((d, d), np.nan),
        floor=float("nan"),
        method=method,
        converged=False,
        message=why,
    )
