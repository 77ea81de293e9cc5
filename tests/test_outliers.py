"""Outlier channels: the streaming accumulator against numpy/scipy on full matrices, and
``outlier_channels`` on a tiny model against a naive computation from its raw hidden states
(padding dropped by hand)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from actscope.errors import DataError, InputError
from actscope.metrics.outliers import ChannelOutlierStats, median_relative_error, outlier_channels
from actscope.zoo.tiny import tiny_model

LO, HI, BINS = 1e-6, 1e6, 50


def synthetic() -> np.ndarray:
    """[500, 7] channels: Gaussian, heavy-tailed, planted outlier, constant, mostly zero,
    tiny (under lo), huge (over hi)."""
    rng = np.random.default_rng(0)
    n = 500
    x = np.stack([
        rng.normal(0.3, 1.0, n),
        rng.standard_t(3, n) * 5,
        np.where(rng.random(n) < 0.02, 300.0, rng.normal(0, 0.5, n)),
        np.full(n, 2.5),
        np.where(rng.random(n) < 0.7, 0.0, rng.normal(0, 1, n)),
        rng.normal(0, 1e-7, n),
        rng.normal(0, 1e7, n),
    ], axis=1)
    return x


def stream(x: np.ndarray, chunks=(1, 60, 0, 139, 300)) -> ChannelOutlierStats:
    stats = ChannelOutlierStats(x.shape[1], LO, HI, BINS)
    start = 0
    for size in chunks:  # uneven chunks, an empty one, a single row: exercises the merge
        stats.update(torch.as_tensor(x[start:start + size], dtype=torch.float32))
        start += size
    assert start == len(x)
    return stats


def test_accumulator_matches_numpy_and_scipy():
    x = synthetic().astype(np.float32).astype(np.float64)  # the values the float32 stream sees
    stats = stream(x)
    np.testing.assert_array_equal(stats.max_abs.numpy(), np.abs(x).max(0))
    assert stats.count.tolist() == [len(x)] * x.shape[1]
    kurt = stats.kurtosis().numpy()
    spread = x.std(0) > 0
    expected = scipy.stats.kurtosis(x[:, spread], axis=0, fisher=True, bias=True)
    np.testing.assert_allclose(kurt[spread], expected, rtol=1e-6)
    assert np.isnan(kurt[3])  # a constant channel has no kurtosis
    assert kurt[1] > 1 and kurt[2] > 30 and abs(kurt[0]) < 1  # heavy tails, planted outlier, Gaussian
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-9, atol=1e-12)


def test_median_within_one_bin_and_bracketed():
    x = synthetic().astype(np.float32).astype(np.float64)
    estimate, lower, upper = (t.numpy() for t in stream(x).median())
    true = np.median(np.abs(x), axis=0)
    assert np.all(lower <= true) and np.all(true <= upper)  # the bracket always holds
    bound = median_relative_error(BINS)
    inside = (true >= LO) & (true < HI)
    assert inside.tolist() == [True, True, True, True, False, False, False]
    ratio = estimate[inside] / true[inside]
    assert np.all(ratio <= 1 + bound) and np.all(ratio >= 1 / (1 + bound)), ratio
    assert estimate[4] == 0.0 and true[4] == 0.0  # mostly-zero channel: exact zero median
    assert estimate[5] == LO and upper[5] == LO  # under lo: reads as lo, bracket [0, lo]
    assert lower[6] == HI and upper[6] == np.abs(x[:, 6]).max()  # over hi: bracket [hi, max]


def test_even_count_median_averages_the_two_middle_values():
    x = np.array([[1.0, -3.0], [-1.0, 0.0], [100.0, 5.0], [-100.0, 0.0]])  # medians 50.5 and 1.5
    stats = ChannelOutlierStats(2)
    stats.update(torch.as_tensor(x))
    estimate, lower, upper = (t.numpy() for t in stats.median())
    true = np.median(np.abs(x), axis=0)
    assert np.all(np.abs(estimate / true - 1) <= median_relative_error(50))
    assert np.all(lower <= true) and np.all(true <= upper)
    assert upper[0] >= 100 and lower[0] <= 1  # the bracket spans both middle values' bins


def test_median_bound_is_tight_enough_to_matter():
    """Many random channels: the error stays inside the bound, and a coarser histogram is
    measurably worse (so the bound is not vacuous)."""
    rng = np.random.default_rng(1)
    x = np.exp(rng.normal(0, 3, (301, 200)))  # odd count: numpy's median is one order statistic
    true = np.median(x, axis=0)
    for bins in (10, 50):
        stats = ChannelOutlierStats(200, LO, HI, bins)
        stats.update(torch.as_tensor(x))
        error = np.abs(np.log10(stats.median()[0].numpy() / true))
        assert error.max() <= math.log10(1 + median_relative_error(bins)) + 1e-12
        assert error.max() > 0.5 * math.log10(1 + median_relative_error(bins))


def test_nonfinite_entries_are_left_out():
    x = synthetic()[:, :3].copy()
    x[5, 0], x[7, 1], x[9, 1] = np.nan, np.inf, -np.inf
    stats = ChannelOutlierStats(3)
    stats.update(torch.as_tensor(x))
    assert stats.nonfinite.tolist() == [1, 2, 0]
    assert stats.count.tolist() == [len(x) - 1, len(x) - 2, len(x)]
    for c in range(3):
        clean = x[:, c][np.isfinite(x[:, c])]
        assert stats.max_abs[c].item() == np.abs(clean).max()
        assert stats.kurtosis()[c].item() == pytest.approx(scipy.stats.kurtosis(clean, fisher=True, bias=True), rel=1e-6)


# -- on a model ---------------------------------------------------------------------------------
def padded_llama():
    model, inputs = tiny_model("llama")
    inputs["attention_mask"][1, 3:] = 0  # example 1 has 3 real tokens and 3 of padding
    return model, inputs


def naive_resid(model, inputs) -> dict[int, np.ndarray]:
    """resid.post of every block on the real tokens: hidden_states[i + 1], mask applied by hand."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    keep = inputs["attention_mask"].bool()
    # Llama's last hidden state is after the final norm; resid.post of the last block is its input.
    return {i: out.hidden_states[i + 1][keep].double().numpy() for i in range(model.config.num_hidden_layers - 1)}


def test_outlier_channels_on_a_model_match_a_naive_computation():
    model, inputs = padded_llama()
    result = outlier_channels(model, [inputs], sites="blocks.0.resid.post", threshold=3.0)
    table = result.to_table()
    a = naive_resid(model, inputs)[0]  # [9 real tokens, 32]
    assert table["count"].tolist() == [9] * 32
    np.testing.assert_array_equal(table["channel"], np.arange(32))
    np.testing.assert_allclose(table["max_abs"], np.abs(a).max(0), rtol=1e-6)
    np.testing.assert_allclose(table["kurtosis"], scipy.stats.kurtosis(a, axis=0, fisher=True, bias=True), rtol=1e-6, atol=1e-9)
    true = np.median(np.abs(a), axis=0)
    bound = median_relative_error(50) * 1.0001  # float32 model vs float64 reference
    assert np.all(table["median_abs"] / true <= 1 + bound) and np.all(table["median_abs"] / true >= 1 / (1 + bound))
    np.testing.assert_allclose(table["ratio"], table["max_abs"] / table["median_abs"], rtol=1e-12)
    summary = result.summary().to_table()
    assert summary["outlier_channels"].tolist() == [int((table["ratio"] > 3.0).sum())]
    assert summary["tokens"].tolist() == [9]
    assert summary["max_ratio_channel"].tolist() == [int(np.argmax(table["ratio"]))]
    assert result.summary(threshold=1e9).to_table()["outlier_channels"].tolist() == [0]


def test_padding_is_excluded():
    model, inputs = padded_llama()
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][1, 3:] = 77  # change only the padded tokens
    first = outlier_channels(model, [inputs]).to_table()
    second = outlier_channels(model, [other]).to_table()
    for key in ("count", "max_abs", "median_abs", "kurtosis"):
        np.testing.assert_array_equal(first[key], second[key])
    alone = outlier_channels(model, [{k: v[1:, :3] for k, v in inputs.items()}, {k: v[:1] for k, v in inputs.items()}])
    np.testing.assert_array_equal(alone.to_table()["count"], first["count"])
    # The float32 model itself rounds differently at another batch shape: 1e-4, not 1e-6.
    np.testing.assert_allclose(alone.to_table()["kurtosis"], first["kurtosis"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(alone.to_table()["max_abs"], first["max_abs"], rtol=1e-5)


def test_module_sites_of_a_cnn_use_channels():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    images = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    result = outlier_channels(net, [{"input": images}], sites="module:0@output").to_table()
    with torch.no_grad():
        a = net[0](images).permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()  # [2·4·4, 4]
    assert result["count"].tolist() == [32] * 4
    np.testing.assert_allclose(result["max_abs"], np.abs(a).max(0), rtol=1e-6)
    np.testing.assert_allclose(result["kurtosis"], scipy.stats.kurtosis(a, axis=0), rtol=1e-6)


def test_text_data_through_the_tokenizer(minilm):
    texts = ["The cat sat on the mat.", "Rain again today, and the river rose over the road."]
    result = outlier_channels(minilm, texts, sites="blocks.5.resid.post").to_table()
    tokens = minilm.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = minilm.module(**tokens, output_hidden_states=True).hidden_states[6]
    a = hidden[tokens["attention_mask"].bool()].double().numpy()
    assert result["count"].tolist() == [int(tokens["attention_mask"].sum())] * a.shape[1]
    np.testing.assert_allclose(result["max_abs"], np.abs(a).max(0), rtol=1e-5)
    np.testing.assert_allclose(result["kurtosis"], scipy.stats.kurtosis(a, axis=0), rtol=1e-5, atol=1e-8)


def test_bad_input_is_refused():
    model, inputs = padded_llama()
    with pytest.raises(InputError, match="threshold"):
        outlier_channels(model, [inputs], threshold=0)
    with pytest.raises(InputError, match="bins_per_decade"):
        outlier_channels(model, [inputs], bins_per_decade=0)
    with pytest.raises(InputError, match="whole number"):
        outlier_channels(model, [inputs], lo=1e-6, hi=3e5, bins_per_decade=1)
    with pytest.raises(InputError, match="no channels"):
        outlier_channels(model, [inputs], sites="blocks.0.attn.pattern")
    with pytest.raises(DataError):
        outlier_channels(model, [])
    with pytest.raises(InputError, match=r"\[N, 3\]"):
        ChannelOutlierStats(3).update(torch.zeros(2, 4))
