"""Per-unit CETT thresholds: built from recorded curves, applied as a reversible edit, saved.

For a CETT target c, layer l gets ε_l = the largest grid ε whose token-averaged CETT is ≤ c
(:meth:`CettCurves.eps_for`) and unit i the threshold ``ε_l / ‖W_out[:, i]‖₂``; the edit is
``a_i ← 0 if |a_i| < threshold_i`` (:func:`actscope.interventions.threshold`).

A saved file is a directory with ``thresholds.safetensors`` (one float64 ``[d_ff]`` tensor per
site) and ``cett.json`` (sites, layers, ε, c, the model's weight hash, anything the caller adds).
Loading refuses a file made for other weights.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np
import torch

from ...errors import InputError
from ...sites import plan_sites
from .core import output_projection, unit_thresholds
from .curves import CettCurves
from ...results import TableResult

TENSORS_FILE = "thresholds.safetensors"
JSON_FILE = "cett.json"
FORMAT = "actscope-cett-thresholds"
FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class CettThresholds(TableResult):
    """Per-layer ε and per-unit thresholds for one CETT target ``c`` on one model's weights."""

    table_name: ClassVar[str] = "cett_thresholds"

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    eps: np.ndarray  # [layers]
    c: float
    thresholds: Mapping[str, np.ndarray] = field(repr=False)  # site → [d_ff] float64
    weight_hash: str = ""

    def edits(self) -> dict[str, Any]:
        """``{site: threshold intervention}`` for :func:`actscope.edit`."""
        from ...interventions import threshold

        return {site: threshold(torch.from_numpy(self.thresholds[site])) for site in self.sites}

    def apply(self, model: Any) -> Iterator[Any]:
        """Context manager: ``model`` runs with the thresholds while the block runs."""
        from ...interventions import edit

        return edit(model, self.edits())

    def to_table(self) -> dict[str, np.ndarray]:
        """One row per (site, unit): the layer's ε and the unit's threshold."""
        sizes = [len(self.thresholds[site]) for site in self.sites]
        return {
            "site": np.repeat(np.array(self.sites, dtype=object), sizes),
            "layer": np.repeat(np.array(self.layers, dtype=np.int64), sizes),
            "unit": np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]),
            "eps": np.repeat(self.eps, sizes),
            "threshold": np.concatenate([self.thresholds[site] for site in self.sites]),
        }

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
        """Write ``path/`` (``thresholds.safetensors`` + ``cett.json``), atomically.

        ``extra`` (JSON-able) is stored under ``"extra"`` in the JSON file.
        """
        from safetensors.torch import save_file

        target = Path(path).expanduser()
        if target.exists() and not overwrite:
            raise InputError(f"{target} already exists; pass overwrite=True or choose another path")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            tensors = {site: torch.from_numpy(np.ascontiguousarray(t)) for site, t in self.thresholds.items()}
            save_file(tensors, str(tmp / TENSORS_FILE))
            (tmp / JSON_FILE).write_text(json.dumps(self._header(extra), indent=2), encoding="utf-8")
            _replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _header(self, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "weight_hash": self.weight_hash,
            "c": self.c,
            "sites": list(self.sites),
            "layers": list(self.layers),
            "eps": [float(e) for e in self.eps],
            "extra": dict(extra or {}),
        }

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any) -> "CettThresholds":
        """Read thresholds saved for ``model``; refuse a file made for other weights."""
        thresholds, _ = load_thresholds(path, model)
        return thresholds


def load_thresholds(path: str | os.PathLike, model: Any) -> tuple[CettThresholds, dict[str, Any]]:
    """``(thresholds, the file's "extra" dict)``; checks format, weight hash and unit counts."""
    from safetensors.torch import load_file

    from ...store import weight_hash
    from ...feeding import as_model

    source = Path(path).expanduser()
    header = _read_header(source)
    model = as_model(model)
    actual = weight_hash(model.module)
    if header["weight_hash"] != actual:
        raise InputError(
            f"{source} holds CETT thresholds for another model (weight hash {header['weight_hash'][:12]}…); "
            f"{model.name} has weight hash {actual[:12]}…. Thresholds are only valid for the weights they "
            "were computed on: run actscope.metrics.cett.cett_sparsity on this model instead"
        )
    tensors = load_file(str(source / TENSORS_FILE))
    sites = tuple(header["sites"])
    if set(tensors) != set(sites):
        raise InputError(
            f"{source / TENSORS_FILE} does not match {JSON_FILE} (sites {sorted(tensors)} vs {list(sites)}); "
            "the file is damaged, recompute it"
        )
    thresholds = CettThresholds(
        sites=sites,
        layers=tuple(int(x) for x in header["layers"]),
        eps=np.asarray(header["eps"], dtype=np.float64),
        c=float(header["c"]),
        thresholds={site: tensors[site].numpy().astype(np.float64) for site in sites},
        weight_hash=actual,
    )
    return thresholds, header.get("extra", {})


def _read_header(source: Path) -> dict[str, Any]:
    if not (source / JSON_FILE).is_file() or not (source / TENSORS_FILE).is_file():
        raise InputError(
            f"{source} is not a saved CETT threshold directory (it needs {JSON_FILE} and {TENSORS_FILE}); "
            "pass the path given to save()"
        )
    try:
        header = json.loads((source / JSON_FILE).read_text(encoding="utf-8"))
    except ValueError as error:
        raise InputError(f"{source / JSON_FILE} is not valid JSON ({error}); the file is damaged, recompute it") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise InputError(f"{source / JSON_FILE} is not an actscope CETT threshold file of version {FORMAT_VERSION}; recompute it")
    return header


def _replace(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` directory to ``target`` (replacing an old one)."""
    if target.exists():
        stale = target.with_name(f".stale-{target.name}-{os.getpid()}")
        os.rename(target, stale)
        os.rename(tmp, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(tmp, target)


def thresholds_for(curves: CettCurves, c: float, model: Any, *, index: Any = None) -> CettThresholds:
    """Thresholds for CETT target ``c`` read off ``curves`` (or for an explicit per-layer grid
    ``index``, −1 meaning ε = 0). ``model`` gives the output projections and the weight hash."""
    from ...store import weight_hash
    from .curves import eps_of
    from ...feeding import as_model

    model = as_model(model)
    index = curves.index_for(c) if index is None else np.asarray(index, dtype=np.int64)
    eps = eps_of(curves.grid, index)
    plan = plan_sites(model, list(curves.sites))
    per_unit = {
        site.label: unit_thresholds(float(e), output_projection(model, site)[0]).cpu().numpy()
        for site, e in zip(plan.sites, eps)
    }
    return CettThresholds(curves.sites, curves.layers, eps, float(c), per_unit, weight_hash(model.module))
