"""Core neurons (CoreInfer) against naive Python loops over each text's captured activations."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import DataError, InputError, SiteError
from actscope.metrics.core import ceil_fraction, core_neurons, sentence_core, token_core

import conftest

WORDS = "the a cat dog sat ran on under mat rug . and big small red blue".split()
TEXTS = [
    "the cat sat on the mat .",
    "a dog ran",
    "the big red dog sat under a small blue rug and ran",
    "the small cat ran .",
]
SITES = "blocks.1.mlp.post,blocks.0.mlp.post[3,10,20,40,41,42,50,63]"
PREFIXES = (1, 2, 3, 4, 5, 50)  # 4: exactly the length of "a dog ran" with <bos>


# -- naive definitions (exact decimal rounding, Python sorts) ----------------------------------------
def naive_ceil(fraction: float, count: int) -> int:
    return math.ceil(Fraction(str(fraction)) * count)


def naive_token_cores(x: np.ndarray, alpha: float) -> list[set[int]]:
    cores = []
    for row in x:  # one token
        positive = sorted((u for u in range(len(row)) if row[u] > 0), key=lambda u: (-row[u], u))
        cores.append(set(positive[:naive_ceil(alpha, len(positive))]))
    return cores


def naive_sentence_core(x: np.ndarray, alpha: float, beta: float) -> tuple[list[int], set[int]]:
    counts = [0] * x.shape[1]
    for core in naive_token_cores(x, alpha):
        for unit in core:
            counts[unit] += 1
    ranked = sorted((u for u in range(len(counts)) if counts[u] > 0), key=lambda u: (-counts[u], u))
    return counts, set(ranked[:naive_ceil(beta, len(counts))])


def naive_overlap(a: set, b: set) -> tuple[float, float]:
    return len(a & b) / len(b), len(a & b) / len(a | b)


# -- a tiny model with a tokenizer ----------------------------------------------------------------
def word_tokenizer():
    return conftest.word_tokenizer(["<pad>", "<bos>", "<unk>", *WORDS], bos="<bos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Llama in float64: batched-with-padding and alone runs rank units alike."""
    from actscope.zoo.tiny import tiny_model

    module, _ = tiny_model("llama")
    return actscope.wrap(module.double(), tokenizer=word_tokenizer())


def alone(model, ids: list[int], sites: str) -> dict[str, np.ndarray]:
    """Each site's activations of one token sequence run on its own: [tokens, units]."""
    with torch.no_grad(), actscope.capture(model, sites) as cap:
        model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64))
    out = {}
    for site in cap.plan.sites:
        x = cap.tensor(site.label)[0]
        out[site.label] = (x[:, list(site.units)] if site.units else x).numpy()
    return out


# -- the definitions on hand-made numbers -------------------------------------------------------------
@pytest.mark.parametrize("fraction, count, expected", [
    (0.4, 10, 4), (0.4, 3, 2), (0.07, 100, 7), (0.28, 25, 7), (0.55, 100, 55),  # float products 7.000…01 etc.
    (0.7, 10, 7), (0.1, 10, 1), (0.3, 10, 3), (0.2, 1536, 308), (1.0, 7, 7), (0.4, 0, 0), (1e-9, 5, 1),
])
def test_ceil_fraction_is_decimal_ceiling(fraction, count, expected):
    assert ceil_fraction(fraction, count) == expected == naive_ceil(fraction, count)


def test_token_core_ties_rounding_and_non_positive_units():
    x = torch.tensor([
        [3.0, 3.0, 3.0, 1.0, -1.0, 0.0, math.nan, 2.0],  # 5 positive, ties at the top
        [0.0, -1.0, -2.0, 0.0, math.nan, -0.5, 0.0, 0.0],  # nothing positive
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],  # all positive
    ], dtype=torch.float64)
    got = token_core(x, 0.4)
    # ceil(0.4·5) = 2 of {0,1,2 (=3), 7 (=2), 3 (=1)}: the lowest indices of the tie; ceil(0.4·8) = 4.
    assert [set(np.flatnonzero(row)) for row in got.numpy()] == [{0, 1}, set(), {4, 5, 6, 7}]
    assert [set(np.flatnonzero(r)) for r in token_core(x, 1.0).numpy()] == [{0, 1, 2, 3, 7}, set(), set(range(8))]
    tenth = torch.arange(1.0, 11.0, dtype=torch.float64)[None]  # 10 positive units
    assert int(token_core(tenth, 0.7).sum()) == 7 and int(token_core(tenth, 0.1).sum()) == 1
    hundred = torch.arange(1.0, 101.0, dtype=torch.float64)[None]
    assert int(token_core(hundred, 0.07).sum()) == 7  # 0.07 · 100 is 7.000000000000001 in floats


def test_sentence_core_ties_rounding_and_zero_counts():
    counts = np.array([2, 5, 5, 0, 1])
    assert sentence_core(counts, 0.4).tolist() == [1, 2]  # ceil(0.4·5) = 2
    assert sentence_core(counts, 0.5).tolist() == [0, 1, 2]  # ceil(2.5) = 3
    assert sentence_core(counts, 1.0).tolist() == [0, 1, 2, 4]  # the unit counted 0 times stays out
    assert sentence_core(np.array([1, 1, 1, 1]), 0.5).tolist() == [0, 1]  # tie: lower index
    assert len(sentence_core(np.arange(1, 101), 0.55)) == 55  # 0.55 · 100 is 55.00000000000001 in floats


# -- the whole measurement against the naive loops ----------------------------------------------------
@pytest.fixture(scope="module")
def measured(tiny):
    result = core_neurons(tiny, TEXTS, site=SITES, alpha=0.4, beta=0.3, prefixes=PREFIXES, batch_size=3)
    ids = [tiny.tokenizer(text)["input_ids"] for text in TEXTS]
    return result, ids


def test_core_sets_match_naive_loops_on_each_text_alone(tiny, measured):
    result, ids = measured
    assert result.sites == ("blocks.1.mlp.post", "blocks.0.mlp.post[3,10,20,40,41,42,50,63]")
    table = result.to_pandas().set_index(["text", "site"])
    for t, row in enumerate(ids):
        for label, x in alone(tiny, row, SITES).items():
            entry = result.entry(t, label)
            units = entry.units
            expected_tokens = naive_token_cores(x, 0.4)
            got_tokens = [set(np.flatnonzero(r)) for r in result.token_cores(t, label)]
            assert got_tokens == expected_tokens
            assert entry.positive.tolist() == [int((r > 0).sum()) for r in x]
            counts, core = naive_sentence_core(x, 0.4, 0.3)
            assert entry.counts.tolist() == counts
            assert set(result.core_set(TEXTS[t], label).tolist()) == {int(units[u]) for u in core}
            assert table.loc[(t, label), "core_size"] == len(core)
            assert table.loc[(t, label), "core_target"] == naive_ceil(0.3, x.shape[1])
            assert table.loc[(t, label), "tokens"] == len(row)
            assert table.loc[(t, label), "mean_token_core"] == pytest.approx(np.mean([len(c) for c in expected_tokens]), rel=1e-12)
    assert set(result.core_set(0, result.sites[1]).tolist()) <= {3, 10, 20, 40, 41, 42, 50, 63}


def test_stability_curve_matches_prefix_runs(tiny, measured):
    result, ids = measured
    for t, row in enumerate(ids):
        full = {label: naive_sentence_core(x, 0.4, 0.3)[1] for label, x in alone(tiny, row, SITES).items()}
        curve = result.stability(t).to_pandas()
        lengths = sorted({k for k in PREFIXES if k < len(row)} | {len(row)})
        assert sorted(set(curve.prefix_tokens)) == lengths and len(curve) == len(lengths) * len(result.sites)
        for k in lengths:
            for label, x in alone(tiny, row[:k], SITES).items():
                prefix = naive_sentence_core(x, 0.4, 0.3)[1]
                point = curve[(curve.prefix_tokens == k) & (curve.site == label)].iloc[0]
                share, jaccard = naive_overlap(prefix, full[label])
                assert point.core_size == len(prefix) and point.shared == len(prefix & full[label])
                assert point.overlap == pytest.approx(share, rel=1e-12) and point.jaccard == pytest.approx(jaccard, rel=1e-12)
    last = result.stability(site="blocks.1.mlp.post").to_pandas()
    assert (last.groupby("text").overlap.last() == 1.0).all()


def test_similarity_matches_naive_overlap(tiny, measured):
    result, ids = measured
    label = "blocks.1.mlp.post"
    cores = [naive_sentence_core(alone(tiny, row, label)[label], 0.4, 0.3)[1] for row in ids]
    matrix = result.similarity_matrix(label)
    for a in range(len(TEXTS)):
        for b in range(len(TEXTS)):
            assert matrix[a, b] == pytest.approx(naive_overlap(cores[a], cores[b])[0], rel=1e-12)
    pair = result.similarity(0, TEXTS[2]).to_pandas().set_index("site").loc[label]
    assert pair.shared == len(cores[0] & cores[2])
    assert pair.jaccard == pytest.approx(naive_overlap(cores[0], cores[2])[1], rel=1e-12)


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["alpha", "beta"])
@pytest.mark.parametrize("value", [0, -0.1, 1.5, math.nan, "0.4", True])
def test_invalid_alpha_and_beta(tiny, name, value):
    with pytest.raises(InputError, match=name):
        core_neurons(tiny, TEXTS, site="blocks.0.mlp.post", **{name: value})


def test_invalid_texts_sites_and_lookups(tiny, measured):
    with pytest.raises(DataError, match="non-empty list"):
        core_neurons(tiny, "the cat", site="blocks.0.mlp.post")
    with pytest.raises(DataError, match="tokenizes to nothing"):
        core_neurons(actscope.wrap(tiny.module, tokenizer=_no_special(tiny)), ["the cat", ""], site="blocks.0.mlp.post")
    with pytest.raises(InputError, match="prefixes"):
        core_neurons(tiny, TEXTS, site="blocks.0.mlp.post", prefixes=(0, 2))
    with pytest.raises(SiteError, match="attention pattern"):
        core_neurons(tiny, TEXTS, site="blocks.0.attn.pattern")
    result, _ = measured
    with pytest.raises(SiteError, match="several sites"):
        result.core_set(0)
    with pytest.raises(InputError, match="out of range"):
        result.core_set(len(TEXTS), "blocks.1.mlp.post")
    with pytest.raises(InputError, match="not measured"):
        result.similarity("no such text", 0)


def _no_special(model):
    """The same words without the <bos> template, so an empty text has no token at all."""
    tokenizer = word_tokenizer()
    tokenizer.backend_tokenizer.post_processor = None
    return tokenizer


# -- the paper's claim, on the real MiniLM ------------------------------------------------------------
PARAPHRASES = [
    ("The doctor examined the patient carefully.", "The physician checked the sick man thoroughly."),
    ("A cat was sleeping on the sofa.", "A kitten dozed on the couch."),
    ("Stock prices dropped sharply today.", "Shares fell steeply this afternoon."),
    ("He drove his car to work.", "He commuted to the office by automobile."),
    ("It is raining heavily outside.", "There is a downpour out there."),
]


def test_paraphrases_share_more_core_neurons_than_unrelated_sentences(minilm):
    """Last MLP of MiniLM, β = 0.2: every paraphrase pair overlaps more than any unrelated pair
    (measured: paraphrases 0.477-0.55, unrelated at most 0.403)."""
    texts = [text for pair in PARAPHRASES for text in pair]
    matrix = core_neurons(minilm, texts, site="blocks.5.mlp.post", beta=0.2, prefixes=()).similarity_matrix()
    paraphrase = [matrix[2 * i, 2 * i + 1] for i in range(len(PARAPHRASES))]
    unrelated = [matrix[i, j] for i in range(len(texts)) for j in range(len(texts)) if i // 2 != j // 2]
    assert min(paraphrase) > max(unrelated) + 0.05
