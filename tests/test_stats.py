"""Accumulators in actscope.stats against naive full-tensor computations in numpy float64."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from actscope.errors import InputError
from actscope.stats import (
    DEFAULT_EPS,
    AbsHistogram,
    HeadSink,
    SiteStats,
    ThresholdLadder,
    TopExamples,
    UnitMoments,
)

RTOL = 1e-6
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
CHUNKS = (3, 0, 1, 17)  # uneven, with an empty update; the rest goes in a last chunk


# -- data -----------------------------------------------------------------------------------
def make_site(dtype=torch.float32, b=5, t=11, u=13, seed=0, plant_nonfinite=False):
    """Real tokens ``x`` [N, U] and their global ids ``tok`` [N], selected from a padded batch.

    Units 0-3 are ReLU-like (exact zeros), unit 4 is all zero (dead), unit 5 never positive;
    magnitudes span 1e-8 .. 1e5 so the histogram sees underflow and overflow.
    """
    torch.manual_seed(seed)
    mag = 10 ** (torch.rand(b, t, u, dtype=torch.float64) * 13 - 8)
    x = torch.randn(b, t, u, dtype=torch.float64) * mag  # [B, T, U]
    x[..., :4] = x[..., :4].clamp(min=0)
    x[..., 4] = 0.0
    x[..., 5] = -x[..., 5].abs()
    lengths = torch.tensor([t, 1, 7, 0, 4])[:b]
    mask = torch.arange(t) < lengths.unsqueeze(1)  # [B, T] right padding, one empty row
    mask[0, :2] = False  # and some left padding
    x[~mask] = 1e9  # padding garbage: would show in every statistic if it leaked
    if plant_nonfinite:
        x[0, 2, 0], x[0, 3, 0], x[2, 0, 1] = math.nan, math.inf, -math.inf
        x[0, 4, 7], x[2, 5, 7] = math.nan, math.inf
        x[..., 6] = math.nan  # a unit that never has a finite value
        x[2, 1, :] = math.nan  # a token with no finite value at all
    tok_grid = torch.arange(b * t).view(b, t)
    x = x.to(dtype)
    return x[mask], tok_grid[mask]  # [N, U], [N]


def feed(acc, x, tok=None, sizes=CHUNKS):
    """Update ``acc`` with ``x`` (and ``tok``) in chunks of the given sizes, then the rest."""
    start = 0
    for size in (*sizes, x.shape[0]):
        stop = min(start + size, x.shape[0])
        acc.update(x[start:stop], None if tok is None else tok[start:stop])
        start = stop
    return acc


def as_np(x):
    return x.to(torch.float64).numpy()


def finite_columns(a):
    """Per unit, its finite entries (the naive reference works one column at a time)."""
    return [col[np.isfinite(col)] for col in a.T]


def assert_close(actual, expected, rtol=RTOL):
    actual = actual.numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0)


def assert_exact(actual, expected):
    actual = actual.numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_array_equal(actual, np.asarray(expected))


def assert_states_equal(sd1, sd2, rtol=1e-9):
    """Two state dicts hold the same values (floats to rtol, everything else exactly)."""
    assert sd1.keys() == sd2.keys()
    for key in sd1:
        a, b = sd1[key], sd2[key]
        if isinstance(a, dict):
            assert_states_equal(a, b, rtol)
        elif isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            if a.is_floating_point():
                np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=rtol, atol=0, err_msg=key)
            else:
                assert torch.equal(a, b), key
        else:
            assert a == b, key


# -- naive references -----------------------------------------------------------------------
def naive_moments(a):
    cols = finite_columns(a)
    stat = lambda f: np.array([f(c) if c.size else np.nan for c in cols])  # noqa: E731
    return {
        "count": np.array([c.size for c in cols]),
        "nonfinite": (~np.isfinite(a)).sum(0),
        "mean": stat(np.mean),
        "var": stat(np.var),
        "std": stat(np.std),
        "min": stat(np.min),
        "max": stat(np.max),
    }


def fires(a, criterion, eps):
    """[N, U] bool: finite entries firing under criterion (0: a > 0, j + 1: |a| > eps[j])."""
    with np.errstate(invalid="ignore"):
        hit = a > 0 if criterion == 0 else np.abs(a) > eps[criterion - 1]
    return hit & np.isfinite(a)


def naive_firing_hist(a, eps):
    n, u = a.shape
    hist = np.zeros((1 + len(eps), u + 1), dtype=np.int64)
    for token in range(n):  # explicit loop over tokens and criteria
        for c in range(1 + len(eps)):
            hist[c, fires(a[token : token + 1], c, eps).sum()] += 1
    return hist


def naive_histogram(a, edges, lo, hi):
    v = np.abs(a[np.isfinite(a)])
    return {
        "zero": int((v == 0).sum()),
        "underflow": int(((v > 0) & (v < lo)).sum()),
        "overflow": int((v >= hi).sum()),
        "counts": np.histogram(v[(v >= lo) & (v < hi)], bins=edges)[0],
        "nonfinite": int((~np.isfinite(a)).sum()),
    }


def naive_top_values(a, k):
    out = np.full((a.shape[1], k), -np.inf)
    for u, col in enumerate(finite_columns(a)):
        best = np.sort(col)[::-1][:k]
        out[u, : best.size] = best
    return out


# -- UnitMoments ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nonfinite", [False, True])
def test_moments_match_naive(dtype, nonfinite):
    x, _ = make_site(dtype, plant_nonfinite=nonfinite)
    acc = feed(UnitMoments(x.shape[1]), x)
    ref = naive_moments(as_np(x))
    for name in ("count", "nonfinite"):
        assert getattr(acc, name).dtype == torch.int64
        assert_exact(getattr(acc, name), ref[name])
    for name in ("mean", "var", "std", "min", "max"):
        assert getattr(acc, name).dtype == torch.float64
        assert_close(getattr(acc, name), ref[name])
    if nonfinite:
        assert ref["nonfinite"].sum() > 0 and np.isnan(acc.mean[6].item())


def test_moments_are_stable_with_a_large_offset():
    # Sum-of-squares formulas lose every digit here; Chan's combination must not.
    torch.manual_seed(1)
    x = 1e8 + torch.randn(1000, 3, dtype=torch.float64)
    acc = feed(UnitMoments(3), x, sizes=(1, 2, 3, 400))
    assert_close(acc.var, np.var(x.numpy(), axis=0))
    assert_close(acc.mean, np.mean(x.numpy(), axis=0))


def test_moments_before_any_data_are_nan():
    acc = UnitMoments(4)
    acc.update(torch.zeros(0, 4))
    assert_exact(acc.count, [0, 0, 0, 0])
    assert torch.isnan(acc.mean).all() and torch.isnan(acc.var).all()
    assert torch.isnan(acc.min).all() and torch.isnan(acc.max).all()


def test_input_that_needs_grad_or_is_not_contiguous():
    torch.manual_seed(2)
    base = torch.randn(6, 20, requires_grad=True)
    x = base.T  # [20, 6] non-contiguous, part of an autograd graph
    acc = UnitMoments(6)
    acc.update(x)
    assert_close(acc.mean, x.detach().double().numpy().mean(0))


# -- ThresholdLadder ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nonfinite", [False, True])
def test_ladder_matches_naive(dtype, nonfinite):
    x, _ = make_site(dtype, plant_nonfinite=nonfinite)
    a = as_np(x)
    acc = feed(ThresholdLadder(x.shape[1]), x)
    eps = DEFAULT_EPS
    count = np.isfinite(a).sum(0)
    pos = fires(a, 0, eps).sum(0)
    abs_gt = np.stack([fires(a, j + 1, eps).sum(0) for j in range(len(eps))])
    assert_exact(acc.count, count)
    assert_exact(acc.pos, pos)
    assert_exact(acc.abs_gt, abs_gt)
    with np.errstate(invalid="ignore", divide="ignore"):
        assert_close(acc.frac_pos, np.where(count > 0, pos / count, np.nan))
        assert_close(acc.frac_abs_gt, np.where(count > 0, abs_gt / count, np.nan))
    assert_exact(acc.firing_hist, naive_firing_hist(a, eps))
    assert acc.n_tokens == a.shape[0]
    for c in range(1 + len(eps)):
        hit = fires(a, c, eps)
        assert acc.activation_ratio(c) == pytest.approx(hit.mean(), rel=RTOL)
        assert_exact(acc.firing_count(c), hit.sum(0))
        assert_exact(acc.dead_units(c), hit.sum(0) == 0)


def test_ladder_dead_units_follow_the_definition():
    x, _ = make_site(torch.float64, plant_nonfinite=True)
    acc = feed(ThresholdLadder(x.shape[1]), x)
    assert acc.dead_units(0)[4] and acc.dead_units(1)[4]  # all zero: dead under every criterion
    assert acc.dead_units(0)[5] and not acc.dead_units(1)[5]  # negative only: fires on |a|
    assert acc.dead_units(1)[6] and acc.count[6] == 0  # never finite: dead, frac undefined
    assert math.isnan(acc.frac_pos[6].item())
    assert not acc.dead_units(1)[0]


def test_ladder_counts_beyond_a_byte():
    # Large batches: per-unit and per-token counts go past 255 within a single update.
    torch.manual_seed(5)
    x = torch.rand(600, 300) + 0.5  # every unit fires on every token under criteria 0-4
    x[:, :7] = -1.0  # seven units never positive
    acc = ThresholdLadder(300)
    acc.update(x)
    assert_exact(acc.pos, [0] * 7 + [600] * 293)
    assert_exact(acc.abs_gt[3], [600] * 300)
    assert acc.firing_hist[0, 293] == 600 and acc.firing_hist[4, 300] == 600
    assert acc.activation_ratio(0) == pytest.approx(293 / 300, rel=RTOL)


def test_ladder_custom_and_empty_eps():
    x, _ = make_site(torch.float32)
    a = as_np(x)
    for eps in [(0.5,), ()]:
        acc = feed(ThresholdLadder(x.shape[1], eps=eps), x)
        assert acc.n_criteria == 1 + len(eps)
        assert_exact(acc.firing_hist, naive_firing_hist(a, eps))
    assert math.isnan(ThresholdLadder(3).activation_ratio(0))


# -- AbsHistogram ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nonfinite", [False, True])
def test_histogram_matches_numpy(dtype, nonfinite):
    x, _ = make_site(dtype, plant_nonfinite=nonfinite)
    acc = feed(AbsHistogram(), x)
    ref = naive_histogram(as_np(x), acc.edges.numpy(), acc.lo, acc.hi)
    assert_exact(acc.counts, ref["counts"])
    for name in ("zero", "underflow", "overflow", "nonfinite"):
        assert getattr(acc, name) == ref[name], name
    assert ref["zero"] > 0 and ref["underflow"] > 0 and ref["overflow"] > 0
    assert acc.total == np.isfinite(as_np(x)).sum()


def test_histogram_edges():
    acc = AbsHistogram(lo=1e-3, hi=1e2, bins_per_decade=4)
    edges = acc.edges.numpy()
    assert acc.n_bins == 20 and edges.shape == (21,) and acc.counts.shape == (20,)
    assert edges[0] == 1e-3 and edges[-1] == 1e2
    assert_close(edges, 1e-3 * 10 ** (np.arange(21) / 4), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_histogram_values_on_and_next_to_edges(dtype):
    # Each edge opens its bin; the value just below it belongs to the bin before.
    acc = AbsHistogram(lo=1e-2, hi=1e2, bins_per_decade=8)
    edges = acc.edges.to(dtype)
    below = torch.nextafter(edges, torch.zeros_like(edges))
    values = torch.cat([edges, below, -edges]).unsqueeze(1)  # [M, 1]
    acc.update(values)
    ref = naive_histogram(as_np(values), acc.edges.numpy(), acc.lo, acc.hi)
    assert_exact(acc.counts, ref["counts"])
    assert (acc.underflow, acc.overflow) == (ref["underflow"], ref["overflow"])


# -- TopExamples ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nonfinite", [False, True])
def test_top_examples_match_naive(dtype, nonfinite):
    x, tok = make_site(dtype, plant_nonfinite=nonfinite)
    a = as_np(x)
    k = 8
    acc = feed(TopExamples(x.shape[1], k=k), x, tok)
    assert_exact(acc.values, naive_top_values(a, k))  # exact: values are only copied
    value_at = {(int(t), u): a[i, u] for i, t in enumerate(tok) for u in range(a.shape[1])}
    for u in range(a.shape[1]):
        real = acc.tok[u] >= 0
        assert_exact(real, np.isfinite(acc.values[u].numpy()))
        toks = acc.tok[u][real].tolist()
        assert len(set(toks)) == len(toks)  # each token at most once per unit
        for t, v in zip(toks, acc.values[u][real].tolist()):
            assert value_at[(t, u)] == v  # the token id is where the value occurred


def test_top_examples_token_ids_without_ties():
    torch.manual_seed(3)
    x = torch.randn(40, 5, dtype=torch.float64)
    tok = torch.arange(100, 140)
    acc = feed(TopExamples(5, k=4), x, tok)
    order = np.argsort(-x.numpy(), axis=0, kind="stable")[:4].T  # [U, k] rows
    assert_exact(acc.tok, tok.numpy()[order])


def test_top_examples_long_stream_only_touches_beaten_units(monkeypatch):
    # Once every unit holds k examples, only the units whose batch maximum beats their k-th
    # best are re-ranked; late on, unit 0 keeps being beaten while the others rarely are.
    touched = []
    keep_best = TopExamples._keep_best

    def spy(self, values, toks, units=None):
        if units is not None:
            touched.append(units.tolist())
        return keep_best(self, values, toks, units)

    monkeypatch.setattr(TopExamples, "_keep_best", spy)
    torch.manual_seed(4)
    n, u, k = 400, 6, 5
    x = torch.randn(n, u, dtype=torch.float64)
    x[300:, 0] += torch.arange(100, dtype=torch.float64)  # unit 0 keeps being beaten late on
    tok = torch.arange(n) * 3 + 1
    acc = feed(TopExamples(u, k=k), x.float(), tok, sizes=(7,) * 57)
    late = touched[-10:]
    assert all(0 in units for units in late) and any(len(units) < u for units in late)
    a = as_np(x.float())
    assert_exact(acc.values, naive_top_values(a, k))
    order = np.argsort(-a, axis=0, kind="stable")[:k].T
    assert_exact(acc.tok, tok.numpy()[order])


def test_top_examples_pad_when_few_values():
    acc = TopExamples(2, k=5)
    acc.update(torch.tensor([[1.0, math.nan], [3.0, 2.0]]), torch.tensor([7, 9]))
    assert_exact(acc.values, [[3.0, 1.0] + [-np.inf] * 3, [2.0] + [-np.inf] * 4])
    assert_exact(acc.tok, [[9, 7, -1, -1, -1], [9, -1, -1, -1, -1]])
    unit, rank, value, tok = acc.to_rows()
    assert_exact(unit, [0, 0, 1])
    assert_exact(rank, [0, 1, 0])
    assert_exact(value, [3.0, 1.0, 2.0])
    assert_exact(tok, [9, 7, 9])
    assert unit.dtype == rank.dtype == tok.dtype == np.int64 and value.dtype == np.float64


def test_top_examples_ties_are_deterministic():
    x = torch.zeros(30, 3)
    tok = torch.arange(30)
    first = feed(TopExamples(3, k=4), x, tok).tok
    again = feed(TopExamples(3, k=4), x, tok).tok
    assert torch.equal(first, again)
    for row in first.tolist():
        assert row == sorted(row) and len(set(row)) == 4  # ties ordered by token id


# -- HeadSink -------------------------------------------------------------------------------
def make_pattern(dtype=torch.float32, b=3, h=4, q=6, seed=0):
    """Causal softmaxed attention [B, H, Q, Q] and a query mask [B, Q] with padding."""
    torch.manual_seed(seed)
    scores = torch.randn(b, h, q, q, dtype=torch.float64) * 3
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    pattern = torch.softmax(scores.masked_fill(~causal, -math.inf), -1)  # exact zeros above
    query_mask = torch.arange(q) < torch.tensor([q, 2, 4])[:b].unsqueeze(1)
    pattern.transpose(1, 2)[~query_mask] = math.nan  # padded queries: garbage that must be ignored
    return pattern.to(dtype), query_mask


def naive_heads(p, query_mask):
    b, h, q, _ = p.shape
    sums, count = np.zeros((3, h)), np.zeros(h, dtype=np.int64)
    for bi in range(b):
        for hi in range(h):
            for qi in range(q):
                row = p[bi, hi, qi]
                if not query_mask[bi, qi] or not np.isfinite(row).all():
                    continue
                nz = row[row > 0]
                sums[:, hi] += (row[0], row.max(), -(nz * np.log(nz)).sum())
                count[hi] += 1
    return sums / count, count


@pytest.mark.parametrize("dtype", DTYPES)
def test_head_sink_matches_naive(dtype):
    pattern, query_mask = make_pattern(dtype)
    acc = HeadSink(4)
    acc.update(pattern[:2], query_mask[:2])
    acc.update(pattern[2:], query_mask[2:])
    acc.update(pattern[:0], query_mask[:0])
    means, count = naive_heads(as_np(pattern), query_mask.numpy())
    assert_exact(acc.count, count)
    assert_exact(acc.nonfinite, [0, 0, 0, 0])
    assert_close(acc.first_token_attention, means[0])
    assert_close(acc.mean_max_attention, means[1])
    assert_close(acc.mean_entropy, means[2])


def test_head_sink_counts_nonfinite_rows_apart():
    pattern, query_mask = make_pattern(torch.float32)
    pattern[0, 1, 3, 2] = math.nan  # one real query of head 1
    pattern[1, 2, 0, 0] = math.inf  # one real query of head 2
    acc = HeadSink(4)
    acc.update(pattern, query_mask)
    means, count = naive_heads(as_np(pattern), query_mask.numpy())
    assert_exact(acc.nonfinite, [0, 1, 1, 0])
    assert_exact(acc.count, count)
    assert_close(acc.first_token_attention, means[0])
    assert_close(acc.mean_entropy, means[2])


def test_head_sink_merge_and_round_trip():
    pattern, query_mask = make_pattern(torch.float64)
    whole, left, right = HeadSink(4), HeadSink(4), HeadSink(4)
    whole.update(pattern, query_mask)
    left.update(pattern[:1], query_mask[:1])
    right.update(pattern[1:], query_mask[1:])
    assert left.merge(right) is left
    assert_states_equal(left.state_dict(), whole.state_dict())
    assert_states_equal(HeadSink.from_state_dict(whole.state_dict()).state_dict(),
                        whole.state_dict(), rtol=0)
    assert math.isnan(HeadSink(2).first_token_attention[0].item())


def test_head_sink_rejects_bad_input():
    pattern, query_mask = make_pattern(torch.float32)
    with pytest.raises(InputError, match="built for 5 heads but pattern has 4"):
        HeadSink(5).update(pattern, query_mask)
    with pytest.raises(InputError, match=r"query_mask must be a bool tensor \[batch, query\]"):
        HeadSink(4).update(pattern, query_mask.long())
    with pytest.raises(InputError, match=r"pattern must be a floating tensor \[batch, head"):
        HeadSink(4).update(pattern[0], query_mask)
    with pytest.raises(InputError, match="n_heads differs"):
        HeadSink(4).merge(HeadSink(3))
    with pytest.raises(InputError, match="n_heads must be at least 1"):
        HeadSink(0)


# -- SiteStats ------------------------------------------------------------------------------
@pytest.fixture(params=["fused", "torch"])
def stats_path(request, monkeypatch):
    """Run a SiteStats test through the C kernel and through the pure-torch path."""
    from actscope.stats import fused

    if request.param == "fused":
        if fused.library() is None:
            pytest.skip("no C compiler: the fused kernel cannot be built here")
        monkeypatch.setenv("ACTSCOPE_FUSED", "1")
    else:
        monkeypatch.setenv("ACTSCOPE_FUSED", "0")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_site_stats_equals_its_parts_fed_alone(dtype, stats_path):
    x, tok = make_site(dtype, plant_nonfinite=True)
    u = x.shape[1]
    site = feed(SiteStats(u, eps=(0.0, 0.1), k=3, hist_kwargs={"bins_per_decade": 2}), x, tok)
    parts = {
        "moments": feed(UnitMoments(u), x),
        "ladder": feed(ThresholdLadder(u, eps=(0.0, 0.1)), x),
        "hist": feed(AbsHistogram(bins_per_decade=2), x),
        "top": feed(TopExamples(u, k=3), x, tok),
    }
    # The C kernel sums in another order than torch: equal to rounding, counts exactly.
    for name, part in parts.items():
        assert_states_equal(getattr(site, name).state_dict(), part.state_dict(), rtol=0 if stats_path == "torch" else 1e-9)
    assert site.hist.n_bins == 20 and site.top.k == 3 and site.ladder.eps == (0.0, 0.1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_updates_leave_the_input_untouched(dtype, stats_path):
    x, tok = make_site(dtype)
    before = x.clone()
    feed(SiteStats(x.shape[1]), x, tok)
    assert torch.equal(x, before)


# -- merge, state dicts, errors: every accumulator ------------------------------------------
ACCUMULATORS = {
    "moments": lambda u: UnitMoments(u),
    "ladder": lambda u: ThresholdLadder(u),
    "hist": lambda u: AbsHistogram(),
    "top": lambda u: TopExamples(u, k=4),
    "site": lambda u: SiteStats(u, k=4),
}
CLASSES = {"moments": UnitMoments, "ladder": ThresholdLadder, "hist": AbsHistogram,
           "top": TopExamples, "site": SiteStats}


@pytest.mark.parametrize("name", ACCUMULATORS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_merge_of_halves_equals_one_pass(name, dtype):
    # float64 has no ties, so even the top-k token ids must agree; bf16 exercises rounding.
    x, tok = make_site(dtype, plant_nonfinite=True)
    make = ACCUMULATORS[name]
    half = x.shape[0] // 2
    whole = feed(make(x.shape[1]), x, tok)
    left = feed(make(x.shape[1]), x[:half], tok[:half])
    right = feed(make(x.shape[1]), x[half:], tok[half:], sizes=(2,))
    assert left.merge(right) is left
    sd_merged, sd_whole = left.state_dict(), whole.state_dict()
    if dtype != torch.float64:  # equal values may keep other tokens; compare the values only
        for sd in (sd_merged, sd_whole):
            (sd.get("top", sd)).pop("tok", None)
    assert_states_equal(sd_merged, sd_whole)


@pytest.mark.parametrize("name", ACCUMULATORS)
def test_state_dict_round_trip(name):
    x, tok = make_site(torch.float32, plant_nonfinite=True)
    acc = feed(ACCUMULATORS[name](x.shape[1]), x, tok)
    sd = acc.state_dict()
    assert_states_equal(CLASSES[name].from_state_dict(sd).state_dict(), sd, rtol=0)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # plain types only
    fresh = CLASSES[name].from_state_dict(loaded)
    assert_states_equal(fresh.state_dict(), sd, rtol=0)
    # Loading into an existing accumulator replaces its state, and later updates still work.
    other = feed(ACCUMULATORS[name](x.shape[1]), x[:5], tok[:5])
    other.load_state_dict(sd)
    assert_states_equal(other.state_dict(), sd, rtol=0)
    fresh.update(x[:5], tok[:5])


def test_state_dict_tensors_fit_safetensors():
    from safetensors.torch import load, save

    x, tok = make_site(torch.float32)
    sd = feed(SiteStats(x.shape[1]), x, tok).state_dict()
    tensors = {f"{part}.{key}": value for part in ("moments", "ladder", "hist", "top")
               for key, value in sd[part].items() if isinstance(value, torch.Tensor)}
    restored = load(save(tensors))
    assert all(torch.equal(restored[key], value) for key, value in tensors.items())


@pytest.mark.parametrize("name", ["moments", "ladder", "top", "site"])
def test_unit_count_mismatch_is_refused(name):
    x, tok = make_site(torch.float32)
    acc = ACCUMULATORS[name](x.shape[1])
    with pytest.raises(InputError, match=f"built for {x.shape[1]} units but x has 12"):
        acc.update(x[:, :12], tok)
    with pytest.raises(InputError, match="built for 13 units but x has 12"):
        acc.update(x[:0, :12], tok[:0])  # even an empty update is checked
    with pytest.raises(InputError, match="n_units differs"):
        acc.merge(ACCUMULATORS[name](12))


def test_merge_refuses_other_kinds_and_setups():
    with pytest.raises(InputError, match="can only merge another UnitMoments"):
        UnitMoments(3).merge(ThresholdLadder(3))
    with pytest.raises(InputError, match="eps differs"):
        ThresholdLadder(3).merge(ThresholdLadder(3, eps=(0.0,)))
    with pytest.raises(InputError, match="k differs"):
        TopExamples(3, k=2).merge(TopExamples(3, k=3))
    with pytest.raises(InputError, match="bins_per_decade differs"):
        AbsHistogram().merge(AbsHistogram(bins_per_decade=4))
    with pytest.raises(InputError, match="hi differs"):
        AbsHistogram().merge(AbsHistogram(hi=1e3))
    site, other = SiteStats(3), SiteStats(3, k=2)
    before = site.state_dict()
    with pytest.raises(InputError, match="k differs"):
        site.merge(other)
    assert_states_equal(site.state_dict(), before, rtol=0)


def test_empty_update_is_a_no_op():
    x, tok = make_site(torch.float32)
    acc = feed(SiteStats(x.shape[1]), x, tok)
    before = acc.state_dict()
    acc.update(x[:0], tok[:0])
    assert_states_equal(acc.state_dict(), before, rtol=0)


def test_bad_state_dicts_are_refused():
    sd = UnitMoments(3).state_dict()
    with pytest.raises(InputError, match="written by 'actscope.stats.UnitMoments'"):
        ThresholdLadder.from_state_dict(sd)
    with pytest.raises(InputError, match="n_units=3 but this accumulator has n_units=4"):
        UnitMoments(4).load_state_dict(sd)
    bad = dict(sd, mean=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(InputError, match=r"state_dict\['mean'\] must be a torch.float64 tensor"):
        UnitMoments.from_state_dict(bad)
    with pytest.raises(InputError, match=r"lacks \['m2'\]"):
        UnitMoments.from_state_dict({k: v for k, v in sd.items() if k != "m2"})
    with pytest.raises(InputError, match="version"):
        UnitMoments.from_state_dict(dict(sd, version=99))
    with pytest.raises(InputError, match="eps="):
        ThresholdLadder(3).load_state_dict(ThresholdLadder(3, eps=(0.5,)).state_dict())


def test_bad_arguments_are_refused_with_the_fix():
    x, tok = make_site(torch.float32)
    cases = [
        (lambda: UnitMoments(0), "n_units must be at least 1"),
        (lambda: UnitMoments(2.5), "n_units must be an int"),
        (lambda: UnitMoments(3).update(np.zeros((2, 3))), "must be a torch.Tensor"),
        (lambda: UnitMoments(3).update(torch.zeros(2, 2, 3)), r"x\[mask\]"),
        (lambda: UnitMoments(3).update(torch.zeros(2, 3, dtype=torch.int64)), "x.float()"),
        (lambda: TopExamples(13).update(x), "tok is required"),
        (lambda: SiteStats(13).update(x, None), "tok is required"),
        (lambda: TopExamples(13).update(x, tok[:-1]), "select it with the same mask"),
        (lambda: TopExamples(13).update(x, tok.float()), r"tok.long\(\)"),
        (lambda: TopExamples(13).update(x, tok - 5), "token ids >= 0"),
        (lambda: TopExamples(3, k=0), "k must be an int >= 1"),
        (lambda: ThresholdLadder(3, eps=(0.1, 0.01)), "not strictly increasing"),
        (lambda: ThresholdLadder(3, eps=(-1.0,)), "bad threshold -1.0"),
        (lambda: ThresholdLadder(3, eps=0.1), "eps must be a sequence"),
        (lambda: ThresholdLadder(3).activation_ratio(6), r"criterion must be an int in \[0, 5\]"),
        (lambda: AbsHistogram(lo=0.0), "lo < hi"),
        (lambda: AbsHistogram(lo=1.0, hi=0.5), "lo < hi"),
        (lambda: AbsHistogram(bins_per_decade=0), "bins_per_decade must be an int"),
        (lambda: AbsHistogram(lo=1e-6, hi=5e3), "not a whole number"),
        (lambda: SiteStats(3, hist_kwargs={"bins": 3}), r"unknown hist_kwargs \['bins'\]"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


def test_fused_histogram_and_ladder_are_exact_at_edges(stats_path):
    # Values on and just around every histogram edge and every ε: the kernel's table lookup
    # and float thresholds must bin and compare them exactly as float64 comparisons do.
    hist = AbsHistogram(bins_per_decade=4)
    edges = hist.edges.to(torch.float32)
    eps = (0.0, 1e-3, 1e-2, 0.1, 1.0)
    near = torch.cat([edges, torch.tensor(eps, dtype=torch.float32)])
    values = torch.cat([near, torch.nextafter(near, torch.tensor(0.0)), torch.nextafter(near, torch.tensor(1e9))])
    values = torch.cat([values, -values, torch.tensor([0.0, 1e-40, 3e4, math.inf, math.nan])])
    x = values[: (len(values) // 4) * 4].reshape(-1, 4)
    site = SiteStats(4, eps=eps, k=2, hist_kwargs={"bins_per_decade": 4})
    site.update(x, torch.arange(x.shape[0]))
    a = np.abs(as_np(x).astype(np.float64))
    finite = np.isfinite(a)
    counts, _ = np.histogram(a[finite & (a >= 1e-6) & (a < 1e4)], bins=site.hist.edges.numpy())
    assert_exact(site.hist.counts, counts)
    assert site.hist.zero == int((a == 0).sum()) and site.hist.overflow == int((finite & (a >= 1e4)).sum())
    assert site.hist.underflow == int((finite & (a > 0) & (a < 1e-6)).sum())
    for j, e in enumerate(eps):
        assert_exact(site.ladder.abs_gt[j], (finite & (a > e)).sum(0))


@pytest.mark.parametrize("sizes", [(1, 7, 3, 2, 5), ()], ids=["chunks", "one-batch"])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_site_top_examples_equal_a_naive_sort(k, sizes, stats_path):
    # Small integers: many ties at every rank; batches of 1 to 7 rows, some smaller than k.
    generator = torch.Generator().manual_seed(k)
    x = torch.randint(-3, 4, (60, 9), generator=generator).to(torch.float32)
    x[5, 2], x[17, 4], x[30, 4] = math.inf, math.nan, -math.inf  # never examples
    tok = torch.arange(60, dtype=torch.int64) * 7 + 3  # increasing, as the stream's token ids are
    site = feed(SiteStats(9, k=k), x, tok, sizes=sizes)
    for unit in range(9):
        column = [(float(v), int(t)) for v, t in zip(x[:, unit], tok) if math.isfinite(float(v))]
        best = sorted(column, key=lambda pair: (-pair[0], pair[1]))[:k]  # naive: value desc, then token
        padding = k - len(best)
        assert site.top.values[unit].tolist() == [v for v, _ in best] + [-math.inf] * padding
        if stats_path == "fused":  # torch.topk may keep any of the tokens tied at the k-th value
            assert site.top.tok[unit].tolist() == [t for _, t in best] + [-1] * padding


# -- the fused kernel's histogram slot paths --------------------------------------------------
# _fused.c finds a value's slot from a register window (AVX-512) or from two tables (any CPU),
# and counts slots one by one or per pair of neighbours (blocks of at least 4 * n_slots**2
# values, n_slots <= 181). Each build below must bin exactly as float64 comparisons do.
SLOT_BUILDS = {
    "native": (["-O3", "-march=native"],),  # the window wherever the CPU has AVX-512
    "tables": (["-O3", "-march=native", "-DACTSCOPE_TABLE_SLOTS"], ["-O3", "-DACTSCOPE_TABLE_SLOTS"]),
    "portable": (["-O3", "-march=native", "-mno-avx512f"],),  # as compiled on a CPU without AVX-512
}
HIST_SETUPS = {
    "default": {},  # 8 bins per decade: a 133-key window
    "bpd3": {"lo": 1e-3, "hi": 1e2, "bins_per_decade": 3},  # few slots: pair counters even in small batches
    "bpd16": {"bins_per_decade": 16},  # a 266-key window (9 register pairs)
    "bpd50": {"bins_per_decade": 50},  # window too large and too many slots for pairs: tables, lanes
    "wide": {"lo": 1e-30, "hi": 1e30, "bins_per_decade": 1},  # window too large
}


@pytest.fixture(scope="module")
def slot_builds(tmp_path_factory):
    """The kernel compiled as SLOT_BUILDS says; None for a build this machine cannot make."""
    import ctypes
    import shutil
    import subprocess
    from importlib import resources

    from actscope.stats import fused

    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler: the fused kernel cannot be built here")
    folder = tmp_path_factory.mktemp("kernels")
    libs = {}
    with resources.as_file(resources.files("actscope.stats").joinpath(fused.SOURCE)) as source:
        for name, flag_sets in SLOT_BUILDS.items():
            libs[name] = None
            for flags in flag_sets:
                target = folder / f"{name}.so"
                command = [compiler, *flags, "-fPIC", "-shared", "-o", str(target), str(source), "-lm"]
                if subprocess.run(command, capture_output=True).returncode == 0:
                    libs[name] = ctypes.CDLL(str(target))
                    break
    return libs


def cpu_has_avx512f():
    """Whether the CPU lists avx512f (Linux); None where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as info:
            return "avx512f" in info.read().split()
    except OSError:
        return None


def slot_probe_values(hist):
    """float32 |a| probes: every edge's nearest float and its neighbours, the floats around each
    key boundary (first, last and middle float of every key) from below lo to above hi,
    subnormals, zero, far outside [lo, hi), ±inf, NaNs with other payloads, and log-uniform
    values; each with both signs. [M] float32."""
    from actscope.stats import fused

    f32 = np.float32
    near = hist.edges.numpy().astype(f32)
    edges = np.concatenate([near, np.nextafter(near, f32(0)), np.nextafter(near, f32(np.inf))])
    _, key_shift, _ = fused.slot_tables(tuple(hist.edges.tolist()))
    key_lo, key_hi = (int(np.asarray(v, dtype=f32).view(np.uint32)) >> key_shift for v in (hist.lo, hist.hi))
    keys = np.arange(key_lo - 3, key_hi + 4, dtype=np.int64)
    starts = keys << key_shift
    boundary = np.concatenate([starts, starts - 1, starts + (1 << (key_shift - 1))]).astype(np.uint32).view(f32)
    tiny = np.finfo(f32).tiny
    special = np.array(
        [0.0, np.finfo(f32).smallest_subnormal, 1e-40, np.nextafter(tiny, f32(0)), tiny, 1e-20,
         hist.lo / 1e3, hist.hi * 1e3, 1e20, np.finfo(f32).max, np.inf, np.nan], dtype=f32)
    nans = np.array([0x7F800001, 0x7FC00001, 0x7FFFFFFF], dtype=np.uint32).view(f32)  # other NaN payloads
    rng = np.random.default_rng(0)
    spread = (10 ** rng.uniform(math.log10(hist.lo) - 2, math.log10(hist.hi) + 2, 4000)).astype(f32)
    magnitudes = np.concatenate([edges, boundary, special, nans, spread])
    return np.concatenate([magnitudes, -magnitudes])


def naive_slots(x, edges):
    """[zero, underflow, overflow, nonfinite, bins…] of |x| by float64 comparisons."""
    with np.errstate(invalid="ignore"):  # the signalling NaN probe
        a = np.abs(x.astype(np.float64)).ravel()
    finite = np.isfinite(a)
    lo, hi = edges[0], edges[-1]
    inside = finite & (a >= lo) & (a < hi)
    bins = np.bincount(np.searchsorted(edges, a[inside], side="right") - 1, minlength=len(edges) - 1)
    head = [(a == 0).sum(), (finite & (a > 0) & (a < lo)).sum(), (finite & (a >= hi)).sum(), (~finite).sum()]
    return np.concatenate([np.array(head), bins])


@pytest.mark.parametrize("setup", list(HIST_SETUPS))
@pytest.mark.parametrize("build", list(SLOT_BUILDS))
def test_fused_slot_paths_bin_probes_exactly(build, setup, slot_builds, monkeypatch):
    from actscope.stats import fused

    lib = slot_builds[build]
    if lib is None:
        pytest.skip(f"this compiler cannot make the {build} build")
    monkeypatch.setattr(fused, "library", lambda: lib)
    hist = AbsHistogram(**HIST_SETUPS[setup])
    values = slot_probe_values(hist)
    rng = np.random.default_rng(1)
    # Small: one short block (single counters unless n_slots is small); large: blocks of 256 and
    # 45 columns (odd: a value left over from the pairs), long enough for the pair counters.
    for rows, units in ((math.ceil(len(values) / 13), 13), (1200, 301)):
        x = rng.permutation(np.resize(values, rows * units)).reshape(rows, units)  # [N, U]
        assert set(values.view(np.uint32)) <= set(x.ravel().view(np.uint32))  # every probe is in
        slots = fused.site_partials(torch.from_numpy(x), (0.0,), hist._edges)["slots"]
        expected = naive_slots(x, hist.edges.numpy())
        assert_exact(slots, expected)
        assert (expected > 0).all()  # every slot and bin was exercised


def test_fused_slot_builds_take_the_intended_path(slot_builds):
    from actscope.stats import fused

    assert slot_builds["tables"].actscope_window_slots() == 0
    if slot_builds["portable"] is not None:
        assert slot_builds["portable"].actscope_window_slots() == 0
    if slot_builds["native"] is not None and cpu_has_avx512f() is not None:
        assert slot_builds["native"].actscope_window_slots() == int(cpu_has_avx512f())
    edges = {name: tuple(AbsHistogram(**kw).edges.tolist()) for name, kw in HIST_SETUPS.items()}
    windows = {name: len(fused.slot_window(values)[0]) for name, values in edges.items()}
    assert windows == {"default": 133, "bpd3": 34, "bpd16": 266, "bpd50": 0, "wide": 0}
