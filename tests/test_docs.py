"""Run the Python examples of README.md and docs/*.md, so the documentation cannot rot.

Every fenced ```python block of a page runs, in order, in one namespace per page (like a
reader who pastes them one after another) and in a temporary working directory. A block may
be preceded by a marker line:

* ``<!-- doc-test: skip -->``: not run (signatures, snippets that need a user's data); a
  reason may follow in parentheses, ``<!-- doc-test: skip (needs a GPU) -->``.
* ``<!-- doc-test: NAME -->``: run after the setup ``FIXTURES[NAME]`` (once per page), which
  defines the names the snippet assumes the reader has (``model``, ``train_loader``, ...).

New pages are picked up automatically; a block that needs names nobody defines fails here.
Blocks indented inside list items run too (their indentation removed).
"""

from __future__ import annotations

import pathlib
import re
import textwrap
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("**/*.md")])

_MARKER = re.compile(r"<!--\s*doc-test:\s*([\w-]+)(?:\s+\([^)]*\))?\s*-->")
_FENCE = re.compile(r"^(\s*)```python\s*$")

# Setup code per marker name: small stand-ins for what a reader has at hand.
_NETS = """
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
import pytorch_lightning as pl


def _stage(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class ResNetBackbone(nn.Module):
    '''A ResNet-shaped stand-in: layer1..layer4, stride 2 from layer2 on.'''

    def __init__(self):
        super().__init__()
        self.stem = _stage(3, 8, 1)
        self.layer1, self.layer2 = _stage(8, 8, 1), _stage(8, 8, 2)
        self.layer3, self.layer4 = _stage(8, 8, 2), _stage(8, 8, 1)

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


class SegmentationHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv(x)


class _Classifier(pl.LightningModule):
    '''The usual layout: the network in self.model.'''

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(ResNetBackbone(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(8, 4))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


_g = torch.Generator().manual_seed(0)
_x = torch.randn(40, 3, 32, 32, generator=_g)
images = _x[:8]
train_loader = DataLoader(TensorDataset(_x, torch.randint(0, 4, (40,), generator=_g)), batch_size=8)
"""

FIXTURES: dict[str, str] = {
    # `model`: a LightningModule whose layers are its own attributes (layer2, layer4, ...).
    "lightning": _NETS
    + """
class _FlatModule(_Classifier):
    def __init__(self):
        super().__init__()
        backbone = self.model[0]
        del self.model  # each layer registered once, under its own top-level name
        for name in ("stem", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(backbone, name))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x))))))

model = _FlatModule()
MyLightningModule = _Classifier
""",
    # `model` and `val_images` for RepLKNet's protocol, scaled down.
    "replknet": _NETS + "model = ResNetBackbone().eval()\nval_images = torch.randn(2, 3, 64, 64)\n",
    # A checkpoint of a module with `.net`, as written by a Lightning run.
    "checkpoint": _NETS
    + """
import os

class MyModule(_Classifier):
    def __init__(self):
        super().__init__()
        self.net = self.model[0]

ckpt_dir = "checkpoints"
os.makedirs(ckpt_dir, exist_ok=True)
_trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
_trainer.fit(MyModule(), train_loader)
path = os.path.join(ckpt_dir, "step1.ckpt")
_trainer.save_checkpoint(path)
""",
}


def python_blocks(text: str) -> list[tuple[int, str | None, str]]:
    """``(line, marker, code)`` of every ```python block; ``marker`` from the line above.

    Example:
        >>> python_blocks("<!-- doc-test: skip -->\\n```python\\nx = 1\\n```\\n")
        [(2, 'skip', 'x = 1\\n')]
    """
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if fence := _FENCE.match(lines[i]):
            # A block inside a list item is indented: its closing fence and code carry the
            # same indentation, which is removed.
            indent = fence.group(1)
            start = i
            j = i + 1
            while j < len(lines) and not lines[j].startswith(indent + "```"):
                j += 1
            marker = None
            k = start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            if k >= 0 and (m := _MARKER.search(lines[k])):
                marker = m.group(1)
            code = "\n".join(line.removeprefix(indent) for line in lines[start + 1 : j])
            blocks.append((start + 1, marker, code + "\n"))
            i = j
        i += 1
    return blocks


def test_block_extraction_sees_markers_and_unmarked_blocks() -> None:
    text = textwrap.dedent(
        """\
        Intro.

        <!-- doc-test: lightning -->

        ```python
        a = 1
        ```

        ```python
        b = 2
        ```

        ```bash
        not python
        ```
        """
    )
    assert python_blocks(text) == [(5, "lightning", "a = 1\n"), (9, None, "b = 2\n")]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_examples_run(page: pathlib.Path, tmp_path, monkeypatch) -> None:
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip("no Python examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"doc_{page.stem}"}
    done: set[str] = set()
    for line, marker, code in blocks:
        if marker == "skip":
            continue
        if marker is not None:
            assert marker in FIXTURES, f"{page.name}:{line}: unknown doc-test marker {marker!r}"
            if marker not in done:
                exec(compile(FIXTURES[marker], f"<fixture {marker}>", "exec"), namespace)
                done.add(marker)
        with warnings.catch_warnings():
            # Examples may show warnings on purpose (border, zero maps); they are not errors.
            warnings.simplefilter("ignore")
            try:
                exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(
                    f"the example at {page.relative_to(ROOT)}:{line} fails: "
                    f"{type(err).__name__}: {err}"
                ) from err


def test_indented_blocks_and_markers_with_a_reason() -> None:
    text = (
        "- item:\n\n  <!-- doc-test: skip (needs a GPU) -->\n"
        "  ```python\n  x = 1\n    y = 2\n  ```\n"
    )
    assert python_blocks(text) == [(4, "skip", "x = 1\n  y = 2\n")]
