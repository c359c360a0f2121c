"""fit_gaussian against OpenERF's lmfit 2-D Gaussian fit: sigma accuracy and speed.

Run: ``.venv/bin/python benchmarks/bench_fit.py`` (``--quick`` for a smoke run).

OpenERF (PyPI ``openerf`` 0.6.1, MIT) fits ``amp * N(xc, yc, sigma_x, sigma_y)`` (axis-aligned,
no floor term) to the sum-normalised map with ``lmfit.Model``, starting from ``xc, yc = 0.8 *
median(x), 0.8 * median(y)`` and ``sigma = (W / 10, H / 6) / 1.5``. Importing the ``openerf``
package pulls in timm, so only its ``openerf/fit.py`` (numpy + lmfit) is loaded, from a wheel
that this script downloads with pip into the git-ignored ``.bench_cache/`` on first use.

Map categories (float64, 32..256 px), each with a known per-axis sigma:

* ``stack``: n layers of k x k all-ones kernels applied to a centred delta; the exact moment
  sigma is ``sqrt(n (k^2 - 1) / 12)`` per axis (not Gaussian for small n: a box, a pyramid...).
* ``gauss``: sampled axis-aligned anisotropic Gaussians.
* ``floor``: the same Gaussians plus a uniform floor at 0.2% of the peak.
* ``noise``: the same Gaussians plus ``mean_32 |N(0, s)|`` per pixel (a 32-sample ERF's noise).

Accuracy is the relative sigma error per axis (the worse of y and x is tabulated). Speed is the
median over interleaved rounds of OpenERF's time / ours on the same map.
"""

from __future__ import annotations

import argparse
import importlib.util
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

OPENERF_VERSION = "0.6.1"
CACHE = bu.ROOT / ".bench_cache" / f"openerf-{OPENERF_VERSION}"
CATEGORIES = ("stack", "gauss", "floor", "noise")
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


def stack_map(size: int, n: int, ky: int, kx: int) -> Case:
    """n layers of ky x kx all-ones kernels on a centred delta (separable, exact in float64)."""
    a = np.zeros((size, size))
    py, px = _box_stack_1d(n, ky), _box_stack_1d(n, kx)
    y0, x0 = size // 2 - len(py) // 2, size // 2 - len(px) // 2
    a[y0 : y0 + len(py), x0 : x0 + len(px)] = np.outer(py, px)
    sig = (np.sqrt(n * (ky * ky - 1) / 12.0), np.sqrt(n * (kx * kx - 1) / 12.0))
    return Case("stack", f"n={n} k={ky}x{kx}", a, (float(sig[0]), float(sig[1])))


def gaussian(size: int, sy: float, sx: float, dy: float = 0.0, dx: float = 0.0) -> np.ndarray:
    y = np.arange(size, dtype=np.float64)[:, None] - (size / 2 + dy)
    x = np.arange(size, dtype=np.float64)[None, :] - (size / 2 + dx)
    return np.exp(-0.5 * ((y / sy) ** 2 + (x / sx) ** 2))


GAUSSIANS = (  # size, sigma_y, sigma_x, offset_y, offset_x; the map holds +-5 sigma
    (32, 2.0, 3.0, 0.3, -0.7),
    (64, 5.0, 3.5, 2.0, -1.5),
    (64, 4.0, 6.0, 0.0, 0.0),
    (128, 12.0, 7.0, -3.0, 5.0),
    (128, 9.0, 11.0, 1.5, 0.5),
    (256, 20.0, 14.0, 4.0, -6.0),
    (256, 8.0, 24.0, 0.0, 3.0),
)


def make_cases(seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = [
        stack_map(32, 1, 3, 3),
        stack_map(32, 2, 3, 3),
        stack_map(32, 3, 5, 3),
        stack_map(64, 4, 3, 3),
        stack_map(64, 2, 7, 7),
        stack_map(64, 8, 3, 5),
        stack_map(128, 16, 3, 3),
        stack_map(128, 3, 11, 11),
        stack_map(256, 32, 3, 3),
        stack_map(256, 10, 7, 5),
    ]
    for size, sy, sx, dy, dx in GAUSSIANS:
        g = gaussian(size, sy, sx, dy, dx)
        tag = f"{size}px s=({sy:g},{sx:g})"
        cases.append(Case("gauss", tag, g, (sy, sx)))
        cases.append(Case("floor", tag + " +0.2% floor", g + 0.002 * g.max(), (sy, sx)))
        s = 0.005 * g.max()
        noise = np.abs(rng.normal(0.0, s, (32, size, size))).mean(axis=0)
        cases.append(Case("noise", tag + " +|N(0,0.5%)|", g + noise, (sy, sx)))
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(cases, key=lambda c: order[c.category])


# --------------------------------------------------------------------------------------------


def ours(a: np.ndarray) -> tuple[float, float]:
    s = fit_gaussian(a).sigma
    return float(s[0]), float(s[1])


def openerf(fit: Callable[[np.ndarray], object], a: np.ndarray) -> tuple[float, float]:
    r = fit(a / a.sum())  # what openerf.erf does: the sum-normalised map
    return float(r.sigma_y), float(r.sigma_x)  # type: ignore[attr-defined]


def rel_err(got: tuple[float, float], truth: tuple[float, float]) -> tuple[float, float]:
    return abs(got[0] - truth[0]) / truth[0], abs(got[1] - truth[1]) / truth[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per map")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)

    bu.header("bench_fit: fit_gaussian (default method) vs OpenERF's lmfit Gaussian")
    oe_fit, note = load_openerf_fit()
    cases = make_cases()
    if args.quick:  # one small and one large map per category
        cases = [c for i, c in enumerate(cases) if i % 4 == 0]
    if oe_fit is None:
        print(f"   SKIP OpenERF: {note}")
    else:
        print(f"   {note}")

    rows, errs, speed = [], {c: {"ours": [], "openerf": []} for c in CATEGORIES}, []
    all_times: dict[str, list[float]] = {}
    oe_fail: list[str] = []
    total_oe = total_ours = 0.0
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
            times = bu.interleaved(funcs, repeats, warmup=1, min_round=0.02)
        all_times.update({f"{k} {case.category} {case.name}": v for k, v in times.items()})
        errs[case.category]["ours"].append(e_ours)
        errs[case.category]["openerf"].append(e_oe)
        t_ours = 1e3 * bu.median(times["ours"])
        t_oe = 1e3 * bu.median(times["openerf"]) if "openerf" in times else float("nan")
        sp = bu.ratio(times["openerf"], times["ours"]) if "openerf" in times else float("nan")
        if "openerf" in times:
            speed.append(sp)
            total_oe += t_oe
            total_ours += t_ours
        rows.append(
            (
                case.category,
                f"{case.name} [{a.shape[0]}px]" if case.category == "stack" else case.name,
                f"({case.sigma[0]:.3f}, {case.sigma[1]:.3f})",
                f"{e_ours:.1e}",
                f"{e_oe:.1e}",
                f"{t_ours:.2f}",
                f"{t_oe:.1f}",
                f"{sp:.0f}x",
            )
        )
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
    if oe_fit is None:
        print(f"TARGET accuracy: ours <= OpenERF on every category: SKIPPED ({note})")
        print(f"TARGET speed: >= 20x: SKIPPED ({note})")
        return 0
    print(
        f"   (accuracy compares the max error per category; errors below {TIE:g} on both sides "
        "count as a tie)"
    )
    sp_med, sp_min = float(np.median(speed)), float(np.min(speed))
    print(
        f"   speed, OpenERF time / ours: median over maps {sp_med:.1f}x, slowest map "
        f"{sp_min:.1f}x, total time over all maps {total_oe / total_ours:.1f}x "
        f"({total_oe:.0f} ms / {total_ours:.0f} ms)"
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
        f"TARGET speed: >= 20x: {bu.verdict(sp_med >= 20.0)} (OpenERF time / ours, median over "
        f"{len(speed)} maps: {sp_med:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
