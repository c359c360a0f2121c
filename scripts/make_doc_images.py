"""Regenerate every picture of the documentation site (docs/images/) with the package's own code.

* ``stage3_*.png``: the pictures ``examples/demo.py --figures`` saves (the images TensorBoard
  shows) after 500 steps (the demo's default, as ``scripts/screenshots.py`` reads them from
  ``make demo``'s logs; the docs' text describes that run), and ``cli_report.png``, the
  ``erf-callback report`` page of that run.
* ``closed_form.png``: measured variance of uniform conv stacks against n(k^2 - 1)/12.
* ``layers_side_by_side.png``: five layers of a small conv net on one scale, as a notebook
  draws what ``compute_erf`` returns (``render_erf_maps``).
* ``luo_replication.png``, ``tcn_erf.png``, ``vit_patch_erf.png``: the gallery's examples.

Run:  python scripts/make_doc_images.py            (a few minutes on an idle laptop CPU)
      python scripts/make_doc_images.py --quick    (keeps stage3_*.png; the report is of a
                                                    short examples/plain_pytorch.py run)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image
from torch import nn

from erf_callback import compute_erf
from erf_callback.cli.report import read_history, write_report

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load_example(name: str) -> ModuleType:
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (``--out`` may be anywhere)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def save(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, optimize=True)
    print(f"  {shown(path)}")


def demo_images(out: Path, steps: int) -> None:
    """Run the demo (Lightning + ERFMonitor); keep its stage3 pictures and report its run."""
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures"
        cmd = [sys.executable, str(EXAMPLES / "demo.py"), "--steps", str(steps),
               "--logdir", str(Path(tmp) / "logs"), "--figures", str(figures)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[1:]])}
        done = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
        pictures = sorted(figures.glob("stage3_*.png")) if figures.is_dir() else []
        if done.returncode != 0 or not pictures:
            print(f"  the demo failed (exit {done.returncode}): stage3_*.png not updated")
        for picture in pictures:
            with Image.open(picture) as img:
                save(np.asarray(img.convert("RGB")), out / picture.name)
        histories = sorted((Path(tmp) / "logs").rglob("erf_history.json"))
        if not histories:
            raise SystemExit("the demo wrote no erf_history.json: cli_report.png not made")
        with tempfile.TemporaryDirectory() as report_dir:
            png, _ = write_report(read_history(histories[-1]), Path(report_dir))
            with Image.open(png) as img:
                save(np.asarray(img.convert("RGB")), out / "cli_report.png")


def quick_report(out: Path, steps: int) -> None:
    """``cli_report.png`` from a short run of the plain-PyTorch example (no Lightning run)."""
    with tempfile.TemporaryDirectory() as tmp:
        load_example("plain_pytorch").main(
            ["--steps", str(steps), "--every", "20", "--logdir", tmp]
        )
        history = next(Path(tmp).rglob("erf_history.json"))
        with tempfile.TemporaryDirectory() as report_dir:
            png, _ = write_report(read_history(history), Path(report_dir))
            with Image.open(png) as img:
                save(np.asarray(img.convert("RGB")), out / "cli_report.png")


def closed_form_image(out: Path) -> None:
    """Uniform stacks of n k x k convolutions: measured per-axis variance vs n(k^2-1)/12."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k in (3, 5, 7):
        depths = list(range(1, 9))
        measured, expected = [], []
        for n in depths:
            convs = [nn.Conv2d(1, 1, k, padding=k // 2, bias=False) for _ in range(n)]
            for c in convs:
                nn.init.constant_(c.weight, 1.0)
            m = compute_erf(nn.Sequential(*convs), torch.rand(2, 1, 97, 97), None)["output"]
            measured.append(m.metrics()["sigma_x"] ** 2)
            expected.append(n * (k * k - 1) / 12)
        ax.plot(depths, expected, "-", color="grey", lw=1)
        ax.plot(depths, measured, "o", label=f"k = {k}")
    ax.set(xlabel="depth n", ylabel="per-axis variance (px²)")
    ax.set_title("uniform stacks: measured (dots) vs n(k²-1)/12 (lines)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "closed_form.png"
    fig.savefig(path)
    print(f"  {shown(path)}")


def layers_image(out: Path) -> None:
    """Five depths of a 10-block conv-BN-ReLU net (strides 2 at blocks 4 and 7; eval mode) on
    96 px noise: what a notebook shows for ``compute_erf``'s result."""
    from erf_callback.render import render_erf_maps

    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for i in range(10):
        stride = 2 if i in (3, 6) else 1
        blocks += [nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1, stride=stride)]
        blocks += [nn.BatchNorm2d(16), nn.ReLU()]
    net = nn.Sequential(*blocks).eval()
    maps = compute_erf(net, torch.randn(16, 3, 96, 96), ["2", "8", "17", "23", "29"])
    save(render_erf_maps(maps), out / "layers_side_by_side.png")


def example_images(out: Path, quick: bool) -> None:
    luo = ["--train-steps", "150"] if quick else []
    with tempfile.TemporaryDirectory() as tmp:
        load_example("luo_replication").main(["--out", tmp, *luo])
        load_example("tcn_1d").main(["--out", tmp])
        load_example("vit_patch").main(["--out", tmp])
        for name in ("luo_replication.png", "tcn_erf.png", "vit_patch_erf.png"):
            with Image.open(Path(tmp) / name) as img:
                save(np.asarray(img.convert("RGB")), out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--steps", type=int, default=500, help="training steps of the demo")
    parser.add_argument("--quick", action="store_true", help="skip the demo (slow on a busy CPU)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models: one thread is fastest
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("writing:")
    closed_form_image(out)
    layers_image(out)
    if args.quick:
        quick_report(out, 120)
    else:
        demo_images(out, args.steps)
    example_images(out, args.quick)


if __name__ == "__main__":
    main()
