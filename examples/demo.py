"""erf-callback demo: watch the effective receptive field grow while a small ResNet learns.

The task needs long-range context: a bright blob sits somewhere on a noisy 32x32 image and the
label is the quadrant it is in. A convolution only knows *where* it is by seeing the image
border (zero padding), so units must learn to look far: the ERF grows during training.

Run:  make demo        (or .venv/bin/python examples/demo.py; it prints its own run time)
Then: make tensorboard  (or .venv/bin/tensorboard --logdir erf_demo_logs), open the URL it prints
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from erf_callback import ERFMonitor


def make_quadrant_data(n: int, size: int = 32, seed: int = 0) -> TensorDataset:
    """Noisy images with one blob; label = the quadrant of the blob (0..3)."""
    g = torch.Generator().manual_seed(seed)
    images = 0.5 * torch.randn(n, 1, size, size, generator=g)
    ys = torch.randint(3, size - 3, (n,), generator=g)
    xs = torch.randint(3, size - 3, (n,), generator=g)
    grid = torch.arange(size)
    blob = torch.exp(
        -(
            (grid[None, :, None] - ys[:, None, None]) ** 2
            + (grid[None, None, :] - xs[:, None, None]) ** 2
        )
        / (2 * 1.5**2)
    )
    images[:, 0] += 2.0 * blob
    labels = (ys >= size // 2).long() * 2 + (xs >= size // 2).long()
    return TensorDataset(images, labels)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Three residual stages (8, 16, 32 channels), global pooling, linear head."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.stage1 = nn.Sequential(Block(8, 8, 1), Block(8, 8, 1))
        self.stage2 = nn.Sequential(Block(8, 16, 2), Block(16, 16, 1))
        self.stage3 = nn.Sequential(Block(16, 32, 2), Block(32, 32, 1))
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(F.relu(self.stem(x)))))
        return self.head(self.dropout(x.mean(dim=(2, 3))))


class QuadrantClassifier(pl.LightningModule):
    def __init__(self, lr: float = 5e-3, steps: int = 500) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = SmallResNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):  # Lightning accepts several return shapes
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, self.hparams.lr, total_steps=self.hparams.steps
        )
        return [opt], [{"scheduler": sched, "interval": "step"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=50, help="probe every N optimiser steps")
    parser.add_argument("--logdir", default="erf_demo_logs")
    parser.add_argument("--figures", default=None, help="also save the final pictures as PNGs here")
    args = parser.parse_args()

    pl.seed_everything(0, workers=True)
    # No torch.set_num_threads here: torch's own choice adapts to the machine; forcing more
    # threads than there are free cores makes every step slower on a busy machine.
    train = DataLoader(make_quadrant_data(8192, seed=0), batch_size=32, shuffle=True)
    val = DataLoader(make_quadrant_data(512, seed=1), batch_size=256)

    monitor = ERFMonitor(
        layers=["stage1", "stage2", "stage3"],
        module="net",
        every_n_steps=args.every,
        num_samples=32,
    )
    logger = pl.loggers.TensorBoardLogger(args.logdir, name="quadrants")
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=logger,
        callbacks=[monitor],
        log_every_n_steps=20,
        val_check_interval=250,
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
    )
    start = time.perf_counter()
    trainer.fit(QuadrantClassifier(steps=args.steps), train, val)
    elapsed = time.perf_counter() - start

    acc = float(trainer.callback_metrics.get("val/acc", float("nan")))
    print(
        f"\nTrained {args.steps} steps in {elapsed:.0f}s (validation accuracy {acc:.3f}); "
        f"{len(monitor.probe_seconds)} ERF probes took {sum(monitor.probe_seconds):.1f}s in total."
    )
    print("ERF radius (2 x geometric-mean sigma, input pixels), initialisation -> end of training:")
    for layer in monitor.layers or []:
        rows = [r for r in monitor.history.records if r["layer"] == layer and r["status"] == "ok"]
        first, last = rows[0], rows[-1]
        print(
            f"  {layer:7s} radius {first['radius']:6.2f} -> {last['radius']:6.2f} px "
            f"(x{last['radius_growth']:.2f}),  ERF/TRF {first['erf_trf_ratio']:.2f} -> "
            f"{last['erf_trf_ratio']:.2f},  correlation with init map {last['map_correlation']:.2f}"
        )
    print(f"\nTensorBoard logs and erf_history.csv/json are in: {logger.log_dir}")
    print(f"Open them with:  {tensorboard_command(args.logdir)}")
    print("  then open the http://localhost:6006/ address it prints, in a browser:")
    print("  IMAGES:  erf/all_layers/radius (every layer's radius over training, one colour each),")
    print("           erf/all_layers/heatmaps (every layer's map on one scale),")
    print("           erf/<layer>/init_vs_now, heatmap, heatmap_init, evolution, radial_profile")
    print("  SCALARS: erf/<layer>/radius, radius_growth, erf_trf_ratio, gaussian_r2, border_mass;")
    print("           every other metric under erf_detail/. Probes are sparse: set Smoothing to 0.")
    print("  HPARAMS: the final ERF metrics of each run, side by side")
    if args.figures:
        save_figures(monitor, trainer, args.figures)


def tensorboard_command(logdir: str) -> str:
    """A TensorBoard command that works as printed: ``make tensorboard`` for the default
    log dir in a checkout, else the ``tensorboard`` next to this Python (venvs are rarely on
    PATH)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    in_checkout = os.path.abspath(os.getcwd()) == here
    if logdir == "erf_demo_logs" and in_checkout and os.path.exists("Makefile"):
        return "make tensorboard"
    script = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if os.path.exists(script):
        rel = os.path.relpath(script)
        return f"{rel if not rel.startswith('..') else script} --logdir {logdir}"
    return f"{sys.executable} -m tensorboard.main --logdir {logdir}"


def save_figures(monitor: ERFMonitor, trainer: pl.Trainer, directory: str) -> None:
    """Write the last probe's pictures (the same images TensorBoard shows) as PNG files."""
    import matplotlib.image

    from erf_callback import compute_erf
    from erf_callback.callback.images import render_probe_images

    os.makedirs(directory, exist_ok=True)
    maps = compute_erf(trainer.lightning_module.net, monitor.probe_inputs, monitor.layers)
    # The renderer the callback uses for TensorBoard; the init map comes from the history.
    images = render_probe_images(maps, monitor.history, "erf", step=trainer.global_step)
    for tag, img in images.items():
        name = tag.replace("erf/", "").replace("/", "_") + ".png"
        matplotlib.image.imsave(os.path.join(directory, name), img)
    print(f"Saved {len(images)} pictures to {directory}")


if __name__ == "__main__":
    main()
