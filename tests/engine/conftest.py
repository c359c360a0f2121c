"""Fixtures shared by the engine's tests."""

import pytest

from erf_callback.engine import compute


@pytest.fixture(params=["checked first", "checked while the device works"])
def check_order(request, monkeypatch):
    """Both ways a remembered trace is checked: before the chunks (CPU), and after their
    kernels are queued (CUDA, where the record may be used unchecked: see TraceCache)."""
    overlap = request.param != "checked first"
    monkeypatch.setattr(compute, "_checks_while_device_works", lambda device: overlap)
    return overlap


@pytest.fixture
def checked_after(monkeypatch):
    """The GPU's order on the CPU: records are used before their fingerprint is checked."""
    monkeypatch.setattr(compute, "_checks_while_device_works", lambda device: True)
