"""A calibration: what sparse execution skips, for one model's weights, saved as one file.

The file is a single ``.safetensors`` file: the threshold tensors, and in its metadata (key
``actscope``) a JSON header with the method, settings, per-layer figures and the model's
weight hash (:func:`actscope.store.weight_hash`). It is written to a temporary sibling and
renamed into place (:func:`actscope.store.files.atomic_file`), so a reader never sees half a
file; ``overwrite`` replaces only a calibration, never another file. Loading refuses a file made
for other weights, naming both models, and one whose header or tensors are not what
``calibrate`` writes (:mod:`~actscope.sparse.validation`).

Threshold tensors are named ``"{layer}.{kind}"``: ``act`` (CATS, one number: ``|act(gate)|``
below it is skipped), ``in`` and ``down`` (TEAL, one number each: input entries with ``|x| ≤ t``
of the gate/up and of the down projection are skipped), ``neuron`` (CETT, ``[d_mlp]``:
``|a_i| < t_i`` is skipped). CORE has none: its sets are chosen per prompt from α and β.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from ..errors import InputError
from ..results import TableResult

METHODS = ("cats", "teal", "cett", "core")
FORMAT = "actscope-sparse-calibration"
FORMAT_VERSION = 1
META_KEY = "actscope"
KINDS = {"cats": ("act",), "teal": ("in", "down"), "cett": ("neuron",), "core": ()}


@dataclass(frozen=True, eq=False)
class Calibration(TableResult):
    """What to skip in each MLP block of one model (see the module docstring).

    ``expected_sparsity`` ``[layers]``: share of the skippable activations (token × unit, or
    token × input channel for TEAL, pooled over its matrices by size) that the calibration
    data leaves inactive. ``expected_weight_skipped`` ``[layers]``: the share of the MLP's
    weights a token does not read at that sparsity. ``per_layer``: further per-layer figures
    of the method (TEAL's two sparsities, CETT's ε). ``settings``: the method's parameters.
    """

    table_name: ClassVar[str] = "sparse_calibration"

    method: str
    family: str
    model_name: str
    weight_hash: str
    layers: tuple[int, ...]
    units: tuple[int, ...]
    thresholds: Mapping[str, torch.Tensor] = field(repr=False)
    expected_sparsity: np.ndarray
    expected_weight_skipped: np.ndarray
    per_layer: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def threshold(self, layer: int, kind: str) -> torch.Tensor:
        """The float32 threshold tensor of ``layer`` (``[1]`` or ``[d_mlp]``)."""
        return self.thresholds[f"{layer}.{kind}"]

    def to_table(self) -> dict[str, np.ndarray]:
        """One row per MLP layer."""
        table: dict[str, np.ndarray] = {
            "layer": np.array(self.layers, dtype=np.int64),
            "units": np.array(self.units, dtype=np.int64),
            "expected_sparsity": np.asarray(self.expected_sparsity, dtype=np.float64),
            "expected_weight_skipped": np.asarray(self.expected_weight_skipped, dtype=np.float64),
        }
        for kind in KINDS[self.method]:
            values = [self.threshold(layer, kind) for layer in self.layers]
            name = f"threshold_{kind}" if values[0].numel() == 1 else f"threshold_{kind}_median"
            table[name] = np.array([float(v.double().median()) for v in values])
        for name, values in self.per_layer.items():
            table[name] = np.asarray(values, dtype=np.float64)
        return table

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the calibration to ``path`` (one ``.safetensors`` file), atomically and with the
        user's permissions. ``overwrite`` replaces an actscope calibration only, never another file."""
        from safetensors.torch import save_file

        from ..store.files import atomic_file

        target = Path(path).expanduser()
        check_target(target, overwrite)
        tensors = {name: t.detach().to(torch.float32).cpu().contiguous() for name, t in self.thresholds.items()}
        tensors["units"] = torch.tensor(self.units, dtype=torch.int64)  # a file always holds a tensor
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        with atomic_file(target, size_hint=size) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(self._header())})
        return target

    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "method": self.method, "family": self.family,
            "model_name": self.model_name, "weight_hash": self.weight_hash, "layers": list(self.layers),
            "units": list(self.units), "expected_sparsity": [float(x) for x in self.expected_sparsity],
            "expected_weight_skipped": [float(x) for x in self.expected_weight_skipped],
            "per_layer": {k: [float(x) for x in v] for k, v in self.per_layer.items()},
            "settings": dict(self.settings),
        }


def check_target(target: Path, overwrite: bool, what: str = "path") -> None:
    """Refuse, before any work, a ``target`` that exists (without ``overwrite``), is a folder,
    is some other file (never replaced: it may be the user's data) or cannot be written."""
    from ..store.files import check_writable

    if target.is_dir():
        raise InputError(f"{target} is a directory; the calibration is one file, e.g. {target / 'calibration.safetensors'}")
    if target.exists() and not overwrite:
        raise InputError(f"{target} already exists; pass overwrite=True (--overwrite) or choose another {what}")
    if target.exists() and not is_calibration(target):
        raise InputError(f"{target} exists and is not an actscope sparse calibration, so it is not replaced, even with "
                         f"overwrite (it may be your data); choose another {what} or remove that file yourself")
    check_writable(target, what)


def is_calibration(path: Path) -> bool:
    """Whether ``path`` is a file actscope wrote as a sparse calibration (any version)."""
    try:
        return _header_of(path).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def load_calibration(path: str | os.PathLike, model: Any) -> Calibration:
    """Read a calibration saved for ``model``; refuse one made for other weights, and one whose
    header or tensors are not what ``calibrate`` writes (:mod:`~actscope.sparse.validation`)."""
    from safetensors.torch import load_file

    from ..feeding import as_model
    from ..store import weight_hash
    from .families import mlp_blocks
    from .validation import check_header, check_model, check_tensors

    source = Path(path).expanduser()
    header = _read_header(source)
    check_header(source, header)
    model = as_model(model)
    actual = weight_hash(model.module)
    if header["weight_hash"] != actual:
        raise InputError(
            f"{source} is a calibration for model '{header['model_name']}' (weight hash {header['weight_hash'][:12]}…), "
            f"not for model '{model.name}' (weight hash {actual[:12]}…); thresholds are only valid for the weights they "
            "were calibrated on: calibrate this model (actscope.sparse.calibrate or `actscope sparsify`)"
        )
    check_model(source, header, model, mlp_blocks(model))
    tensors = load_file(str(source))
    check_tensors(source, header, tensors)
    return Calibration(
        method=header["method"], family=header["family"], model_name=header["model_name"], weight_hash=actual,
        layers=tuple(header["layers"]), units=tuple(header["units"]),
        thresholds={name: t.to(torch.float32) for name, t in tensors.items() if name != "units"},
        expected_sparsity=np.asarray(header["expected_sparsity"], dtype=np.float64),
        expected_weight_skipped=np.asarray(header["expected_weight_skipped"], dtype=np.float64),
        per_layer={k: np.asarray(v, dtype=np.float64) for k, v in header["per_layer"].items()},
        settings=header["settings"],
    )


def _header_of(source: Path) -> Any:
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        meta = handle.metadata() or {}
    return json.loads(meta[META_KEY])


def _read_header(source: Path) -> dict[str, Any]:
    if not source.is_file():
        raise InputError(f"{source} is not a file; pass the path a calibration was saved to (Calibration.save, --out)")
    try:
        header = _header_of(source)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        raise InputError(f"{source} is not an actscope sparse calibration ({type(error).__name__}: {error}); recompute it") from None
    found = (header.get("format"), header.get("version")) if isinstance(header, dict) else (None, None)
    if found != (FORMAT, FORMAT_VERSION):
        raise InputError(
            f"{source} is not an actscope sparse calibration of version {FORMAT_VERSION} (its header has format "
            f"{found[0]!r}, version {found[1]!r}); recompute it with `actscope sparsify` or actscope.sparse.calibrate"
        )
    return header
