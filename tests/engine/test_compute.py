import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from erf_callback import ERFWarning, MetricConfig, compute_erf, tokens_to_grid
from tests.helpers.nets import (
    KeepsAndWrites,
    ResNet,
    randomize_bn_stats,
    relu_stack,
    stack_closed_form,
    uniform_stack,
)
from tests.helpers.replknet import replknet_area_ratio


@pytest.mark.parametrize(
    ("kernels", "dilations", "strides", "dims", "size"),
    [
        ([3, 3, 3], None, None, 2, 48),
        ([5] * 4, [2, 1, 2, 1], None, 2, 96),
        ([3, 5, 3], None, [2, 1, 1], 2, 64),
        ([3, 3, 3, 3], None, [2, 2, 1, 1], 2, 96),
        ([7, 3], [1, 3], [1, 2], 1, 128),
        ([3] * 6, None, None, 1, 64),
        ([3, 3], [1, 2], None, 3, 24),
    ],
)
def test_sigma_and_trf_match_closed_forms(kernels, dilations, strides, dims, size):
    net = uniform_stack(kernels, dilations, strides, dims)
    x = torch.randn((3, 1) + (size,) * dims)
    m = compute_erf(net, x, layers=[str(len(kernels) - 1)])[str(len(kernels) - 1)]
    (form,) = {stack_closed_form(kernels, dilations, strides, dims=dims)[ax] for ax in range(dims)}
    var, trf = form.variance, form.trf
    metrics = m.metrics()
    names = {1: [""], 2: ["_y", "_x"], 3: ["_z", "_y", "_x"]}[dims]
    # The gradients of an all-ones linear stack are integers (exact in float32) and the map is
    # clean, so the fitted moments are exact up to float64 rounding: 1e-12, not 1%.
    for s in names:
        assert metrics[f"sigma{s}"] == pytest.approx(math.sqrt(var), rel=1e-12)
        assert metrics[f"trf{s}"] == trf
    assert metrics["radius"] == pytest.approx(2 * math.sqrt(var), rel=1e-12)
    assert metrics["center_offset"] == pytest.approx(0.0, abs=1e-9)
    # Gaussian mass outside [-0.5, n - 0.5] on each axis, from the closed-form variance.
    centre, z = size // 2, 1 / math.sqrt(2 * var)
    inside = (0.5 * (math.erf((size - 0.5 - centre) * z) - math.erf((-0.5 - centre) * z))) ** dims
    assert metrics["border_mass"] == pytest.approx(1 - inside, abs=1e-12)
    assert metrics["erf_trf_ratio"] == pytest.approx(4 * math.sqrt(var) / trf, rel=1e-12)
    assert m.geometry.exact


@pytest.mark.parametrize("factor", [2.0, 3.0])
def test_anisotropic_radius_is_the_geometric_mean_of_sigma_y_and_sigma_x(factor):
    # Kernels 3x9 then 5x7: sigma_y^2 = (8 + 24) / 12, sigma_x^2 = (80 + 48) / 12, so the
    # geometric mean (radius) and the arithmetic mean differ by 20%; TRFs 7 and 15 likewise.
    net = uniform_stack([(3, 9), (5, 7)])
    m = compute_erf(net, torch.randn(2, 1, 48, 48), config=MetricConfig(radius_factor=factor))
    metrics = m["output"].metrics()
    sy, sx = (math.sqrt(a.variance) for a in stack_closed_form([(3, 9), (5, 7)]))
    assert (metrics["sigma_y"], metrics["sigma_x"]) == pytest.approx((sy, sx), rel=1e-12)
    assert metrics["radius"] == pytest.approx(factor * math.sqrt(sy * sx), rel=1e-12)
    assert (metrics["trf_y"], metrics["trf_x"]) == (7, 15)
    expected_ratio = 2 * factor * math.sqrt(sy * sx) / math.sqrt(7 * 15)
    assert metrics["erf_trf_ratio"] == pytest.approx(expected_ratio, rel=1e-12)


def test_non_square_odd_and_even_inputs():
    net = uniform_stack([3, 3, 3])
    for shape in [(33, 48), (48, 33), (31, 31), (40, 64)]:
        m = compute_erf(net, torch.randn(2, 1, *shape))["output"]
        assert tuple(m.grad.shape) == shape
        assert m.grad.dtype == torch.float64
        expected = tuple(float(s // 2) for s in shape)
        np.testing.assert_allclose(m.gaussian.mean, expected, atol=1e-9)
        assert m.metrics()["sigma_y"] == pytest.approx(math.sqrt(2.0), rel=1e-3)


def test_trf_of_resnet18_stages():
    net = ResNet(width=4)
    maps = compute_erf(net, torch.randn(2, 3, 64, 64), ["layer1", "layer2", "layer3", "layer4"])
    got = [maps[n].trf[1] for n in ("layer1", "layer2", "layer3", "layer4")]
    assert got == [43, 99, 211, 435]


def test_radius_grows_like_sqrt_depth():
    # Luo et al. 2016: random ReLU nets, ERF radius ~ sqrt(depth) (averaged over weights).
    depths = [4, 8, 16, 32]
    radii = []
    for depth in depths:
        runs = []
        for seed in range(3):
            torch.manual_seed(seed)
            net = relu_stack(depth)
            runs.append(compute_erf(net, torch.randn(8, 1, 96, 96))["output"].metrics()["radius"])
        radii.append(np.mean(runs))
    slope = np.polyfit(np.log(depths), np.log(radii), 1)[0]
    assert 0.4 < slope < 0.6, (slope, radii)


def test_chunking_does_not_change_the_map():
    # float64: in float32, batched and batch-1 kernels round differently, and a ReLU or
    # max-pool decision within rounding of a tie can flip on some CPUs and reroute a sample.
    torch.manual_seed(0)
    net = ResNet(width=4).eval().double()
    x = torch.randn(7, 3, 32, 32, dtype=torch.float64)
    ref = compute_erf(net, x, ["layer2"], chunk_size=None)["layer2"].grad
    for chunk in (1, 3, 7):
        got = compute_erf(net, x, ["layer2"], chunk_size=chunk)["layer2"].grad
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)


def test_matches_a_per_image_reference_and_replknet_convention():
    torch.manual_seed(1)
    net = ResNet(width=4).eval().double()  # float64: no rounding-dependent ReLU/max-pool flips
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    feats = {}
    net.layer2.register_forward_hook(lambda m, i, o: feats.__setitem__("o", o))
    ref_abs = torch.zeros(32, 32, dtype=torch.float64)
    ref_rep = torch.zeros(32, 32, dtype=torch.float64)
    for img in x:
        sample = img[None].clone().requires_grad_(True)
        net(sample)
        out = feats["o"]
        h, w = out.shape[2] // 2, out.shape[3] // 2
        (g,) = torch.autograd.grad(out[:, :, h, w].sum(), sample, retain_graph=True)
        ref_abs += g.abs().sum((0, 1))
        # RepLKNet erf/visualize_erf.py get_input_grad
        (g,) = torch.autograd.grad(torch.relu(out[:, :, h, w]).sum(), sample)
        ref_rep += torch.relu(g).sum((0, 1))
    got = compute_erf(net, x, ["layer2"])["layer2"].grad
    torch.testing.assert_close(got, ref_abs / 5, rtol=1e-12, atol=1e-14 * got.max().item())
    got = compute_erf(net, x, ["layer2"], reduction="replknet")["layer2"].grad
    torch.testing.assert_close(got, ref_rep / 5, rtol=1e-12, atol=1e-14 * got.max().item())


def test_position_and_channels():
    net = uniform_stack([3, 3])
    m = compute_erf(net, torch.randn(2, 1, 32, 32), position=(5, 20))["output"]
    np.testing.assert_allclose(m.gaussian.mean, [5.0, 20.0], atol=1e-9)
    assert m.location == (5.0, 20.0)
    assert m.metrics()["center_offset"] == pytest.approx(0.0, abs=1e-9)

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    x = torch.randn(3, 2, 16, 16)
    one = compute_erf(conv, x, channels=[1])["output"].grad
    w = conv.weight[1].detach().abs().sum(0).double()  # the ERF of one linear unit is |w|
    torch.testing.assert_close(one[7:10, 7:10], w, rtol=1e-6, atol=1e-9)
    assert one.sum() == pytest.approx(w.sum().item(), rel=1e-6)


@pytest.mark.parametrize(("position", "location"), [((5, 14), (10, 28)), ((3, 3), (6, 6))])
def test_area_ratio_squares_grow_around_the_probed_unit(position, location):
    # A stride-2 stack: output unit (i, j) sits on input pixel (2i, 2j), so position and
    # location differ and both differ from the input centre (20, 20) that the default unit
    # (10, 10) would use.
    net = uniform_stack([3, 3], strides=[2, 1])
    m = compute_erf(net, torch.randn(2, 1, 40, 40), position=position)["output"]
    assert m.location == location
    metrics = m.metrics()
    erf = m.grad.numpy()
    for t in (0.2, 0.3, 0.5, 0.99):
        expected = replknet_area_ratio(erf, t, location)
        assert metrics[f"area_ratio@{t:g}"] == pytest.approx(expected, rel=1e-12), t
    assert metrics["area_ratio@0.5"] != pytest.approx(replknet_area_ratio(erf, 0.5), rel=1e-3)


def test_default_unit_keeps_replknets_map_centre():
    net = uniform_stack([3, 5])
    m = compute_erf(net, torch.randn(2, 1, 33, 40))["output"]
    erf = m.grad.numpy()
    for t in (0.2, 0.5, 0.99):
        expected = replknet_area_ratio(erf, t)
        assert m.metrics()[f"area_ratio@{t:g}"] == pytest.approx(expected, rel=1e-12)


def test_probing_leaves_every_rng_stream_as_it_was():
    class Noisy(nn.Module):
        """Draws from torch, NumPy and Python RNGs in every forward, eval mode included."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            jitter = torch.rand(()) + float(np.random.rand()) + random.random()
            return self.conv(x) * (1 + 1e-3 * jitter)

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in "abc"]

    def seed_all():
        torch.manual_seed(11)
        np.random.seed(11)
        random.seed(11)

    net, x = Noisy().eval(), torch.randn(2, 1, 16, 16)
    seed_all()
    expected = draws()
    seed_all()
    net(x)
    assert all(a != b for a, b in zip(draws(), expected, strict=True))  # the forward draws
    seed_all()
    compute_erf(net, x, chunk_size=1)  # two forwards
    assert draws() == expected


def test_probing_leaves_the_model_exactly_as_it_was():
    torch.manual_seed(0)
    net = ResNet(width=4)
    net.train()
    net.layer1.eval()  # a frozen part: must stay in eval mode (no blanket .train())
    for p in net.layer1.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, 32, 32)
    net(x).sum().backward()  # populate .grad and move BatchNorm statistics
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    modes = {n: m.training for n, m in net.named_modules()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    compute_erf(net, x, ["layer2", "layer3"])

    for n, p in net.named_parameters():
        assert torch.equal(p, params[n]), n
        assert (p.grad is None) == (n not in grads)
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n
        assert p.requires_grad == flags[n], n
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]


def test_buffers_changed_by_the_forward_are_restored():
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1  # stateful even in eval mode
            return self.conv(x)

    net = Counter()
    compute_erf(net, torch.randn(2, 1, 8, 8))
    assert net.calls.item() == 0


def test_buffers_written_in_place_by_a_kernel_are_restored_too():
    # F.batch_norm(training=True) updates the running statistics inside the kernel without
    # moving their version counters; a norm that always uses batch statistics (whatever the
    # module's mode) changes them at every probe. Found by value, they are put back bitwise;
    # a buffer the probe did not change is not written (its version counter stays).
    class BatchStatNorm(nn.BatchNorm2d):
        def forward(self, x):
            stats = (self.running_mean, self.running_var, self.weight, self.bias)
            return F.batch_norm(x, *stats, training=True, momentum=0.5)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), BatchStatNorm(3), nn.Conv2d(3, 2, 1))
    net.register_buffer("odd", torch.tensor([float("nan"), -0.0, 1.0]))
    version = net[1].running_mean._version
    net[1](torch.randn(2, 3, 4, 4))
    assert net[1].running_mean._version == version  # written, yet the counter did not move
    before = {n: b.clone() for n, b in net.named_buffers()}
    odd_version = net.odd._version

    compute_erf(net, torch.randn(4, 1, 8, 8), chunk_size=2)

    for n, b in net.named_buffers():
        got, expected = b.reshape(-1).view(torch.uint8), before[n].reshape(-1).view(torch.uint8)
        assert torch.equal(got, expected), n
    assert net.odd._version == odd_version


def test_buffers_replaced_or_added_by_the_forward_are_put_back():
    # A cache rebuilt for the probe's input size (as rotary-embedding tables are) replaces a
    # buffer; another module registers one on the fly. After the probe each module holds its
    # own tensors again, under the same names.
    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.register_buffer("table", torch.ones(4), persistent=False)

        def forward(self, x):
            if self.table.numel() != x.shape[-1]:
                self.table = torch.ones(x.shape[-1])  # replaces the buffer
            self.register_buffer("seen", torch.zeros(1))
            return self.conv(x) * self.table

    net = Cached()
    table = net.table
    compute_erf(net, torch.randn(2, 1, 8, 8))
    assert net.table is table and torch.equal(table, torch.ones(4))
    assert "seen" not in net._buffers and net._non_persistent_buffers_set == {"table"}
    assert [n for n, _ in net.named_buffers()] == ["table"]


class _WritesItsInput(nn.Module):
    """Writes into its input first: in place with autograd (``inplace=True``), or under
    ``no_grad`` (a clamp of the pixel range), then a conv stack with a ReLU."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.first = nn.ReLU(inplace=inplace)
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.body.append(nn.Conv2d(4, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            with torch.no_grad():
                x.clamp_(-1.5, 1.5)
        else:  # the same values, and the gradient passes the clamp as under no_grad
            x = x + (x.clamp(-1.5, 1.5) - x).detach()
        x = x * 2 if not self.inplace else x.mul_(2)
        return self.body(self.first(x))


@pytest.mark.parametrize("optimize", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_a_model_that_writes_into_its_input_is_probed_and_the_inputs_are_kept(optimize, chunk_size):
    # An in-place ReLU or mul_ on the input with autograd on would fail on the leaf the
    # gradients are taken for; a clamp_ under no_grad would change the caller's inputs (the
    # callback's fixed probe batch, clamped and doubled again at every probe). The model gets a
    # copy of each chunk: the maps equal those of the same model written out of place.
    torch.manual_seed(0)
    writes = _WritesItsInput(inplace=True).eval()
    plain = copy.deepcopy(writes)
    plain.inplace = False
    plain.first = nn.ReLU()
    x = torch.randn(7, 2, 12, 12, dtype=torch.float64)
    writes.double(), plain.double()
    kept = x.clone()
    for layer in ("body.1", "body.3"):
        got = compute_erf(writes, x, layer, chunk_size=chunk_size, optimize=optimize)[layer]
        want = compute_erf(plain, x, layer, chunk_size=chunk_size, optimize=optimize)[layer]
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=0)
        assert torch.equal(x, kept)
    # The default layer of ERFMonitor is found by a forward of the inputs too.
    from erf_callback.engine.layers import deepest_spatial_layer

    assert deepest_spatial_layer(writes, x) == "body"
    assert torch.equal(x, kept)


def _in_place_stack(inplace: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.LeakyReLU(0.1, inplace=inplace),
        nn.Conv2d(4, 3, 3, padding=1),
    )


@pytest.mark.parametrize("optimize", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_probed_outputs_that_the_forward_writes_into_later_are_read_as_the_layer_gave_them(
    optimize, chunk_size
):
    # An in-place ReLU behind a probed layer (or torchvision's `out += identity` behind bn2)
    # wrote into its output before the backward when a deeper layer was probed in the same
    # call: the map was then that of relu(layer), and depended on which other layers were
    # probed. Every map must be the layer's own, whatever else is probed, in whatever order.
    torch.manual_seed(0)
    written = randomize_bn_stats(_in_place_stack(inplace=True)).double().eval()
    plain = copy.deepcopy(written)
    for m in plain.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    x = torch.randn(5, 2, 12, 12, dtype=torch.float64)
    kw = {"chunk_size": chunk_size, "optimize": optimize}
    for layers in (["0", "3", "5", "7"], ["5", "0"], ["3", "output"]):
        for _ in range(2):  # the second call starts from the remembered trace
            got = compute_erf(written, x, layers, **kw)
            want = compute_erf(plain, x, layers, **kw)
            for name in layers:
                torch.testing.assert_close(got[name].grad, want[name].grad, rtol=1e-12, atol=0)
    # torchvision's basic block: bn1 is followed by ReLU(inplace=True), bn2 by `out +=
    # identity`. Each layer probed among others gives the map of that layer probed alone,
    # where the forward stops at it and nothing can write into it.
    net = randomize_bn_stats(ResNet(width=4, blocks=(1, 1, 1, 1))).double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    layers = ["layer1.0.bn2", "layer1.0.bn1", "bn1", "layer2"]
    together = compute_erf(net, x, layers, **kw)
    for name in layers:
        alone = compute_erf(net, x, name, **kw)[name]
        torch.testing.assert_close(together[name].grad, alone.grad, rtol=1e-12, atol=0)


def test_a_write_into_a_probed_output_is_found_once_per_model_and_layers():
    # The first probe runs the chunk that shows the write twice; later probes of the same
    # layers hand copies downstream from the start: one forward per chunk, as without writes.
    net = _in_place_stack(inplace=True).eval()
    forwards: list[int] = []
    net.register_forward_pre_hook(lambda *_: forwards.append(1))
    x = torch.randn(4, 2, 12, 12)
    counts = []
    for layers in (["0", "5"], ["0", "5"], ["3", "5"], ["3", "5"]):
        forwards.clear()
        compute_erf(net, x, layers, chunk_size=None)
        counts.append(len(forwards))
    assert counts == [2, 1, 2, 1]


class _InferenceStem(nn.Module):
    """Runs its stem under torch.inference_mode: the stem's output has no gradient path."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            y = self.stem(x)
        return self.head(y.clone())


@pytest.mark.parametrize("layers", [["stem"], ["stem", "head"], ["head"]])
def test_an_output_made_under_inference_mode_says_it_is_not_connected(layers):
    # Inference tensors keep no version counter: the check for in-place writes must not turn
    # the message that explains the probe into torch's "do not track version counter".
    with pytest.raises(ValueError, match=r"output is not connected to the input by autograd"):
        compute_erf(_InferenceStem(), torch.randn(2, 3, 12, 12), layers)


def test_a_probed_output_written_into_through_a_kept_reference_is_an_error():
    net = KeepsAndWrites()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"writes into the output of \[.a.\].*call of its own"):
        compute_erf(net, x, ["a", "output"])
    # Probed alone, the forward stops at the layer: its map is its own.
    alone = compute_erf(net, x, "a")["a"]
    assert alone.status == "ok"


def test_autocast_and_channels_last_and_low_precision():
    torch.manual_seed(0)
    net = ResNet(width=4).eval()
    x = torch.randn(3, 3, 32, 32)
    ref = compute_erf(net, x, ["layer2"])["layer2"].grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compute_erf(net, x, ["layer2"])["layer2"].grad
    torch.testing.assert_close(got, ref)  # probing disables autocast: float32 results
    # channels_last runs other kernels; float64 keeps ReLU/max-pool ties from flipping.
    net64, x64 = copy.deepcopy(net).double(), x.double()
    ref64 = compute_erf(net64, x64, ["layer2"])["layer2"].grad
    cl = compute_erf(
        net64.to(memory_format=torch.channels_last),
        x64.to(memory_format=torch.channels_last),
        ["layer2"],
    )["layer2"].grad
    torch.testing.assert_close(cl, ref64, rtol=1e-12, atol=1e-15)
    half = compute_erf(net.to(torch.bfloat16), x, ["layer2"])["layer2"]  # a "bf16-true" model
    assert half.grad.dtype == torch.float64
    assert torch.corrcoef(torch.stack([half.grad.flatten(), ref.flatten()]))[0, 1] > 0.98


def test_torch_compile_is_probed_without_recompiling():
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.compile(uniform_stack([3, 3]), backend=counting_backend)

        def forward(self, x):
            return self.body(x)

    net = Wrapper()
    x = torch.randn(2, 1, 16, 16)
    net(x)
    assert len(compiles) == 1
    m = compute_erf(net, x, ["body.1"])["body.1"]  # names without the _orig_mod segment
    net(x)
    assert len(compiles) == 1
    assert m.metrics()["sigma_x"] == pytest.approx(math.sqrt(4 / 3), rel=1e-3)
    top = torch.compile(uniform_stack([3]), backend=counting_backend)
    assert compute_erf(top, x, ["_orig_mod.0"])["_orig_mod.0"].metrics()["trf_x"] == 3


def test_tuple_outputs_and_transformer_tokens():
    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(x), "aux"

    net = nn.Sequential()
    net.add_module("block", TupleOut())
    m = compute_erf(net.block, torch.randn(2, 1, 16, 16))["output"]
    assert m.grad.shape == (16, 16)

    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 4, stride=4)
            self.cls = nn.Parameter(torch.zeros(1, 1, 16))
            self.block = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(len(x), -1, -1), t], dim=1)
            return self.block(t)

    torch.manual_seed(0)
    vit = TinyViT()
    maps = compute_erf(
        vit,
        torch.randn(2, 3, 32, 32),
        ["block"],
        output_transform=tokens_to_grid(),
        reduction="replknet",  # the plain channel sum after LayerNorm is constant
    )
    grad = maps["block"].grad
    assert grad.shape == (32, 32)
    assert (grad > 0).float().mean() > 0.9  # attention: the unit sees the whole image
    assert math.isinf(maps["block"].metrics()["trf_x"])
    assert maps["block"].metrics()["erf_trf_ratio"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_prefix_tokens": -1}, "must be >= 0"),
        ({"num_prefix_tokens": 1.0}, "must be an int"),
        ({"grid_size": (0, 4)}, "positive ints"),
        ({"grid_size": (4, 4.0)}, "positive ints"),
        ({"grid_size": (1, 2, 2, 4)}, "1-3 positive ints"),
    ],
)
def test_tokens_to_grid_refuses_bad_arguments_at_once(kwargs, match):
    # -1 prefix tokens took the last token alone as a 1 x 1 "grid"; a 0-sized grid passed
    # every token count of 0.
    with pytest.raises(ValueError, match=match):
        tokens_to_grid(**kwargs)


def test_tokens_to_grid_refuses_a_prefix_that_leaves_no_patch_tokens():
    # 20 prefix tokens of 17 gave an empty (2, 8, 0, 0) grid.
    with pytest.raises(ValueError, match="no patch tokens are left"):
        tokens_to_grid(num_prefix_tokens=20)(torch.zeros(2, 17, 8))


def test_bn_without_running_stats_is_probed_per_sample():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False))
    x = torch.randn(4, 1, 16, 16)
    batched = compute_erf(net, x, chunk_size=4)["output"].grad
    single = sum(compute_erf(net, x[i : i + 1])["output"].grad for i in range(4)) / 4
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-9)


# ----- errors and numerical trouble ---------------------------------------------------------


def test_unknown_layer_lists_the_closest_names():
    with pytest.raises(KeyError, match=r"'layer_3'.*Closest names: 'layer3', "):
        compute_erf(ResNet(width=4), torch.randn(1, 3, 32, 32), ["layer_3"])


def test_non_spatial_layer_is_rejected_with_a_fix():
    with pytest.raises(ValueError, match=r"'fc' outputs shape \(N, 10\).*output_transform"):
        compute_erf(ResNet(width=4), torch.randn(1, 3, 32, 32), ["fc"])
    # The shape came from the user's output_transform: the message says so, and what to return
    # (not "pass output_transform", which they did).
    with pytest.raises(
        ValueError,
        match=r"output_transform of layer 'layer1' returns shape \(N, "
        r"\d+\).*return the layer's output as \(N, C, H, W\)\.$",
    ):
        compute_erf(
            ResNet(width=4),
            torch.randn(1, 3, 32, 32),
            ["layer1"],
            output_transform=lambda o: o.flatten(1),
        )


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (torch.randn(32), r"unsqueeze\(0\)"),
        (torch.randn(32, 32), r"inputs\[None, None\]"),  # one image without either axis
        (torch.randint(0, 255, (1, 3, 32, 32)), "floating point"),
        (torch.randn(1, 1, 2, 2, 2, 2), "1-3 spatial dims"),
        (torch.randn(2, 3, 0, 8), r"\(2, 3, 0, 8\) have an empty channel or spatial axis"),
        (torch.randn(2, 0, 8, 8), "empty channel or spatial axis"),
    ],
)
def test_bad_inputs(inputs, match):
    net = nn.Conv2d(3, 3, 3)
    with pytest.raises(ValueError, match=match):
        compute_erf(net, inputs)


def test_lazy_modules_must_be_initialised_first_and_are_left_uninitialised():
    net = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.LazyConv2d(2, 3))
    with pytest.raises(ValueError, match=r"4 uninitialised parameters.*'0.weight'.*model\(x\)"):
        compute_erf(net, torch.randn(2, 3, 16, 16))
    assert isinstance(net[0].weight, nn.parameter.UninitializedParameter)  # not initialised
    net(torch.randn(1, 3, 16, 16))  # what the first training step does
    assert compute_erf(net, torch.randn(2, 3, 16, 16))["output"].status == "ok"


def test_sparse_inputs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"dense tensor; got layout torch.sparse_coo.*to_dense"):
        compute_erf(nn.Conv2d(3, 3, 3), torch.randn(2, 3, 8, 8).to_sparse())


def test_inputs_with_more_spatial_dims_than_the_model_name_the_shape_it_needs():
    # A 3-D volume into a 2-D network: conv2d's own error would name neither the layer nor
    # the fix. (One dim too few is the unbatched case, tested with the unbatched guard.)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"'0' \(Conv2d\) works on 2-D.*\(N, C, H, W\)"):
        compute_erf(net, torch.randn(2, 3, 4, 16, 16), ["2"])
    conv1d = nn.Conv1d(3, 3, 3)
    with pytest.raises(ValueError, match=r"works on 1-D.*\(N, C, W\)"):
        compute_erf(conv1d, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": 2}, TypeError, r"layers must be a layer name.*got 2.*layers=\['layer3'\]"),
        ({"layers": {"2": 1}}, TypeError, r"layers must be a layer name"),
        ({"output_transform": 3}, ValueError, r"output_transform must be a callable.*got 3"),
        (
            {"output_transform": {"2": "flatten"}},
            ValueError,
            r"output_transform\['2'\] must be a callable.*got 'flatten'",
        ),
        ({"model": lambda x: x}, TypeError, r"model must be a torch.nn.Module; got function"),
    ],
)
def test_arguments_of_the_wrong_kind_are_named(kwargs, error, match):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3))
    args = {"model": net, "inputs": torch.randn(2, 3, 8, 8), "layers": ["2"], **kwargs}
    with pytest.raises(error, match=match):
        compute_erf(**args)


def test_position_outside_the_output():
    with pytest.raises(ValueError, match=r"outside layer 'output'.*\(8, 8\).*centre is \(4, 4\)"):
        compute_erf(nn.Conv2d(1, 1, 1), torch.randn(1, 1, 8, 8), position=(8, 0))


def test_position_with_the_wrong_number_of_indices():
    with pytest.raises(ValueError, match=r"has 3 indices, but layer 'output'.*2 spatial axes"):
        compute_erf(nn.Conv2d(1, 1, 1), torch.randn(1, 1, 8, 8), position=(1, 2, 3))
    with pytest.raises(ValueError, match=r"has 1 index,.*2 spatial axes \(8, 8\)"):
        compute_erf(nn.Conv2d(1, 1, 1), torch.randn(1, 1, 8, 8), position=(1,))


def test_layer_never_reached():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(1, 1, 3)
            self.spare = nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"never called \['spare'\]"):
        compute_erf(Unused(), torch.randn(1, 1, 8, 8), ["spare"])


def test_nan_gradients_warn_and_give_nan_metrics():
    class Bad(nn.Module):
        def forward(self, x):
            return x * float("nan")

    with pytest.warns(ERFWarning, match="NaN/Inf"):
        m = compute_erf(Bad(), torch.randn(2, 1, 8, 8))["output"]
    assert m.status == "nonfinite"
    metrics = m.metrics()
    assert metrics["trf_x"] == 1  # structure is still known
    assert all(math.isnan(v) for k, v in metrics.items() if not k.startswith("trf"))


def test_layernorm_channel_sum_is_constant_and_the_warning_says_so():
    class ChannelNorm(nn.Module):  # LayerNorm over channels at each position, as in ConvNeXt
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 4, 3, padding=1), nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    # Depending on the weights, the constant sum's gradient is exactly zero or float32
    # round-off (half of the seeds): both are "zero" with the warning, at every probe.
    for seed in range(12):
        torch.manual_seed(seed)
        net = ChannelNorm()
        for _ in range(2):  # the second probe would reuse a remembered trace: it must not
            with pytest.warns(ERFWarning, match="reduction='replknet'"):
                m = compute_erf(net, torch.randn(2, 1, 8, 8))["output"]
            assert m.status == "zero", seed
            assert math.isnan(m.metrics()["radius"])
        assert compute_erf(net, torch.randn(2, 1, 8, 8), channels=[0])["output"].status == "ok"
    # Trained weights that differ between channels: the sum is no longer constant, a real map.
    with torch.no_grad():
        net.norm.weight.copy_(torch.tensor([1.0, 1.02, 0.97, 1.01]))
    assert compute_erf(net, torch.randn(2, 1, 8, 8))["output"].status == "ok"


def test_zero_gradients_warn():
    net = nn.Conv2d(1, 1, 3, padding=1)
    nn.init.zeros_(net.weight)
    with pytest.warns(ERFWarning, match="zero everywhere"):
        m = compute_erf(net, torch.randn(2, 1, 8, 8))["output"]
    assert m.status == "zero"
    assert math.isnan(m.metrics()["radius"])


def test_border_warning():
    net = uniform_stack([9] * 6)
    with pytest.warns(ERFWarning, match="reaches the input's border"):
        metrics = compute_erf(net, torch.randn(1, 1, 24, 24))["output"].metrics()
    assert metrics["border_mass"] > 0.01


@pytest.mark.parametrize("made_inside", [False, True])
def test_compute_erf_inside_inference_mode_gives_the_same_maps(made_inside):
    # A notebook cell or a validation hook under torch.inference_mode: the probe leaves that
    # mode, as it leaves no_grad, and an input made inside it (an inference tensor, which
    # autograd refuses) is copied. Before, either failed with "not connected to the input".
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    net.append(nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(3, 3, 24, 24)
    compute_erf(net, x)  # the first call traces; later ones take the recalled fast path
    expected = compute_erf(net, x)["output"].grad
    state = copy.deepcopy(net.state_dict())
    with torch.inference_mode():
        inputs = x.clone() if made_inside else x
        got = compute_erf(net, inputs)["output"]
    assert got.status == "ok"
    assert torch.equal(got.grad, expected)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key


class _Checkpointed(nn.Module):
    """Three conv blocks, each run through torch.utils.checkpoint (``reentrant``: the variant
    that refuses torch.autograd.grad; None: not checkpointed)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
            for c in (3, 6, 6)
        )
        self.head = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            if self.reentrant is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


@pytest.mark.parametrize("reentrant", [True, False])
def test_models_with_gradient_checkpointing_are_probed(reentrant):
    # Reentrant checkpoints (PyTorch's default when use_reentrant is not given) refuse
    # torch.autograd.grad: such a model's input gradients come from .backward(), with no
    # .grad of the model touched.
    torch.manual_seed(0)
    plain = _Checkpointed(None).double()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net = copy.deepcopy(plain).train()
    net.reentrant = reentrant
    net.head.weight.grad = torch.ones_like(net.head.weight)  # a gradient the probe must keep
    x = torch.randn(5, 3, 24, 24, dtype=torch.float64)
    for layers in (["head"], ["blocks.2", "head", "output"]):
        want = compute_erf(plain, x, layers, optimize=False)
        for _ in range(2):  # the first probe finds the mode, the second starts in it
            got = compute_erf(net, x, layers, chunk_size=2)
            for name in layers:
                torch.testing.assert_close(got[name].grad, want[name].grad, rtol=1e-12, atol=0)
    assert torch.equal(net.head.weight.grad, torch.ones_like(net.head.weight))
    assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith("head"))
    assert net.training and all(p.requires_grad for p in net.parameters())
    if reentrant:  # inside a reentrant segment the forward runs without autograd
        with pytest.raises(ValueError, match="use_reentrant=True"):
            compute_erf(net, x, ["blocks.1.0"])
