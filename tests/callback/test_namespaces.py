"""What happens when the callback and the Trainer come from different Lightning namespaces.

docs/callback.md states the result; this test is its proof (Lightning 2.6: it runs).
"""

from __future__ import annotations

import pytest

from erf_callback.lightning import ERFMonitor as LightningERFMonitor
from erf_callback.pytorch_lightning import ERFMonitor as PLERFMonitor
from tests.helpers.lit import make_trainer, module_class


@pytest.mark.parametrize(
    ("monitor_class", "trainer_namespace"),
    [(PLERFMonitor, "lightning"), (LightningERFMonitor, "pytorch_lightning")],
)
def test_callback_from_the_other_namespace_probes(tmp_path, monitor_class, trainer_namespace):
    monitor = monitor_class(layers=["net.7"], every_n_steps=2, num_samples=8)
    trainer = make_trainer(tmp_path, [monitor], trainer_namespace, max_steps=2)
    trainer.fit(module_class(trainer_namespace)())
    assert [r["step"] for r in monitor.history.records] == [0, 2]  # init, step 2 (= end)
    assert all(r["status"] == "ok" for r in monitor.history.records)
