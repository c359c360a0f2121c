"""Probing under DDP: 2 ranks sharing a probe vs. 1 process, and training overhead under DDP.

Part 1 (probe speed and agreement), 2 gloo processes on CPU with one thread each. Each round
times, on the same 32 ``inputs="noise"`` samples and the same ResNet-18 (bench_engine's):

* 2 ranks: both ranks call the callback's own probe path (``run_probe`` with a ``ProbeGroup``:
  each probes its 16-sample shard, then one all-reduce of sums and counts);
* 1 process: rank 0 alone runs ``compute_erf`` on all 32 samples (rank 1 waits at a barrier),
  in the same process, so both sides share every condition but the split.

Rounds alternate the order; the ratio is the median over rounds of the same-round ratio.
Target: <= 0.65. The maps' metrics of the two must agree to 1e-6 (relative).

Part 2 (training overhead), Lightning ``strategy="ddp_spawn"``, 2 CPU processes: the demo's
model trained with ERFMonitor at its default schedule vs. without, alternating; the time from
``on_train_start`` to ``on_train_end`` on rank 0 is compared. Target: <= 1.03.

    python benchmarks/bench_distributed.py [--rounds 15] [--steps 400] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _bench_utils import header, median, ratio, spread, verdict
from bench_engine import LAYER, ResNet18, randomize_bn_stats
from demo import QuadrantClassifier, make_quadrant_data

from erf_callback import ERFMonitor, ProbeConfig, compute_erf
from erf_callback.callback.distributed import ProbeGroup, run_probe
from erf_callback.callback.inputs import noise_like

NUM_SAMPLES = 32
METRICS = ("radius", "sigma_x", "sigma_y", "area_ratio@0.3", "area_ratio@0.5", "gaussian_r2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _probe_worker(rank: int, port: int, rounds: int, size: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = ResNet18()
    randomize_bn_stats(model)
    x = noise_like(torch.zeros(1, 3, size, size), NUM_SAMPLES, seed=0)
    cfg = ProbeConfig()
    group = ProbeGroup(rank, 2, lockstep=False, strategy="DDPStrategy")

    def shared() -> dict:
        return run_probe(model, x, [LAYER], cfg, group)

    def alone() -> dict | None:
        maps = compute_erf(model, x, [LAYER], probe=cfg) if rank == 0 else None
        dist.barrier()
        return maps

    times: dict[str, list[float]] = {"2 ranks": [], "1 process": []}
    cpu: dict[str, list[float]] = {"2 ranks": [], "1 process": []}
    maps = {"2 ranks": shared(), "1 process": alone()}  # warm-up, and the maps compared
    for r in range(rounds):
        order = ["2 ranks", "1 process"] if r % 2 == 0 else ["1 process", "2 ranks"]
        for name in order:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            shared() if name == "2 ranks" else alone()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    if rank == 0:
        warnings.filterwarnings("ignore")  # border notes: the comparison is what matters here
        a, b = maps["2 ranks"][LAYER], maps["1 process"][LAYER]
        ma, mb = a.metrics(), b.metrics()
        rel = max(abs(ma[k] - mb[k]) / max(1.0, abs(mb[k])) for k in METRICS)
        grad = float((a.grad - b.grad).abs().max() / b.grad.abs().max())
        torch.save({"times": times, "cpu": cpu, "metric_rel": rel, "grad_rel": grad}, out)
    dist.destroy_process_group()


def probe_part(rounds: int, size: int) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_probe_worker, args=(_free_port(), rounds, size, out), nprocs=2, join=True)
        res = torch.load(out)
    times = res["times"]
    print(f"-- probe: ResNet-18 {LAYER}, {NUM_SAMPLES} noise samples 3x{size}x{size}, gloo, ")
    print(f"   1 thread per process, {rounds} alternating rounds (median s, min..max/median)")
    for name, ts in times.items():
        print(f"   {name:10s}: {median(ts):.3f}s  ({spread(ts)})")
    r = ratio(times["2 ranks"], times["1 process"])
    cpu = ratio(res["cpu"]["2 ranks"], res["cpu"]["1 process"])
    print(
        f"   rank 0's CPU time, 2 ranks / 1 process: {cpu:.3f}x (its share of the work plus the "
        "all-reduce: the wall ratio to expect when each rank has a core of its own)"
    )
    ok_speed = r <= 0.65
    ok_equal = res["metric_rel"] <= 1e-6
    print(f"   maps: max |diff| / max |map| = {res['grad_rel']:.2e}")
    print(f"TARGET 2-rank probe / 1-process probe: {r:.3f}x (target <= 0.65): {verdict(ok_speed)}")
    print(
        f"TARGET metrics 2-rank vs 1-process, max |diff|/max(1,|v|): {res['metric_rel']:.1e} "
        f"(target <= 1e-6): {verdict(ok_equal)}"
    )
    return ok_speed and ok_equal


# ---- part 2: training overhead under DDP -----------------------------------------------------


class Timer(pl.Callback):
    """Rank 0's training time and probe time, saved to ``path`` (ddp_spawn returns nothing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            probes = sum(
                sum(m.probe_seconds) for m in trainer.callbacks if isinstance(m, ERFMonitor)
            )
            torch.save((time.perf_counter() - self.start, probes), self.path)


def _train_once(steps: int, with_monitor: bool, root: str) -> tuple[float, float]:
    """(training seconds, probe seconds) on rank 0 of a 2-process ddp_spawn run."""
    result = os.path.join(root, "timing.pt")
    callbacks: list[pl.Callback] = [Timer(result)]
    if with_monitor:
        callbacks.append(
            ERFMonitor(layers=["stage1", "stage2", "stage3"], module="net", num_samples=32)
        )
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=pl.loggers.TensorBoardLogger(root, name="bench"),
        callbacks=callbacks,
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    loader = DataLoader(make_quadrant_data(4096, seed=0), batch_size=32, shuffle=True)
    trainer.fit(QuadrantClassifier(steps=steps), loader)
    train_s, probe_s = torch.load(result)
    return float(train_s), float(probe_s)


def overhead_part(steps: int, repeats: int) -> bool:
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    base: list[float] = []
    with_cb: list[float] = []
    shares: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        for r in range(repeats):
            for monitored in (False, True) if r % 2 == 0 else (True, False):
                train_s, probe_s = _train_once(steps, monitored, root)
                (with_cb if monitored else base).append(train_s)
                if monitored:
                    shares.append(probe_s / train_s)
    print(f"-- training: demo model, ddp_spawn x2 (gloo), {steps} steps, {repeats} repeat(s)")
    print(f"   without ERFMonitor: {', '.join(f'{t:.2f}s' for t in base)}")
    print(f"   with ERFMonitor   : {', '.join(f'{t:.2f}s' for t in with_cb)}")
    print(
        "   probe time / training time on rank 0 (inside the run, less noisy): "
        + ", ".join(f"{100 * s:.2f}%" for s in shares)
    )
    r = ratio(with_cb, base)
    print(f"TARGET DDP training time with/without ERFMonitor: {r:.3f}x (target <= 1.03): "
          f"{verdict(r <= 1.03)}")  # fmt: skip
    return r <= 1.03


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 100 steps")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.repeats = 3, 100, 1
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    header("bench_distributed: sharing the probe among DDP ranks")
    ok = probe_part(args.rounds, args.size)
    if not args.skip_training:
        ok = overhead_part(args.steps, args.repeats) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
