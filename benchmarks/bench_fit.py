"""fit_gaussian against OpenERF's lmfit 2-D Gaussian fit: sigma accuracy and speed.

Run: ``.venv/bin/python benchmarks/bench_fit.py`` (``--quick`` for a smoke run;
``--fixed-cost`` to time our fit alone at 20x20 and 32x32 against 64x64; ``--numpy`` to time
the fit's numpy path, as where numba cannot load: ``ERF_CALLBACK_JIT=0``; ``--kernels`` to
time the compiled kernels against that numpy path, interleaved, on the same maps).

OpenERF (PyPI ``openerf`` 0.6.1, MIT) fits ``amp * N(xc, yc, sigma_x, sigma_y)`` (axis-aligned,
no floor term) to the sum-normalised map with ``lmfit.Model``, starting from ``xc, yc = 0.8 *
median(x), 0.8 * median(y)`` and ``sigma = (W / 10, H / 6) / 1.5``. Importing the ``openerf``
package pulls in timm, so only its ``openerf/fit.py`` (numpy + lmfit) is loaded, from a wheel
that this script downloads with pip into the git-ignored ``.bench_cache/`` on first use.

Map categories, each at every size of ``SIZES`` (64x64 to 1024x1024, one non-square), each
map with a known per-axis sigma:

* ``stack``: n layers of k x k all-ones kernels applied to a centred delta; the exact moment
  sigma is ``sqrt(n (k^2 - 1) / 12)`` per axis (not Gaussian for small n: a box, a pyramid...).
* ``gauss``: sampled axis-aligned anisotropic Gaussians, +-5 sigma inside the map.
* ``floor``: the same Gaussians plus a uniform floor at 0.2% of the peak.
* ``noise``: the same Gaussians plus ``mean_32 |N(0, s)|`` per pixel (a 32-sample ERF's faint
  noise floor).
* ``border``: maps that fill or are cut by the border: a Gaussian cut on one side (75% of its
  mass inside) on a 2% floor with ``|N(0, 2%)|`` noise; a rotated one cut at a corner (60%
  inside) with ``N(0, 1%)`` noise; one that fills the map (sigma a quarter of the side, ~85%
  inside) with the faint noise floor of ``noise``.

Accuracy is the relative sigma error per axis (the worse of y and x is tabulated; for rotated
maps the truth is ``sqrt(diag(cov))``, what both fits report). Speed is the median over
interleaved rounds (order alternating, sub-ms calls looped) of OpenERF's time / ours on the
same map; the summary gives it per category and size, the worst one, the median, the slowest
map and the total-time ratio.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import _bench_utils as bu
import numpy as np

from erf_callback import fit_gaussian
from erf_callback.fit import kernels
from erf_callback.fit.metrics import border_mass

OPENERF_VERSION = "0.6.1"
CACHE = bu.ROOT / ".bench_cache" / f"openerf-{OPENERF_VERSION}"
CATEGORIES = ("stack", "gauss", "floor", "noise", "border")
SIZES = ((64, 64), (129, 161), (224, 224), (512, 512), (1024, 1024))
# Relative sigma errors below this are float round-off / solver tolerance, not accuracy: two
# tools both under it count as tied in the per-category comparison.
TIE = 1e-6


# --------------------------------------------------------------------------------------------
# OpenERF: download (once), then load only openerf/fit.py


def load_openerf_fit() -> tuple[Callable[[np.ndarray], object] | None, str]:
    """``(fit_2d_gaussian, note)``, or ``(None, why)`` when it cannot be had."""
    try:
        import lmfit  # noqa: F401
    except ImportError:
        return None, "lmfit is not installed (pip install lmfit, or the [bench] extra)"
    fit_py = CACHE / "openerf" / "fit.py"
    if not fit_py.exists():
        dl = CACHE.parent / "downloads"
        dl.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += [f"openerf=={OPENERF_VERSION}", "-d", str(dl), "-q"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            return None, f"pip download of openerf failed: {err}"
        wheels = sorted(dl.glob(f"openerf-{OPENERF_VERSION}-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            return None, f"pip download of openerf failed (no network?): {' '.join(tail)}"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(CACHE)
        if not fit_py.exists():
            return None, f"the openerf wheel has no openerf/fit.py ({wheels[0].name})"
    spec = importlib.util.spec_from_file_location("openerf_fit_bench", fit_py)
    if spec is None or spec.loader is None:
        return None, f"cannot load {fit_py}"
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building classes
    spec.loader.exec_module(module)
    fit = getattr(module, "fit_2d_gaussian", None)
    if fit is None:
        return None, f"{fit_py} has no fit_2d_gaussian"
    return fit, f"OpenERF {OPENERF_VERSION} fit_2d_gaussian from {fit_py.relative_to(bu.ROOT)}"


# --------------------------------------------------------------------------------------------
# maps with known sigma


@dataclass
class Case:
    category: str
    name: str
    map: np.ndarray
    sigma: tuple[float, float]  # (y, x)


def _box_stack_1d(n: int, k: int) -> np.ndarray:
    out = np.ones(1)
    for _ in range(n):
        out = np.convolve(out, np.ones(k))
    return out


def stack_map(shape: tuple[int, int], n: int, ky: int, kx: int) -> Case:
    """n layers of ky x kx all-ones kernels on a centred delta (separable, exact in float64)."""
    a = np.zeros(shape)
    py, px = _box_stack_1d(n, ky), _box_stack_1d(n, kx)
    y0, x0 = shape[0] // 2 - len(py) // 2, shape[1] // 2 - len(px) // 2
    a[y0 : y0 + len(py), x0 : x0 + len(px)] = np.outer(py, px)
    sig = (np.sqrt(n * (ky * ky - 1) / 12.0), np.sqrt(n * (kx * kx - 1) / 12.0))
    return Case("stack", f"n={n} k={ky}x{kx}", a, (float(sig[0]), float(sig[1])))


def gaussian(shape: tuple[int, int], mean: tuple[float, float], cov: np.ndarray) -> np.ndarray:
    """``exp(-(x - mean)^T cov^-1 (x - mean) / 2)`` at the pixel centres (peak 1)."""
    y = np.arange(shape[0], dtype=np.float64)[:, None] - mean[0]
    x = np.arange(shape[1], dtype=np.float64)[None, :] - mean[1]
    p = np.linalg.inv(cov)
    return np.exp(-0.5 * (p[0, 0] * y * y + 2 * p[0, 1] * y * x + p[1, 1] * x * x))


def rotated_cov(sy: float, sx: float, theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    return rot @ np.diag([sy * sy, sx * sx]) @ rot.T


def _truth(cov: np.ndarray) -> tuple[float, float]:
    return float(np.sqrt(cov[0, 0])), float(np.sqrt(cov[1, 1]))


def make_cases(sizes: tuple[tuple[int, int], ...] = SIZES, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for h, w in sizes:
        m = min(h, w)
        tag = f"{h}x{w}"
        k = 2 * max(1, round(m / 48)) + 1
        cases.append(stack_map((h, w), 2, 3, 5))
        cases.append(stack_map((h, w), 8, k, k))
        cases[-2].name += f" [{tag}]"
        cases[-1].name += f" [{tag}]"
        # Gaussians: +-5 sigma inside, off-centre by a fraction of a pixel and a few pixels.
        cov = np.diag([(m / 14) ** 2, (m / 11) ** 2])
        mean = (h / 2 + 0.3, w / 2 - 1.7)
        g = gaussian((h, w), mean, cov)
        s = f"{tag} s=({m / 14:.1f},{m / 11:.1f})"
        cases.append(Case("gauss", s, g, _truth(cov)))
        cases.append(Case("floor", s + " +0.2% floor", g + 0.002, _truth(cov)))
        noise = np.abs(rng.normal(0.0, 0.005, (32, h, w))).mean(axis=0)
        cases.append(Case("noise", s + " +|N(0,0.5%)|", g + noise, _truth(cov)))
        # Border: cut on one side, cut at a corner (rotated), filling the map.
        cov = np.diag([(m / 10) ** 2, (m / 8) ** 2])
        side = gaussian((h, w), (h / 2, w - 1 - 0.54 * m / 8), cov)
        side += 0.02 + np.abs(rng.normal(0.0, 0.02, (h, w)))
        inside = _inside((h / 2, w - 1 - 0.54 * m / 8), cov, (h, w))
        cases.append(Case("border", f"{tag} cut side {inside} +2% +|N(0,2%)|", side, _truth(cov)))
        cov = rotated_cov(m / 9, m / 13, 0.5)
        corner = gaussian((h, w), (0.1 * m, 0.12 * m), cov) + rng.normal(0.0, 0.01, (h, w))
        inside = _inside((0.1 * m, 0.12 * m), cov, (h, w))
        cases.append(Case("border", f"{tag} corner rot {inside} +N(0,1%)", corner, _truth(cov)))
        cov = np.diag([(h / 4) ** 2, (w / 4) ** 2])
        fill = gaussian((h, w), ((h - 1) / 2, (w - 1) / 2), cov)
        fill += np.abs(rng.normal(0.0, 0.005, (32, h, w))).mean(axis=0)
        inside = _inside(((h - 1) / 2, (w - 1) / 2), cov, (h, w))
        cases.append(Case("border", f"{tag} fills {inside} +|N(0,0.5%)|", fill, _truth(cov)))
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(cases, key=lambda c: order[c.category])


def _inside(mean: tuple[float, float], cov: np.ndarray, shape: tuple[int, int]) -> str:
    return f"{100 * (1 - border_mass(np.array(mean), cov, shape)):.0f}% in"


def _size(case: Case) -> str:
    return f"{case.map.shape[0]}x{case.map.shape[1]}"


# --------------------------------------------------------------------------------------------


def ours(a: np.ndarray) -> tuple[float, float]:
    s = fit_gaussian(a).sigma
    return float(s[0]), float(s[1])


def openerf(fit: Callable[[np.ndarray], object], a: np.ndarray) -> tuple[float, float]:
    r = fit(a / a.sum())  # what openerf.erf does: the sum-normalised map
    return float(r.sigma_y), float(r.sigma_x)  # type: ignore[attr-defined]


def fit_path() -> str:
    """Which implementation the 2-D fit runs here (loading the compiled kernels first, so
    their one-time compile is not timed)."""
    if kernels.compiled() is not None:
        import numba

        return f"2-D fit: compiled kernels (numba {numba.__version__})"
    why = f"{kernels.JIT_ENV}=0" if os.environ.get(kernels.JIT_ENV) else "numba unavailable"
    return f"2-D fit: numpy path ({why})"


def rel_err(got: tuple[float, float], truth: tuple[float, float]) -> tuple[float, float]:
    return abs(got[0] - truth[0]) / truth[0], abs(got[1] - truth[1]) / truth[1]


def fixed_cost(repeats: int) -> None:
    """Where the time of a small fit goes: each floored, noisy and border map of 64x64 timed
    against the same map made at 32x32 and 20x20 (4x and 10x fewer pixels), interleaved.

    A ratio near 1 means the call's time does not depend on the pixel count: numpy's and
    Python's fixed cost per operation, not arithmetic, sets it.
    """
    bu.header("bench_fit --fixed-cost: our fit at 20x20 and 32x32 against 64x64")
    print(f"   {fit_path()}")
    made = {n: make_cases(((n, n),)) for n in (20, 32, 64)}
    rows, shares = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, case in enumerate(made[64]):
            if case.category not in ("floor", "noise", "border"):
                continue
            funcs: dict[str, Callable[[], object]] = {
                str(n): functools.partial(ours, made[n][i].map) for n in made
            }
            times = bu.interleaved(funcs, repeats, warmup=1, min_round=0.05)
            share = bu.ratio(times["20"], times["64"])
            shares.append(share)
            rows.append(
                (
                    case.category,
                    case.name,
                    f"{1e3 * bu.median(times['64']):.2f}",
                    f"{bu.ratio(times['32'], times['64']):.2f}",
                    f"{share:.2f}",
                )
            )
    print(bu.table(("cat", "map (64x64)", "64x64 ms", "32x32 / 64x64", "20x20 / 64x64"), rows))
    print(
        f"   a 20x20 map (a tenth of the pixels) takes {np.median(shares):.2f} of the 64x64 time "
        f"(median over {len(shares)} maps; {min(shares):.2f}..{max(shares):.2f})"
    )


def kernels_vs_numpy(sizes: tuple[tuple[int, int], ...], repeats: int) -> None:
    """Our fit with its compiled kernels against its numpy path (``ERF_CALLBACK_JIT=0``) on
    every map, interleaved in one process, with the largest difference of the two fits."""
    bu.header("bench_fit --kernels: compiled kernels vs the numpy path, same maps")
    print(f"   {fit_path()}")
    if kernels.compiled() is None:
        print("   SKIP: the compiled kernels are not available here")
        return

    def on(a: np.ndarray, jit: bool) -> object:
        if jit:
            os.environ.pop(kernels.JIT_ENV, None)
        else:
            os.environ[kernels.JIT_ENV] = "0"
        return fit_gaussian(a)

    rows, ratios = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in make_cases(sizes):
            a = case.map
            funcs: dict[str, Callable[[], object]] = {
                "numpy": functools.partial(on, a, False),
                "compiled": functools.partial(on, a, True),
            }
            times = bu.interleaved(funcs, repeats, warmup=1, min_round=0.02)
            ref, got = on(a, False), on(a, True)
            os.environ.pop(kernels.JIT_ENV, None)
            scale = float(np.max(np.diag(ref.cov)))  # type: ignore[attr-defined]
            diff = float(np.max(np.abs(got.cov - ref.cov))) / scale  # type: ignore[attr-defined]
            r = bu.ratio(times["compiled"], times["numpy"])
            ratios.append((r, case))
            rows.append(
                (
                    case.category,
                    case.name,
                    f"{1e3 * bu.median(times['numpy']):.2f}",
                    f"{1e3 * bu.median(times['compiled']):.2f}",
                    f"{r:.2f}",
                    f"{diff:.1e}",
                )
            )
    print(bu.table(("cat", "map", "numpy ms", "compiled ms", "compiled / numpy", "cov diff"), rows))
    print("   cov diff: max |cov_compiled - cov_numpy| / max diag cov_numpy")
    for cat in CATEGORIES:
        rs = [r for r, c in ratios if c.category == cat]
        if rs:
            print(f"   {cat:7s} compiled / numpy {min(rs):.2f}..{max(rs):.2f} over {len(rs)} maps")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64x64 and 224x224 only")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per map")
    parser.add_argument(
        "--sizes", default=None, help="comma-separated HxW list, e.g. 64x64,512x512"
    )
    parser.add_argument(
        "--numpy",
        action="store_true",
        help=f"run the fit's numpy path ({kernels.JIT_ENV}=0), not its compiled kernels",
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="only time the compiled kernels against the numpy path (no OpenERF)",
    )
    parser.add_argument(
        "--fixed-cost",
        action="store_true",
        help="only time our fit at 20x20 and 32x32 against 64x64 (no OpenERF)",
    )
    args = parser.parse_args()
    if args.numpy:
        os.environ[kernels.JIT_ENV] = "0"
    repeats = args.repeats or (2 if args.quick else 4)
    if args.fixed_cost:
        fixed_cost(args.repeats or 9)
        return 0
    sizes = SIZES
    if args.sizes:
        sizes = tuple(
            (int(hw.split("x")[0]), int(hw.split("x")[1])) for hw in args.sizes.split(",")
        )
    elif args.quick:
        sizes = ((64, 64), (224, 224))
    if args.kernels:
        kernels_vs_numpy(sizes, args.repeats or 15)
        return 0

    bu.header("bench_fit: fit_gaussian (default method) vs OpenERF's lmfit Gaussian")
    print(f"   {fit_path()}")
    oe_fit, note = load_openerf_fit()
    cases = make_cases(sizes)
    print(f"   {note}" if oe_fit is not None else f"   SKIP OpenERF: {note}")

    rows, errs = [], {c: {"ours": [], "openerf": []} for c in CATEGORIES}
    speed: list[tuple[float, Case, float, float]] = []  # (ratio, case, ours ms, OpenERF ms)
    all_times: dict[str, list[float]] = {}
    oe_fail: list[str] = []
    for case in cases:
        a = case.map
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e_ours = max(rel_err(ours(a), case.sigma))
            funcs: dict[str, Callable[[], object]] = {"ours": lambda a=a: ours(a)}
            e_oe = float("nan")
            if oe_fit is not None:
                try:
                    e_oe = max(rel_err(openerf(oe_fit, a), case.sigma))
                except Exception as err:  # its failures are part of the result
                    e_oe = float("inf")
                    oe_fail.append(f"{case.category} {case.name}: {type(err).__name__}: {err}")
                else:
                    funcs["openerf"] = lambda a=a: openerf(oe_fit, a)
            # lmfit takes seconds on the large maps: fewer rounds there (its spread is small).
            reps = repeats if a.size <= 300_000 else max(1, repeats // 2)
            times = bu.interleaved(funcs, reps, warmup=1, min_round=0.02)
        all_times.update({f"{k} {case.category} {case.name}": v for k, v in times.items()})
        errs[case.category]["ours"].append(e_ours)
        errs[case.category]["openerf"].append(e_oe)
        t_ours = 1e3 * bu.median(times["ours"])
        t_oe = 1e3 * bu.median(times["openerf"]) if "openerf" in times else float("nan")
        sp = bu.ratio(times["openerf"], times["ours"]) if "openerf" in times else float("nan")
        if "openerf" in times:
            speed.append((sp, case, t_ours, t_oe))
        rows.append(
            (
                case.category,
                case.name,
                f"({case.sigma[0]:.3f}, {case.sigma[1]:.3f})",
                f"{e_ours:.1e}",
                f"{e_oe:.1e}",
                f"{t_ours:.2f}",
                f"{t_oe:.1f}",
                f"{sp:.0f}x",
            )
        )
        print(f"   done {case.category} {case.name}", file=sys.stderr, flush=True)
    print()
    print(
        bu.table(
            (
                "cat",
                "map",
                "true sigma (y, x)",
                "ours rel err",
                "OpenERF rel err",
                "ours ms",
                "OpenERF ms",
                "OpenERF/ours",
            ),
            rows,
        )
    )
    print("   rel err = max over y, x of |sigma - true| / true; times are medians of rounds")
    warning = bu.noise_warning(all_times, limit=2.0) if repeats >= 3 else None
    if warning:
        print(f"   {warning}")
    for line in oe_fail:
        print(f"   OpenERF raised on {line}")

    print()
    summary = []
    acc_ok = True
    for cat in CATEGORIES:
        e_o, e_r = np.array(errs[cat]["ours"]), np.array(errs[cat]["openerf"])
        if e_o.size == 0:
            continue
        worse = float(e_o.max()) > max(float(np.nanmax(e_r)) if oe_fit else np.inf, TIE)
        acc_ok = acc_ok and not worse
        summary.append(
            (
                cat,
                len(e_o),
                f"{e_o.max():.1e}",
                f"{np.median(e_o):.1e}",
                f"{np.nanmax(e_r):.1e}" if oe_fit else "n/a",
                f"{np.nanmedian(e_r):.1e}" if oe_fit else "n/a",
                ("ours worse" if worse else "ok") if oe_fit else "-",
            )
        )
    print(
        bu.table(
            ("category", "maps", "ours max", "ours median", "OpenERF max", "OpenERF median", ""),
            summary,
        )
    )
    print()
    if oe_fit is None or not speed:
        print(f"TARGET accuracy: ours <= OpenERF on every category: SKIPPED ({note})")
        print(f"TARGET speed: >= 20x on every category and size: SKIPPED ({note})")
        return 0
    print(
        f"   (accuracy compares the max error per category; errors below {TIE:g} on both sides "
        "count as a tie)"
    )
    # Speed per category and size: the worst (lowest) ratio over the maps of that cell.
    size_names = [f"{h}x{w}" for h, w in sizes]
    grid_rows = []
    for cat in CATEGORIES:
        cells = []
        for sz in size_names:
            r = [sp for sp, c, _, _ in speed if c.category == cat and _size(c) == sz]
            cells.append(f"{min(r):.0f}x" if r else "-")
        grid_rows.append((cat, *cells))
    print("   OpenERF time / ours, worst map of each category and size:")
    print(bu.table(("category", *size_names), grid_rows))
    ratios = [sp for sp, _, _, _ in speed]
    sp_med = float(np.median(ratios))
    worst = min(speed, key=lambda t: t[0])
    slowest = max(speed, key=lambda t: t[2])
    total_ours = sum(t for _, _, t, _ in speed)
    total_oe = sum(t for _, _, _, t in speed)
    print()
    print(
        f"   speed, OpenERF time / ours: median over {len(speed)} maps {sp_med:.1f}x; "
        f"worst map {worst[0]:.1f}x ({worst[1].category} {worst[1].name}); "
        f"total time over all maps {total_oe / total_ours:.1f}x "
        f"({total_oe:.0f} ms / {total_ours:.0f} ms)"
    )
    print(
        f"   slowest map for us: {slowest[1].category} {slowest[1].name}, {slowest[2]:.1f} ms "
        f"(OpenERF {slowest[3]:.0f} ms, {slowest[0]:.1f}x)"
    )
    print(
        f"TARGET accuracy: ours <= OpenERF on every category: {bu.verdict(acc_ok)} "
        f"(max rel err ours/OpenERF: "
        + ", ".join(
            f"{c} {max(errs[c]['ours']):.1e}/{np.nanmax(errs[c]['openerf']):.1e}"
            for c in CATEGORIES
            if errs[c]["ours"]
        )
        + ")"
    )
    print(
        f"TARGET speed: >= 20x on every category and size: {bu.verdict(worst[0] >= 20.0)} "
        f"(worst {worst[0]:.1f}x, median {sp_med:.1f}x, total {total_oe / total_ours:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
