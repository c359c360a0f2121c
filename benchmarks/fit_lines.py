"""fit_gaussian on random noisy 1-D lines, against the least-squares fits of the same lines.

Run: ``.venv/bin/python benchmarks/fit_lines.py`` (``--lines N``, default 500; ``--quick``:
50; ``--seed S``; ``--old-path DIR`` adds, for comparison, the fit of an ``erf_callback_old``
package found in ``DIR``, e.g. a copy of an earlier commit). Needs scipy.

A line has few pixels, so the floor under an ERF is pinned by few of them: the regime where
the fit's floor rules matter most (a temporal conv net's ERF on a short sequence). Each line
is ``exp(-(x - m)^2 / (2 s^2))`` on ``n`` pixels (``n`` drawn from 10-19, 20-79 or 80-199;
``s`` log-uniform from 0.8 px to 1.2 n; ``m`` anywhere that leaves at least half of the mass
inside), plus a floor (0, or up to 5% of the peak) and zero-mean or ``|.|`` noise of 0.5-5%.

The references are scipy's least-squares fits of ``floor + amplitude * Gaussian`` started at
the truth, free and with the floor bounded below by zero (the maximum-likelihood fits under
Gaussian noise, unconstrained and under the bound that ERF maps have no negative pedestal).
The gap of a line is the fit's relative sigma error minus the better reference's. The table
counts lines whose gap exceeds 1% and 3%, by kind (sub-pixel ``s < 1``, wide ``s > n / 4``,
other) and lists the worst.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import warnings
from collections.abc import Callable

import _bench_utils as bu
import numpy as np

from erf_callback import fit_gaussian
from erf_callback.fit.metrics import border_mass
from tests.helpers.maps import gaussian_map, least_squares_line_sigma


def kind(n: int, sigma: float) -> str:
    return "sub-pixel" if sigma < 1.0 else "wide" if sigma > n / 4 else "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="50 lines")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--old-path", default=None, help="folder holding erf_callback_old")
    args = parser.parse_args()
    bu.header("fit_lines: fit_gaussian on random noisy lines vs least squares")
    fits: dict[str, Callable[[np.ndarray], object]] = {"ours": fit_gaussian}
    if args.old_path:
        sys.path.insert(0, args.old_path)
        fits["old"] = importlib.import_module("erf_callback_old").fit_gaussian
    if args.quick:
        args.lines = 50
    rng = np.random.default_rng(args.seed)
    gaps: dict[str, list[tuple[float, str]]] = {k: [] for k in fits}
    kinds: list[str] = []
    while len(kinds) < args.lines:
        n = int(rng.choice([rng.integers(10, 20), rng.integers(20, 80), rng.integers(80, 200)]))
        sigma = math.exp(rng.uniform(math.log(0.8), math.log(1.2 * n)))
        mean = rng.uniform(-0.2 * n, 1.2 * n)
        if border_mass(np.array([mean]), np.array([[sigma**2]]), (n,)) > 0.5:
            continue
        floor = rng.choice([0.0, 0.05]) * rng.random()
        noise_sd = rng.uniform(0.005, 0.05)
        noise = rng.normal(0.0, noise_sd, n)
        absolute = rng.random() < 0.5
        a = (
            gaussian_map((n,), [mean], [[sigma**2]])
            + floor
            + (np.abs(noise) if absolute else noise)
        )
        try:
            best = min(
                abs(least_squares_line_sigma(a, mean, sigma, f) / sigma - 1) for f in (-np.inf, 0.0)
            )
        except (ValueError, np.linalg.LinAlgError):
            continue
        label = (
            f"n={n} m={mean:.1f} s={sigma:.2f} floor={floor:.3f} "
            f"{'|N|' if absolute else 'N'}({noise_sd:.3f})"
        )
        kinds.append(kind(n, sigma))
        for name, fit in fits.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = fit(a)
            err = abs(float(got.sigma[0]) / sigma - 1)  # type: ignore[attr-defined]
            gaps[name].append((err - best if math.isfinite(err) else math.inf, label))
    rows = []
    for name in fits:
        for k in ("sub-pixel", "wide", "other", "all"):
            g = [gap for (gap, _), kk in zip(gaps[name], kinds, strict=True) if k in ("all", kk)]
            rows.append(
                (
                    name,
                    k,
                    str(len(g)),
                    str(sum(x > 0.01 for x in g)),
                    str(sum(x > 0.03 for x in g)),
                    f"{max(g):.3f}" if g else "-",
                )
            )
    print(bu.table(("fit", "lines", "count", "gap > 1%", "gap > 3%", "worst gap"), rows))
    worst = sorted(gaps["ours"], reverse=True)[:5]
    print("   worst lines (ours): " + "; ".join(f"{g:.3f} {label}" for g, label in worst))
    over = sum(g > 0.03 for g, _ in gaps["ours"])
    print(f"   {over} of {len(kinds)} lines more than 3% further off than least squares")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
