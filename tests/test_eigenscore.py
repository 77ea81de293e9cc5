"""EigenScore: the exact score against numpy, the Chebyshev–Hutchinson estimate against the
exact one, and the sampling path on a tiny causal LM against plain forward hooks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import InputError
from actscope.metrics.eigenscore import MEAN_LAST_LAYER, EigenScore, eigenscore, eigenscore_efficient, eigenscore_exact
from actscope.zoo.tiny import tiny_model

import conftest

ALPHA = 1e-3


def numpy_score(z: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    """(slogdet, eigvalsh) versions of mean log λ(cov + αI), cov = numpy.cov over rows."""
    covariance = np.cov(z) + alpha * np.eye(len(z))  # rows are the variables: [K, K]
    sign, logdet = np.linalg.slogdet(covariance)
    assert sign == 1
    return logdet / len(z), float(np.mean(np.log(np.linalg.eigvalsh(covariance))))


def embeddings(k: int, d: int, seed: int) -> np.ndarray:
    """Answers sharing a common direction (as sampled answers do) plus their own parts."""
    rng = np.random.default_rng(seed)
    return 3 * rng.standard_normal((k, d)) + 5 * rng.standard_normal((1, d))


# -- exact --------------------------------------------------------------------------------
@pytest.mark.parametrize("k,d", [(10, 32), (16, 8), (64, 512), (5, 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_matches_numpy(k, d, seed):
    z = embeddings(k, d, seed)
    by_slogdet, by_eigvalsh = numpy_score(z)
    assert eigenscore_exact(z) == pytest.approx(by_slogdet, rel=1e-6)
    assert eigenscore_exact(torch.from_numpy(z).float()) == pytest.approx(by_eigvalsh, rel=1e-5)  # float32 input
    assert eigenscore_exact(z, alpha=0.5) == pytest.approx(numpy_score(z, 0.5)[0], rel=1e-6)


def test_exact_on_a_known_spectrum():
    z = orthogonal_embeddings(np.array([0.1, 1.0, 2.0, 10.0]), d=16, seed=0)
    assert eigenscore_exact(z) == pytest.approx(np.mean(np.log(np.array([0.1, 1.0, 2.0, 10.0]) ** 2 + ALPHA)), rel=1e-9)


def test_identical_answers():
    z = np.tile(np.arange(6.0), (4, 1))  # four copies of one answer: Σ = 3.5·(all ones)
    expected = (3 * math.log(ALPHA) + math.log(4 * 3.5 + ALPHA)) / 4
    assert eigenscore_exact(z) == pytest.approx(expected, rel=1e-9)
    assert eigenscore_efficient(z) == pytest.approx(expected, rel=0.05)
    flat = np.arange(4.0)[:, None] * np.ones((1, 6))  # every answer constant over features: Σ = 0
    assert eigenscore_exact(flat) == pytest.approx(math.log(ALPHA), rel=1e-9)
    assert eigenscore_efficient(flat) == pytest.approx(math.log(ALPHA), rel=1e-9)


# -- efficient ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [10, 24, 64])
@pytest.mark.parametrize("d", [32, 128, 512])
def test_efficient_within_five_percent(k, d):
    for seed in range(3):
        z = embeddings(k, d, 10 * k + d + seed)
        exact = eigenscore_exact(z)
        assert abs(exact) > 1  # relative error is meaningful
        assert eigenscore_efficient(z, seed=seed) == pytest.approx(exact, rel=0.05)


def test_efficient_with_duplicate_answers_and_k_above_d():
    rng = np.random.default_rng(3)
    distinct = 4 * rng.standard_normal((6, 40))
    z = distinct[rng.integers(0, 6, size=20)]  # 20 answers, 6 different ones: 14 eigenvalues at α
    assert eigenscore_efficient(z) == pytest.approx(eigenscore_exact(z), rel=0.05)
    wide = embeddings(64, 16, 4)  # K > d: the d×d form plus (K − d)·log α
    assert eigenscore_efficient(wide) == pytest.approx(eigenscore_exact(wide), rel=0.05)


def orthogonal_embeddings(scales: np.ndarray, d: int, seed: int) -> np.ndarray:
    """Rows orthogonal to each other and to the all-ones vector, so that the covariance is
    exactly diag(scales²): Hutchinson's estimate of a diagonal matrix's trace has no error."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(np.column_stack([np.ones(d), rng.standard_normal((d, len(scales)))]))
    return scales[:, None] * basis[:, 1:].T * math.sqrt(d - 1)


def test_truncation_error_is_within_its_bound():
    scales = np.geomspace(0.01, 30, 12)  # variances 1e-4 .. 900: a badly conditioned spectrum
    z = orthogonal_embeddings(scales, d=48, seed=1)
    exact = float(np.mean(np.log(scales**2 + ALPHA)))
    assert eigenscore_exact(z) == pytest.approx(exact, rel=1e-9)
    assert abs(eigenscore_efficient(z) - exact) <= 1e-3  # the default moments' guarantee
    assert abs(eigenscore_efficient(z, moments=20) - exact) > 1e-2  # too few moments are visibly off


def test_efficient_is_seeded():
    z = embeddings(12, 64, 7)
    assert eigenscore_efficient(z, seed=5) == eigenscore_efficient(z, seed=5)
    assert eigenscore_efficient(z, seed=5) != eigenscore_efficient(z, seed=6)
    assert eigenscore_efficient(z, probes=4, seed=5) != eigenscore_efficient(z, probes=64, seed=5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1e-3}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": "0.1"}, "alpha"),
        ({"probes": 0}, "probes"),
        ({"moments": 0}, "moments"),
        ({"moments": True}, "moments"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        eigenscore_efficient(embeddings(4, 8, 0), **kwargs)


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((1, 5)), np.zeros((5, 1)), np.full((3, 4), np.nan)])
def test_bad_embeddings(bad):
    with pytest.raises(InputError, match="embeddings"):
        eigenscore_exact(bad)
    with pytest.raises(InputError, match="embeddings"):
        eigenscore_efficient(bad)


def test_too_many_moments_needed_is_refused():
    z = 1e6 * embeddings(6, 16, 0)  # condition number ~1e15 with α = 1e-3
    with pytest.raises(InputError, match="moments=N"):
        eigenscore_efficient(z)
    assert math.isfinite(eigenscore_efficient(z, moments=50))


# -- sampling from a causal LM -------------------------------------------------------------
def _zoo_dir():
    from actscope.zoo.lm import TrainConfig, default_dir, is_valid_zoo_dir

    path = default_dir(TrainConfig(activation="relu"))
    return path if is_valid_zoo_dir(path) else None


def _word_tokenizer(size: int):
    words = [f"w{i}" for i in range(2, size)]
    return conftest.word_tokenizer(["<pad>", "<unk>", *words], pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")


@pytest.fixture(scope="module")
def lm():
    """The trained tiny LM when the cache holds it, else a random tiny Llama with a word-level
    tokenizer (the sampling path is the same). Float64, so that a padded batch and one
    unpadded row agree far below the tolerances."""
    path = _zoo_dir()
    if path is not None:
        return actscope.load(path, dtype="float64"), "la pikea"
    module, _ = tiny_model("llama", seed=0)
    return actscope.wrap(module.double(), _word_tokenizer(128)), "w5 w6"


def naive_embedding(model, prompt_ids: list[int], answer: tuple[int, ...], pool: str, hidden_state: int) -> np.ndarray:
    """Hugging Face's ``hidden_states[hidden_state]`` (the output of block hidden_state - 1)
    over one unpadded prompt + answer, by a plain forward hook, pooled over the answer."""
    module = model.module
    seen = []
    block = module.model.layers[hidden_state - 1]
    handle = block.register_forward_hook(lambda mod, args, output: seen.append(output))
    try:
        with torch.no_grad():
            module(input_ids=torch.tensor([prompt_ids + list(answer)]))
    finally:
        handle.remove()
    out = seen[0][0]  # [pos, d]
    answer_rows = out[len(prompt_ids):]
    return (answer_rows.mean(dim=0) if pool == "mean" else answer_rows[-1]).numpy()


# INSIDE's embedding (the default): the last token at hidden_states[(L + 1) // 2]; the variant:
# mean-pooled at the last block; and one mix of the two
VARIANTS = {"inside": ({}, "last", "middle"), "mean-last-layer": (MEAN_LAST_LAYER, "mean", "last"),
            "mean-middle": ({"pool": "mean"}, "mean", "middle")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampled_answers_match_naive_embeddings(lm, variant):
    model, prompt = lm
    options, pool, layer = VARIANTS[variant]
    hidden_state = (model.n_layers + 1) // 2 if layer == "middle" else model.n_layers
    state = torch.get_rng_state()
    result = eigenscore(model, prompt, k=6, max_new_tokens=10, seed=3, **options)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert isinstance(result, EigenScore) and result.site == f"blocks.{hidden_state - 1}.resid.post"
    assert result.pool == pool
    d = model.config.hidden_size
    assert result.embeddings.shape == (6, d) and len(result.answers) == 6
    assert len(set(result.answer_ids)) == 6  # six distinct sampled answers
    assert math.isfinite(result.exact) and math.isfinite(result.efficient)
    eos = model.module.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for answer in result.answer_ids:
        assert 1 <= len(answer) <= 10 and not eos & set(answer[:-1])  # stops at the first end token
        assert len(answer) == 10 or answer[-1] in eos  # ... which it keeps
    prompt_ids = list(model.tokenizer(prompt)["input_ids"])
    expected = np.stack([naive_embedding(model, prompt_ids, answer, pool, hidden_state) for answer in result.answer_ids])
    np.testing.assert_allclose(result.embeddings, expected, rtol=1e-6, atol=0)
    assert result.exact == pytest.approx(eigenscore_exact(result.embeddings), rel=1e-12)
    assert result.efficient == pytest.approx(eigenscore_efficient(result.embeddings, seed=3), rel=1e-12)
    # absolute near 0 (the random-init fallback scores about -0.2), relative beyond
    assert result.efficient == pytest.approx(result.exact, rel=0, abs=0.05 * max(1.0, abs(result.exact)))
    table = result.to_table()
    assert table["tokens"].tolist() == [len(a) for a in result.answer_ids]


def test_sampling_is_seeded(lm):
    model, prompt = lm
    first = eigenscore(model, prompt, k=3, max_new_tokens=6, seed=1)
    again = eigenscore(model, prompt, k=3, max_new_tokens=6, seed=1)
    other = eigenscore(model, prompt, k=3, max_new_tokens=6, seed=2)
    assert first.answer_ids == again.answer_ids and first.exact == again.exact
    assert first.answer_ids != other.answer_ids


def test_other_site(lm):
    model, prompt = lm
    result = eigenscore(model, prompt, k=3, max_new_tokens=5, site="blocks.0.mlp.post")
    assert result.site == "blocks.0.mlp.post"
    assert result.embeddings.shape == (3, model.config.intermediate_size)


def test_sampling_errors(lm):
    model, prompt = lm
    bare, _ = tiny_model("llama", seed=0)
    with pytest.raises(InputError, match="tokenizer"):
        eigenscore(bare, "w5")
    encoder, _ = tiny_model("bert", seed=0)
    with pytest.raises(InputError, match="generate"):
        eigenscore(encoder, "w5", tokenizer=_word_tokenizer(128))
    with pytest.raises(InputError, match="at least 2"):
        eigenscore(model, prompt, k=1)
    with pytest.raises(InputError, match="pool"):
        eigenscore(model, prompt, k=2, pool="max")
    with pytest.raises(InputError, match="exactly one"):
        eigenscore(model, prompt, k=2, site="blocks.*.resid.post")
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0},
                {"alpha": 0.0}, {"probes": 0}, {"moments": -3}):
        with pytest.raises(InputError, match=next(iter(bad))):
            eigenscore(model, prompt, k=2, **bad)
