"""Training wall time with ERFMonitor at its default schedule vs. without, on the demo's model.

Runs alternate (without, with, without, with, ...) in one process so machine noise hits both
sides alike; the ratio of medians is reported. Target: <= 1.03.

    python benchmarks/bench_callback.py [--steps 1500] [--repeats 2] [--quick]
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
import torch
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
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="300 steps, 1 repeat (smoke run)")
    args = parser.parse_args()
    steps, repeats = (300, 1) if args.quick else (args.steps, args.repeats)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    base, with_cb, monitors = [], [], []
    with tempfile.TemporaryDirectory() as root:
        train(50, None, root)  # warm-up: imports, allocator, thread pools
        for _ in range(repeats):
            base.append(train(steps, None, root))
            monitor = ERFMonitor(layers=LAYERS, module="net", num_samples=32)
            with_cb.append(train(steps, monitor, root))
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
    verdict = "PASS" if ratio <= 1.03 else "FAIL"
    print(f"TARGET training time with/without ERFMonitor: {ratio:.3f}x (target <= 1.03): {verdict}")


if __name__ == "__main__":
    main()
