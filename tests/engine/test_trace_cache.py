"""A repeated probe reuses the first probe's trace, and only while the model is unchanged.

Every comparison is in float64 against a probe that cannot use the cache (``optimize=False``
on a deep copy), so rounding differences between the traced and the fast path stay below 1e-12
and any stale geometry, shape or fold would show.
"""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from erf_callback import compute_erf
from erf_callback.engine import compute, trace_cache
from erf_callback.engine.trace_cache import TRACES, clear_trace_cache, model_fingerprint
from tests.helpers.nets import ResNet, randomize_bn_stats, uniform_stack

# The small test inputs let deep ERFs reach the border; that warning is beside the point here.
pytestmark = pytest.mark.filterwarnings("ignore:The ERF of .* reaches the input's border")


@pytest.fixture
def traces(monkeypatch):
    """Counts the traced first chunks (ReceptiveFieldTracer instances) of compute_erf."""
    count = []
    original = compute.ReceptiveFieldTracer

    def counting(x):
        count.append(1)
        return original(x)

    monkeypatch.setattr(compute, "ReceptiveFieldTracer", counting)
    clear_trace_cache()
    yield count
    clear_trace_cache()


def resnet() -> nn.Module:
    net = ResNet(width=8).double()
    randomize_bn_stats(net)
    return net.eval()


def reference(net: nn.Module, x: torch.Tensor, layer: str, **kw):
    """The same probe, traced from scratch on a copy (optimize=False never uses the cache)."""
    return compute_erf(copy.deepcopy(net), x, [layer], optimize=False, **kw)[layer]


def assert_same(got, want) -> None:
    assert got.output_shape == want.output_shape and got.position == want.position
    assert got.location == pytest.approx(want.location, abs=1e-12)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=0.0)
    m, w = got.metrics(), want.metrics()
    for key in ("trf_x", "trf_y", "sigma_x", "sigma_y", "radius", "area_ratio@0.5"):
        assert m[key] == pytest.approx(w[key], rel=1e-9), key


def test_a_repeated_probe_traces_once_and_gives_the_same_maps(traces, check_order):
    net, x = resnet(), torch.randn(6, 3, 32, 32, dtype=torch.float64)
    first = compute_erf(net, x, ["layer2"])["layer2"]
    again = compute_erf(net, x, ["layer2"])["layer2"]
    other_unit = compute_erf(net, x, ["layer2"], position=(1, 2), channels=[3])["layer2"]
    assert len(traces) == 1  # the second and third probe reused the first one's trace
    assert_same(again, first)
    assert_same(first, reference(net, x, "layer2"))
    assert_same(other_unit, reference(net, x, "layer2", position=(1, 2), channels=[3]))


def test_optimize_false_and_new_inputs_or_layers_trace_again(traces):
    net, x = resnet(), torch.randn(4, 3, 32, 32, dtype=torch.float64)
    compute_erf(net, x, ["layer2"])
    compute_erf(net, x, ["layer2"], optimize=False)  # the reference path: always traced
    compute_erf(net, x[:, :, :24, :24], ["layer2"])  # another input size
    compute_erf(net, x, ["layer3"])  # another layer list
    compute_erf(net, x.float(), ["layer2"])  # same shape, cast to the model's dtype: reused
    assert len(traces) == 4


def _dilate(net):
    net[1].dilation, net[1].padding = (2, 2), (2, 2)  # same output shape, wider TRF


def _replace(net):
    net[1] = nn.Conv2d(1, 1, 5, padding=2, bias=False).double()
    nn.init.constant_(net[1].weight, 1.0)


def _hook(net):
    net[1].register_forward_hook(lambda _m, _i, out: out.roll(1, dims=-1))


def _pre_hook_removed_and_re_added(net):
    net[0].register_forward_pre_hook(lambda _m, args: None).remove()
    net[0].register_forward_pre_hook(lambda _m, args: (args[0].flip(-1),))


def _patch_forward(net):
    conv = net[2]
    net[2].forward = lambda t: nn.functional.conv2d(t, conv.weight, None, 1, 3, 3)


def _weights(net):
    with torch.no_grad():
        net[0].weight.mul_(torch.linspace(0.5, 2.0, 9, dtype=torch.float64).view(1, 1, 3, 3))


def _stride(net):
    net[1].stride = (2, 2)  # a smaller output: a new position, a new TRF


@pytest.mark.parametrize(
    "change",
    [_dilate, _replace, _hook, _pre_hook_removed_and_re_added, _patch_forward, _weights, _stride],
)
def test_a_change_of_the_model_is_seen_by_the_next_probe(traces, check_order, change):
    net = uniform_stack([3, 3, 3]).double()
    x = torch.randn(3, 1, 40, 40, dtype=torch.float64)
    before = compute_erf(net, x)["output"]
    assert_same(compute_erf(net, x)["output"], before)  # recalled once before the change
    change(net)
    after = compute_erf(net, x)["output"]
    assert_same(after, reference(net, x, "output"))
    assert not torch.equal(after.grad, before.grad)


def test_weights_and_bn_statistics_of_a_folded_network_are_read_at_every_probe(traces):
    net, x = resnet(), torch.randn(4, 3, 32, 32, dtype=torch.float64)
    compute_erf(net, x, ["layer2"])
    compute_erf(net, x, ["layer2"])  # traced, then recalled, before the weights change
    with torch.no_grad():  # what an optimizer step and a training forward do, in place
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        net.layer1[0].bn1.running_var.mul_(3.0)
        net.layer2[0].bn2.running_mean.add_(0.5)
    again = compute_erf(net, x, ["layer2"])["layer2"]
    assert len(traces) == 1
    assert_same(again, reference(net, x, "layer2"))


def test_a_shape_change_the_fingerprint_misses_is_caught_and_traced_again(traces):
    class Switch(nn.Module):  # the stride comes from outside the modules
        stride = 1

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False).double()

        def forward(self, t):
            return nn.functional.conv2d(t, self.conv.weight, None, Switch.stride, 1)

    net, x = Switch(), torch.randn(2, 1, 20, 20, dtype=torch.float64)
    compute_erf(net, x)
    Switch.stride = 2  # a class attribute: not part of any module's __dict__
    after = compute_erf(net, x)["output"]
    assert after.output_shape == (1, 10, 10)
    assert_same(after, reference(net, x, "output"))
    assert len(traces) == 3  # the stale recall was abandoned and the probe traced again


def test_clear_trace_cache_is_the_way_out_for_state_outside_the_modules(traces):
    class Dilated(nn.Module):  # same output shape at both settings, different TRF
        dilation = 1

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, bias=False).double()

        def forward(self, t):
            d = Dilated.dilation
            return nn.functional.conv2d(t, self.conv.weight, None, 1, d, d)

    net, x = Dilated(), torch.randn(2, 1, 20, 20, dtype=torch.float64)
    assert compute_erf(net, x)["output"].metrics()["trf_x"] == 3
    Dilated.dilation = 2
    clear_trace_cache(net)
    after = compute_erf(net, x)["output"]
    assert after.metrics()["trf_x"] == 5
    assert_same(after, reference(net, x, "output"))


def test_the_cache_holds_no_model_alive_and_is_bounded(traces):
    net = uniform_stack([3, 3])
    net[0].register_forward_hook(lambda _m, _i, out: out)  # a closure in the fingerprint
    compute_erf(net, torch.randn(1, 1, 16, 16))
    assert len(TRACES) == 1
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None and len(TRACES) == 0

    net = uniform_stack([3])
    for size in range(8, 8 + 2 * trace_cache.MAX_ENTRIES):
        compute_erf(net, torch.randn(1, 1, size, size))
    assert len(TRACES) == trace_cache.MAX_ENTRIES


def test_the_fingerprint_sees_attributes_hooks_and_shapes_not_values():
    net = resnet()
    base = model_fingerprint(net)
    assert model_fingerprint(copy.deepcopy(net)) != base  # other module identities
    with torch.no_grad():
        net.conv1.weight.add_(1.0)
    net.layer1[0].bn1.running_mean.fill_(3.0)
    assert model_fingerprint(net) == base  # values change every step: never part of it
    net.train()  # the probe sets eval mode itself
    net._current_fx_name = "on_train_batch_end"  # Lightning's name of the running hook
    assert model_fingerprint(net) == base
    net.eval()
    net.layer1[0].conv1.padding_mode = "circular"
    assert model_fingerprint(net) != base
    net.layer1[0].conv1.padding_mode = "zeros"
    assert model_fingerprint(net) == base
    net.fc.weight = nn.Parameter(torch.zeros(3, 64, dtype=torch.float64))
    assert model_fingerprint(net) != base


def test_counters_kept_on_modules_do_not_make_every_probe_trace_again(traces):
    net, x = uniform_stack([3, 3]), torch.randn(2, 1, 16, 16)
    for step in range(3):  # what training code keeps on its modules
        net.steps, net.loss_scale = step, 2.0**step
        compute_erf(net, x)
    assert len(traces) == 1


def test_a_fingerprint_holds_no_tensor_of_the_model_alive():
    net = uniform_stack([3])
    t = torch.zeros(1000)
    net[0].cached, net[0].pair = t, (t, 2)  # tensors kept on a module, bare and in a tuple
    ref = weakref.ref(t)
    fingerprint = model_fingerprint(net)
    net[0].cached = net[0].pair = None
    del t
    gc.collect()
    assert ref() is None and fingerprint != model_fingerprint(net)


def test_a_model_the_fingerprint_cannot_read_is_probed_and_traced_every_time(traces, monkeypatch):
    def unreadable(_model):
        raise RuntimeError("an attribute that cannot be read")

    monkeypatch.setattr(compute, "model_fingerprint", unreadable)
    net, x = uniform_stack([3, 3]), torch.randn(2, 1, 16, 16)
    maps = [compute_erf(net, x)["output"] for _ in range(2)]
    assert len(traces) == 2 and all(m.status == "ok" for m in maps)
    assert maps[0].metrics()["trf_x"] == 5


class _Calls(nn.Module):
    """Counts its forwards; ``keep`` also keeps each input's shape, as some models keep
    activations (a list that changes the fingerprint at every forward)."""

    def __init__(self, keep: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 3)
        ).double()
        randomize_bn_stats(self.body)
        self.keep = keep
        self.calls = 0  # an int: not part of the fingerprint
        self.kept: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls += 1
        if self.keep:
            self.kept.append(tuple(x.shape))
        return self.body(x)


def _undilated(net: nn.Module) -> nn.Module:
    out = copy.deepcopy(net)
    out.body[3].dilation = (1, 1)
    return out


def test_a_record_used_unchecked_is_checked_once_the_kernels_are_queued(traces, checked_after):
    net, x = _Calls().eval(), torch.randn(3, 1, 24, 24, dtype=torch.float64)
    maps = [compute_erf(net, x, chunk_size=None)["output"] for _ in range(3)]
    assert len(traces) == 1 and net.calls == 3  # one forward per probe: nothing thrown away
    for m in maps[1:]:
        assert_same(m, maps[0])
    # A change the fingerprint sees: the unchecked record's result is thrown away, once.
    net.body[3].dilation = (2, 2)
    net.calls = 0
    after = [compute_erf(net, x, chunk_size=None)["output"] for _ in range(3)]
    assert net.calls == 4 and len(traces) == 2
    assert_same(maps[-1], reference(_undilated(net), x, "output", chunk_size=None))
    for m in after:
        assert_same(m, reference(net, x, "output", chunk_size=None))


def test_a_hook_registered_since_never_sees_a_forward_that_is_thrown_away(checked_after):
    net, x = _Calls().eval(), torch.randn(3, 1, 24, 24, dtype=torch.float64)
    for _ in range(2):
        compute_erf(net, x, chunk_size=None)
    seen = []
    net.body[0].register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    got = compute_erf(net, x, chunk_size=None)["output"]
    # One forward, of the model as written (the traced chunk): the hook's output is the
    # conv's own, not a folded copy's.
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], net.body[0](x), rtol=0, atol=0)
    assert_same(got, reference(net, x, "output", chunk_size=None))


def test_a_forward_that_changes_the_fingerprint_is_never_run_unchecked(traces, checked_after):
    net, x = _Calls(keep=True).eval(), torch.randn(3, 1, 24, 24, dtype=torch.float64)
    for _ in range(4):
        compute_erf(net, x, chunk_size=None)
    assert net.calls == 4  # no probe ran twice


def test_a_model_that_changes_before_every_probe_runs_one_forward_more_in_all(
    traces, checked_after
):
    net, x = _Calls().eval(), torch.randn(3, 1, 24, 24, dtype=torch.float64)
    for step in range(5):
        net.tag = f"step {step}"  # a string: part of the fingerprint
        compute_erf(net, x, chunk_size=None)
    # The second probe used the first one's record unchecked and threw its result away; from
    # then on records are checked first, as on a CPU.
    assert net.calls == 6 and len(traces) == 5


def test_an_error_from_a_stale_record_used_unchecked_is_not_the_users(traces, checked_after):
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3))
    net = net.double()
    x = torch.randn(2, 1, 40, 40, dtype=torch.float64)
    for _ in range(2):
        compute_erf(net, x)  # output 18x18, remembered
    net[0].stride = (1, 1)  # output 38x38: the module tree and its hooks are unchanged
    # (30, 30) is outside the remembered 18x18 output: the unchecked record raises, the
    # changed fingerprint shows it stale, and the probe starts again, traced.
    got = compute_erf(net, x, position=(30, 30))["output"]
    assert len(traces) == 2 and got.output_shape == (1, 38, 38)
    assert_same(got, reference(net, x, "output", position=(30, 30)))
    with pytest.raises(ValueError, match="position"):  # a real error stays the user's
        compute_erf(net, x, position=(40, 40))


def test_hooks_key_sees_hooks_modules_and_instance_forwards():
    net = uniform_stack([3, 3])
    base = trace_cache.hooks_key(list(net.modules()))
    assert trace_cache.hooks_key(list(net.modules())) == base
    net[0].register_forward_pre_hook(lambda _m, a: None).remove()
    assert trace_cache.hooks_key(list(net.modules())) == base  # removed again
    handle = net[1].register_full_backward_hook(lambda *a: None)
    assert trace_cache.hooks_key(list(net.modules())) != base
    handle.remove()
    net[1].forward = net[1].forward
    assert trace_cache.hooks_key(list(net.modules())) != base
    del net[1].forward
    net[1] = nn.Conv2d(1, 1, 3)
    assert trace_cache.hooks_key(list(net.modules())) != base
