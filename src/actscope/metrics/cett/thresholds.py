"""Per-unit CETT thresholds: built from recorded curves, applied as a reversible edit, saved.

For a CETT target c, layer l gets ε_l = the largest grid ε whose token-averaged CETT is ≤ c
(:meth:`CettCurves.eps_for`) and unit i the threshold ``ε_l / ‖W_out[:, i]‖₂``; the edit is
``a_i ← 0 if |a_i| < threshold_i`` (:func:`actscope.interventions.threshold`).

``t.save(path)`` / ``CettThresholds.load(path, model)`` write and read one bound file of kind
``cett-thresholds`` (:mod:`actscope.store.bound`: one ``.safetensors`` file, atomic, refused for
other weights): a float64 ``[d_ff]`` tensor per site, and c, the sites, layers and ε in the
header. ``CettThresholds.load`` also reads a ``cett-sparsity`` file (:meth:`CettSparsity.save`),
which holds the same thresholds and header fields beside the search's summary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

import numpy as np
import torch

from ...errors import InputError
from ...sites import plan_sites
from .core import output_projection, unit_thresholds
from .curves import CettCurves
from ...results import TableResult
from ...store.bound import Bound, WeightBound, refuse, shown
from ...models import Model, ModelLike

KIND = "cett-thresholds"


@dataclass(frozen=True, eq=False)
class CettThresholds(TableResult, WeightBound):
    """Per-layer ε and per-unit thresholds for one CETT target ``c`` on one model's weights
    (``weight_hash``, ``model_name``: the model they were computed on)."""

    table_name: ClassVar[str] = "cett_thresholds"
    bound_kind: ClassVar[str] = KIND
    also_reads: ClassVar[tuple[str, ...]] = ("cett-sparsity",)  # the same thresholds, with the search's summary

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    eps: np.ndarray  # [layers]
    c: float
    thresholds: Mapping[str, np.ndarray] = field(repr=False)  # site → [d_ff] float64
    weight_hash: str = ""
    model_name: str = ""

    def edits(self) -> dict[str, Any]:
        """``{site: threshold intervention}`` for :func:`actscope.edit`."""
        from ...interventions import threshold

        return {site: threshold(torch.from_numpy(self.thresholds[site])) for site in self.sites}

    def apply(self, model: Model) -> Iterator[Any]:
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

    # -- files: obj.save(path) / CettThresholds.load(path, model) (actscope.store.bound) -------
    def to_bound(self) -> Bound:
        # torch.tensor copies: a read-only array (one loaded from a file) would warn in from_numpy
        tensors = {site: torch.tensor(self.thresholds[site], dtype=torch.float64) for site in self.sites}
        header = {"c": float(self.c), "sites": list(self.sites), "layers": [int(x) for x in self.layers],
                  "eps": [float(e) for e in self.eps]}
        return Bound(self.bound_kind, self.model_name, self.weight_hash, header, tensors)

    @classmethod
    def from_bound(cls, bound: Bound, model: Model) -> "CettThresholds":
        """Rebuilt after :func:`check_content` (the envelope and the weights are checked before)."""
        check_content(bound, model)
        header, sites = bound.header, bound.header["sites"]
        return cls(
            sites=tuple(sites), layers=tuple(header["layers"]), eps=np.asarray(header["eps"], dtype=np.float64),
            c=float(header["c"]), thresholds={site: bound.tensors[site].numpy().astype(np.float64) for site in sites},
            weight_hash=bound.weight_hash, model_name=bound.model_name,
        )


# -- what a file must hold: a rule per header key, then the tensors against the model ------------
def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _listed(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(test(x) for x in v)


HEADER: dict[str, tuple[Callable[[Any], bool], str]] = {
    "c": (_finite, "a finite number ≥ 0"),
    "sites": (lambda v: _listed(lambda x: isinstance(x, str) and x != "")(v) and len(set(v)) == len(v),
              "a list of distinct site names"),
    "layers": (_listed(lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0),
               "a list of layer numbers ≥ 0"),
    "eps": (_listed(_finite), "a list of finite numbers ≥ 0"),
}


def check_content(bound: Bound, model: Model) -> None:
    """The header's keys (:data:`HEADER`), one layer and ε per site, and one float tensor per
    site of the model's unit count, finite and ≥ 0."""
    header, source = bound.header, bound.path
    for key, (test, what) in HEADER.items():
        if key not in header:
            refuse(source, KIND, f"its header has no '{key}'")
        if not test(header[key]):
            refuse(source, KIND, f"header '{key}' is {shown(header[key])}, expected {what}")
    sites = header["sites"]
    if not len(sites) == len(header["layers"]) == len(header["eps"]):
        refuse(source, KIND, f"its header has {len(sites)} sites, {len(header['layers'])} layers and "
                             f"{len(header['eps'])} ε values; expected one of each per site")
    if set(bound.tensors) != set(sites):
        refuse(source, KIND, f"its tensors {sorted(bound.tensors)} are not its sites {sites}")
    units = _units(source, model, sites)
    for site in sites:
        _check_tensor(source, site, bound.tensors[site], units[site])


def _units(source: Path | None, model: Model, sites: list[str]) -> dict[str, int]:
    """The unit count of each site on ``model`` (the width of its output projection)."""
    try:
        return {site.label: output_projection(model, site)[0].shape[1] for site in plan_sites(model, sites).sites}
    except InputError as error:
        refuse(source, KIND, f"its sites do not fit model '{model.name}' ({error})")


def _check_tensor(source: Path | None, site: str, tensor: torch.Tensor, units: int) -> None:
    if list(tensor.shape) != [units]:
        refuse(source, KIND, f"tensor '{site}' has shape {list(tensor.shape)}; the model's {site} has {units} "
                             "units")
    if not tensor.is_floating_point():
        refuse(source, KIND, f"tensor '{site}' has dtype {str(tensor.dtype).removeprefix('torch.')}, expected float64")
    bad = ~torch.isfinite(tensor) | (tensor < 0)
    if bool(bad.any()):
        refuse(source, KIND, f"tensor '{site}' holds {float(tensor[bad][0]):g}; thresholds are finite and ≥ 0")


def thresholds_for(curves: CettCurves, c: float, model: ModelLike, *, index: Any = None) -> CettThresholds:
    """Thresholds for CETT target ``c`` read off ``curves`` (or for an explicit per-layer grid
    ``index``, −1 meaning ε = 0). ``model`` gives the output projections and the weight hash."""
    from ...store import weight_hash
    from .curves import eps_of
    from ...models import as_model

    model = as_model(model)
    index = curves.index_for(c) if index is None else np.asarray(index, dtype=np.int64)
    eps = eps_of(curves.grid, index)
    plan = plan_sites(model, list(curves.sites))
    per_unit = {
        site.label: unit_thresholds(float(e), output_projection(model, site)[0]).cpu().numpy()
        for site, e in zip(plan.sites, eps)
    }
    return CettThresholds(curves.sites, curves.layers, eps, float(c), per_unit, weight_hash(model.module), model.name)
