"""chunk_size="auto": sized from measured activations and a budget; OOM halves (issue 7, item 3)."""

import gc
import weakref

import pytest
import torch
from torch import nn

from erf_callback import compute_erf
from erf_callback.engine.chunking import ChunkPlan, SavedBytesMeter
from tests.helpers.nets import relu_stack


class Recorder(nn.Module):
    """Wraps a net and records the batch size of every forward."""

    def __init__(self, net: nn.Module, oom_above: int | None = None) -> None:
        super().__init__()
        self.net, self.oom_above = net, oom_above
        self.sizes: list[int] = []
        self.seen: list[weakref.ref] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        self.seen.append(weakref.ref(x))
        h = self.net(x)
        self.seen.append(weakref.ref(h))
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("fake: CUDA out of memory. Tried to allocate 2.00 GiB")
        return h


def test_saved_bytes_meter_counts_what_autograd_keeps():
    x = torch.randn(3, 4, 10, 10, requires_grad=True)
    meter = SavedBytesMeter(nn.Identity())
    with meter:
        torch.relu(x * 2.0)  # mul by a Python scalar saves nothing; relu saves its output
    assert meter.nbytes == x.numel() * 4


def test_auto_chunk_scales_with_the_activation_size_and_the_budget():
    def chunks(size: int, budget: int) -> list[int]:
        net = Recorder(relu_stack(4, channels=8))
        compute_erf(net, torch.randn(64, 1, size, size), memory_budget=budget)
        assert sum(net.sizes) == 64 and net.sizes[0] == 1  # first sample alone, measured
        return net.sizes[1:]

    meter = SavedBytesMeter(relu_stack(4, channels=8))
    x = torch.randn(1, 1, 32, 32, requires_grad=True)
    with meter:
        relu_stack(4, channels=8)(x)
    per_sample = meter.nbytes + 2 * x.nbytes
    budget = 8 * per_sample + 100
    small = chunks(32, budget)
    assert small == [8] * 7 + [7]  # 8 fit the budget: the 63 samples left go in 8 chunks
    big = chunks(64, budget)  # 4x the pixels: 4x the activations per sample
    assert max(big) == 2
    assert max(chunks(32, 2 * budget)) == 16


def test_int_and_none_chunk_sizes_keep_their_meaning():
    net = Recorder(relu_stack(2))
    compute_erf(net, torch.randn(10, 1, 16, 16), chunk_size=None)
    assert net.sizes == [10]
    net.sizes.clear()
    compute_erf(net, torch.randn(10, 1, 16, 16), chunk_size=4)
    assert max(net.sizes) == 4 and sum(net.sizes) == 10


def test_plan_balances_chunks():
    plan = ChunkPlan.create("auto", n=34, budget=32)
    plan.measured(per_sample_bytes=1.0, start=1)  # 33 left, 32 fit: 17 + 16, not 32 + 1
    assert plan.chunk == 17


def test_out_of_memory_halves_the_chunk_and_the_map_is_unchanged():
    base = relu_stack(3).double()
    x = torch.randn(20, 1, 16, 16, dtype=torch.float64)
    want = compute_erf(base, x, chunk_size=1)["output"].grad
    net = Recorder(base, oom_above=3)
    got = compute_erf(net, x, memory_budget=2**40)["output"].grad  # plans one chunk of 19
    assert net.sizes[:5] == [1, 19, 9, 4, 2]  # halved until it fits (<= 3)
    assert sum(s for s in net.sizes if s <= 3) == 20  # every sample counted once
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)  # float64: same values


class _OutOfMemoryOnCopy(torch.Tensor):
    """Inputs whose copy to the device runs out of memory for chunks of more than 3 samples
    (as a large chunk's host-to-GPU copy does on a nearly full GPU)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args[0].shape[0] > 3:
            raise torch.OutOfMemoryError("fake: CUDA out of memory. Tried to allocate 4.48 GiB")
        out = super().__torch_function__(func, types, args, kwargs)
        if func is torch.Tensor.to:  # on the device: a plain tensor, as a real copy is
            return out.as_subclass(torch.Tensor)
        return out


def test_out_of_memory_while_copying_a_chunk_to_the_device_halves_it_too():
    net = relu_stack(3).double()
    x = torch.randn(20, 1, 16, 16, dtype=torch.float64)
    want = compute_erf(net, x, chunk_size=1)["output"].grad
    sizes = []
    net[0].register_forward_pre_hook(lambda _m, a: sizes.append(a[0].shape[0]))
    got = compute_erf(net, x.as_subclass(_OutOfMemoryOnCopy), memory_budget=2**40)
    assert sizes[0] == 1 and max(sizes[1:]) <= 3 and sum(sizes) == 20
    torch.testing.assert_close(got["output"].grad, want, rtol=1e-12, atol=0)


def test_out_of_memory_frees_the_failed_chunks():
    net = Recorder(relu_stack(3), oom_above=2)
    compute_erf(net, torch.randn(12, 1, 16, 16), memory_budget=2**40)
    # Without a garbage collection: nothing of a failed chunk is kept by a traceback.
    assert all(ref() is None for ref in net.seen)


def test_out_of_memory_at_one_sample_raises_a_clear_error_and_frees_everything():
    net = Recorder(relu_stack(3), oom_above=0)
    with pytest.raises(torch.OutOfMemoryError, match="even one sample at a time"):
        compute_erf(net, torch.randn(4, 1, 16, 16))
    gc.collect()
    assert all(ref() is None for ref in net.seen)
    assert all(p.requires_grad for p in net.parameters())  # the model is restored


def test_out_of_memory_with_a_fixed_chunk_says_to_use_auto():
    net = Recorder(relu_stack(3), oom_above=2)
    with pytest.raises(
        torch.OutOfMemoryError, match=r"a chunk of 4 samples ran out.*chunk_size='auto'"
    ):
        compute_erf(net, torch.randn(9, 1, 16, 16), chunk_size=4)
    assert net.sizes == [1, 4]  # no silent halving of a size the user chose


def test_a_probe_keeps_no_activation_alive():
    # The activation meter's saved-tensor hook must not create reference cycles (a ReLU saves
    # its own output): every tensor the model saw is freed by reference counting alone.
    net = Recorder(relu_stack(3))
    compute_erf(net, torch.randn(6, 1, 16, 16))
    assert len(net.seen) > 2 and all(ref() is None for ref in net.seen)


@pytest.mark.parametrize("optimize", [True, False])
def test_a_probed_model_is_freed_by_reference_counting_alone(optimize):
    # Nothing compute_erf leaves behind may hold the model in a reference cycle: a model the
    # user deletes after probing (a GPU model, say) must free its memory at once, not at the
    # next garbage collection.
    from tests.helpers.nets import ResNet

    gc.collect()
    gc.disable()
    try:
        net = ResNet(width=4).eval()
        compute_erf(net, torch.randn(3, 3, 32, 32), ["layer2"], optimize=optimize)
        compute_erf(net, torch.randn(3, 3, 32, 32), ["layer2"], optimize=optimize)  # recalled
        ref = weakref.ref(net)
        del net
        assert ref() is None
    finally:
        gc.enable()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_out_of_memory_halves_until_it_fits_and_frees_everything():
    from tests.helpers.nets import ResNet

    torch.manual_seed(0)
    net = ResNet(width=64).cuda()
    for p in net.parameters():
        p.requires_grad_(False)
    one = torch.randn(1, 3, 256, 256, device="cuda", requires_grad=True)
    meter = SavedBytesMeter(net)
    with meter:
        net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(one)))))))
    for p in net.parameters():
        p.requires_grad_(True)
    # Enough samples that all at once need twice the GPU's memory.
    n = int(2 * torch.cuda.get_device_properties(0).total_memory / meter.nbytes) + 2
    x = torch.randn(n, 3, 256, 256)
    del one, meter
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    sizes = []
    hook = net.conv1.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    m = compute_erf(net, x, ["layer3"], memory_budget=2**50)["layer3"]  # plans n - 1 at once
    hook.remove()
    assert m.status == "ok" and m.num_samples == n
    assert sizes[:3] == [1, n - 1, (n - 1) // 2]  # halved after the OOM
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@cuda
def test_cuda_out_of_memory_at_one_sample_raises_and_frees_everything():
    from tests.helpers.nets import ResNet

    net = ResNet(width=64).cuda()
    x = torch.randn(2, 3, 16384, 16384)  # one sample's activations exceed the GPU
    gc.collect()  # earlier tests' garbage must not be freed inside the measured window
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with pytest.raises(torch.OutOfMemoryError, match="even one sample at a time"):
        compute_erf(net, x, ["layer3"])
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@cuda
def test_cuda_default_budget_comes_from_free_memory():
    from erf_callback.engine.chunking import default_budget

    free, _ = torch.cuda.mem_get_info()
    budget = default_budget(torch.device("cuda"))
    assert 0.4 * free <= budget <= 0.6 * (free + torch.cuda.memory_reserved())
