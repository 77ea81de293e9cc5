"""How well an SAE reconstructs its site, on data: one row per SAE.

Over every real token ``t`` of the data, with ``y_t`` what the SAE reconstructs (its own input
``x_t``; a transcoder's output site), ``ŷ_t = decode(encode(x_t))`` and ``ȳ`` the mean of ``y``:

* ``explained_variance = 1 − Σ_t ‖y_t − ŷ_t‖² / Σ_t ‖y_t − ȳ‖²`` (pooled over tokens; float64);
* ``mse = Σ_t ‖y_t − ŷ_t‖² / (n · d)``, the mean squared error per entry;
* ``l0``: features with ``f > 0`` per token, averaged; ``dead``: features that fire on no token
  (``dead_fraction`` of ``d_sae``).

With an ``objective`` (one of :mod:`actscope.metrics.cett.objectives`, as ``profile`` picks it for
the model: next-token loss for causal LMs, masked-LM loss for masked LMs, the cosine fidelity of
mean-pooled embeddings for bare encoders, the KL of a classifier's outputs) the model also runs
with the site replaced by its reconstruction (the error term dropped), and with the site zeroed:
``degradation`` and ``degradation_ablated`` are the objective's (``exp(L − L_clean) − 1`` for a
loss; ``1 − mean cosine`` for embeddings); for a loss, ``clean``/``reconstructed``/``ablated`` are
the losses in nats, ``loss_increase = reconstructed − clean`` and ``recovered = (ablated −
reconstructed) / (ablated − clean)`` (SAELens's "CE loss score"). Other columns are NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..errors import DataError, InputError, SiteError
from ..results import TableResult
from .attach import as_vectors, attach
from .core import SAE

LOSSES = ("causal_lm_loss", "masked_lm_loss")
COLUMNS = ("site", "reads", "writes", "path", "architecture", "d_in", "d_sae", "tokens", "explained_variance", "mse", "l0",
           "dead", "dead_fraction", "objective", "clean", "reconstructed", "ablated", "loss_increase", "recovered", "degradation",
           "degradation_ablated")


@dataclass(frozen=True, eq=False)
class Reconstruction(TableResult):
    """One row per SAE (see the module docstring for every column)."""

    table_name: ClassVar[str] = "sae"

    site: np.ndarray  # [rows] object: the feature site
    reads: np.ndarray  # [rows] object: the site it encodes
    writes: np.ndarray  # [rows] object: the site it reconstructs
    path: np.ndarray  # [rows] object
    architecture: np.ndarray  # [rows] object
    d_in: np.ndarray  # [rows] int64
    d_sae: np.ndarray  # [rows] int64
    tokens: np.ndarray  # [rows] int64
    explained_variance: np.ndarray  # [rows] float64
    mse: np.ndarray  # [rows] float64
    l0: np.ndarray  # [rows] float64
    dead: np.ndarray  # [rows] int64
    dead_fraction: np.ndarray  # [rows] float64
    objective: np.ndarray  # [rows] object ("" without one)
    clean: np.ndarray  # [rows] float64
    reconstructed: np.ndarray  # [rows] float64
    ablated: np.ndarray  # [rows] float64
    loss_increase: np.ndarray  # [rows] float64
    recovered: np.ndarray  # [rows] float64
    degradation: np.ndarray  # [rows] float64
    degradation_ablated: np.ndarray  # [rows] float64

    def to_table(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in COLUMNS}

    def row(self, site: str) -> dict[str, Any]:
        """The row of one feature site, as a dict."""
        index = list(self.site).index(site)
        return {name: getattr(self, name)[index] for name in COLUMNS}


def reconstruction(model: Any, saes: Any, data: Any = None, *, objective: Any = None, batch_size: int = 8, max_length: int = 128,
                   max_tokens: int | None = None, column: str | None = None) -> Reconstruction:
    """Reconstruction quality of ``saes`` (an SAE, a feature site attached to ``model``, or a
    list of them) on ``data`` (as for :func:`actscope.profile`), and, with ``objective``, the
    model's loss on the reconstruction (see the module docstring)."""
    from ..models import as_model

    model = as_model(model)
    sites = [_feature_site(model, item) for item in (saes if isinstance(saes, (list, tuple)) else [saes])]
    if not sites:
        raise InputError("reconstruction(): give at least one SAE or feature site")
    sums = _statistics(model, sites, data, dict(batch_size=batch_size, max_length=max_length, max_tokens=max_tokens, column=column))
    losses = [_losses(model, site, objective) if objective is not None and _replaceable(site) else {} for site in sites]
    return _result(sites, sums, losses, getattr(objective, "name", ""))


def _feature_site(model: Any, item: Any) -> Any:
    from ..sites import plan_sites

    name = attach(model, item) if isinstance(item, SAE) else item
    sites = plan_sites(model, name).sites
    if len(sites) != 1 or getattr(sites[0].hook.read, "sae", None) is None:
        raise InputError(f"reconstruction(): '{name}' is not the feature site of one attached SAE; attach it first (actscope.sae.attach)")
    return sites[0]


# -- the statistics pass --------------------------------------------------------------------------
@dataclass
class _Sums:
    tokens: int = 0
    error: float = 0.0  # Σ ‖y − ŷ‖²
    square: float = 0.0  # Σ ‖y‖²
    total: torch.Tensor | None = None  # Σ y  [d]
    active: float = 0.0  # Σ features firing
    fired: torch.Tensor | None = None  # [d_sae] bool


def _statistics(model: Any, sites: list, data: Any, limits: dict) -> list[_Sums]:
    from ..feeding import calls, source_for
    from ..sites import Plan
    from ..trace import Capture

    reads = {s.hook.read.base.label: s.hook.read.base for s in sites} | {s.hook.read.writes.label: s.hook.read.writes for s in sites}
    capture = Capture(model, Plan(tuple(reads.values())), flat=True, announce=False, max_bytes=1 << 62)
    sums = [_Sums() for _ in sites]
    with torch.no_grad(), capture.attached():
        for call in calls(model, source_for(model, data, **limits)):
            capture.next_examples = call.examples
            model(**call.inputs)
            for site, total in zip(sites, sums):
                _add(site, total, capture)
            for label in capture.readings:
                capture.readings[label] = []
    if not sums[0].tokens:
        raise DataError("no real token was observed; the data produced no input (is it empty?)")
    return sums


def _add(site: Any, sums: _Sums, capture: Any) -> None:
    read = site.hook.read
    sae = read.sae
    x = capture.tensor(read.base.label)
    y = capture.tensor(read.writes.label) if sae.transcoder else x
    sae = sae.on(x.device)
    f = sae.encode(x)
    error = (sae.decode(f, x).double() - y.double()).pow(2).sum()
    y = y.double()
    sums.tokens += len(x)
    sums.error += float(error)
    sums.square += float(y.pow(2).sum())
    sums.total = y.sum(0) if sums.total is None else sums.total + y.sum(0)
    fires = f > 0
    sums.active += float(fires.sum())
    fired = fires.any(0)
    sums.fired = fired if sums.fired is None else sums.fired | fired


# -- the loss passes ------------------------------------------------------------------------------
def _replaceable(site: Any) -> bool:
    """Whether ``edit`` can replace the sites the SAE reads and writes (not a computed slice);
    otherwise the loss columns stay NaN."""
    from ..interventions.context import _check_editable

    try:
        for part in {site.hook.read.base.label: site.hook.read.base, site.hook.read.writes.label: site.hook.read.writes}.values():
            _check_editable(part)
    except SiteError:
        return False
    return True


def _losses(model: Any, site: Any, objective: Any) -> dict[str, float]:
    from ..interventions import edit

    reference = objective.reference(model)
    loss = objective.name in LOSSES and isinstance(reference.value, float)
    found: dict[str, float] = {"clean": reference.value if loss else math.nan}
    for key, edits in (("reconstructed", _reconstructing(site)), ("ablated", _ablating(site))):
        with edit(model, edits):
            if loss:
                value = objective.measure(model, reference.batches)
                found[key] = value
                found[f"degradation_{key}"] = math.exp(value - reference.value) - 1.0
            else:
                found[f"degradation_{key}"] = objective.degradation(model, reference)
    return found


def _reconstructing(site: Any) -> dict:
    """Edits that hand the model ``decode(encode(x))`` instead of the site the SAE reconstructs."""
    read = site.hook.read
    sae, base, writes = read.sae, read.base, read.writes

    def reconstructed(view: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        vectors = as_vectors(x, base.hook.layout)
        out = sae.on(vectors.device).reconstruct(vectors)
        return out.to(view.dtype).reshape(view.shape)

    if not sae.transcoder:
        return {base.label: lambda view: reconstructed(view, view)}
    seen: dict[str, torch.Tensor] = {}

    def remember(view: torch.Tensor) -> torch.Tensor:
        seen["x"] = view
        return view

    return {base.label: remember, writes.label: lambda view: reconstructed(view, seen["x"])}


def _ablating(site: Any) -> dict:
    writes = site.hook.read.writes
    return {writes.label: torch.zeros_like}


def _result(sites: Sequence[Any], sums: Sequence[_Sums], losses: Sequence[dict[str, float]], objective: str) -> Reconstruction:
    rows = []
    for site, total, found in zip(sites, sums, losses):
        read = site.hook.read
        sae = read.sae
        centred = total.square - float(total.total.pow(2).sum()) / total.tokens
        dead = int((~total.fired).sum())
        clean, recon, ablated = (found.get(key, math.nan) for key in ("clean", "reconstructed", "ablated"))
        gap = ablated - clean
        rows.append({
            "site": site.name, "reads": read.base.name, "writes": read.writes.name, "path": sae.path or "", "architecture":
            sae.architecture + (" transcoder" if sae.transcoder else ""), "d_in": sae.d_in, "d_sae": sae.d_sae, "tokens": total.tokens,
            "explained_variance": 1.0 - total.error / centred if centred > 0 else math.nan,
            "mse": total.error / (total.tokens * sae.d_out), "l0": total.active / total.tokens, "dead": dead,
            "dead_fraction": dead / sae.d_sae, "objective": objective, "clean": clean, "reconstructed": recon, "ablated": ablated,
            "loss_increase": recon - clean, "recovered": (ablated - recon) / gap if gap and not math.isnan(gap) else math.nan,
            "degradation": found.get("degradation_reconstructed", math.nan),
            "degradation_ablated": found.get("degradation_ablated", math.nan),
        })
    kinds = {"d_in": np.int64, "d_sae": np.int64, "tokens": np.int64, "dead": np.int64}
    strings = ("site", "reads", "writes", "path", "architecture", "objective")
    return Reconstruction(**{name: np.array([row[name] for row in rows], dtype=object if name in strings else kinds.get(name, np.float64))
                             for name in COLUMNS})
