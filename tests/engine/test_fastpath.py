"""The fast path (BN folding, channels_last) changes neither results nor the model (item 4)."""

import copy

import pytest
import torch
from torch import nn

from erf_callback import compute_erf
from erf_callback.engine import fastpath
from tests.helpers.nets import ResNet, randomize_bn_stats


def per_image_reference(net: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """OpenERF's method written out: one image at a time, full forward, |grad| summed."""
    net = copy.deepcopy(net).eval()
    store = {}
    dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: store.update(o=o))
    acc = torch.zeros(x.shape[2:], dtype=torch.float64)
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        net(xi)
        out = store["o"]
        unit = out[:, :, out.shape[2] // 2, out.shape[3] // 2].sum()
        (g,) = torch.autograd.grad(unit, xi)
        acc += g.abs().sum(dim=(0, 1)).double()
    return acc / len(x)


def _record(monkeypatch, method: str) -> list:
    """The FastPath objects that ``FastPath.<method>`` returns from now on."""
    made = []
    original = getattr(fastpath.FastPath, method).__func__

    def spy(cls, *args, **kwargs):
        made.append(original(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(fastpath.FastPath, method, classmethod(spy))
    return made


@pytest.fixture
def planned(monkeypatch):
    """The FastPath objects that compute_erf planned, to see what it folded."""
    return _record(monkeypatch, "plan")


def test_float64_maps_equal_the_reference_with_every_bn_folded(planned):
    torch.manual_seed(0)
    net = randomize_bn_stats(ResNet(width=4)).double()
    x = torch.randn(9, 3, 48, 48, dtype=torch.float64)
    got = compute_erf(net, x, ["layer3"], chunk_size=4)["layer3"].grad
    want = per_image_reference(net, x, "layer3")
    # float64 rounding of a different summation order, nothing more.
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.max()))
    # stem + 6 blocks x 2 convs + 2 downsample convs: all 15 conv+BN pairs up to layer3.
    assert planned[0].folded == 15 and planned[0].channels_last


def test_float32_maps_agree_to_float32_rounding():
    torch.manual_seed(1)
    net = randomize_bn_stats(ResNet(width=8))
    x = torch.randn(12, 3, 64, 64)
    fast = compute_erf(net, x, ["layer2", "layer3"], chunk_size=4)
    plain = compute_erf(net, x, ["layer2", "layer3"], chunk_size=4, optimize=False)
    for k in fast:
        a, b = fast[k].grad, plain[k].grad
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5  # float32 eps ~1.2e-7


def snapshot(net: nn.Module) -> dict:
    return {
        "params": [
            (n, p.detach().clone(), p.stride(), p._version, p.requires_grad)
            for n, p in net.named_parameters()
        ],
        "grads": [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        "buffers": [(n, b.clone(), b.stride(), b._version) for n, b in net.named_buffers()],
        "training": [m.training for m in net.modules()],
        "dicts": [sorted(vars(m)) for m in net.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in net.modules()],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["training"] == b["training"] and a["dicts"] == b["dicts"]
    assert a["hooks"] == b["hooks"]
    for (n1, t1, s1, v1, r1), (n2, t2, s2, v2, r2) in zip(a["params"], b["params"], strict=True):
        assert n1 == n2 and s1 == s2 and v1 == v2 and r1 == r2
        assert torch.equal(t1, t2)  # bitwise
    for g1, g2 in zip(a["grads"], b["grads"], strict=True):
        assert (g1 is None and g2 is None) or torch.equal(g1, g2)
    for (n1, t1, s1, v1), (n2, t2, s2, v2) in zip(a["buffers"], b["buffers"], strict=True):
        assert n1 == n2 and s1 == s2 and v1 == v2 and torch.equal(t1, t2)


def test_the_fast_path_leaves_no_visible_trace(planned):
    torch.manual_seed(2)
    net = randomize_bn_stats(ResNet(width=4))
    net.layer1.train()  # mixed flags, a frozen part, existing gradients
    net.layer2[0].bn1.eval()
    for p in net.layer1.parameters():
        p.requires_grad_(False)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    before = snapshot(net)
    compute_erf(net, torch.randn(6, 3, 32, 32), ["layer3"], chunk_size=2)
    assert planned[0].folded > 0  # the rewrites were used
    assert_same(before, snapshot(net))
    # memory format of every parameter as found (contiguous, not channels_last)
    assert all(p.is_contiguous() for p in net.parameters())
    # A second probe rebuilds the rewrites from the remembered recipe (no new plan, no trace):
    # no trace of those either.
    compute_erf(net, torch.randn(6, 3, 32, 32), ["layer3"], chunk_size=2)
    assert len(planned) == 1
    assert_same(before, snapshot(net))
    assert all(p.is_contiguous() for p in net.parameters())


class Shared(nn.Module):
    """A conv whose output feeds its BatchNorm *and* a skip: folding it would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = torch.relu(self.bn(y)) + y
        w = self.conv2(z)
        w.mul_(2.0)  # in place between the conv and its BatchNorm: not foldable either
        return self.bn2(w)


def test_pairs_that_cannot_be_folded_are_not(planned):
    torch.manual_seed(3)
    net = randomize_bn_stats(Shared()).double()
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    got = compute_erf(net, x, chunk_size=2)["output"].grad
    want = compute_erf(net, x, chunk_size=2, optimize=False)["output"].grad
    assert planned[0].folded == 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_probed_convs_and_hooked_modules_are_not_folded(planned):
    torch.manual_seed(4)
    net = randomize_bn_stats(ResNet(width=4)).double()
    seen = []
    net.layer1[0].bn2.register_forward_hook(lambda m, i, o: seen.append(float(i[0].detach().sum())))
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    got = compute_erf(net, x, ["layer2.0.conv1", "layer3"], chunk_size=2)
    want = compute_erf(net, x, ["layer2.0.conv1", "layer3"], chunk_size=2, optimize=False)
    for k in got:
        torch.testing.assert_close(got[k].grad, want[k].grad, rtol=1e-12, atol=0)
    assert planned[0].folded == 15 - 2  # the probed conv1 and the hooked bn2 stay as written
    # The hook saw the same (unfolded) inputs in both runs, up to float64 summation order.
    half = len(seen) // 2
    assert seen[:half] == pytest.approx(seen[half:], rel=1e-12)


def test_a_model_that_rejects_channels_last_falls_back(planned):
    class Viewer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y.view(y.shape[0], -1).view_as(y)  # .view fails on channels_last

    net = Viewer().double()
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    got = compute_erf(net, x, chunk_size=2)["output"].grad
    want = compute_erf(net, x, chunk_size=2, optimize=False)["output"].grad
    assert planned[0].channels_last is False  # disabled after the failed chunk
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _fold_one_pair(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The fold of one pair written out: float64 scale and shift, rounded to the weight dtype."""
    mean, var = norm.running_mean.double(), norm.running_var.double()
    scale = torch.rsqrt(var + norm.eps)
    shift = -mean * scale
    if norm.weight is not None:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double()
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    if conv.bias is not None:
        shift = conv.bias.double() * scale + shift
    dtype = conv.weight.dtype
    return conv.weight * scale.to(dtype).reshape(-1, 1, 1, 1), shift.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_folds_at_once_equal_each_pair_folded_alone_bitwise(dtype):
    # One concatenated computation for every pair must give each channel exactly what the pair
    # alone gives: with and without affine parameters and conv bias, different eps, negative
    # gammas, a shift of exactly -0.0 (a missing beta must keep its sign), channels_last.
    torch.manual_seed(0)
    pairs = []
    for i, (affine, bias, eps) in enumerate(
        [(True, False, 1e-5), (False, True, 1e-3), (True, True, 1e-5), (False, False, 0.1)]
    ):
        conv = nn.Conv2d(3, 4 + i, 3, bias=bias).to(dtype)
        norm = nn.BatchNorm2d(4 + i, eps=eps, affine=affine).to(dtype).eval()
        with torch.no_grad():
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.running_mean[0] = 0.0  # -mean * scale = -0.0
            if affine:
                norm.weight.uniform_(-2, 2)
                norm.bias.uniform_(-1, 1)
        pairs.append((conv, norm, i % 2 == 1))
    shadows = fastpath._shadow_weights(pairs)
    for (conv, norm, channels_last), (weight, bias) in zip(pairs, shadows, strict=True):
        ref_weight, ref_bias = _fold_one_pair(conv, norm)
        assert torch.equal(weight, ref_weight) and weight.dtype == dtype
        assert torch.equal(bias, ref_bias)
        assert torch.equal(bias.signbit(), ref_bias.signbit())  # -0.0 stays -0.0
        assert weight.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
    assert bool(_fold_one_pair(*pairs[3][:2])[1][0].signbit())  # the -0.0 case is exercised


@pytest.mark.parametrize(
    ("capability", "dtype", "tf32", "expected"),
    [
        ((9, 0), torch.float32, True, True),  # Hopper, PyTorch's default TF32 convolutions
        ((8, 0), torch.bfloat16, False, True),
        ((8, 0), torch.float32, False, False),  # full float32: NCHW stays
        ((8, 0), torch.float64, True, False),
        ((7, 5), torch.float16, True, False),  # before Ampere: NCHW stays
    ],
)
def test_channels_last_on_cuda_only_where_tensor_cores_run_the_dtype(
    monkeypatch, capability, dtype, tf32, expected
):
    from erf_callback.engine import compute

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    x = torch.zeros(1, 3, 8, 8, dtype=dtype)
    assert compute._wants_channels_last(net, x, torch.device("cuda", 0)) is expected
    # CPU: always for 2-D convolutions; never for 1-D ones or nets without Conv2d.
    assert compute._wants_channels_last(net, x, torch.device("cpu")) is True
    conv1d = nn.Sequential(nn.Conv1d(3, 4, 3))
    assert compute._wants_channels_last(conv1d, x[..., 0], torch.device("cuda", 0)) is False


def test_no_room_for_the_weight_copies_runs_the_model_as_written(monkeypatch):
    # A nearly full GPU: copying the weights for the fold raises an out-of-memory error. The
    # probe (its first, traced, and a later one that reuses the trace) runs the model as
    # written with the same map; once memory is back, the fast path returns.
    net = randomize_bn_stats(ResNet(width=4)).double().eval()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = compute_erf(net, x, ["layer2"], optimize=False)["layer2"].grad

    def no_room(shadowed):
        raise torch.OutOfMemoryError("fake: CUDA out of memory. Tried to allocate 350.00 MiB")

    monkeypatch.setattr(fastpath, "_shadow_weights", no_room)
    for _ in range(2):
        got = compute_erf(net, x, ["layer2"])["layer2"].grad
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    monkeypatch.undo()
    built = _record(monkeypatch, "build")
    got = compute_erf(net, x, ["layer2"])["layer2"].grad
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert built and built[-1].folded > 0  # the remembered recipe folds again


def test_channels_last_stays_off_on_rocm(monkeypatch):
    from erf_callback.engine import compute

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    net, x = nn.Sequential(nn.Conv2d(3, 4, 3)), torch.zeros(1, 3, 8, 8, dtype=torch.bfloat16)
    assert compute._wants_channels_last(net, x, torch.device("cuda", 0)) is False


class Branching(nn.Module):
    """A model whose path depends on the chunk's data: the fold planned from the first chunk
    does not hold for the chunks that take another branch."""

    def __init__(self, branch: str) -> None:
        super().__init__()
        self.branch = branch
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.other = nn.Conv2d(6, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.conv(h)
        if float(x.detach()[:, 0].mean()) < 0:  # the traced first sample is positive
            if self.branch == "skip":  # the BatchNorm is left out
                return self.head(torch.relu(y))
            if self.branch == "in place":  # the conv's output is changed before the norm
                y = y.mul_(2.0)
            elif self.branch == "other input":  # the norm gets another conv's output
                y = self.other(h)
            elif self.branch == "twice":  # the conv runs again before the norm
                y = self.conv(h) + y
        return self.head(torch.relu(self.bn(y)))


@pytest.mark.parametrize("branch", ["skip", "in place", "other input", "twice"])
def test_a_chunk_that_takes_another_path_than_the_traced_one_runs_as_written(branch, planned):
    torch.manual_seed(5)
    net = randomize_bn_stats(Branching(branch)).double().eval()
    x = torch.randn(6, 3, 12, 12, dtype=torch.float64)
    x[:, 0] += torch.tensor([3.0, 3.0, -3.0, 3.0, -3.0, -3.0])[:, None, None]
    # One sample per chunk: each takes its own branch, as the per-image reference does.
    got = compute_erf(net, x, chunk_size=1)["output"]
    want = compute_erf(net, x, chunk_size=1, optimize=False)["output"]
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=0)
    assert planned[0].folded == 0  # planned with the fold, disabled at the first other path
    # The next probe reuses the trace, without the fold. (With the fold kept, pixels of
    # these maps were 33-114% off.)
    again = compute_erf(net, x, chunk_size=1)["output"]
    torch.testing.assert_close(again.grad, want.grad, rtol=1e-12, atol=0)


def test_a_model_that_always_takes_the_traced_path_keeps_its_fold(planned):
    torch.manual_seed(6)
    net = randomize_bn_stats(Branching("skip")).double().eval()
    x = torch.randn(5, 3, 12, 12, dtype=torch.float64)
    x[:, 0] += 3.0  # every chunk takes the traced branch
    got = compute_erf(net, x, chunk_size=2)["output"]
    want = compute_erf(net, x, chunk_size=2, optimize=False)["output"]
    assert planned[0].folded == 1  # conv + bn
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=0)


class ReadsConvOutput(nn.Module):
    """A conv + BatchNorm pair whose conv output is also read where autograd does not see it:
    folded, that read would see the BatchNorm's values."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.read = read
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(torch.relu(self.stem(x)))
        if self.read == "mask":
            gate = (y > 0.3).to(y.dtype)
        elif self.read == "detached":
            gate = y.detach().abs().mean((1, 2, 3), keepdim=True)
        elif self.read == "no_grad":
            with torch.no_grad():
                gate = torch.sigmoid(y)
        else:  # "shape": reads no values, so the pair still folds
            gate = torch.ones(y.shape[1], 1, 1, dtype=y.dtype, device=y.device) * y.dim()
        return self.head(torch.relu(self.bn(y)) * gate)


@pytest.mark.parametrize(
    ("read", "folds"), [("mask", 0), ("detached", 0), ("no_grad", 0), ("shape", 1)]
)
def test_a_conv_output_read_outside_autograd_is_not_folded(read, folds, planned):
    torch.manual_seed(7)
    net = randomize_bn_stats(ReadsConvOutput(read)).double().eval()
    x = torch.randn(5, 3, 12, 12, dtype=torch.float64)
    got = compute_erf(net, x, chunk_size=2)["output"]
    want = compute_erf(net, x, chunk_size=2, optimize=False)["output"]
    # Folded (as before the recorder watched such reads), pixels of these maps were 1.4% to
    # 3.4x off.
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=0)
    assert planned[0].folded == folds


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_convs_of_every_rank_fold_with_their_batchnorm(monkeypatch, dims):
    conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d)}.get(
        dims, (nn.Conv3d, nn.BatchNorm3d)
    )
    net = nn.Sequential(
        conv(2, 4, 3, padding=1), norm(4), nn.ReLU(), conv(4, 3, 3, bias=False), norm(3)
    ).double()
    randomize_bn_stats(net)
    net.eval()
    size = {1: (40,), 2: (20, 20), 3: (9, 9, 9)}[dims]
    x = torch.randn(5, 2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for layer, folds in (("3", 1), ("4", 2)):  # conv "3" probed: only (0, 1) folds
        want = compute_erf(net, x, [layer], optimize=False)[layer].grad
        built = _record(monkeypatch, "build")
        got = compute_erf(net, x, [layer], chunk_size=2)[layer].grad
        assert built and built[-1].folded == folds
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_a_weight_made_by_a_forward_pre_hook_is_read_at_every_probe(check_order):
    # Pruning keeps weight_orig and a mask, and a forward pre-hook sets conv.weight to their
    # product at each call: a copy of conv.weight taken before a probe's forward is the
    # previous call's. Such a conv runs as written (not folded, not shadowed).
    from torch.nn.utils import prune

    net = randomize_bn_stats(ResNet(width=4)).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    prune.l1_unstructured(net.layer1[0].conv1, "weight", amount=0.5)
    for step in range(3):
        with torch.no_grad():  # an optimizer step on the pruned conv's weight_orig
            net.layer1[0].conv1.weight_orig.mul_(1.0 + 0.5 * step)
        got = compute_erf(net, x, ["layer2"], chunk_size=2)["layer2"].grad
        want = compute_erf(copy.deepcopy(net), x, ["layer2"], optimize=False)["layer2"].grad
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
