"""CKA, HSIC, RSA and effective rank against computations written out here (explicit centering
matrices, the estimators' formulas term by term, scipy's distances and correlations)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import actscope
from actscope.metrics import cka, effective_rank, hsic, participation_ratio, rdm, rsa


def data(seed: int = 0, n: int = 60, d1: int = 12, d2: int = 9):
    """Two related representations: y is a noisy linear read-out of x."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) * rng.uniform(0.3, 3.0, size=d1) + rng.normal(size=d1) * 5
    y = np.tanh(x @ rng.normal(size=(d1, d2)) / 3) + 0.5 * rng.normal(size=(n, d2))
    return x, y


def rbf_gram(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Kornblith et al.'s gram_rbf, as in their notebook."""
    dots = x @ x.T
    norms = np.diag(dots)
    squared = -2 * dots + norms[:, None] + norms[None, :]
    return np.exp(-squared / (2 * sigma**2 * np.median(squared)))


def hsic_plain(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def hsic_song(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. (2012), eq. 5, term by term."""
    n = len(k)
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return float(np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                 - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))


def cka_direct(k, l, estimator=hsic_plain) -> float:  # noqa: E741
    return estimator(k, l) / np.sqrt(estimator(k, k) * estimator(l, l))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matches_the_hsic_formula_on_random_data(kernel, unbiased):
    estimator = hsic_song if unbiased else hsic_plain
    for seed in range(3):
        for n, d1, d2 in ((60, 12, 9), (15, 40, 30)):  # feature space and Gram paths
            x, y = data(seed, n, d1, d2)
            gram = (lambda a: a @ a.T) if kernel == "linear" else rbf_gram
            want = cka_direct(gram(x), gram(y), estimator)
            assert abs(cka(x, y, kernel, unbiased=unbiased) - want) < 1e-10
            assert abs(hsic(x, y, kernel, unbiased=unbiased) - estimator(gram(x), gram(y))) < 1e-9 * max(1.0, abs(estimator(gram(x), gram(y))))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_identical_representations_have_cka_one(kernel, unbiased):
    x, _ = data(1)
    assert abs(cka(x, x, kernel, unbiased=unbiased) - 1.0) < 1e-12
    assert abs(cka(torch.as_tensor(x, dtype=torch.float32), x.astype(np.float32), kernel, unbiased=unbiased) - 1.0) < 1e-6


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(kernel, unbiased):
    x, y = data(2)
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(x.shape[1], x.shape[1])))
    base = cka(x, y, kernel, unbiased=unbiased)
    assert abs(cka(x @ q, y, kernel, unbiased=unbiased) - base) < 1e-10
    assert abs(cka(3.7 * x, 0.01 * y, kernel, unbiased=unbiased) - base) < 1e-10
    assert abs(cka(x @ q * 2.5, y, kernel, unbiased=unbiased) - base) < 1e-10
    # ... but not to an anisotropic scaling, which is what makes the check able to fail
    stretched = x * np.linspace(0.1, 10, x.shape[1])
    assert abs(cka(stretched, y, kernel, unbiased=unbiased) - base) > 1e-3


def test_linear_cka_is_invariant_to_translation_and_falls_for_unrelated_data():
    x, y = data(3)
    assert abs(cka(x + 100.0, y - 7.0) - cka(x, y)) < 1e-9
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 1000)), rng.normal(size=(50, 1000))
    assert cka(a, b) > 0.9  # the plain estimator's bias with few samples and many features
    assert abs(cka(a, b, unbiased=True)) < 0.05  # the unbiased one is near 0


@pytest.mark.parametrize("metric,scipy_name", [("correlation", "correlation"), ("euclidean", "euclidean"), ("cosine", "cosine")])
def test_rdm_matches_scipy(metric, scipy_name):
    from scipy.spatial.distance import pdist, squareform

    x, _ = data(4)
    assert np.abs(rdm(x, metric).numpy() - squareform(pdist(x, scipy_name))).max() < 1e-9


@pytest.mark.parametrize("compare", ["spearman", "pearson", "kendall"])
def test_rsa_is_the_rank_correlation_of_the_rdms(compare):
    from scipy import stats
    from scipy.spatial.distance import pdist

    x, y = data(5)
    for metric in ("correlation", "euclidean", "cosine"):
        a, b = pdist(x, metric), pdist(y, metric)
        want = {"spearman": stats.spearmanr, "pearson": stats.pearsonr, "kendall": stats.kendalltau}[compare](a, b).statistic
        assert abs(rsa(x, y, metric, compare=compare) - want) < 1e-10


def test_rsa_with_ties_uses_average_ranks():
    from scipy import stats
    from scipy.spatial.distance import pdist

    x = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 2]], dtype=float)  # many equal distances
    y = np.array([[0, 0], [2, 0], [0, 1], [3, 1], [2, 5]], dtype=float)
    assert abs(rsa(x, y, "euclidean") - stats.spearmanr(pdist(x), pdist(y)).statistic) < 1e-12


def test_effective_rank_and_participation_ratio_of_a_known_spectrum():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(200, 6))
    basis -= basis.mean(axis=0)  # centered columns: the singular values are exactly s
    q, _ = np.linalg.qr(basis)
    s = np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    x = q * s
    p = s / s.sum()
    assert abs(effective_rank(x) - np.exp(-(p * np.log(p)).sum())) < 1e-9
    lam = s**2
    assert abs(participation_ratio(x) - lam.sum() ** 2 / (lam**2).sum()) < 1e-9
    wide = x @ rng.normal(size=(6, 50))  # more features than directions: still at most 6
    assert effective_rank(wide) <= 6 + 1e-9 and participation_ratio(wide) <= 6 + 1e-9
    assert effective_rank(np.ones((10, 3))) == 0.0


def test_short_paths_and_tensors():
    x, y = data(6)
    assert actscope.metrics.cka is cka
    assert abs(cka(torch.as_tensor(x), torch.as_tensor(y)) - cka(x, y)) < 1e-12
    assert abs(cka(x[:, 0], y) - cka(x[:, :1], y)) < 1e-12  # a 1-D array is one feature


@pytest.mark.parametrize("call,message", [
    (lambda: cka(np.ones((5, 2)), np.ones((6, 2))), "x has 5 samples and y 6"),
    (lambda: cka(np.full((5, 2), np.nan), np.ones((5, 2))), "NaN or infinite"),
    (lambda: cka(np.ones((5, 2)), np.random.default_rng(0).normal(size=(5, 2))), "no variance"),
    (lambda: cka(np.zeros((5, 2, 2)), np.zeros((5, 2))), r"must be \[samples, features\]"),
    (lambda: cka(*data(0), kernel="poly"), "kernel must be one of linear, rbf"),
    (lambda: cka(*data(0), kernel="rbf", max_samples=10), "RBF CKA needs the 60 × 60 Gram matrix"),
    (lambda: cka(*data(0), kernel="rbf", sigma=0), "sigma is the RBF bandwidth"),
    (lambda: cka(np.ones((3, 2)), np.ones((3, 2)), unbiased=True), "at least 4 samples"),
    (lambda: rdm(np.ones((4, 3)), "correlation"), "sample 0 has the same value in every feature"),
    (lambda: rsa(*data(0), compare="distance"), "compare must be one of"),
])
def test_errors_say_what_and_how_to_fix(call, message):
    with pytest.raises(actscope.InputError, match=message):
        call()
