"""Similarity of two representations held in memory: CKA, HSIC, RSA, effective rank.

Every function takes arrays or tensors of shape ``[samples, features]`` (rows are the same
inputs in the same order for both representations; the feature counts may differ) and computes
in float64. The streamed layer × layer version, for activations that do not fit in memory, is
:func:`actscope.metrics.compare_representations` (:mod:`.compare`).

* :func:`cka` — centered kernel alignment (Kornblith et al., 2019),
  ``HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))``, with a linear kernel (``K = X Xᵀ``) or an RBF
  kernel. Default: Kornblith et al.'s estimator, ``HSIC = tr(K H L H) / (n − 1)²`` (H the
  centering matrix; the ``(n − 1)²`` cancels in the ratio). ``unbiased=True``: the unbiased
  HSIC estimator of Song et al. (2012), which removes the upward bias of the plain estimator
  when there are few samples for many features (two unrelated random matrices with 50 samples
  and 1000 features have a plain linear CKA above 0.9, an unbiased one near 0).
  Linear CKA works in feature space (``‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F)``, Xᶜ centered), or
  through the samples' Gram matrices when there are fewer samples than features. RBF CKA needs
  the samples' ``n × n`` Gram matrices: ``K_ij = exp(−‖x_i − x_j‖² / (2 σ²))`` with σ a multiple
  (``sigma``, default 1) of the median pairwise distance, exactly as Kornblith et al.'s code
  (the median of all n² squared distances, the zero diagonal included); it is refused above
  ``max_samples`` samples (default :data:`MAX_GRAM_SAMPLES`: two float64 Gram matrices of
  8192² take 1 GiB).
* :func:`rsa` — representational similarity analysis: the rank (Spearman, default; Kendall's
  τ-b) or Pearson correlation between the upper triangles of the two representational
  dissimilarity matrices (:func:`rdm`: ``correlation`` = 1 − Pearson r between two samples'
  feature vectors, ``euclidean``, ``cosine`` = 1 − cosine similarity).
* :func:`effective_rank` — Roy & Vetterli's ``exp(H(p))``, p the centered data's singular
  values normalised to sum 1; :func:`participation_ratio` — ``(Σλ)² / Σλ²`` over the
  covariance's eigenvalues λ (= squared singular values). Both lie in ``[1, min(n − 1, d)]``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InputError

KERNELS = ("linear", "rbf")
METRICS = ("correlation", "euclidean", "cosine")
RANKINGS = ("spearman", "pearson", "kendall")
MAX_GRAM_SAMPLES = 8192


# -- inputs ------------------------------------------------------------------------------
def as_matrix(x: Any, name: str = "x") -> torch.Tensor:
    """An array or tensor ``[samples, features]`` (a 1-D one is one feature) as float64 on the CPU."""
    if isinstance(x, torch.Tensor):
        tensor = x.detach().to("cpu", torch.float64)
    else:
        try:
            tensor = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise InputError(f"{name} must be a numeric array [samples, features], got {type(x).__name__} ({error})") from None
    if tensor.dim() == 1:
        tensor = tensor[:, None]
    if tensor.dim() != 2:
        raise InputError(f"{name} must be [samples, features], got shape {tuple(tensor.shape)}; flatten the other axes into features")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise InputError(f"{name} holds {bad} NaN or infinite value(s); drop or fill them before comparing representations")
    return tensor


def paired(x: Any, y: Any, least: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = as_matrix(x, "x"), as_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise InputError(
            f"x has {x.shape[0]} samples and y {y.shape[0]}; both must hold the same inputs in the same order "
            "(rows are samples, columns features)"
        )
    if x.shape[0] < least:
        raise InputError(f"this needs at least {least} samples, got {x.shape[0]}")
    return x, y


def _choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise InputError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


# -- kernels and HSIC --------------------------------------------------------------------
def gram(x: Any, kernel: str = "linear", *, sigma: float = 1.0) -> torch.Tensor:
    """The samples' kernel matrix ``[n, n]`` (float64): ``X Xᵀ`` or the RBF kernel with σ
    ``sigma`` times the median pairwise distance (see the module docstring)."""
    x = as_matrix(x)
    _choice(kernel, KERNELS, "kernel")
    dots = x @ x.T
    if kernel == "linear":
        return dots
    _check_sigma(sigma)
    norms = dots.diagonal()
    squared = (norms[:, None] + norms[None, :] - 2 * dots).clamp_min_(0)
    median = float(np.median(squared.numpy()))  # numpy's median (the mean of the middle two), as in their code
    if median <= 0:
        raise InputError("the RBF kernel's bandwidth is the median distance between samples, which is 0 here "
                         "(most samples are identical); use kernel='linear' or remove the duplicates")
    return torch.exp(-squared / (2 * sigma**2 * median))


def _check_sigma(sigma: Any) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0 or not np.isfinite(sigma):
        raise InputError(f"sigma is the RBF bandwidth as a multiple of the median distance, a positive number; got {sigma!r}")


def centered(k: torch.Tensor) -> torch.Tensor:
    """``H K H``: the Gram matrix with row and column means removed."""
    k = k - k.mean(dim=0, keepdim=True)
    return k - k.mean(dim=1, keepdim=True)


def hsic_gram(k: torch.Tensor, l: torch.Tensor, *, unbiased: bool = False) -> float:  # noqa: E741
    """HSIC of two ``[n, n]`` kernel matrices: ``tr(K H L H) / (n − 1)²``, or Song et al.'s
    unbiased estimator (needs n ≥ 4)."""
    n = k.shape[0]
    if not unbiased:
        return float((centered(k) * centered(l)).sum()) / (n - 1) ** 2
    if n < 4:
        raise InputError(f"the unbiased HSIC estimator needs at least 4 samples, got {n}")
    k, l = k.clone(), l.clone()  # noqa: E741
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    k_sum, l_sum = float(k.sum()), float(l.sum())
    cross = float(k.sum(dim=0) @ l.sum(dim=1))
    value = float((k * l).sum()) + k_sum * l_sum / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)
    return value / (n * (n - 3))


def hsic(x: Any, y: Any, kernel: str = "linear", *, unbiased: bool = False, sigma: float = 1.0) -> float:
    """HSIC between two representations (see :func:`cka`)."""
    x, y = paired(x, y, 4 if unbiased else 2)
    return hsic_gram(gram(x, kernel, sigma=sigma), gram(y, kernel, sigma=sigma), unbiased=unbiased)


def cka(x: Any, y: Any, kernel: str = "linear", *, unbiased: bool = False, sigma: float = 1.0,
        max_samples: int = MAX_GRAM_SAMPLES) -> float:
    """Centered kernel alignment of ``x`` ``[n, d1]`` and ``y`` ``[n, d2]`` (see the module
    docstring): 1 for representations equal up to an orthogonal transform and an isotropic
    scaling (and, with a linear kernel, a translation); 0 for linear CKA when no feature of one
    is correlated with a feature of the other. ``unbiased``: Song et al.'s HSIC estimator (for
    few samples); ``sigma``: the RBF bandwidth as a multiple of the median distance. A
    representation with no variance at all has no CKA: that is an error."""
    _choice(kernel, KERNELS, "kernel")
    x, y = paired(x, y, 4 if unbiased else 2)
    n = x.shape[0]
    if kernel == "linear" and n > x.shape[1] + y.shape[1]:  # feature space is the smaller problem
        return _unbiased_linear_cka_features(x, y) if unbiased else _linear_cka_features(x, y)
    if kernel == "rbf" and n > max_samples:
        raise InputError(
            f"RBF CKA needs the {n} × {n} Gram matrix of the samples ({2 * 8 * n * n / 2**30:.1f} GiB for the two); "
            f"max_samples is {max_samples}: pass a random subset of the samples, raise max_samples, or use kernel='linear', "
            "which works in feature space and streams"
        )
    k, l = gram(x, kernel, sigma=sigma), gram(y, kernel, sigma=sigma)  # noqa: E741
    return _ratio(hsic_gram(k, l, unbiased=unbiased), hsic_gram(k, k, unbiased=unbiased), hsic_gram(l, l, unbiased=unbiased))


def _ratio(xy: float, xx: float, yy: float) -> float:
    if not xx > 0 or not yy > 0:
        which = "x" if not xx > 0 else "y"
        raise InputError(f"{which} has no variance across samples (its self-HSIC is {min(xx, yy):.3g}), so CKA is undefined; "
                         "check that the representation is not constant")
    return xy / float(np.sqrt(xx * yy))


def _linear_cka_features(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al.'s feature-space form: ``‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F)``."""
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    return _ratio(float((y.T @ x).square().sum()), float((x.T @ x).square().sum()), float((y.T @ y).square().sum()))


def _unbiased_linear_cka_features(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased estimator in feature space (Kornblith et al.'s code, centered features)."""
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    n = x.shape[0]
    rx, ry = x.square().sum(dim=1), y.square().sum(dim=1)  # [n] squared row norms

    def product(a: torch.Tensor, b: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor) -> float:
        value = float((a.T @ b).square().sum()) - n / (n - 2) * float(ra @ rb) + float(ra.sum() * rb.sum()) / ((n - 1) * (n - 2))
        return value

    return _ratio(product(x, y, rx, ry), product(x, x, rx, rx), product(y, y, ry, ry))


# -- RSA ----------------------------------------------------------------------------------
def rdm(x: Any, metric: str = "correlation") -> torch.Tensor:
    """The representational dissimilarity matrix ``[n, n]`` (float64) of ``x`` ``[n, d]``:
    ``correlation`` (1 − Pearson r of two samples' features), ``euclidean`` or ``cosine``
    (1 − cosine similarity). A sample with no variance (correlation) or a zero vector (cosine)
    has no such distance: that is an error naming it."""
    x = as_matrix(x)
    _choice(metric, METRICS, "metric")
    if metric == "euclidean":
        norms = x.square().sum(dim=1)
        return (norms[:, None] + norms[None, :] - 2 * x @ x.T).clamp_min_(0).sqrt_().fill_diagonal_(0)
    if metric == "correlation":
        x = x - x.mean(dim=1, keepdim=True)
    length = x.norm(dim=1)
    flat = (length == 0).nonzero().flatten()
    if len(flat):
        what = "has the same value in every feature" if metric == "correlation" else "is all zeros"
        raise InputError(f"sample {int(flat[0])} {what}, so its {metric} distance is undefined; drop it or use metric='euclidean'")
    unit = x / length[:, None]
    return (1 - unit @ unit.T).clamp_(0, 2).fill_diagonal_(0)


def upper(matrix: torch.Tensor) -> torch.Tensor:
    """The entries above the diagonal of a square matrix, row by row."""
    rows, columns = torch.triu_indices(matrix.shape[0], matrix.shape[1], offset=1)
    return matrix[rows, columns]


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as ``scipy.stats.rankdata``)."""
    order = np.argsort(values, kind="mergesort")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(values))
    ordered = values[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    dense = starts.cumsum()[inverse]
    bounds = np.r_[np.nonzero(starts)[0], len(values)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def correlate(a: np.ndarray, b: np.ndarray, how: str = "spearman") -> float:
    """Spearman (Pearson of average ranks), Pearson, or Kendall's τ-b (needs scipy) of two vectors."""
    _choice(how, RANKINGS, "compare")
    if how == "kendall":
        try:
            from scipy.stats import kendalltau
        except ImportError:
            raise InputError("compare='kendall' needs scipy (pip install scipy); or use compare='spearman'") from None
        return float(kendalltau(a, b).statistic)
    if how == "spearman":
        a, b = rank_average(a), rank_average(b)
    a, b = a - a.mean(), b - b.mean()
    scale = float(np.sqrt((a @ a) * (b @ b)))
    if scale == 0:
        raise InputError("one of the dissimilarity matrices is constant (every pair equally far apart), so no correlation exists")
    return float(a @ b) / scale


def rsa(x: Any, y: Any, metric: str = "correlation", *, compare: str = "spearman") -> float:
    """Representational similarity of ``x`` and ``y`` (same samples, in order): the ``compare``
    correlation (``spearman`` default, ``pearson``, ``kendall``) between the upper triangles of
    their :func:`rdm`\\ s under ``metric`` (``correlation``, ``euclidean``, ``cosine``)."""
    x, y = paired(x, y, 3)
    _choice(compare, RANKINGS, "compare")
    return correlate(upper(rdm(x, metric)).numpy(), upper(rdm(y, metric)).numpy(), compare)


# -- dimensionality -------------------------------------------------------------------------
def spectrum(x: Any) -> torch.Tensor:
    """Eigenvalues of the covariance of ``x`` (descending, negatives from rounding set to 0)."""
    x = as_matrix(x)
    if x.shape[0] < 2:
        raise InputError(f"a spectrum needs at least 2 samples, got {x.shape[0]}")
    x = x - x.mean(dim=0)
    small = x @ x.T if x.shape[0] < x.shape[1] else x.T @ x  # the same non-zero eigenvalues
    return covariance_spectrum(small / (x.shape[0] - 1))


def covariance_spectrum(covariance: torch.Tensor) -> torch.Tensor:
    values = torch.linalg.eigvalsh(covariance.to(torch.float64)).flip(0)
    return values.clamp_min(0)


def effective_rank_of(eigenvalues: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank from covariance eigenvalues (singular values ∝ √λ)."""
    singular = eigenvalues.clamp_min(0).sqrt()
    total = float(singular.sum())
    if total == 0:
        return 0.0
    p = singular[singular > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio_of(eigenvalues: torch.Tensor) -> float:
    total = float(eigenvalues.sum())
    squares = float(eigenvalues.square().sum())
    return total * total / squares if squares > 0 else 0.0


def effective_rank(x: Any) -> float:
    """Roy & Vetterli's effective rank of ``x`` ``[n, d]`` (centered): exp of the entropy of its
    singular values normalised to sum 1; 0 for a constant representation."""
    return effective_rank_of(spectrum(x))


def participation_ratio(x: Any) -> float:
    """``(Σλ)² / Σλ²`` over the eigenvalues λ of the covariance of ``x`` ``[n, d]``; 0 for a
    constant representation."""
    return participation_ratio_of(spectrum(x))


__all__ = ["cka", "hsic", "gram", "rdm", "rsa", "effective_rank", "participation_ratio"]
