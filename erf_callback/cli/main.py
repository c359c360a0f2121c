"""Argument parsing and the error boundary of ``erf-callback``.

User errors (:class:`~erf_callback.cli.errors.CLIError`) print one line,
``erf-callback: error: <problem>; <fix>``, and exit with status 2, as argparse does for bad
arguments. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from erf_callback.cli.errors import EXIT_USAGE, CLIError

__all__ = ["build_parser", "main"]

_EPILOG = """examples:
  erf-callback probe mymodels:build_resnet --layers layer2 layer4 --out erf_out
  erf-callback probe mymodels:build_resnet --layers layer4 --checkpoint last.ckpt \\
      --inputs images/ --size 224 224 --normalize imagenet --out erf_out
  erf-callback report lightning_logs/version_0 --out report/
  erf-callback layers mymodels:build_resnet
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``erf-callback`` (``probe``, ``report``, ``layers``)."""
    parser = argparse.ArgumentParser(
        prog="erf-callback",
        description="Measure effective receptive fields offline, and report on tracked runs.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    probe = sub.add_parser(
        "probe",
        help="ERF of layers of a model built by MODULE:FACTORY (metrics.json + PNGs)",
        description="Build the model by calling FACTORY() from MODULE (importable from the "
        "current directory, or path/to/file.py), optionally load a checkpoint, probe the "
        "layers, and write DIR/metrics.json and a heatmap and radial profile PNG per layer.",
    )
    probe.add_argument("factory", metavar="MODULE:FACTORY")
    probe.add_argument(
        "--layers",
        nargs="+",
        required=True,
        metavar="LAYER",
        help="names as in model.named_modules(); 'output' = the model output",
    )
    probe.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    probe.add_argument(
        "--checkpoint", metavar="PATH", help="a state dict (torch.save) or a Lightning .ckpt"
    )
    probe.add_argument(
        "--prefix", default=None, help="key prefix to drop from the checkpoint (default: detected)"
    )
    probe.add_argument(
        "--unsafe-load",
        action="store_true",
        help="torch.load with weights_only=False (runs the file's pickled code)",
    )
    probe.add_argument(
        "--inputs",
        default="noise",
        metavar="noise|FOLDER",
        help="Gaussian noise (default) or a folder of images (read with PIL)",
    )
    probe.add_argument(
        "--size",
        nargs="+",
        type=int,
        default=[224, 224],
        metavar="N",
        help="spatial size of the inputs (1-3 ints; default 224 224)",
    )
    probe.add_argument(
        "--channels",
        type=int,
        default=3,
        help="input channels (default 3); 0: no channel axis, (N, *size), for a model that "
        "adds it itself (x.unsqueeze(1)), or channels last with C the last --size value",
    )
    probe.add_argument("--num-samples", type=int, default=32, help="inputs averaged (32)")
    probe.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="samples per progress step (8); split further to fit the memory budget",
    )
    probe.add_argument(
        "--normalize",
        choices=("none", "imagenet"),
        default="none",
        help="normalise images with the ImageNet mean/std",
    )
    probe.add_argument("--reduction", choices=("abs", "replknet"), default="abs")
    probe.add_argument("--seed", type=int, default=0, help="seed of the noise inputs")
    probe.add_argument("--device", default="cpu", help="torch device (default cpu)")
    probe.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    probe.add_argument(
        "--heatmap-style",
        choices=("annotated", "raw"),
        default="annotated",
        help="annotated (title, colour bar, legend; default) or raw (the bare map)",
    )

    report = sub.add_parser(
        "report",
        help="one-page HTML/PNG report of a run (history file or TensorBoard log folder)",
        description="Render DIR/report.png and DIR/report.html: the ERF radius against the "
        "step for every layer, each layer's evolution grid and the final metrics.",
    )
    report.add_argument(
        "run", metavar="RUN", help="erf_history.json/.csv, or a log folder (history or TB events)"
    )
    report.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    report.add_argument("--tag-prefix", default="erf", help="tag prefix of the TB scalars")

    layers = sub.add_parser("layers", help="list the layer names of a model")
    layers.add_argument("factory", metavar="MODULE:FACTORY")
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for a user error).

    Example:
        >>> main(["layers", "torch.nn:Identity"])
        (Identity)
        0
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "probe":
            _probe(args)
        elif args.command == "report":
            _report(args)
        else:
            _layers(args)
    except CLIError as err:
        print(f"erf-callback: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _probe(args: argparse.Namespace) -> None:
    import torch

    from erf_callback.cli.loading import build_model, load_checkpoint, load_inputs
    from erf_callback.cli.probe import prepare_out_dir, probe_model, write_probe_outputs

    if args.batch_size < 1:
        raise CLIError(f"--batch-size {args.batch_size} is not positive", "pass e.g. 8")
    progress = False if args.no_progress else None
    model = build_model(args.factory)
    if args.checkpoint:
        prefix = load_checkpoint(
            model, args.checkpoint, weights_only=not args.unsafe_load, prefix=args.prefix
        )
        note = f" (key prefix {prefix!r} removed)" if prefix else ""
        print(f"loaded {args.checkpoint}{note}")
    inputs = load_inputs(
        args.inputs,
        num_samples=args.num_samples,
        channels=args.channels,
        size=args.size,
        seed=args.seed,
        normalize=args.normalize,
        progress=progress,
    )
    try:
        device = torch.device(args.device)
        model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise CLIError(
            f"--device {args.device!r} is not usable ({err})", "pass --device cpu"
        ) from err
    out = prepare_out_dir(args.out)
    maps = probe_model(
        model, args.layers, inputs, batch_size=args.batch_size, reduction=args.reduction,
        progress=progress,
    )  # fmt: skip
    written = write_probe_outputs(maps, out, heatmap_style=args.heatmap_style)
    print(f"{'layer':24s} {'radius':>8s} {'TRF':>12s} {'ERF/TRF':>8s}")
    for name, m in maps.items():
        metrics = m.metrics() if m.status == "ok" else {}
        trf = "x".join(f"{t:g}" for t in m.trf)
        print(
            f"{name:24s} {metrics.get('radius', float('nan')):8.2f} {trf:>12s} "
            f"{metrics.get('erf_trf_ratio', float('nan')):8.3f}"
        )
    print(f"wrote {len(written)} files to {out}")


def _report(args: argparse.Namespace) -> None:
    from erf_callback.cli.probe import prepare_out_dir
    from erf_callback.cli.report import find_run, write_report

    run = find_run(args.run, args.tag_prefix)
    out = prepare_out_dir(args.out)
    png, page = write_report(run, out)
    print(f"read {run.source}: {len(run.layers)} layers, {len(run.records)} records")
    print(f"wrote {png} and {page}")


def _layers(args: argparse.Namespace) -> None:
    from erf_callback.cli.loading import build_model

    model = build_model(args.factory)
    for name, module in model.named_modules():
        kind = f"({type(module).__name__})"
        print(f"{name}  {kind}" if name else kind)
