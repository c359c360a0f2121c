"""Package hygiene that holds for every module, including ones added later."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import erf_callback

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(erf_callback.__path__, prefix="erf_callback.")
)


def test_the_walk_finds_the_subpackages() -> None:
    for sub in ("engine", "fit", "trf", "render", "callback"):
        assert f"erf_callback.{sub}" in MODULES


@pytest.mark.parametrize("name", ["erf_callback", *MODULES])
def test_every_module_declares_its_public_names(name) -> None:
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__ list"
    names = module.__all__
    assert len(set(names)) == len(names), f"{name}.__all__ repeats a name"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what the module lacks: {missing}"
    # Public classes and functions defined here are either exported or deliberately private.
    defined = [
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == name
    ]
    unexported = sorted(set(defined) - set(names))
    assert not unexported, f"{name} defines public {unexported} outside __all__: add or prefix _"
