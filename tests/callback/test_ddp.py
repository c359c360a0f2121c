"""DDP on CPU (gloo, 2 processes): all ranks probe together, only rank 0 writes, nothing hangs.

The run happens in a subprocess with a hard timeout, so a hang fails this test instead of
stalling the suite.
"""

import glob
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.path.insert(0, {tests!r})
    warnings.filterwarnings("ignore")
    import torch
    from tests.helpers.lit import make_trainer, module_class
    from erf_callback import ERFMonitor

    class Probed(module_class()):
        pass

    if __name__ == "__main__":
        torch.manual_seed(0)
        monitor = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8)
        trainer = make_trainer(
            {root!r}, [monitor], strategy="ddp_spawn", devices=2, max_steps=4,
            deterministic=False,
        )
        trainer.fit(Probed())
    """
)


def test_ddp_ranks_probe_together_and_rank_zero_writes(tmp_path):
    script = tmp_path / "ddp_run.py"
    tests = str(Path(__file__).resolve().parents[2])
    script.write_text(SCRIPT.format(tests=tests, root=str(tmp_path)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The spawned rank 0 picked the log version; the parent may name the next one.
    found = glob.glob(os.path.join(str(tmp_path), "**", "erf_history.csv"), recursive=True)
    assert len(found) == 1, found
    log_dir = os.path.dirname(found[0])
    history = pd.read_csv(found[0])
    assert list(history.step) == [0, 2, 4]  # same schedule on both ranks, one writer
    assert (history.status == "ok").all()
    written = [f for f in os.listdir(log_dir) if f.startswith("erf_history")]
    assert sorted(written) == ["erf_history.csv", "erf_history.json"]
