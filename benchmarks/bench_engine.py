"""compute_erf on a ResNet-18 against the published per-image methods and hand-written loops.

Run: ``.venv/bin/python benchmarks/bench_engine.py`` (``--quick`` for a smoke run;
``--chunks 64,224,512`` for the default-vs-fixed chunk size table; ``--budgets`` for the CPU
``memory_budget`` against other budgets on three architectures; ``--in-place`` for layers
probed together whose outputs the forward writes into, against the same model written out of
place).

* OpenERF (reference): one image at a time, a full forward of the whole model with a forward
  hook on the probed stage, ``autograd.grad`` of the centre unit w.r.t. the image, parameters
  left with ``requires_grad=True``; the maps are accumulated.
* RepLKNet's script: the same per-image loop, but the forward stops at the probed stage (their
  erf/ scripts patch the model's forward), as stem..layer3 only.
* hand-written loops, batched, on the truncated network (stem..layer3), weights frozen, each
  at the best chunk size of a sweep: ``plain`` (the model as it is), ``channels_last`` (a
  channels_last copy of the model and channels_last inputs), ``BN-folded`` (a copy with every
  eval-mode BatchNorm folded into its convolution), and both together (information).
* candidate: ``compute_erf(model, inputs, layers=["layer3"])`` with every default. Timed
  calls repeat the probe of one model, so they reuse the trace of the first call (as the
  callback's probes do after its first); ``first probe of the model`` clears it before each
  call (information).

All runs use the same unit as compute_erf's default ``reduction="abs"``: the sum over channels of
layer3's output at the spatial centre, and the map is |grad| summed over input channels.
Timings are interleaved and every ratio is a median of same-round ratios.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import _bench_utils as bu
import numpy as np
import torch
from torch import nn

from erf_callback import ERFMap, compute_erf, fit_gaussian
from erf_callback.engine import clear_trace_cache

# _bench_utils put the repository root on sys.path
from tests.helpers.nets import BasicBlock, randomize_bn_stats

CHUNKS = (1, 2, 4, 8, 16, 32)
LAYER = "layer3"


# --------------------------------------------------------------------------------------------
# torchvision-style ResNet-18 in plain torch (full width, Kaiming init; the tests' BasicBlock)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, inplanes = (64, 128, 256, 512), 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stage = nn.Sequential(BasicBlock(inplanes, w, stride), BasicBlock(w, w))
            setattr(self, f"layer{i + 1}", stage)
            inplanes = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def truncated(model: ResNet18) -> nn.Sequential:
    """Stem..layer3 as one Sequential that shares the model's modules."""
    m = model
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One conv equal to ``bn(conv(x))`` in eval mode (folded in float64)."""
    scale = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).detach()
    out = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    ).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(conv.weight.double() * scale[:, None, None, None])
        out.bias.copy_(bn.bias.double() - bn.running_mean.double() * scale)
    return out


def folded(model: ResNet18) -> nn.Sequential:
    """A BN-folded copy of stem..layer3 (the hand-written way: rebuild the network)."""
    m = copy.deepcopy(model)
    for block in (*m.layer1, *m.layer2, *m.layer3):
        block.conv1, block.bn1 = _fold(block.conv1, block.bn1), nn.Identity()
        block.conv2, block.bn2 = _fold(block.conv2, block.bn2), nn.Identity()
        if block.downsample is not None:
            block.downsample = _fold(block.downsample[0], block.downsample[1])
    m.conv1, m.bn1 = _fold(m.conv1, m.bn1), nn.Identity()
    return truncated(m).eval()


# --------------------------------------------------------------------------------------------
# the three ways of computing the map


def reference(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """Per-image, full forward + hook, weights keep requires_grad (RepLKNet / OpenERF style)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    store: dict[str, torch.Tensor] = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda _m, _i, out: store.__setitem__("feat", out)
    )
    acc = None
    try:
        for i in range(x.shape[0]):
            sample = x[i : i + 1].detach().clone().requires_grad_(True)
            model(sample)
            feat = store.pop("feat")
            unit = feat[:, :, feat.shape[2] // 2, feat.shape[3] // 2].sum()
            (g,) = torch.autograd.grad(unit, sample)
            part = g.abs().sum(dim=(0, 1)).detach().to("cpu", torch.float64)
            acc = part if acc is None else acc + part
    finally:
        handle.remove()
    return acc / x.shape[0]


def reference_truncated(trunc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-image on the truncated net (RepLKNet's scripts patch forward to stop at the stage)."""
    trunc.eval()
    for p in trunc.parameters():
        p.requires_grad_(True)
    acc = None
    for i in range(x.shape[0]):
        sample = x[i : i + 1].detach().clone().requires_grad_(True)
        out = trunc(sample)
        unit = out[:, :, out.shape[2] // 2, out.shape[3] // 2].sum()
        (g,) = torch.autograd.grad(unit, sample)
        part = g.abs().sum(dim=(0, 1)).detach().to("cpu", torch.float64)
        acc = part if acc is None else acc + part
    return acc / x.shape[0]


def hand_loop(trunc: nn.Module, x: torch.Tensor, chunk: int, cl: bool = False) -> torch.Tensor:
    """Batched, truncated, frozen weights, input gradient only (``cl``: channels_last input)."""
    trunc.eval()
    for p in trunc.parameters():
        p.requires_grad_(False)
    acc = torch.zeros(x.shape[2:], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xc = x[s : s + chunk].detach()
        if cl:
            xc = xc.contiguous(memory_format=torch.channels_last)
        xc.requires_grad_(True)
        out = trunc(xc)
        unit = out[:, :, out.shape[2] // 2, out.shape[3] // 2].sum()
        (g,) = torch.autograd.grad(unit, xc)
        acc += g.abs().sum(dim=(0, 1), dtype=torch.float64)
    return acc.cpu() / x.shape[0]


def candidate(model: nn.Module, x: torch.Tensor, chunk: int | str = "auto") -> ERFMap:
    return compute_erf(model, x, layers=[LAYER], chunk_size=chunk)[LAYER]


def candidate_cold(model: nn.Module, x: torch.Tensor) -> ERFMap:
    """A model's first probe: no remembered trace (it traces its first sample alone)."""
    clear_trace_cache(model)
    return candidate(model, x)


# --------------------------------------------------------------------------------------------
# memory (CPU): peak RSS of a fresh child process per chunk size


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _memory_child(chunk: str, n: int, size: int) -> None:
    torch.manual_seed(0)
    model = ResNet18()
    randomize_bn_stats(model)
    x = torch.randn(n, 3, size, size)
    compute_erf(model, x[:1], layers=[LAYER], chunk_size=1)  # load kernels, allocator pools
    # Reset the peak RSS (Linux: writing 5 to clear_refs resets VmHWM), so the peak below is
    # this call's own, not one left over from imports and model construction.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, how = _status_kib("VmRSS"), "VmHWM"
    except OSError:
        before, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    compute_erf(model, x, layers=[LAYER], chunk_size=chunk if chunk == "auto" else int(chunk))
    after = _status_kib("VmHWM") if how == "VmHWM" else None
    if after is None:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": after, "increase_kib": after - (before or 0), "how": how}))


def measure_memory(chunks: list[str], n: int, size: int, threads: int) -> dict[str, dict]:
    """Peak RSS (whole process, and its increase during the call) per chunk size, fresh process."""
    out: dict[str, dict] = {}
    for chunk in chunks:
        cmd = [sys.executable, __file__, "--_memory-child", chunk, "--n", str(n)]
        cmd += ["--size", str(size), "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"   memory child for chunk {chunk} failed: {proc.stderr.strip()[-300:]}")
            continue
        out[chunk] = json.loads(lines[-1])
    return out


def chunk_table(size: int, n: int, repeats: int, threads: int, memory: bool) -> tuple[float, float]:
    """Default chunk vs every fixed chunk at one input size: time ratios and peak RSS."""
    torch.manual_seed(0)
    model = ResNet18()
    randomize_bn_stats(model)
    model.eval()
    x = torch.randn(n, 3, size, size)
    fixed = [c for c in CHUNKS if c <= n]
    funcs = {"auto": lambda: candidate(model, x)}
    for c in fixed:
        funcs[str(c)] = lambda c=c: candidate(model, x, c)
    times = bu.interleaved(funcs, repeats, warmup=1)  # type: ignore[arg-type]
    best = min((str(c) for c in fixed), key=lambda k: bu.median(times[k]))
    mem = measure_memory(list(funcs), n, size, threads) if memory else {}
    rows = []
    for k, ts in times.items():
        m = mem.get(k, {})
        rows.append(
            (
                "default (auto)" if k == "auto" else k,
                f"{1e3 * bu.median(ts):.0f}",
                f"{bu.ratio(ts, times[best]):.2f}",
                f"{m['peak_kib'] / 1024:.0f}" if m else "-",
                f"{m['increase_kib'] / 1024:.0f}" if m else "-",
            )
        )
    print(f"\n   {size}x{size}, {n} images, {repeats} interleaved rounds:")
    heads = ("chunk_size", "median ms", "time / best fixed", "peak RSS MiB", "increase MiB")
    print(bu.table(heads, rows))
    t_ratio = bu.ratio(times["auto"], times[best])
    m_ratio = mem["auto"]["peak_kib"] / mem["1"]["peak_kib"] if "auto" in mem and "1" in mem else 0
    return t_ratio, m_ratio


def vgg_like(width: int = 64) -> nn.Sequential:
    """A VGG-style plain stack: full-resolution activations in the first stages (the largest
    per-sample activations for their depth)."""
    layers: list[nn.Module] = []
    cin = 3
    for cout, pool in ((width, False), (width, True), (2 * width, False), (2 * width, True)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if pool else []
        cin = cout
    for _ in range(2):
        layers += [nn.Conv2d(cin, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU()]
        cin = 4 * width
    return nn.Sequential(*layers)


def convnext_like(width: int = 96) -> nn.Sequential:
    """A ConvNeXt-style stack: a 4x4 patchify stem, then 7x7 depthwise convolutions and 4x
    pointwise MLPs (small spatial grids, wide hidden activations)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 4)]
    for _ in range(4):
        layers += [
            nn.Conv2d(width, width, 7, padding=3, groups=width),
            nn.BatchNorm2d(width),
            nn.Conv2d(width, 4 * width, 1),
            nn.GELU(),
            nn.Conv2d(4 * width, width, 1),
        ]
    return nn.Sequential(*layers)


BUDGETS_MIB = (32, 64, 128)


def budget_table(repeats: int) -> None:
    """``compute_erf``'s default budget against other ``memory_budget`` values, per model and
    size: the median over interleaved rounds of each budget's time / the default's."""
    from erf_callback.engine.chunking import CPU_BUDGET

    nets: dict[str, tuple[Callable[[], nn.Module], str]] = {
        "ResNet-18": (lambda: randomize_bn_stats(ResNet18()), LAYER),
        "VGG-like": (lambda: randomize_bn_stats(vgg_like()), "19"),
        "ConvNeXt-like": (lambda: randomize_bn_stats(convnext_like()), "20"),
    }
    default_mib = CPU_BUDGET >> 20
    rows = []
    for name, (make, layer) in nets.items():
        for size, n in ((64, 32), (224, 16)):
            torch.manual_seed(0)
            model = make().eval()
            x = torch.randn(n, 3, size, size)
            funcs = {
                mib: functools.partial(compute_erf, model, x, [layer], memory_budget=mib << 20)
                for mib in BUDGETS_MIB
            }
            times = bu.interleaved(funcs, repeats, warmup=1)  # type: ignore[arg-type]
            base = times[default_mib]
            ratios = [f"{bu.ratio(times[mib], base):.2f}" for mib in BUDGETS_MIB]
            rows.append((name, f"{size}x{size}", str(n), f"{1e3 * bu.median(base):.0f}", *ratios))
    heads = ("model", "size", "images", f"default ({default_mib} MiB) ms")
    heads += tuple(f"{mib} MiB / default" for mib in BUDGETS_MIB)
    print(bu.table(heads, rows))


IN_PLACE_LAYERS = ["layer1.0.bn1", "layer2", LAYER]


def in_place_table(repeats: int) -> float:
    """``compute_erf`` of layers whose outputs the forward writes into (bn1, behind an in-place
    ReLU, probed with deeper layers: the later layers get copies of it), against the same
    model with out-of-place ReLUs; the median of same-round time ratios."""
    torch.manual_seed(0)
    written = randomize_bn_stats(ResNet18()).eval()
    plain = copy.deepcopy(written)
    for m in plain.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    rows, ratios = [], []
    for size, n in ((64, 32), (224, 8)):
        x = torch.randn(n, 3, size, size)
        funcs = {
            "in place": functools.partial(compute_erf, written, x, IN_PLACE_LAYERS),
            "out of place": functools.partial(compute_erf, plain, x, IN_PLACE_LAYERS),
        }
        times = bu.interleaved(funcs, repeats, warmup=1)  # type: ignore[arg-type]
        r = bu.ratio(times["in place"], times["out of place"])
        ratios.append(r)
        rows.append(
            (
                f"{size}x{size}",
                str(n),
                f"{1e3 * bu.median(times['out of place']):.0f}",
                f"{1e3 * bu.median(times['in place']):.0f}",
                f"{r:.2f}",
            )
        )
    print(bu.table(("size", "images", "out of place ms", "in place ms", "ratio"), rows))
    return max(ratios)


# --------------------------------------------------------------------------------------------
# fit + metrics timings (absolute)


def _synthetic_map(size: int, seed: int = 0) -> np.ndarray:
    """Anisotropic Gaussian + uniform floor (0.2% of peak) + |noise| averaged like 32 samples."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float64)
    c = size / 2
    g = np.exp(-0.5 * (((y - c) / (0.08 * size)) ** 2 + ((x - c) / (0.06 * size)) ** 2))
    noise = np.abs(rng.normal(0.0, 0.01, (32, size, size))).mean(axis=0)
    return g + 0.002 + noise


def time_metrics(erf: ERFMap, repeats: int) -> tuple[float, float]:
    """Median ms of fit_gaussian alone and of a fresh ERFMap.metrics() (fit + all metrics)."""
    arr = erf.numpy()
    fit_t, met_t = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            fit_gaussian(arr)
            t1 = time.perf_counter()
            dataclasses.replace(erf).metrics()  # a fresh map: the cached fit is not reused
            t2 = time.perf_counter()
            if r:  # the first round is the warm-up
                fit_t.append(t1 - t0)
                met_t.append(t2 - t1)
    return 1e3 * bu.median(fit_t), 1e3 * bu.median(met_t)


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run (few repeats)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--size", type=int, default=None, help="input size (64 cpu, 224 cuda)")
    parser.add_argument("--n", type=int, default=32, help="number of probe images")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS sweep")
    parser.add_argument(
        "--chunks", default="", help="sizes for the default-vs-fixed chunk table, e.g. 64,224,512"
    )
    parser.add_argument("--chunk-n", type=int, default=16, help="images in the chunk table")
    parser.add_argument("--skip-main", action="store_true", help="only the chunk table")
    parser.add_argument(
        "--budgets", action="store_true", help="the default memory_budget against 32-128 MiB"
    )
    parser.add_argument(
        "--in-place",
        action="store_true",
        help="layers whose outputs the forward writes into, against an out-of-place twin",
    )
    parser.add_argument("--_memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args._memory_child is not None:
        _memory_child(args._memory_child, args.n, args.size or 64)
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is unavailable on this machine: skipping the GPU benchmark (--device cuda).")
        print(
            "TARGET compute_erf vs per-image reference (cuda, 224x224): SKIPPED "
            "(target >= 10x; no CUDA device)"
        )
        return 0
    size = args.size or (224 if device.type == "cuda" else 64)
    repeats = args.repeats or (3 if args.quick else 7)
    if not args.skip_main:
        run_main(args, device, size, repeats)
    if args.chunks and device.type == "cpu":
        bu.header(f"bench_engine chunk sizes: ResNet-18 {LAYER}, CPU")
        results = {}
        for s in (int(v) for v in args.chunks.split(",")):
            reps = max(3, repeats // 2) if s <= 256 else 3
            results[s] = chunk_table(s, args.chunk_n, reps, args.threads, not args.no_memory)
        print()
        for s, (t_ratio, m_ratio) in results.items():
            print(
                f"TARGET default chunk time / best fixed chunk ({s}x{s}): {t_ratio:.2f}x "
                f"(target <= 1.2x): {bu.verdict(t_ratio <= 1.2)}"
            )
            if m_ratio:
                print(
                    f"TARGET default chunk peak RSS / chunk_size=1's ({s}x{s}): {m_ratio:.2f}x "
                    f"(target <= 1.5x): {bu.verdict(m_ratio <= 1.5)}"
                )
    if args.budgets and device.type == "cpu":
        bu.header("bench_engine memory budgets (CPU): time / the default budget's")
        budget_table(max(5, repeats))
    if args.in_place:
        bu.header(f"bench_engine in-place writes: ResNet-18 {', '.join(IN_PLACE_LAYERS)}, CPU")
        worst = in_place_table(max(9, repeats))
        print(
            f"in place / out of place, worst size: {worst:.2f}x (information: the copies that "
            "keep the probed outputs as the layers gave them)"
        )
    return 0


def run_main(args: argparse.Namespace, device: torch.device, size: int, repeats: int) -> None:
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    target_speedup = 10.0 if device.type == "cuda" else 1.3
    bu.header(f"bench_engine: ResNet-18 {LAYER}, {args.n} x 3x{size}x{size}, {device}")
    torch.manual_seed(0)
    model = ResNet18()
    randomize_bn_stats(model)
    model = model.to(device).eval()
    trunc = truncated(model)
    trunc_cl = copy.deepcopy(trunc).to(memory_format=torch.channels_last)
    trunc_bn = folded(model)
    trunc_bn_cl = copy.deepcopy(trunc_bn).to(memory_format=torch.channels_last)
    x = torch.randn(args.n, 3, size, size, device=device)

    # ---- correctness.
    # float64: compute_erf (with its BN folding and channels_last) against a hand-written float64
    # loop of the model as written. float32 maps of different kernels (batch 1 vs batched,
    # folded vs not) can differ by more than rounding where a ReLU / max-pool decision sits
    # within rounding of a tie; they are shown as information. On CUDA the float32 comparison
    # runs without TF32 (PyTorch lets cuDNN use it for convolutions by default, ~1e-3
    # relative, and batch 1 vs batched picks other algorithms): full float32 on both sides.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref_map = reference(model, x, LAYER)
        ours = candidate(model, x)
        ours_c1 = compute_erf(model, x, layers=[LAYER], chunk_size=1, optimize=False)[LAYER].grad
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    model64 = copy.deepcopy(model).double()
    truth = hand_loop(truncated(model64), x.double(), 8)
    ours64 = compute_erf(model64, x.double(), layers=[LAYER])[LAYER].grad
    del model64

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max()) / float(b.abs().max())

    agree = {
        "compute_erf (float64, defaults) vs float64 hand-written loop": rel(ours64, truth),
        "compute_erf chunk_size=1, optimize=False vs OpenERF (same kernels)": rel(ours_c1, ref_map),
    }
    info = {
        "compute_erf (float32, defaults) vs float64 truth": rel(ours.grad, truth),
        "OpenERF reference (float32, batch 1) vs float64 truth": rel(ref_map, truth),
    }
    print("   map agreement, max |a - b| / max |b|:")
    for k, v in agree.items():
        print(f"     {k:<68s} {v:.1e}")
    print("   float32 rounding (information: ReLU / max-pool decisions may flip):")
    for k, v in info.items():
        print(f"     {k:<68s} {v:.1e}")

    # ---- timings
    hand = {
        "plain": (trunc, False),
        "channels_last": (trunc_cl, True),
        "BN-folded": (trunc_bn, False),
        "BN-folded + channels_last": (trunc_bn_cl, True),
    }
    funcs: dict[str, object] = {
        "OpenERF: per image, full model": lambda: reference(model, x, LAYER),
        "RepLKNet script: per image, stops at layer3": lambda: reference_truncated(trunc, x),
        "compute_erf (defaults)": lambda: candidate(model, x),
        # Every call above after the warm-up reuses the trace of the first (the callback's
        # every probe after its first); this one forgets it first: a model's first probe.
        "compute_erf, first probe of the model": lambda: candidate_cold(model, x),
    }
    hand_chunks = [c for c in CHUNKS if 4 <= c <= args.n] or [args.n]
    for name, (net, cl) in hand.items():
        for c in hand_chunks:
            funcs[f"hand-written {name}, chunk {c}"] = lambda net=net, cl=cl, c=c: hand_loop(
                net, x, c, cl
            )
    t_start = time.perf_counter()
    times = bu.interleaved(funcs, repeats, warmup=1, sync=sync)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - t_start

    ref_key, ours_key = "OpenERF: per image, full model", "compute_erf (defaults)"
    best = {
        name: min(
            (k for k in times if k.startswith(f"hand-written {name},")),
            key=lambda k: bu.median(times[k]),
        )
        for name in hand
    }
    cold_key = "compute_erf, first probe of the model"
    shown = [
        ref_key,
        "RepLKNet script: per image, stops at layer3",
        ours_key,
        cold_key,
        *best.values(),
    ]
    rows = [
        (
            k,
            f"{1e3 * bu.median(times[k]):.1f}",
            bu.spread(times[k]),
            f"{bu.ratio(times[ref_key], times[k]):.2f}x",
            f"{bu.ratio(times[ours_key], times[k]):.2f}",
        )
        for k in shown
    ]
    print()
    print(
        f"   {repeats} interleaved rounds after a warm-up ({elapsed:.0f} s); ratios are medians "
        "of same-round ratios; hand-written loops at their best chunk size"
    )
    heads = ("variant", "median ms", "min..max/med", "speedup vs OpenERF", "compute_erf / it")
    print(bu.table(heads, rows))
    warning = bu.noise_warning(times)
    if warning:
        print(f"   {warning}")

    # ---- memory
    if device.type == "cpu" and not args.no_memory and not args.quick:
        print()
        print("   peak RSS of one compute_erf call, fresh process per chunk size:")
        mem = measure_memory(["auto", *(str(c) for c in CHUNKS)], args.n, size, args.threads)
        rows_m = [
            (c, f"{m['peak_kib'] / 1024:.0f}", f"{m['increase_kib'] / 1024:.0f}")
            for c, m in mem.items()
        ]
        print(bu.table(("chunk_size", "peak RSS (MiB)", "increase (MiB)"), rows_m))
    elif device.type == "cuda":
        print()
        print("   peak CUDA memory per chunk size:")
        rows_mem = []
        for c in ("auto", *CHUNKS):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            candidate(model, x, c)
            torch.cuda.synchronize()
            rows_mem.append((c, f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f}"))
        print(bu.table(("chunk_size", "peak allocated (MiB)"), rows_mem))

    # ---- fit + metrics (absolute ms: that target is absolute)
    print()
    fit_reps = 5 if args.quick else 25
    fit_ms, met_ms = time_metrics(ours, fit_reps)
    big = _synthetic_map(512)
    big_map = ERFMap(
        grad=torch.from_numpy(big),
        layer="synthetic",
        position=(256, 256),
        output_shape=(1, 512, 512),
        location=(256.0, 256.0),
        num_samples=32,
    )
    big_fit_ms, big_met_ms = time_metrics(big_map, fit_reps)
    print(
        bu.table(
            ("map", "fit_gaussian ms", "ERFMap.metrics() ms (fit + all)"),
            [
                (f"{LAYER} ERF {size}x{size}", f"{fit_ms:.2f}", f"{met_ms:.2f}"),
                ("Gaussian+floor+noise 512x512", f"{big_fit_ms:.2f}", f"{big_met_ms:.2f}"),
            ],
        )
    )

    # ---- targets
    speedup = bu.ratio(times[ref_key], times[ours_key])
    singles = [best[k] for k in ("plain", "channels_last", "BN-folded") if k in best]
    best_single = min(singles, key=lambda k: bu.median(times[k]))
    # The best variant (and chunk size) is chosen on the rounds above; its ratio is measured
    # on rounds of its own. Chosen and measured on the same noisy rounds, the minimum of 12
    # hand-written candidates carries the luckiest noise of the 12 (5-25% on these machines),
    # which is selection, not speed. Paired rounds of the two alone also keep both calls
    # close in time.
    both_key = best.get("BN-folded + channels_last")
    paired_funcs = {ours_key: funcs[ours_key], best_single: funcs[best_single]}
    if both_key is not None:
        paired_funcs[both_key] = funcs[both_key]
    paired = bu.interleaved(paired_funcs, 2 * repeats + 1, warmup=1, sync=sync)  # type: ignore[arg-type]
    vs_best = bu.ratio(paired[ours_key], paired[best_single])
    print(
        f"   {best_single} (chosen above) and compute_erf again, {2 * repeats + 1} rounds of "
        f"their own: {1e3 * bu.median(paired[best_single]):.1f} vs "
        f"{1e3 * bu.median(paired[ours_key]):.1f} ms"
    )
    print()
    dev = f" ({device.type}, {size}x{size})"
    print(
        f"TARGET compute_erf vs OpenERF per-image reference{dev}: {speedup:.2f}x faster "
        f"(target >= {target_speedup:g}x): {bu.verdict(speedup >= target_speedup)}"
    )
    print(
        f"TARGET compute_erf / best hand-written variant ({best_single}){dev}: {vs_best:.2f}x "
        f"(target <= 1.0x): {bu.verdict(vs_best <= 1.0)}"
    )
    cold = bu.ratio(times[cold_key], times[best_single])
    print(f"   (information) a model's first probe / {best_single}: {cold:.2f}x")
    if both_key is not None:
        both = bu.ratio(paired[ours_key], paired[both_key])
        print(f"   (information) compute_erf / {both_key}: {both:.2f}x")
    worst = max(agree.values())
    print(
        "TARGET maps agree (float64 vs truth; float32 vs the same kernels by hand): "
        f"max rel diff {worst:.1e} (target <= 1e-5): {bu.verdict(worst <= 1e-5)}"
    )
    print(
        f"TARGET fit + metrics on 512x512: {big_met_ms:.1f} ms (absolute; target < 50 ms): "
        f"{bu.verdict(big_met_ms < 50.0)}"
    )


if __name__ == "__main__":
    sys.exit(main())
