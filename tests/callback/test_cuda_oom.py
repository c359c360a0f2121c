"""A real CUDA out-of-memory error in a probe (needs a GPU; skipped without one).

The probe inputs (2 images of 6144x6144, 0.9 GiB on the GPU) need more activation memory than
the 2 GiB this process may use, even one image at a time (the first convolution's output alone
is 1.2 GiB), while training (batches of 8 images of 16x16) needs a few MiB. Every probe fails
with ``torch.OutOfMemoryError``; training must complete, warn once, and start every step
with the memory it had before the probe: the caching allocator holds no more than at the
first step (``memory_reserved``), and nothing the probe allocated stays
(``memory_allocated``).
"""

import warnings

import pytest
import torch

from erf_callback import ERFMonitor, ERFWarning
from tests.helpers.lit import make_trainer, module_class

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Recording(module_class()):
    def __init__(self) -> None:
        super().__init__()
        self.memory: list[tuple[int, int, int]] = []

    def training_step(self, batch, batch_idx):
        torch.cuda.synchronize()
        self.memory.append(
            (self.global_step, torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
        )
        return super().training_step(batch, batch_idx)


def _train(tmp_path, callbacks) -> Recording:
    model = Recording()
    make_trainer(tmp_path, callbacks, accelerator="gpu", max_steps=8, deterministic=False).fit(
        model
    )
    torch.cuda.synchronize()
    return model


def test_cuda_out_of_memory_probe_is_skipped_and_memory_given_back(tmp_path):
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(
        2 * 2**30 / torch.cuda.get_device_properties(0).total_memory
    )
    try:
        baseline = _train(tmp_path, [])  # what training alone holds at each step
        torch.cuda.empty_cache()
        inputs = torch.randn(2, 3, 6144, 6144)
        monitor = ERFMonitor(layers=["net.7"], every_n_steps=2, inputs=inputs, chunk_size=2)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model = _train(tmp_path, [monitor])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert model.training_steps == 8
    said = [str(w.message) for w in record if issubclass(w.category, ERFWarning)]
    oom = [m for m in said if "OutOfMemoryError" in m]
    assert len(oom) == 1 and "Lower chunk_size or num_samples" in oom[0], said
    assert len(monitor.history) == 0  # every probe failed, none was recorded
    mib = 2**20
    kept = inputs.numel() * inputs.element_size()  # the probe inputs stay on the GPU
    print(
        "MiB (step, allocated, reserved) alone:",
        [(s, a / mib, r / mib) for s, a, r in baseline.memory],
    )
    print("MiB with failing probes:", [(s, a / mib, r / mib) for s, a, r in model.memory])
    # Each step starts with what training alone holds plus the inputs, within 64 MiB (the
    # allocator's rounding, cuDNN workspaces): a failed probe leaves >= 1.2 GiB otherwise.
    for (step, alloc, reserved), (_, alloc0, reserved0) in zip(
        model.memory, baseline.memory, strict=True
    ):
        assert abs(alloc - alloc0 - kept) <= 64 * mib, step
        assert reserved - reserved0 - kept <= 64 * mib, step
