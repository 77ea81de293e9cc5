"""Subspace patching and the interpretability-illusion diagnostic (METHODS.md,
"Explanation and intervention").

Subspace patching replaces only the part of a site's activation that lies in a subspace: with
an orthonormal basis ``Q`` (``[d, k]``) of the subspace, a corrupted activation ``x`` becomes
``x + (x_clean − x) Q Qᵀ``. With ``k = d`` that is full patching; with ``k = 0`` nothing changes.
The vector ``x`` is a site's selected units, or, for per-head sites, the selected heads'
``head × d_head`` values flattened.

The subspace is given (directions, orthonormalised by a QR decomposition) or learned: a
rotation ``R`` (``[d, d]``, kept orthogonal by ``torch.nn.utils.parametrizations.orthogonal``)
whose first ``k`` rows span the subspace is trained so that the patched corrupted run
produces the clean run's output (distributed alignment search). Our choices: the default
loss is the cross-entropy between the clean run's next-token distribution and the patched
run's at each row's last real token; Adam; the rotation starts from a seeded random
initialisation; only the rotation is trained (gradients are taken with
``torch.autograd.grad``, so the model's parameters and ``.grad`` are never touched).

The illusion diagnostic (our choice of form): the downstream weight ``W`` (``[out, d]``, the
linear layer that reads the site: ``o_proj`` columns of the chosen heads for ``attn.z``,
``W_out`` columns of the chosen units for ``mlp.post``) splits each unit direction ``v`` into
its projection on ``W``'s row space (``span`` of its right singular vectors with singular value
above ``max(s) · max(shape) · eps``) and the rest, which ``W`` maps to 0 (its null space). We
report both norms and the squared-norm fractions, which sum to 1. A patch along a direction
that is mostly null-space can only act through a dormant pathway elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from ..errors import InputError
from ..models import Model, ModelLike, as_model
from ..results import TableResult
from .patching import Metric, as_inputs, check_pair, evaluate, last_positions, output_logits, plan_editable, record, scalar

Loss = Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]  # (patched logits, inputs) -> scalar


# -- results ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowNullSplit(TableResult):
    """Per direction: norm of its row-space and null-space parts of the downstream weight."""

    table_name: ClassVar[str] = "row_null_split"

    row_norm: np.ndarray  # [k]
    null_norm: np.ndarray  # [k]
    norm: np.ndarray  # [k] the directions' own norms
    rank: int  # rank of the downstream weight

    @property
    def row_fraction(self) -> np.ndarray:
        """Share of the squared norm in the row space (``row² / norm²``)."""
        return self.row_norm**2 / self.norm**2

    @property
    def null_fraction(self) -> np.ndarray:
        return self.null_norm**2 / self.norm**2

    def to_table(self) -> dict[str, np.ndarray]:
        return {"direction": np.arange(len(self.norm)), "norm": self.norm, "row_norm": self.row_norm, "null_norm": self.null_norm,
                "row_fraction": self.row_fraction, "null_fraction": self.null_fraction}


@dataclass(frozen=True)
class SubspacePatch(TableResult):
    """One subspace patch: the metric before and after, and the row/null split per direction."""

    table_name: ClassVar[str] = "subspace_patch"

    site: str
    k: int  # subspace dimension
    d: int  # the activation's dimension
    metric_clean: float
    metric_corrupt: float
    metric_patched: float
    basis: torch.Tensor  # [k, d] orthonormal rows
    split: RowNullSplit | None  # None when no downstream weight was found or given

    @property
    def recovered(self) -> float:
        gap = self.metric_clean - self.metric_corrupt
        return (self.metric_patched - self.metric_corrupt) / gap if gap != 0 else float("nan")

    def to_table(self) -> dict[str, np.ndarray]:
        table = {"site": np.asarray([self.site] * self.k, dtype=object), "direction": np.arange(self.k)}
        if self.split is not None:
            table.update({"row_fraction": self.split.row_fraction, "null_fraction": self.split.null_fraction})
        return table


# -- the diagnostic -----------------------------------------------------------------------
def row_null_split(directions: torch.Tensor, weight: torch.Tensor) -> RowNullSplit:
    """Split each row of ``directions`` (``[k, d]``) into ``weight``'s (``[out, d]``) row space
    and null space; ``row_norm² + null_norm² = norm²`` for each direction. Computed on the
    CPU (one small SVD), wherever the weight and the directions live."""
    directions = _as_rows(directions).cpu()
    weight = torch.as_tensor(weight).detach().to("cpu", torch.float64)
    if weight.dim() != 2 or weight.shape[1] != directions.shape[1]:
        raise InputError(f"row_null_split: the weight must be [out, {directions.shape[1]}] (it reads the directions' space), "
                         f"got {tuple(weight.shape)}")
    _, s, vh = torch.linalg.svd(weight, full_matrices=False)
    tol = (s.max() if s.numel() else torch.tensor(0.0)) * max(weight.shape) * torch.finfo(torch.float64).eps
    basis = vh[s > tol]  # [rank, d] orthonormal rows spanning the row space
    row = directions @ basis.T @ basis  # [k, d]
    null = directions - row
    return RowNullSplit(row.norm(dim=1).numpy(), null.norm(dim=1).numpy(), directions.norm(dim=1).numpy(), int(basis.shape[0]))


def downstream_weight(model: Model, site: Any) -> torch.Tensor | None:
    """``[out, d]``: the weight of the linear layer whose input is the site, restricted to the
    selected heads or units; None when the site is not the input of a linear layer."""
    if site.hook.at != "input":
        return None
    from ..models.adapters import out_in_weight

    weight = out_in_weight(model.module.get_submodule(site.path))  # [out, in]
    if weight is None:
        return None
    weight = weight.detach()
    if site.hook.layout == "heads":
        heads = site.heads
        if heads is None:
            return weight
        from ..models.adapters.common import n_heads

        d_head = weight.shape[1] // n_heads(model.config)
        return torch.cat([weight[:, h * d_head:(h + 1) * d_head] for h in heads], dim=1)
    return weight if site.units is None else weight[:, list(site.units)]


# -- subspace patching --------------------------------------------------------------------
def orthonormal_basis(directions: torch.Tensor) -> torch.Tensor:
    """``[k, d]`` orthonormal rows spanning the rows of ``directions`` (QR, signs kept)."""
    rows = _as_rows(directions)
    if rows.shape[0] == 0:
        return rows
    if rows.shape[0] > rows.shape[1]:
        raise InputError(f"subspace: {rows.shape[0]} directions in a {rows.shape[1]}-dimensional space; give at most {rows.shape[1]}")
    q, r = torch.linalg.qr(rows.T)  # q: [d, k]
    diagonal = r.diagonal()
    if bool((diagonal.abs() <= diagonal.abs().max() * 1e-10).any()):
        raise InputError("subspace: the directions are linearly dependent; drop the redundant ones")
    return (q * torch.sign(diagonal)).T.contiguous()


def _as_rows(directions: Any) -> torch.Tensor:
    rows = torch.as_tensor(directions).detach().double()
    rows = rows.unsqueeze(0) if rows.dim() == 1 else rows
    if rows.dim() != 2:
        raise InputError(f"subspace: directions must be [k, d] (or one [d] vector), got shape {tuple(rows.shape)}")
    return rows


def flat(x: torch.Tensor, heads: bool) -> torch.Tensor:
    """The site's vectors: ``[..., d]`` (per-head sites: ``head × d_head`` flattened)."""
    return x.reshape(*x.shape[:-2], -1) if heads else x


def subspace_edit(clean: torch.Tensor, basis: Any, heads: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Intervention: ``x + (clean − x) Qᵀ Q`` on the site's vectors, ``basis`` = ``Q`` ``[k, d]``
    (a tensor, or a callable returning one, for a basis that is being trained)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        q = (basis() if callable(basis) else basis).to(device=x.device, dtype=x.dtype)  # [k, d]
        v, c = flat(x, heads), flat(clean, heads).to(device=x.device, dtype=x.dtype)
        return (v + ((c - v) @ q.T) @ q).reshape(x.shape)

    return apply


def _one_site(model: Model, site: str) -> Any:
    planned = plan_editable(model, site)
    if len(planned) != 1:
        raise InputError(f"subspace patching works on one site; '{site}' selects {len(planned)} ({', '.join(s.label for s in planned[:4])}…)")
    return planned[0]


def subspace_patching(
    model: ModelLike,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    site: str,
    directions: Any,
    *,
    weight: torch.Tensor | None = None,
) -> SubspacePatch:
    """Patch the clean activation of ``site`` into the corrupted run inside the span of
    ``directions`` (``[k, d]``, orthonormalised), and split each basis direction into the row
    and null space of the downstream weight (found for inputs of linear layers, e.g. attn.z
    and mlp.post, or given as ``weight`` ``[out, d]``). Forward passes: 3."""
    model = as_model(model)
    clean, corrupted = as_inputs(model, clean, "clean"), as_inputs(model, corrupted, "corrupted")
    check_pair(clean, corrupted)
    target = _one_site(model, site)
    cache, m_clean = record(model, clean, [target], metric)
    heads = target.hook.layout == "heads"
    d = flat(cache[target.label], heads).shape[-1]
    basis = torch.empty(0, d, dtype=torch.float64) if _is_empty(directions) else orthonormal_basis(directions)
    if basis.shape[1] != d:
        raise InputError(f"subspace: {target.label} has {d}-dimensional vectors, the directions {basis.shape[1]}")
    m_corrupt = evaluate(model, corrupted, metric)
    m_patched = evaluate(model, corrupted, metric, {target.label: subspace_edit(cache[target.label], basis, heads)})
    weight = downstream_weight(model, target) if weight is None else torch.as_tensor(weight)
    split = row_null_split(basis, weight) if weight is not None and basis.shape[0] else None
    return SubspacePatch(target.label, basis.shape[0], d, m_clean, m_corrupt, m_patched, basis, split)


def _is_empty(directions: Any) -> bool:
    return directions is None or (isinstance(directions, (list, tuple)) and not directions) or (
        isinstance(directions, torch.Tensor) and directions.numel() == 0)


# -- learned rotation (distributed alignment search) --------------------------------------
@dataclass(frozen=True)
class LearnedSubspace:
    """The learned basis (first ``k`` rows of the rotation), its patch, and the loss per step."""

    basis: torch.Tensor  # [k, d]
    patch: SubspacePatch
    losses: np.ndarray  # [steps]


def clean_distribution_loss(clean_logits: torch.Tensor, clean_inputs: Mapping[str, Any]) -> Loss:
    """Default DAS loss: cross-entropy from the clean run's last-token distribution."""
    target = last_positions(clean_logits, clean_inputs).float().softmax(-1).detach()  # [batch, vocab]

    def loss(logits: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        return -(target * last_positions(logits, inputs).float().log_softmax(-1)).sum(-1).mean()

    return loss


def learn_subspace(
    model: ModelLike,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    site: str,
    k: int,
    *,
    steps: int = 100,
    lr: float = 0.05,
    seed: int = 0,
    loss: Loss | None = None,
    weight: torch.Tensor | None = None,
) -> LearnedSubspace:
    """Learn a ``k``-dimensional subspace of ``site`` whose patch makes the corrupted run
    produce the clean output (distributed alignment search), then patch along it.

    ``loss(patched logits, corrupted inputs)``: what to minimise (default: cross-entropy to the
    clean run's last-token distribution). Passes: ``steps`` forward+backward, plus 4 forwards.
    """
    from ..interventions import edit

    model = as_model(model)
    clean, corrupted = as_inputs(model, clean, "clean"), as_inputs(model, corrupted, "corrupted")
    check_pair(clean, corrupted)
    target = _one_site(model, site)
    cache = record(model, clean, [target], metric)[0][target.label]
    heads = target.hook.layout == "heads"
    d = flat(cache, heads).shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d:
        raise InputError(f"learn_subspace: k must be an int in 1..{d} (the site's dimension), got {k!r}")
    if loss is None:
        with torch.no_grad():
            loss = clean_distribution_loss(output_logits(model(**clean)), clean)
    rotation = _rotation(d, seed)
    optimizer = torch.optim.Adam(rotation.parameters(), lr=lr)
    losses = []
    intervention = subspace_edit(cache, lambda: rotation.weight[:k], heads)
    for _ in range(steps):
        with torch.enable_grad(), edit(model, {target.label: intervention}):
            value = scalar(loss(output_logits(model(**corrupted)), corrupted), "loss")
        grads = torch.autograd.grad(value, list(rotation.parameters()))
        for parameter, grad in zip(rotation.parameters(), grads):
            parameter.grad = grad
        optimizer.step()
        losses.append(float(value.detach()))
    basis = rotation.weight[:k].detach().double()
    return LearnedSubspace(basis, subspace_patching(model, clean, corrupted, metric, target.label, basis, weight=weight), np.asarray(losses))


def _rotation(d: int, seed: int) -> torch.nn.Module:
    """A seeded ``d × d`` linear map kept orthogonal; the global RNG is left as it was."""
    from torch.nn.utils.parametrizations import orthogonal

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return orthogonal(torch.nn.Linear(d, d, bias=False, dtype=torch.float64))


__all__ = [
    "LearnedSubspace", "RowNullSplit", "SubspacePatch", "downstream_weight", "learn_subspace", "orthonormal_basis",
    "row_null_split", "subspace_patching",
]
