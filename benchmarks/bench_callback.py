"""Training wall time with ERFMonitor at its default schedule vs. without, on the demo's model.

Both sides are warmed once, then runs alternate in one process and swap their order every
repeat (without-with, with-without, ...), so machine noise and drift hit both sides alike.
Reported: the ratio of medians, and each repeat's paired ratio with their spread (the
resolution of the figure: a 3% target needs a spread well under 3%). Target: <= 1.03.

    python benchmarks/bench_callback.py [--steps 1500] [--repeats 6] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import pytorch_lightning as pl
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from demo import QuadrantClassifier, make_quadrant_data

from erf_callback import ERFMonitor

LAYERS = ["stage1", "stage2", "stage3"]


def train(steps: int, monitor: ERFMonitor | None, root: str) -> float:
    pl.seed_everything(0, workers=True, verbose=False)
    loader = DataLoader(make_quadrant_data(8192, seed=0), batch_size=32, shuffle=True)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=pl.loggers.TensorBoardLogger(root, name="bench"),
        callbacks=[monitor] if monitor else [],
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    model = QuadrantClassifier(steps=steps)
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="300 steps, 1 repeat (smoke run)")
    args = parser.parse_args()
    steps, repeats = (300, 2) if args.quick else (args.steps, args.repeats)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    base, with_cb, monitors = [], [], []
    with tempfile.TemporaryDirectory() as root:
        # Warm both sides: imports, allocator, thread pools, matplotlib's font cache.
        train(50, None, root)
        train(50, ERFMonitor(layers=LAYERS, module="net", num_samples=32), root)
        for i in range(repeats):
            monitor = ERFMonitor(layers=LAYERS, module="net", num_samples=32)
            if i % 2 == 0:
                base.append(train(steps, None, root))
                with_cb.append(train(steps, monitor, root))
            else:
                with_cb.append(train(steps, monitor, root))
                base.append(train(steps, None, root))
            monitors.append(monitor)

    step_s = statistics.median(base) / steps
    probes = [s for m in monitors for s in m.probe_seconds]
    ratio = statistics.median(with_cb) / statistics.median(base)
    print(f"demo model, {steps} optimiser steps, {repeats} alternating repeat(s), 3 layers probed")
    print(f"  without ERFMonitor : {', '.join(f'{t:.2f}s' for t in base)}")
    print(f"  with ERFMonitor    : {', '.join(f'{t:.2f}s' for t in with_cb)}")
    for i, m in enumerate(monitors):
        steps_probed = sorted({r["step"] for r in m.history.records})
        print(
            f"  run {i}: automatic interval = {m.schedule.auto_interval} steps, "
            f"{len(m.probe_seconds)} probes at steps {steps_probed}"
        )
    print(
        f"  one probe (3 layers, 32 samples, metrics + images) = {statistics.median(probes):.3f}s"
        f" = {statistics.median(probes) / step_s:.1f} training steps ({step_s * 1e3:.1f} ms/step)"
    )
    shares = [sum(m.probe_seconds) / t for m, t in zip(monitors, with_cb, strict=True)]
    print(
        "  probe time / training time with ERFMonitor (measured inside the run, less noisy than "
        f"the wall-time ratio): {', '.join(f'{100 * x:.2f}%' for x in shares)}"
    )
    paired = [w / b for w, b in zip(with_cb, base, strict=True)]
    spread = statistics.stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else float("nan")
    print(
        f"  paired ratios: {', '.join(f'{r:.3f}' for r in paired)}; median "
        f"{statistics.median(paired):.3f}, standard error of the mean {spread:.3f}"
    )
    verdict = "PASS" if ratio <= 1.03 else "FAIL"
    print(f"TARGET training time with/without ERFMonitor: {ratio:.3f}x (target <= 1.03): {verdict}")


if __name__ == "__main__":
    main()
