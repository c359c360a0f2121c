"""A tiny LightningModule for both Lightning namespaces (tests only)."""

from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def make_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def data(n: int = 64, size: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(x, y)


def module_class(namespace: str = "pytorch_lightning"):
    pl = importlib.import_module("lightning.pytorch" if namespace == "lightning" else namespace)

    class Classifier(pl.LightningModule):
        def __init__(self, batch_size: int = 8, poison_after: int | None = None) -> None:
            super().__init__()
            self.net = make_net()
            self.batch_size = batch_size
            self.poison_after = poison_after
            self.training_steps = 0

        def forward(self, x):
            if self.poison_after is not None and self.global_step >= self.poison_after:
                x = x * float("nan")  # numerical trouble in the probe's forward only
            return self.net(x)

        def training_step(self, batch, batch_idx):
            self.training_steps += 1
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(data(), batch_size=self.batch_size, shuffle=True)

        def val_dataloader(self):
            return DataLoader(data(16, seed=1), batch_size=8)

    return Classifier


def two_optimiser_class(namespace: str = "pytorch_lightning"):
    """The classifier trained GAN-style: manual optimisation, two optimisers (the first and
    second half of the network) stepped every batch, so ``global_step`` moves 2 per batch."""

    class TwoOptimisers(module_class(namespace)):
        def __init__(self, batch_size: int = 8) -> None:
            super().__init__(batch_size)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            self.training_steps += 1
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()

        def configure_optimizers(self):
            half = len(self.net) // 2
            return [
                torch.optim.SGD(self.net[:half].parameters(), lr=0.1),
                torch.optim.SGD(self.net[half:].parameters(), lr=0.1),
            ]

    return TwoOptimisers


def trainer_class(namespace: str = "pytorch_lightning"):
    pl = importlib.import_module("lightning.pytorch" if namespace == "lightning" else namespace)
    return pl.Trainer, pl.loggers


def make_trainer(tmp_path, callbacks, namespace: str = "pytorch_lightning", **kwargs):
    Trainer, loggers = trainer_class(namespace)
    defaults = {
        "default_root_dir": str(tmp_path),
        "max_steps": 5,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "logger": loggers.TensorBoardLogger(str(tmp_path), name="tb"),
        "log_every_n_steps": 1,
        "deterministic": True,
    }
    defaults.update(kwargs)
    return Trainer(callbacks=callbacks, **defaults)
