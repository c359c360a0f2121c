"""Suite-wide guard: tests write into ``tmp_path``, never into the working tree."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Written by the tools themselves, not by the tests.
_TOOL_OUTPUTS = ("__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "mutants")


def untracked_paths() -> set[str] | None:
    """Untracked and ignored paths of the checkout (directories collapsed), or None without
    git. Only new paths count: a developer editing tracked files during a run is no error."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        return None
    res = subprocess.run(
        [git, "status", "--porcelain", "--ignored", "--", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if res.returncode != 0:
        return None
    paths = {line[3:] for line in res.stdout.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if not any(part in _TOOL_OUTPUTS for part in Path(p).parts)}


@pytest.fixture(scope="session", autouse=True)
def working_tree_stays_clean() -> Iterator[None]:
    before = untracked_paths()
    yield
    after = untracked_paths()
    if before is None or after is None:
        return
    new = sorted(after - before)
    assert not new, f"the tests wrote into the working tree: {new}; write into tmp_path instead"


@pytest.fixture(autouse=True)
def seeded_rngs() -> None:
    """Every test starts from the same RNG state, whatever ran before it on its worker."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
