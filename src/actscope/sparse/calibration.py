"""A calibration: what sparse execution skips, for one model's weights, saved as one file.

``cal.save(path)`` / ``Calibration.load(path, model)`` write and read a bound file of kind
``sparse-calibration`` (:mod:`actscope.store.bound`: one ``.safetensors`` file, atomic, refused
for other weights): the threshold tensors, and in the header the method, settings, layers,
units and per-layer figures. Loading also refuses a file whose header or tensors are not what
``calibrate`` writes (:mod:`~actscope.sparse.validation`).

Threshold tensors are named ``"{layer}.{kind}"``: ``act`` (CATS, one number: ``|act(gate)|``
below it is skipped), ``in`` and ``down`` (TEAL, one number each: input entries with ``|x| ≤ t``
of the gate/up and of the down projection are skipped), ``neuron`` (CETT, ``[d_mlp]``:
``|a_i| < t_i`` is skipped). CORE has none: its sets are chosen per prompt from α and β. TEAL
over projections (the default) holds one number per projection instead, named by its path in
the block (``"3.self_attn.q_proj"``; the names are in ``settings["names"]``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from ..results import TableResult
from ..store.bound import Bound, WeightBound
from .validation import by_projection, check_header, check_model, check_tensors, threshold_kinds
from ..models import Model


@dataclass(frozen=True, eq=False)
class Calibration(TableResult, WeightBound):
    """What to skip in each MLP block of one model (see the module docstring).

    ``expected_sparsity`` ``[layers]``: share of the skippable activations (token × unit, or
    token × input channel for TEAL, pooled over its matrices by size) that the calibration
    data leaves inactive. ``expected_weight_skipped`` ``[layers]``: the share of the MLP's
    weights a token does not read at that sparsity. ``per_layer``: further per-layer figures
    of the method (TEAL's two sparsities, CETT's ε). ``settings``: the method's parameters.
    """

    table_name: ClassVar[str] = "sparse_calibration"
    bound_kind: ClassVar[str] = "sparse-calibration"

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

    @property
    def kinds(self) -> tuple[str, ...]:
        """The names after ``"{layer}."`` of the threshold tensors (a projection's path for TEAL
        over projections)."""
        return threshold_kinds(self.method, self.settings)

    @property
    def by_projection(self) -> bool:
        """One threshold per projection (TEAL unless uniform over the MLP): run by
        :mod:`~actscope.sparse.projections`, not the sparse MLP."""
        return by_projection(self.method, self.settings)

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
        for kind in self.kinds:
            values = [self.threshold(layer, kind) for layer in self.layers]
            name = f"threshold_{kind}" if values[0].numel() == 1 else f"threshold_{kind}_median"
            table[name] = np.array([float(v.double().median()) for v in values])
        for name, values in self.per_layer.items():
            table[name] = np.asarray(values, dtype=np.float64)
        return table

    # -- files: obj.save(path) / Calibration.load(path, model) (actscope.store.bound) -----------
    def to_bound(self) -> Bound:
        tensors = {name: t.detach().to(torch.float32) for name, t in self.thresholds.items()}
        tensors["units"] = torch.tensor(self.units, dtype=torch.int64)  # a file always holds a tensor
        header = {
            "method": self.method, "family": self.family, "layers": list(self.layers), "units": list(self.units),
            "expected_sparsity": [float(x) for x in self.expected_sparsity],
            "expected_weight_skipped": [float(x) for x in self.expected_weight_skipped],
            "per_layer": {k: [float(x) for x in v] for k, v in self.per_layer.items()},
            "settings": dict(self.settings),
        }
        return Bound(self.bound_kind, self.model_name, self.weight_hash, header, tensors)

    @classmethod
    def from_bound(cls, bound: Bound, model: Model) -> "Calibration":
        """Rebuilt after :mod:`~actscope.sparse.validation` checked the header and tensors (the
        envelope and the weights are checked before, by :meth:`WeightBound.load`)."""
        from .families import mlp_blocks

        header, tensors = bound.header, bound.tensors
        check_header(bound.path, header)
        check_model(bound.path, header, model, mlp_blocks(model))
        check_tensors(bound.path, header, tensors)
        if by_projection(header["method"], header["settings"]):
            from .projections import block_projections
            from .validation import refuse

            found = [p.name for p in block_projections(model, header["layers"], header["settings"]["projections"])[header["layers"][0]]]
            if found != header["settings"]["names"]:
                refuse(bound.path, f"it has thresholds for projections {header['settings']['names']}, model '{model.name}' has {found}")
        return cls(
            method=header["method"], family=header["family"], model_name=bound.model_name,
            weight_hash=bound.weight_hash, layers=tuple(header["layers"]), units=tuple(header["units"]),
            thresholds={name: t.to(torch.float32) for name, t in tensors.items() if name != "units"},
            expected_sparsity=np.asarray(header["expected_sparsity"], dtype=np.float64),
            expected_weight_skipped=np.asarray(header["expected_weight_skipped"], dtype=np.float64),
            per_layer={k: np.asarray(v, dtype=np.float64) for k, v in header["per_layer"].items()},
            settings=header["settings"],
        )
