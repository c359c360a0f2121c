"""The import rules of docs/architecture.md hold for every module of the package.

The rules are read from the table in docs/architecture.md itself, so the page cannot drift
from the code: every ``import`` statement of every module (including imports inside functions
and ``TYPE_CHECKING`` blocks) is parsed with :mod:`ast` and checked against its layer's row.
A second test imports the pure layers in a fresh interpreter and checks that Lightning and
matplotlib were not pulled in indirectly either.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "erf_callback"
DOC = ROOT / "docs" / "architecture.md"


def read_rules(doc: Path = DOC) -> dict[str, tuple[set[str], set[str]]]:
    """``unit -> (erf_callback units it may import, top-level packages it must never import)``.

    Parsed from the Markdown table whose header starts with ``| Unit |``: one row per unit,
    names in backticks, ``-`` for none.
    """
    rules: dict[str, tuple[set[str], set[str]]] = {}
    in_table = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("| Unit |"):
            in_table = True
            continue
        if not in_table:
            continue
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= set("-: "):  # the header separator
            continue
        unit, may, never = (re.findall(r"`([^`]+)`", c) for c in cells[:3])
        assert len(unit) == 1, f"row without exactly one unit: {line!r}"
        rules[unit[0]] = (set(may), set(never))
    assert rules, f"no '| Unit |' table in {doc}"
    return rules


RULES = read_rules()


def unit_of(module: str) -> str | None:
    """The most specific unit (row) that ``module`` belongs to; None if no row claims it.

    The row ``erf_callback`` is the package's ``__init__`` only, so that a new top-level
    module has to get a row of its own.
    """
    best = None
    for unit in RULES:
        inside = module.startswith(unit + ".") and unit != "erf_callback"
        if (module == unit or inside) and len(unit) > len(best or ""):
            best = unit
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(source: str, here: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import of module ``here``, relative resolved."""
    package = here if is_package else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                # `from erf_callback import lightning` imports the submodule, not the package.
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if is_module(sub) else base))
    return found


def violations(source: str, here: str, is_package: bool = False) -> list[str]:
    """Every import in module ``here`` (text ``source``) that its unit's row does not allow."""
    unit = unit_of(here)
    if unit is None:
        return [f"{here} belongs to no unit of the table in {DOC.name}: add a row"]
    may, never = RULES[unit]
    out = []
    for line, target in imported_modules(source, here, is_package):
        top = target.split(".")[0]
        if top in never:
            out.append(f"{here}:{line}: {unit} must never import {top} (imports {target})")
        if top == "erf_callback":
            dest = unit_of(target)
            if dest != unit and dest not in may:
                out.append(f"{here}:{line}: {unit} may not import {dest or target}")
    return out


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_architecture(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert violations(source, module_name(path), path.name == "__init__.py") == []


def test_every_unit_of_the_table_exists() -> None:
    assert [u for u in RULES if not is_module(u)] == []
    for may, _ in RULES.values():
        assert may <= set(RULES), may - set(RULES)


def test_the_layers_keep_their_documented_bans() -> None:
    # The promises the README and the guide make; a row edited to drop one fails here.
    pure = {"erf_callback.engine", "erf_callback.fit", "erf_callback.trf"}
    for unit in pure:
        assert {"lightning", "pytorch_lightning", "matplotlib"} <= RULES[unit][1], unit
    for unit in ("erf_callback.render", "erf_callback.callback"):
        assert {"lightning", "pytorch_lightning"} <= RULES[unit][1], unit
    assert "pytorch_lightning" in RULES["erf_callback.lightning"][1]
    assert "lightning" in RULES["erf_callback.pytorch_lightning"][1]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import matplotlib.pyplot as plt\n", "must never import matplotlib"),
        ("def f():\n    from lightning.pytorch import Trainer\n", "must never import lightning"),
        ("from erf_callback.callback import core\n", "may not import erf_callback.callback"),
        ("from erf_callback import render\n", "may not import erf_callback.render"),
        ("from ..render import raster\n", "may not import erf_callback.render"),
        ("from .geometry import AxisRF\n", None),
    ],
)
def test_a_forbidden_import_is_reported(source: str, expected: str | None) -> None:
    # A module of the trf layer with one import.
    found = violations(source, "erf_callback.trf.tracer")
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found


_PROBE = """
import json, sys
# numba too: the fit loads its compiled kernels on its first 2-D fit, not on import.
banned = ("lightning", "pytorch_lightning", "lightning_fabric", "matplotlib", "numba")
def loaded():
    return sorted({m.split(".")[0] for m in sys.modules} & set(banned))
seen = {}
import erf_callback, erf_callback.engine, erf_callback.fit, erf_callback.trf
seen["engine"] = loaded()
import erf_callback.render
seen["render"] = loaded()
import erf_callback.callback
seen["callback"] = loaded()
print(json.dumps(seen))
"""


def test_pure_layers_do_not_load_lightning_or_matplotlib() -> None:
    res = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["engine"] == []  # `import erf_callback` included: ERFMonitor is lazy
    assert seen["render"] == ["matplotlib"]
    assert seen["callback"] == ["matplotlib"]
