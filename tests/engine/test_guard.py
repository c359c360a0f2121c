"""The buffer snapshot of the state guard (``erf_callback.engine.guard``): every change is put
back bitwise, whatever the dtype or how it was made, and nothing unchanged is written."""

from __future__ import annotations

import torch

from erf_callback.engine.guard import _BufferSnapshot


def _snapshot(buffers: list[torch.Tensor]) -> _BufferSnapshot:
    """A snapshot of one module that holds ``buffers``."""
    holder = torch.nn.Module()
    for i, b in enumerate(buffers):
        holder.register_buffer(f"b{i}", b)
    return _BufferSnapshot([holder])


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().clone().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_changes_of_every_kind_are_undone_and_the_rest_is_not_written() -> None:
    buffers = [
        torch.tensor([1.0, float("nan"), -0.0]),  # NaN and -0.0: equal to themselves bitwise
        torch.arange(6, dtype=torch.float32).reshape(2, 3),
        torch.tensor(3),  # 0-dim int64 (num_batches_tracked)
        torch.tensor([True, False]),
        torch.tensor([1 + 2j, 3 - 1j]),
        torch.zeros(4, 2).t(),  # not contiguous
        torch.ones(0),
        torch.tensor([0.5, 0.25], dtype=torch.bfloat16),
    ]
    before = [_bytes(b) for b in buffers]
    shapes = [b.shape for b in buffers]
    snap = _snapshot(buffers)
    versions = [b._version for b in buffers]

    buffers[1].mul_(2)
    buffers[2].add_(1)
    buffers[3].logical_not_()
    buffers[4].mul_(1j)
    buffers[5].fill_(7.0)
    buffers[7].resize_(5)  # resized in place
    changed = {1, 2, 3, 4, 5, 7}
    versions_after_change = [b._version for b in buffers]
    snap.restore()

    for i, b in enumerate(buffers):
        assert b.shape == shapes[i], i
        assert _bytes(b) == before[i], i
        if i not in changed:
            assert b._version == versions[i], i  # untouched: not written
        else:
            assert b._version > versions_after_change[i], i


def test_a_value_change_without_a_version_bump_is_found() -> None:
    stats = torch.zeros(3)
    snap = _snapshot([stats])
    version = stats._version
    torch.nn.functional.batch_norm(torch.randn(4, 3), stats, torch.ones(3), training=True)
    assert stats._version == version and stats.abs().sum() > 0
    snap.restore()
    assert torch.equal(stats, torch.zeros(3))


def test_tensor_subclasses_and_sparse_buffers_are_copied_one_by_one() -> None:
    class Tagged(torch.Tensor):
        pass

    tagged = torch.zeros(3).as_subclass(Tagged)
    sparse = torch.eye(3).to_sparse()
    plain = torch.ones(2)
    snap = _snapshot([tagged, sparse, plain])
    tagged.add_(1)
    sparse.mul_(2)
    plain.sub_(1)
    snap.restore()
    assert type(tagged) is Tagged and torch.equal(tagged, torch.zeros(3).as_subclass(Tagged))
    assert torch.equal(sparse.to_dense(), torch.eye(3))
    assert torch.equal(plain, torch.ones(2))


class _FrozenNormNet(torch.nn.Module):
    """Overrides ``train`` the way detection code does: its BatchNorm never leaves eval mode,
    and each call is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.bn = torch.nn.BatchNorm2d(2)
        self.calls: list[bool] = []

    def train(self, mode: bool = True) -> _FrozenNormNet:
        self.calls.append(mode)
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_eval_mode_and_flags_are_restored_with_and_without_a_train_override() -> None:
    from erf_callback.engine.guard import probe_context

    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Dropout(), torch.nn.ReLU())
    plain[1].eval()  # one submodule frozen in eval mode: must stay so, others back to train
    overriding = _FrozenNormNet()
    for net in (plain, overriding):
        before = [m.training for m in net.modules()]
        with probe_context(net):
            assert not any(m.training for m in net.modules())
            assert "training" in vars(net)  # a plain attribute, as Module.train writes it
        assert [m.training for m in net.modules()] == before
    # The override was honoured: the probe called its eval() (train(False)) once.
    assert overriding.calls == [False]
    assert plain[1].training is False and plain[0].training is True


class _WatchesItsAttributes(torch.nn.Module):
    """Overrides ``__setattr__`` only, as torchmetrics' ``Metric`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, object]] = []

    def __setattr__(self, name: str, value: object) -> None:
        if name == "training" and "writes" in self.__dict__:
            self.writes.append((name, value))
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_module_with_its_own_setattr_sees_the_flag_writes() -> None:
    from erf_callback.engine.guard import probe_context

    watcher = _WatchesItsAttributes()
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), watcher)
    with probe_context(net):
        assert not watcher.training and not net[0].training
    assert watcher.training and net[0].training
    assert watcher.writes == [("training", False), ("training", True)]
