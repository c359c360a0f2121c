"""The record of every probe: metrics, change since initialisation, downsampled maps."""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from erf_callback.fit.grid import downsample_map

__all__ = ["CHANGE_METRICS", "TMP_SUFFIX", "ERFHistory", "claim_history_files", "history_paths"]

#: Change-from-initialisation metrics added to every record (and logged as scalars).
CHANGE_METRICS = ("radius_growth", "map_correlation", "center_shift")
#: Suffix of the files written before they are renamed into place.
TMP_SUFFIX = ".tmp"
# Columns of every record: an empty history still gets a CSV header pandas can read.
_BASE_COLUMNS = ("probe", "step", "epoch", "layer", "status")


class ERFHistory:
    """Probe records in order, each ``{"probe", "step", "epoch", "layer", "status", metrics...}``.

    Maps are kept downsampled (``map_size`` per side at most, float32) so a long run stays
    small; they feed the evolution grid and the change metrics and survive checkpoints.

    Example:
        >>> import torch
        >>> h = ERFHistory()
        >>> h.add(0, 0, "layer1", "ok", {"radius": 2.0, "center_y": 8.0, "center_x": 8.0},
        ...       torch.ones(16, 16))["radius_growth"]
        1.0
    """

    def __init__(self, map_size: int = 64) -> None:
        self.map_size = map_size
        self.records: list[dict[str, Any]] = []
        self.maps: dict[str, list[tuple[int, torch.Tensor]]] = {}
        # Each layer's map shape before downsampling (the input's spatial shape), so a
        # reader of the history knows how many input pixels a stored pixel covers.
        self.map_shapes: dict[str, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        layers = list(dict.fromkeys(r["layer"] for r in self.records))
        steps = self.steps()
        span = f"{steps[0]}..{steps[-1]}" if steps else "none"
        return (
            f"ERFHistory(layers={layers}, probes={self.num_probes}, steps={span}, "
            f"records={len(self.records)}, map_size={self.map_size})"
        )

    @property
    def num_probes(self) -> int:
        return 1 + max((r["probe"] for r in self.records), default=-1)

    def steps(self) -> list[int]:
        return sorted({r["step"] for r in self.records})

    def first(self, layer: str) -> dict[str, Any] | None:
        """The earliest valid record of ``layer`` (the initialisation probe)."""
        return next((r for r in self.records if r["layer"] == layer and r["status"] == "ok"), None)

    def add(
        self,
        step: int,
        epoch: int,
        layer: str,
        status: str,
        metrics: Mapping[str, float],
        erf: torch.Tensor,
        probe: int | None = None,
    ) -> dict[str, Any]:
        """Append a record (with change metrics against the first valid one) and its map."""
        small = torch.from_numpy(downsample_map(erf.numpy(), self.map_size)).float()
        base = self.first(layer)
        record: dict[str, Any] = {
            "probe": self.num_probes if probe is None else probe,
            "step": step,
            "epoch": epoch,
            "layer": layer,
            "status": status,
            **{k: float(v) for k, v in metrics.items()},
        }
        record.update(self._change(record, base, small, layer))
        self.records.append(record)
        if status == "ok":
            self.maps.setdefault(layer, []).append((step, small))
            self.map_shapes[layer] = tuple(int(n) for n in erf.shape)
        return record

    def _change(
        self, record: dict[str, Any], base: dict[str, Any] | None, small: torch.Tensor, layer: str
    ) -> dict[str, float]:
        nan = float("nan")
        if record["status"] != "ok":
            return dict.fromkeys(CHANGE_METRICS, nan)
        if base is None:  # this is the first valid probe
            return {"radius_growth": 1.0, "map_correlation": 1.0, "center_shift": 0.0}
        growth = record.get("radius", nan) / base["radius"] if base.get("radius") else nan
        init_map = self.maps[layer][0][1]
        corr = _correlation(init_map, small) if init_map.shape == small.shape else nan
        keys = [k for k in record if k.startswith("center_") and k != "center_offset"]
        shift = math.sqrt(sum((record[k] - base.get(k, nan)) ** 2 for k in keys)) if keys else nan
        return {"radius_growth": growth, "map_correlation": corr, "center_shift": shift}

    # ---- persistence ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only, so checkpoints load with ``weights_only=True``."""
        return {
            "map_size": self.map_size,
            "records": [dict(r) for r in self.records],
            "maps": {k: [(s, m.clone()) for s, m in v] for k, v in self.maps.items()},
            "map_shapes": {k: list(v) for k, v in self.map_shapes.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.map_size = int(state["map_size"])
        self.records = [dict(r) for r in state["records"]]
        self.maps = {k: [(int(s), m) for s, m in v] for k, v in state["maps"].items()}
        # Absent from checkpoints written before the shapes were kept.
        self.map_shapes = {
            k: tuple(int(n) for n in v) for k, v in state.get("map_shapes", {}).items()
        }

    def write(self, directory: str, basename: str = "erf_history") -> tuple[str, str]:
        """Write ``<basename>.csv`` (metrics, one row per probe and layer: ``pd.read_csv``) and
        ``<basename>.json`` (records plus the downsampled maps). Returns both paths.

        Both files are first written in full to temporary files, then both are renamed into
        place, so a failed write (a full or read-only disk) replaces neither and leaves no
        temporary file, and a reader never sees a partly written file.
        """
        os.makedirs(directory, exist_ok=True)
        paths = history_paths(directory, basename)
        temps = tuple(p + TMP_SUFFIX for p in paths)
        try:
            with open(temps[0], "w", newline="") as f:
                f.write(self.to_csv())
            with open(temps[1], "w") as f:
                f.write(self.to_json())
            for tmp, path in zip(temps, paths, strict=True):
                os.replace(tmp, path)
        finally:
            for tmp in temps:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
        return paths

    def to_csv(self) -> str:
        """The CSV text: one row per probe and layer, columns in order of first appearance."""
        columns: list[str] = list(_BASE_COLUMNS)
        for r in self.records:
            columns += [k for k in r if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.records)
        return buffer.getvalue()

    def to_json(self) -> str:
        """The JSON text: records (NaN/Inf as null) and the downsampled maps."""
        payload = {
            "format": "erf-callback history v1",
            "records": [{k: _json_number(v) for k, v in r.items()} for r in self.records],
            "maps": {
                layer: [{"step": s, "map": m.tolist()} for s, m in entries]
                for layer, entries in self.maps.items()
            },
            "map_shapes": {k: list(v) for k, v in self.map_shapes.items()},
        }
        return json.dumps(payload)


def history_paths(directory: str, basename: str) -> tuple[str, str]:
    """``(<directory>/<basename>.csv, <directory>/<basename>.json)``."""
    return (
        os.path.join(directory, f"{basename}.csv"),
        os.path.join(directory, f"{basename}.json"),
    )


def claim_history_files(directory: str, basename: str, history: ERFHistory) -> str:
    """Take ``<basename>.csv/.json`` in ``directory`` for this run, or ``<basename>-v1``,
    ``-v2``, ... if another run already has them, and write ``history`` there. Returns the
    base name taken.

    The CSV is created with ``O_EXCL``, so two runs starting together in one directory never
    take the same name, and no run overwrites another run's files.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> [claim_history_files(d, "erf_history", ERFHistory()) for _ in range(3)]
        ['erf_history', 'erf_history-v1', 'erf_history-v2']
    """
    os.makedirs(directory, exist_ok=True)
    for n in itertools.count():
        name = basename if n == 0 else f"{basename}-v{n}"
        csv_path, json_path = history_paths(directory, name)
        if os.path.exists(json_path):
            continue
        try:
            os.close(os.open(csv_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        try:
            history.write(directory, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(csv_path)  # give the name back: no empty file is left behind
            raise
        return name
    raise AssertionError("unreachable")  # pragma: no cover


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.double().flatten(), b.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denom = float(torch.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def _json_number(v: Any) -> Any:
    # JSON has no NaN/Inf; null keeps the file valid for every reader (pandas reads it as NaN).
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v
