"""Shared helpers of the benchmark scripts: interleaved timing, medians of ratios, tables.

Machines are noisy, so every benchmark compares a candidate with a baseline measured in the
same process: repetitions of all variants are interleaved (the order alternates every round),
after a warm-up, and a ratio is the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: import the working tree's package
    sys.path.insert(0, str(ROOT))


def interleaved(
    funcs: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    min_round: float = 0.0,
) -> dict[str, list[float]]:
    """Seconds per call of each function; rounds alternate forward and reverse order.

    With ``min_round`` > 0, a function faster than that is called in a loop (sized once from
    its warm-up time) so each timed round lasts about ``min_round`` seconds, as timeit does:
    a single sub-millisecond call is dominated by timer and cold-cache noise.
    """
    loops = dict.fromkeys(funcs, 1)
    for _ in range(warmup):
        for k, f in funcs.items():
            t0 = time.perf_counter()
            f()
            if sync is not None:
                sync()
            took = time.perf_counter() - t0
            if min_round > 0:
                loops[k] = max(1, min(1000, int(min_round / max(took, 1e-9))))
    names = list(funcs)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            gc.collect()
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            for _ in range(loops[k]):
                funcs[k]()
            if sync is not None:
                sync()
            times[k].append((time.perf_counter() - t0) / loops[k])
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of ``numerator[r] / denominator[r]`` (same-round pairs)."""
    return median([a / b for a, b in zip(numerator, denominator, strict=True)])


def spread(values: Sequence[float]) -> str:
    """``min..max`` relative to the median, to show how noisy a row is."""
    m = median(values)
    return f"{min(values) / m:.2f}..{max(values) / m:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def header(title: str) -> None:
    import numpy as np

    try:
        import torch

        torch_info = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:  # pragma: no cover
        torch_info = "no torch"
    print(f"== {title}")
    print(f"   {load_note()}")
    print(
        f"   python {platform.python_version()}, {torch_info}, numpy {np.__version__}, "
        f"{platform.machine()} ({platform.processor() or 'cpu'})"
    )


def load_note() -> str:
    """The 1-minute load average against the core count (other jobs skew every timing)."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return "load average unknown"
    return f"load average {load:.2f} on {os.cpu_count()} cores"


def noise_warning(times: dict[str, list[float]], limit: float = 1.5) -> str | None:
    """A warning when some variant's slowest round is over ``limit`` x its median."""
    noisy = [k for k, ts in times.items() if max(ts) > limit * median(ts)]
    if not noisy:
        return None
    return (
        f"WARNING: noisy run ({load_note()}): {len(noisy)} of {len(times)} variants had a round "
        f"over {limit:g}x their median; the ratios below may be off. Re-run on a quiet machine."
    )
