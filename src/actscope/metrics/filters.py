"""Convolution filter statistics (CNN Filter DB): the distribution of a model's 3×3 filters.

Definitions used here (Gavrikov & Keuper's, where their paper is explicit; our choices otherwise):

* A **filter** is one 3×3 kernel slice ``W[o, i]`` of a ``Conv2d`` with a 3×3 kernel, read as a
  9-vector. **Normalised**: divided by its largest absolute coefficient (its L∞ norm), so its
  coefficients lie in −1..1; an all-zero filter stays zero.
* **Sparsity** of a layer: the share of its filters that are near zero, ``‖f‖∞ < 1 % × max over
  the layer of ‖f‖∞`` (before normalising).
* **Principal components** of a layer: the eigenvectors of the covariance of its normalised
  filters (centred), with each one's share of the variance (``explained``).
* **Variance entropy** of a layer: the entropy of those shares divided by log 9: near 0 when one
  pattern dominates (repetitive, degenerate filters), near 1 when the variance is spread evenly
  over all nine directions (filters like random noise).
* **KL divergence** between two sets of filters P and Q (layers or models): both projected onto
  a shared basis (the principal components of P and Q pooled), each of the 9 coefficients
  histogrammed over ``BINS`` equal bins on −3..3 (the range a normalised filter's coordinates
  can take), a count of ``SMOOTH`` added to every bin; KL(P‖Q) is the mean over the 9
  coefficients of ``Σ p log(p/q)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from torch import nn

from ..errors import InputError
from ..results import TableResult

NEAR_ZERO = 0.01
BINS = 60
RANGE = 3.0
SMOOTH = 1.0


def conv3x3_filters(module: nn.Module) -> dict[str, np.ndarray]:
    """``{module path: [filters, 9]}`` raw 3×3 filters of every 3×3 ``Conv2d``, in module order."""
    found = {name: m.weight.detach().cpu().double().reshape(-1, 9).numpy()
             for name, m in module.named_modules() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3)}
    if not found:
        raise InputError(f"{type(module).__name__} has no Conv2d with a 3×3 kernel, so it has no filters to study")
    return found


def normalised(filters: np.ndarray) -> np.ndarray:
    """Each filter divided by its largest absolute coefficient (zero filters stay zero)."""
    scale = np.abs(filters).max(axis=1, keepdims=True)
    return np.divide(filters, scale, out=np.zeros_like(filters), where=scale > 0)


def principal_components(filters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(components [9, 9] as rows, strongest first; their shares of the variance [9])."""
    centred = filters - filters.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred / max(len(filters) - 1, 1))
    order = np.argsort(values)[::-1]
    values = np.clip(values[order], 0, None)
    return vectors[:, order].T, values / values.sum() if values.sum() > 0 else values


def sparsity(filters: np.ndarray) -> float:
    norms = np.abs(filters).max(axis=1)
    return float(np.mean(norms < NEAR_ZERO * norms.max())) if norms.max() > 0 else 1.0


def variance_entropy(explained: np.ndarray) -> float:
    p = explained[explained > 0]
    return float(-(p * np.log(p)).sum() / np.log(9)) if p.size else 0.0


def kl_divergence(p_filters: np.ndarray, q_filters: np.ndarray, basis: np.ndarray | None = None) -> float:
    """KL(P‖Q) of two sets of normalised filters (see the module docstring)."""
    if basis is None:
        basis, _ = principal_components(np.concatenate([p_filters, q_filters]))
    edges = np.linspace(-RANGE, RANGE, BINS + 1)
    total = 0.0
    for component in basis:
        p = np.histogram(p_filters @ component, edges)[0] + SMOOTH
        q = np.histogram(q_filters @ component, edges)[0] + SMOOTH
        p, q = p / p.sum(), q / q.sum()
        total += float((p * np.log(p / q)).sum())
    return total / len(basis)


@dataclass(frozen=True, eq=False)
class FilterStats(TableResult):
    """One row per 3×3 conv layer: filters, sparsity, variance entropy, the first components' shares."""

    table_name: ClassVar[str] = "filters"

    layer: np.ndarray  # [layers] object: the module path
    filters: np.ndarray  # [layers] int64
    sparsity: np.ndarray  # [layers] float64
    variance_entropy: np.ndarray  # [layers] float64
    explained: np.ndarray  # [layers, 9] float64
    components: np.ndarray  # [layers, 9, 9] float64
    normalised: dict  # module path → [filters, 9] normalised filters

    def to_table(self) -> dict[str, np.ndarray]:
        table = {"layer": self.layer, "filters": self.filters, "sparsity": self.sparsity, "variance_entropy": self.variance_entropy}
        table.update({f"pc{j + 1}_share": self.explained[:, j] for j in range(3)})
        return table


def filter_stats(model: Any) -> FilterStats:
    """The 3×3 filter statistics of every such conv layer of ``model`` (a Model or an nn.Module)."""
    module = getattr(model, "module", model)
    raw = conv3x3_filters(module)
    normed = {name: normalised(f) for name, f in raw.items()}
    pcs = {name: principal_components(f) for name, f in normed.items()}
    return FilterStats(
        layer=np.array(list(raw), dtype=object),
        filters=np.array([len(f) for f in raw.values()], dtype=np.int64),
        sparsity=np.array([sparsity(f) for f in raw.values()]),
        variance_entropy=np.array([variance_entropy(pcs[name][1]) for name in raw]),
        explained=np.stack([pcs[name][1] for name in raw]),
        components=np.stack([pcs[name][0] for name in raw]),
        normalised=normed,
    )


def filter_divergence(a: Any, b: Any | None = None) -> np.ndarray:
    """KL(layer i of ``a`` ‖ layer j of ``b``) for every pair ([layers of a, layers of b]); with
    ``b`` None, between the layers of ``a``. Each argument: a model, a module or a FilterStats."""
    first = a if isinstance(a, FilterStats) else filter_stats(a)
    second = first if b is None else (b if isinstance(b, FilterStats) else filter_stats(b))
    p, q = list(first.normalised.values()), list(second.normalised.values())
    return np.array([[kl_divergence(x, y) for y in q] for x in p])


def pooled_divergence(a: Any, b: Any) -> float:
    """KL between all the 3×3 filters of ``a`` and all of ``b`` (each pooled over its layers)."""
    first = a if isinstance(a, FilterStats) else filter_stats(a)
    second = b if isinstance(b, FilterStats) else filter_stats(b)
    return kl_divergence(np.concatenate(list(first.normalised.values())), np.concatenate(list(second.normalised.values())))

