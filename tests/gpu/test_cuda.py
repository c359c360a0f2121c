"""The CUDA path: exact maps, restored state, no leaks, bf16-mixed, channels_last, compile.

Skipped where no GPU is present (CI has none); run on a GPU machine with
``python -m pytest -q tests/gpu``.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import pytest
import torch

from erf_callback import ERFMonitor, compute_erf
from tests.helpers.lit import make_trainer, module_class
from tests.helpers.nets import ResNet, stack_closed_form, uniform_stack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Plain float32 convolutions: PyTorch lets cuDNN use TF32 (10-bit mantissa) by default."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = ResNet(width=8)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_uniform_stack_closed_form_on_cuda():
    kernels = [3, 5, 3, 7]
    net = uniform_stack(kernels).double().to(CUDA)
    m = compute_erf(net, torch.randn(4, 1, 65, 65, dtype=torch.float64))["output"]
    form = stack_closed_form(kernels)[0]
    var, trf = form.variance, form.trf
    cov = m.gaussian.cov
    assert cov[0, 0] == pytest.approx(var, rel=1e-8)
    assert cov[1, 1] == pytest.approx(var, rel=1e-8)
    assert m.metrics()["trf_x"] == trf


@pytest.mark.parametrize(("tf32", "tol"), [(False, 1e-4), (True, 5e-3)])
def test_cuda_float32_map_matches_cpu_float64(tf32, tol):
    # compute_erf follows the process's precision flags, as any PyTorch code does: with cuDNN's
    # TF32 (PyTorch's default for convolutions) the map is ~1e-3 of its peak off, without it
    # float32 rounding. It leaves the flag as it found it.
    x = torch.randn(16, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    ref = compute_erf(_resnet().double(), x.double(), layers=["layer2", "layer3"])
    with contextlib.nullcontext() if tf32 else full_float32():
        flag = torch.backends.cudnn.allow_tf32
        got = compute_erf(_resnet().to(CUDA), x, layers=["layer2", "layer3"])
        assert torch.backends.cudnn.allow_tf32 is flag is tf32
    for name in ("layer2", "layer3"):
        a, b = got[name].grad, ref[name].grad
        assert a.device.type == "cpu" and a.dtype == torch.float64
        # float32 on the GPU against float64 on the CPU: relative to the map's peak.
        assert float((a - b).abs().max() / b.abs().max()) < tol, name


def test_no_memory_leak_and_state_restored_on_cuda():
    net = _resnet().to(CUDA).train()
    net.layer2.requires_grad_(False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [
        (m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in net.modules()
    ]
    x = torch.randn(32, 3, 128, 128)
    compute_erf(net, x, layers=["layer3"])  # warm the caching allocator
    gc.collect()  # earlier tests' garbage must not be freed inside the measured window
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    rng = torch.cuda.get_rng_state()
    compute_erf(net, x, layers=["layer3", "layer4"])
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert flags == [
        (m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in net.modules()
    ]
    assert all(p.grad is None for p in net.parameters())


def test_channels_last_model_gives_the_same_map_and_keeps_its_format():
    x = torch.randn(8, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    net = _resnet().to(CUDA).to(memory_format=torch.channels_last)
    with full_float32():  # TF32 rounds differently per layout (its algorithms differ)
        plain = compute_erf(_resnet().to(CUDA), x, layers=["layer3"])["layer3"].grad
        cl = compute_erf(net, x, layers=["layer3"])["layer3"].grad
    assert float((cl - plain).abs().max() / plain.abs().max()) < 1e-4
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_compiled_model_on_cuda_matches_eager():
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(_resnet().to(CUDA))
    with full_float32():
        eager = compute_erf(_resnet().to(CUDA), x, layers=["layer2"])["layer2"].grad
        got = compute_erf(compiled, x, layers=["layer2"])["layer2"].grad
    assert float((got - eager).abs().max() / eager.abs().max()) < 1e-4


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_on_gpu_is_bitwise_identical_with_and_without_the_monitor(tmp_path, precision):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    def run(callbacks: list) -> dict[str, torch.Tensor]:
        torch.manual_seed(7)
        model = module_class()()
        trainer = make_trainer(
            tmp_path / str(len(callbacks)),
            callbacks,
            accelerator="gpu",
            precision=precision,
            max_steps=6,
        )
        trainer.fit(model)
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    plain = run([])
    monitor = ERFMonitor(layers=["net.2", "net.7"], every_n_steps=2, num_samples=8)
    probed = run([monitor])
    for k in plain:
        assert torch.equal(plain[k], probed[k]), k
    steps = [r["step"] for r in monitor.history.records if r["layer"] == "net.7"]
    assert steps == [0, 2, 4, 6]
    assert all(r["status"] == "ok" for r in monitor.history.records)


def test_repeated_probes_on_cuda_use_the_trace_unchecked_and_still_see_a_change(monkeypatch):
    # On CUDA a remembered trace is used before the model's fingerprint is checked (engine.md):
    # float64, so the maps must equal the always-traced reference to rounding.
    from erf_callback.engine import compute
    from erf_callback.engine.trace_cache import TRACES, clear_trace_cache

    traced = []
    tracer = compute.ReceptiveFieldTracer
    monkeypatch.setattr(compute, "ReceptiveFieldTracer", lambda x: traced.append(1) or tracer(x))
    net = _resnet().double().to(CUDA)
    x = torch.randn(8, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    clear_trace_cache(net)

    def reference(model):
        copy = ResNet(width=8).double().to(CUDA)
        copy.load_state_dict(model.state_dict())
        copy.layer1[0].conv2.dilation = model.layer1[0].conv2.dilation
        copy.layer1[0].conv2.padding = model.layer1[0].conv2.padding
        return compute_erf(copy.eval(), x, ["layer2"], optimize=False)["layer2"].grad

    maps = [compute_erf(net, x, ["layer2"])["layer2"].grad for _ in range(3)]
    assert len(traced) == 1
    (entry,) = TRACES._models[net].values()
    assert entry.speculative
    want = reference(net)
    for m in maps:
        torch.testing.assert_close(m, want, rtol=1e-12, atol=0)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    compute_erf(net, x, ["layer2"])  # an unchecked record: nothing of the probe stays
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    traced.clear()
    net.layer1[0].conv2.dilation, net.layer1[0].conv2.padding = (2, 2), (2, 2)
    changed = compute_erf(net, x, ["layer2"])["layer2"].grad
    assert len(traced) == 1  # the unchecked record's result was thrown away, then traced
    torch.testing.assert_close(changed, reference(net), rtol=1e-12, atol=0)
    assert not torch.allclose(changed, want)
