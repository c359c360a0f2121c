"""Which strategies share the probe, which need lockstep, which fail at fit start."""

from types import SimpleNamespace

import pytest
import torch

from erf_callback import ERFMonitor
from erf_callback.callback.distributed import ProbeGroup, probe_group, run_probe
from tests.helpers.nets import relu_stack


def strategy(name: str, base: str | None = None, **attrs) -> object:
    bases = (type(base, (), {}),) if base else ()
    return type(name, bases, attrs)()


def trainer(strat: object, world_size: int = 2, rank: int = 1) -> SimpleNamespace:
    return SimpleNamespace(strategy=strat, world_size=world_size, global_rank=rank)


@pytest.mark.parametrize(
    ("strat", "lockstep"),
    [
        (strategy("DDPStrategy"), False),
        (strategy("MyDDP", base="DDPStrategy"), False),  # a user's subclass (e.g. ddp_spawn)
        (strategy("DDPSpawnStrategy"), False),
        (strategy("FSDPStrategy"), True),
        (strategy("DeepSpeedStrategy", zero_stage_3=False), False),
        (strategy("DeepSpeedStrategy", zero_stage_3=True), True),
        (strategy("ModelParallelStrategy", _tensor_parallel_size=1), True),
    ],
)
def test_supported_strategies_share_the_probe(strat, lockstep):
    group = probe_group(trainer(strat))
    assert group == ProbeGroup(1, 2, lockstep, type(strat).__name__)


@pytest.mark.parametrize(
    ("strat", "why"),
    [
        (strategy("ModelParallelStrategy", _tensor_parallel_size=2), "tensor parallelism"),
        (strategy("XLAStrategy"), "it is not known"),
        (strategy("SomethingNewStrategy"), "it is not known"),
    ],
)
def test_unsupported_strategies_fail_naming_themselves(strat, why):
    name = type(strat).__name__
    with pytest.raises(ValueError, match=rf"under the {name} strategy \({why}") as info:
        probe_group(trainer(strat))
    assert "compute_erf" in str(info.value)  # the way out


def test_one_process_needs_no_group_whatever_the_strategy():
    assert probe_group(trainer(strategy("XLAStrategy"), world_size=1, rank=0)) is None


def test_monitor_setup_raises_for_an_unsupported_strategy():
    monitor = ERFMonitor(layers=["0"])
    fake = trainer(strategy("XLAStrategy"))
    fake.fast_dev_run = False
    with pytest.raises(ValueError, match="XLAStrategy"):
        monitor.setup(fake, relu_stack(2), "fit")


def test_run_probe_with_a_group_uses_its_all_reduce():
    # A stand-in all-reduce of two ranks holding the same shard: sums and counts double, so
    # the mean is unchanged and num_samples counts both.
    net, x = relu_stack(2).double(), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    group = ProbeGroup(0, 2, False, "DDPStrategy", all_reduce=lambda t: 2 * t)
    shared = run_probe(net, x, ["2"], ERFMonitor().probe_config, group)["2"]
    alone = run_probe(net, x[:2], ["2"], ERFMonitor().probe_config, None)["2"]
    assert shared.num_samples == 4
    assert torch.allclose(shared.grad, alone.grad, rtol=1e-12, atol=0)
