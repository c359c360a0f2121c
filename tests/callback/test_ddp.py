"""DDP on CPU (gloo, 2 processes, Lightning's own launchers): ranks share the probe.

Each run happens in a subprocess with a hard timeout, so a hang fails the test instead of
stalling the suite. The script wraps the callback's probe function to save, per rank, what it
was given and what it returned; the parent recomputes the single-process maps from that.
"""

import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from erf_callback import compute_erf
from erf_callback.engine.shard import shard_bounds
from tests.helpers.lit import module_class

LAYERS = ["net.3", "net.7"]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, warnings
    sys.path.insert(0, {tests!r})
    warnings.filterwarnings("ignore")
    import torch
    from erf_callback import ERFMonitor
    from erf_callback.callback import core
    from tests.helpers.lit import make_trainer, module_class

    OUT = {root!r}
    FAIL_ON_RANK1_FROM = {fail_from!r}
    probe = core.run_probe

    def recording_probe(net, inputs, layers, cfg, group):
        rank = 0 if group is None else group.rank
        step = net.global_step
        maps = probe(net, inputs, layers, cfg, group)
        if step == 0:
            torch.save(
                {{
                    "inputs": inputs.cpu(),
                    "world": (group.rank, group.world_size, group.lockstep),
                    "state": {{k: v.detach().cpu() for k, v in net.state_dict().items()}},
                    "grads": {{k: m.grad for k, m in maps.items()}},
                    "num_samples": {{k: m.num_samples for k, m in maps.items()}},
                }},
                os.path.join(OUT, f"rank{{rank}}.pt"),
            )
        return maps

    core.run_probe = recording_probe

    class Probed(module_class()):  # module level: ddp_spawn pickles the model
        def forward(self, x):
            if (
                FAIL_ON_RANK1_FROM is not None
                and self.global_rank == 1
                and self.global_step >= FAIL_ON_RANK1_FROM
            ):
                raise RuntimeError("injected failure in rank 1's probe")
            return super().forward(x)

    class Monitor(ERFMonitor):
        def on_train_end(self, trainer, pl_module):
            super().on_train_end(trainer, pl_module)
            with open(os.path.join(OUT, f"warned{{trainer.global_rank}}.json"), "w") as f:
                json.dump(sorted(self._warned), f)

    if __name__ == "__main__":
        torch.manual_seed(0)
        monitor = Monitor(layers={layers!r}, num_samples=7, **{monitor!r})
        trainer = make_trainer(OUT, [monitor], devices=2, deterministic=False, **{trainer!r})
        trainer.fit(Probed(batch_size=8))
    """
)


def run_ddp(tmp_path: Path, monitor: dict, trainer: dict, fail_from: int | None = None) -> None:
    script = tmp_path / "ddp_run.py"
    tests = str(Path(__file__).resolve().parents[2])
    script.write_text(
        SCRIPT.format(
            tests=tests,
            root=str(tmp_path),
            layers=LAYERS,
            monitor=monitor,
            trainer=trainer,
            fail_from=fail_from,
        )
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,  # a hung collective becomes a failure, not a stalled suite
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def single_process_reference(tmp_path: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Both ranks' records and the 1-process maps of the union of their shards."""
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    n = ranks[0]["inputs"].shape[0]
    union = torch.cat([rec["inputs"][slice(*shard_bounds(n, r, 2))] for r, rec in enumerate(ranks)])
    model = module_class()()
    model.load_state_dict(ranks[0]["state"])
    maps = compute_erf(model, union, LAYERS, chunk_size=3)
    return ranks, {k: m.grad for k, m in maps.items()}


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    # float32 per-sample gradients summed in another grouping differ by ~1e-7 relative.
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def the_history(tmp_path: Path) -> tuple[str, pd.DataFrame]:
    found = glob.glob(os.path.join(str(tmp_path), "**", "erf_history.csv"), recursive=True)
    assert len(found) == 1, found  # one writer
    return os.path.dirname(found[0]), pd.read_csv(found[0])


def test_ddp_spawn_noise_probe_is_the_single_process_probe(tmp_path):
    run_ddp(
        tmp_path,
        {"inputs": "noise", "every_n_steps": 2, "seed": 3, "chunk_size": 2},
        {"strategy": "ddp_spawn", "max_steps": 4},
    )
    ranks, expected = single_process_reference(tmp_path)
    # inputs="noise": the same 7 samples on every rank (the set does not depend on the world).
    assert torch.equal(ranks[0]["inputs"], ranks[1]["inputs"])
    assert [rec["world"] for rec in ranks] == [(0, 2, False), (1, 2, False)]
    for layer in LAYERS:
        # Shards of 4 and 3 samples, all-reduced: the maps of all 7, on both ranks.
        for rec in ranks:
            assert rec["num_samples"][layer] == 7
            close(rec["grads"][layer], expected[layer])
        assert torch.equal(ranks[0]["grads"][layer], ranks[1]["grads"][layer])

    log_dir, history = the_history(tmp_path)
    assert list(history.step.unique()) == [0, 2, 4]  # same schedule on both ranks
    assert (history.status == "ok").all()
    written = [f for f in os.listdir(log_dir) if f.startswith("erf_history")]
    assert sorted(written) == ["erf_history.csv", "erf_history.json"]
    # Logged once: one event stream with one value per probe (two writers would double them).
    runs = {os.path.dirname(p) for p in glob.glob(f"{tmp_path}/**/events.out.*", recursive=True)}
    with_erf = []
    for run in runs:
        acc = EventAccumulator(run, size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        if f"erf/{LAYERS[1]}/radius" in acc.Tags()["scalars"]:
            with_erf.append([e.step for e in acc.Scalars(f"erf/{LAYERS[1]}/radius")])
            images = acc
    assert with_erf == [[0, 2, 4]]
    # The ranks split the rendering; rank 0 gathered and logged every picture, once.
    for layer in LAYERS:
        for kind in ("heatmap", "heatmap_log", "radial_profile"):
            assert [e.step for e in images.Images(f"erf/{layer}/{kind}")] == [0, 2, 4]
        for kind in ("init_vs_now", "evolution"):
            assert [e.step for e in images.Images(f"erf/{layer}/{kind}")] == [2, 4]
        assert [e.step for e in images.Images(f"erf/{layer}/heatmap_init")] == [0]
    assert [e.step for e in images.Images("erf/all_layers/radius")] == [2, 4]


def test_ddp_train_inputs_accumulation_and_a_failing_rank(tmp_path):
    # Rank 1's probe raises from step 2 on: both ranks skip that probe (rank 0 learns it from
    # the success flag instead of waiting forever in the all-reduce), and training finishes.
    run_ddp(
        tmp_path,
        {"inputs": "train", "every_n_steps": 1, "chunk_size": 3},
        {"strategy": "ddp", "max_steps": 3, "accumulate_grad_batches": 2},
        fail_from=2,
    )
    ranks, expected = single_process_reference(tmp_path)
    # inputs="train": each rank captured its own first batch; the probe set is the union of
    # rank 0's first 4 and rank 1's samples 4..6.
    assert not torch.equal(ranks[0]["inputs"], ranks[1]["inputs"])
    for layer in LAYERS:
        for rec in ranks:
            close(rec["grads"][layer], expected[layer])
    _, history = the_history(tmp_path)
    # Accumulation: one probe per optimiser step, the same steps on both ranks; 2, 3 failed.
    assert list(history.step.unique()) == [0, 1]
    warned = [json.loads((tmp_path / f"warned{r}.json").read_text()) for r in range(2)]
    assert "skip:ProbeFailedElsewhereError" in warned[0]
    assert "skip:RuntimeError" in warned[1]
