"""Transformer: the ERF of one patch token of a small ViT, via ``output_transform``.

A ViT block outputs tokens ``(N, 1 + h*w, D)``, not an ``(N, C, H, W)`` grid; the
``output_transform=tokens_to_grid((h, w), num_prefix_tokens=1)`` drops the class token and
reshapes the patch tokens into a grid, so the centre patch token is probed like a conv unit.

What it shows: the patch embedding (a strided conv) sees exactly its own 4x4 patch; after one
attention block the same token already draws on the whole image (self-attention is global:
the theoretical RF is the whole input), and the share of the ERF outside its own patch grows
with depth. Blocks use pre-norm (``norm_first=True``): a post-norm block ends in LayerNorm,
whose channel sum is constant, which would make the summed unit's gradient zero.

Run:  python examples/vit_patch.py --out erf_vit      (a few seconds)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from erf_callback import compute_erf, tokens_to_grid

PATCH = 4


class TinyViT(nn.Module):
    """Patch embedding (conv, stride = patch), class token, position embedding, pre-norm blocks."""

    def __init__(self, image: int = 32, dim: int = 32, depth: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.grid = image // PATCH
        self.patch_embed = nn.Conv2d(1, dim, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + self.grid**2, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, h*w, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(tokens[:, 0])


def patch_share(m: Any) -> float:
    """Share of the ERF inside the probed token's own patch."""
    erf = m.numpy()
    r, c = (p * PATCH for p in m.position)
    return float(erf[r : r + PATCH, c : c + PATCH].sum() / erf.sum())


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Probe the centre patch token after every block; returns per layer its share and metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--out", default="erf_vit", help="folder for the figure")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    net = TinyViT(depth=args.depth)
    to_grid = tokens_to_grid((net.grid, net.grid), num_prefix_tokens=1)
    blocks = [f"blocks.{i}" for i in range(args.depth)]
    maps = compute_erf(
        net,
        torch.randn(args.num_samples, 1, 32, 32),
        ["patch_embed", *blocks],
        output_transform={b: to_grid for b in blocks},  # patch_embed already outputs a grid
    )
    result: dict[str, dict[str, float]] = {}
    print(f"{'layer':12s} {'own patch':>9s} {'radius':>7s} {'TRF':>5s}")
    for name, m in maps.items():
        metrics = m.metrics()
        result[name] = {"patch_share": patch_share(m), **metrics}
        print(f"{name:12s} {patch_share(m):9.3f} {metrics['radius']:7.2f} {metrics['trf_x']:5g}")
    save_figure(maps, args.out)
    return result


def save_figure(maps: dict[str, Any], directory: str) -> str:
    """One log-scale heatmap per layer, with the probed token's patch outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    os.makedirs(directory, exist_ok=True)
    fig = Figure(figsize=(2.6 * len(maps), 2.8), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, m) in enumerate(maps.items()):
        ax = fig.add_subplot(1, len(maps), i + 1)
        erf = m.numpy()
        ax.imshow(np.log10(erf / erf.max() + 1e-4), cmap="inferno", vmin=-4, vmax=0)
        r, c = (p * PATCH for p in m.position)
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), PATCH, PATCH, fill=False, ec="cyan", lw=1.5))
        ax.set_title(f"{name}\nown patch {patch_share(m):.0%}", fontsize=9)
        ax.axis("off")
    fig.suptitle("ViT: ERF of the centre patch token (log scale)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(directory, "vit_patch_erf.png")
    fig.savefig(path)
    print(f"figure: {path}")
    return path


if __name__ == "__main__":
    main()
