"""The framework-free core's hooks are real Lightning hooks, in both Lightning namespaces.

``ERFMonitorBase`` does not inherit from a Lightning ``Callback`` (so the core imports no
Lightning), which means nothing checks its hook names: a misspelt ``on_train_batch_ends`` would
be a method Lightning never calls, and probing would silently stop. These tests do what
``@override`` does for Lightning's own callbacks: every public member the core defines must
exist on ``pytorch_lightning.Callback`` and ``lightning.pytorch.Callback`` with a signature that
accepts every call Lightning makes, unless it is one of the core's own public helpers.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as lightning_pytorch
import pytest
import pytorch_lightning

import erf_callback
from erf_callback import lightning as glue_lightning
from erf_callback import pytorch_lightning as glue_pl
from erf_callback.callback.core import ERFMonitorBase

CALLBACKS = {
    "pytorch_lightning": (pytorch_lightning.Callback, glue_pl.ERFMonitor),
    "lightning.pytorch": (lightning_pytorch.Callback, glue_lightning.ERFMonitor),
}

# Public members of the core that are its own API, not Lightning hooks.
CORE_API = {"probe_seconds", "probe_inputs", "history_files"}

# What the monitor cannot work without: losing one of these stops probing or resuming.
REQUIRED_HOOKS = {
    "setup",
    "on_train_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_train_end",
    "state_dict",
    "load_state_dict",
    "state_key",
}


def hooks_of(cls: type) -> dict[str, Any]:
    """Public members ``cls`` defines itself, less the core's own API: claimed hooks."""
    return {n: v for n, v in vars(cls).items() if not n.startswith("_") and n not in CORE_API}


def accepts_calls_of(impl: inspect.Signature, base: inspect.Signature) -> str | None:
    """Why ``impl`` cannot stand in for ``base`` (None if it can): names, kinds, defaults."""
    impl_params = list(impl.parameters.values())
    base_params = list(base.parameters.values())
    if len(impl_params) < len(base_params):
        return f"takes {len(impl_params)} parameters, Lightning passes {len(base_params)}"
    for i, b in enumerate(base_params):
        p = impl_params[i]
        if (p.name, p.kind) != (b.name, b.kind):
            return f"parameter {i} is {p.name!r} ({p.kind}), Lightning's is {b.name!r} ({b.kind})"
        if b.default is not inspect.Parameter.empty and p.default is inspect.Parameter.empty:
            return f"parameter {p.name!r} needs a default, as in Lightning"
    for p in impl_params[len(base_params) :]:
        variadic = p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if not variadic and p.default is inspect.Parameter.empty:
            return f"extra parameter {p.name!r} without a default"
    return None


def hook_problems(cls: type, callback: type) -> list[str]:
    """Every claimed hook of ``cls`` that ``callback`` lacks or declares differently."""
    problems = []
    for name, member in hooks_of(cls).items():
        try:
            base = inspect.getattr_static(callback, name)
        except AttributeError:
            problems.append(f"{name}: not a hook of {callback.__module__}.Callback")
            continue
        if isinstance(member, property) or isinstance(base, property):
            if not (isinstance(member, property) and isinstance(base, property)):
                problems.append(f"{name}: property on one side only")
            continue
        if not (callable(member) and callable(base)):
            problems.append(f"{name}: not a method on both sides")
            continue
        why = accepts_calls_of(inspect.signature(member), inspect.signature(base))
        if why is not None:
            problems.append(f"{name}: {why}")
    return problems


@pytest.mark.parametrize("namespace", sorted(CALLBACKS))
def test_core_hooks_exist_on_the_callback_with_a_compatible_signature(namespace: str) -> None:
    callback, _ = CALLBACKS[namespace]
    assert hook_problems(ERFMonitorBase, callback) == []
    assert REQUIRED_HOOKS - set(hooks_of(ERFMonitorBase)) == set()


@pytest.mark.parametrize("namespace", sorted(CALLBACKS))
def test_monitor_is_a_callback_of_its_namespace_and_runs_the_core_hooks(namespace: str) -> None:
    callback, monitor = CALLBACKS[namespace]
    other = next(c for ns, (c, _) in CALLBACKS.items() if ns != namespace)
    assert issubclass(monitor, callback)
    assert issubclass(monitor, ERFMonitorBase)
    # The namespaces must not mix (a Trainer rejects the other namespace's callbacks).
    assert not issubclass(monitor, other)
    for name, member in hooks_of(ERFMonitorBase).items():
        # The core comes first in the MRO: Lightning's no-op default never shadows it.
        assert inspect.getattr_static(monitor, name) is member, name


def test_top_level_monitor_is_the_pytorch_lightning_one() -> None:
    assert erf_callback.ERFMonitor is glue_pl.ERFMonitor


class _Misspelt(ERFMonitorBase):
    def on_train_batch_ends(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pass


class _ShortSignature(ERFMonitorBase):
    def on_train_batch_end(self, trainer: Any, pl_module: Any) -> None:
        pass


class _RenamedParameter(ERFMonitorBase):
    def setup(self, trainer: Any, module: Any, stage: str) -> None:
        pass


class _PlainStateKey(ERFMonitorBase):
    state_key = "monitor"


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (_Misspelt, "on_train_batch_ends: not a hook"),
        (_ShortSignature, "on_train_batch_end: takes 3 parameters, Lightning passes 6"),
        (_RenamedParameter, "setup: parameter 2 is 'module'"),
        (_PlainStateKey, "state_key: property on one side only"),
    ],
)
def test_a_wrong_hook_is_reported(cls: type, expected: str) -> None:
    for callback, _ in CALLBACKS.values():
        problems = hook_problems(cls, callback)
        assert len(problems) == 1
        assert problems[0].startswith(expected)
