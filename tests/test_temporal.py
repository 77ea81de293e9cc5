"""Temporal (delta) sparsity and the delta L1 loss against naive loops over captured tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import DataError, InputError, SiteError
from actscope.metrics.temporal import TemporalSparsity, delta_l1_loss, temporal_sparsity

import conftest

EPS = (0.0, 1e-3, 1e-2, 1e-1, 0.5)
SITES = "blocks.*.mlp.post,blocks.0.resid.post[1,5,7]"
WORDS = "the a cat dog sat ran on under mat rug . and big small red blue".split()


# -- models and data ----------------------------------------------------------------------------
def relu_llama(dtype=torch.float32, tokenizer=None):
    """The tiny Llama with ReLU, so ε = 0 counts pairs of exact zeros as well."""
    import transformers

    from actscope.zoo.tiny import tiny_config

    config = tiny_config("llama")
    config.hidden_act = "relu"
    torch.manual_seed(0)
    module = transformers.LlamaForCausalLM(config).eval().to(dtype)
    return actscope.wrap(module, tokenizer=tokenizer)


def word_tokenizer():
    """A hand-built word-level tokenizer: <pad>=0, <bos> in front of every text."""
    return conftest.word_tokenizer(["<pad>", "<bos>", "<unk>", *WORDS], bos="<bos>", pad_token="<pad>", unk_token="<unk>")


def padded_batches():
    """Two calls of different widths: right padding, left padding, a hole, a 1-token row."""
    generator = torch.Generator().manual_seed(3)
    masks = [
        torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1, 0]]),
        torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]),
    ]
    return [{"input_ids": torch.randint(3, 128, m.shape, generator=generator), "attention_mask": m} for m in masks]


def captured(model, batches, sites):
    """Per site, a list of (raw tensor [batch, pos, units], mask [batch, pos]) per call."""
    out: dict[str, list] = {}
    for batch in batches:
        with torch.no_grad(), actscope.capture(model, sites) as cap:
            model(**batch)
        for site in cap.plan.sites:  # raw tensors hold every unit: select as the site does
            x = cap.tensor(site.label)
            x = x[..., list(site.units)] if site.units else x
            out.setdefault(site.label, []).append((x, batch["attention_mask"].bool()))
    return out


def naive(calls, eps):
    """Plain loops: every (row, t) with real tokens at t−1 and t is a pair."""
    units = calls[0][0].shape[-1]
    le, zero = np.zeros((len(eps), units), np.int64), np.zeros((len(eps), units), np.int64)
    abs_sum, pairs, tokens = np.zeros(units), 0, 0
    for x, mask in calls:
        x = x.double().numpy()
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                if mask[b, t]:
                    tokens += 1
                    for j, e in enumerate(eps):
                        zero[j] += np.abs(x[b, t]) <= e
                if t == 0 or not (mask[b, t] and mask[b, t - 1]):
                    continue
                delta = np.abs(x[b, t] - x[b, t - 1])
                pairs += 1
                abs_sum += delta
                for j, e in enumerate(eps):
                    le[j] += delta <= e
    return dict(le=le, zero=zero, abs_sum=abs_sum, pairs=pairs, tokens=tokens)


def check_site(result: TemporalSparsity, label: str, expected: dict, eps) -> None:
    entry = result.site(label)
    assert entry.pairs == expected["pairs"] and entry.tokens == expected["tokens"]
    np.testing.assert_array_equal(entry.le, expected["le"])
    np.testing.assert_array_equal(entry.zero, expected["zero"])
    np.testing.assert_allclose(entry.abs_delta_sum, expected["abs_sum"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(result.unit_fractions(label), expected["le"] / expected["pairs"], rtol=1e-12)
    table = result.to_pandas().set_index(["site", "eps"])
    units = expected["le"].shape[1]
    for j, e in enumerate(eps):
        row = table.loc[(label, e)]
        assert row["temporal_sparsity"] == pytest.approx(expected["le"][j].sum() / (expected["pairs"] * units), rel=1e-12)
        assert row["activation_sparsity"] == pytest.approx(expected["zero"][j].sum() / (expected["tokens"] * units), rel=1e-12)
        assert row["mean_abs_delta"] == pytest.approx(expected["abs_sum"].sum() / (expected["pairs"] * units), rel=1e-6)


# -- streaming metric -------------------------------------------------------------------------------
def test_matches_naive_loop_and_pairs_never_cross_padding():
    model = relu_llama()
    batches = padded_batches()
    result = temporal_sparsity(model, batches, sites=SITES, eps=EPS)
    calls = captured(model, batches, SITES)
    assert [s.site for s in result.sites] == list(calls)
    # Pairs: 6 + 2 + 4 + (1 + 2) in the first call, 4 + 0 in the second.
    assert {s.pairs for s in result.sites} == {19}
    for label, site_calls in calls.items():
        check_site(result, label, naive(site_calls, EPS), EPS)
    expected_relu = naive(calls["blocks.1.mlp.post"], EPS)
    assert 0 < expected_relu["le"][0].sum() < expected_relu["le"][-1].sum()  # ε = 0 catches exact zeros
    units = result.unit_pandas()
    resid = units[units.site == "blocks.0.resid.post[1,5,7]"]
    assert resid.unit.tolist() == [1, 5, 7]
    np.testing.assert_allclose(resid["frac_delta_le_0.01"], result.unit_fractions("blocks.0.resid.post[1,5,7]")[2])


def test_text_data_pairs_stay_inside_each_text():
    """Texts batched with padding (float64 model) against each text run alone."""
    tokenizer = word_tokenizer()
    model = relu_llama(torch.float64, tokenizer)
    texts = ["the cat sat on the mat .", "a dog ran", "the big red dog sat under a small blue rug and ran"]
    result = temporal_sparsity(model, texts, sites="blocks.1.mlp.post", eps=EPS, batch_size=2)
    alone = [{k: torch.tensor([v]) for k, v in tokenizer(text).items() if k in ("input_ids", "attention_mask")} for text in texts]
    calls = captured(model, alone, "blocks.1.mlp.post")["blocks.1.mlp.post"]
    expected = naive(calls, EPS)
    assert expected["pairs"] == sum(len(t.split()) for t in texts)  # <bos> + words: one pair per word
    check_site(result, "blocks.1.mlp.post", expected, EPS)


def test_frame_axis_of_a_plain_module():
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    generator = torch.Generator().manual_seed(1)
    frames = [{"input": torch.randn(3, 9, 5, generator=generator)}, {"input": torch.randn(2, 4, 5, generator=generator)}]
    model = actscope.wrap(net)
    result = temporal_sparsity(model, frames, sites="module:1@output", eps=EPS)
    calls = []
    for batch in frames:
        x = torch.relu(net[0](batch["input"])).detach()  # [batch, frames, 16] by hand
        calls.append((x, torch.ones(x.shape[:2], dtype=torch.bool)))
    expected = naive(calls, EPS)
    assert expected["pairs"] == 3 * 8 + 2 * 3
    check_site(result, "module:1@output", expected, EPS)


def test_expert_sites_pair_only_tokens_routed_together():
    """MoE expert neurons see the routed tokens only: a pair needs both neighbours routed."""
    from actscope.trace import split_token_id
    from actscope.zoo.tiny import tiny_model

    module, inputs = tiny_model("mixtral")
    model, sites = actscope.wrap(module), "blocks.1.moe.experts.*.post"
    result = temporal_sparsity(model, [inputs], sites=sites, eps=EPS)
    with torch.no_grad(), actscope.capture(model, sites, flat=True) as cap:
        model(**inputs)
    for label in cap.readings:
        values = cap.tensor(label).double().numpy()
        example, position = (t.tolist() for t in split_token_id(cap.token_ids(label)))
        row = {(e, p): i for i, (e, p) in enumerate(zip(example, position))}
        le, pairs = np.zeros((len(EPS), values.shape[1]), np.int64), 0
        for (e, p), i in row.items():
            if (e, p - 1) in row:
                delta = np.abs(values[i] - values[row[(e, p - 1)]])
                pairs += 1
                le += np.stack([delta <= v for v in EPS])
        entry = result.site(label)
        assert entry.pairs == pairs and entry.tokens == len(row)
        np.testing.assert_array_equal(entry.le, le)
    # Expert 0 of block 1 gets one token of these inputs: no pair, NaN fractions, no error.
    lonely = result.site("blocks.1.moe.experts.0.post")
    assert lonely.tokens == 1 and lonely.pairs == 0 and np.isnan(result.unit_fractions(lonely.site)).all()
    table = result.to_pandas()
    assert table[table.site == lonely.site].temporal_sparsity.isna().all() and table.temporal_sparsity.notna().sum() > 0


def test_loss_equals_the_streamed_mean_abs_delta():
    model = relu_llama()
    batches = padded_batches()[:1]
    result = temporal_sparsity(model, batches, sites="blocks.0.mlp.post", eps=0.0)
    (x, mask), = captured(model, batches, "blocks.0.mlp.post")["blocks.0.mlp.post"]
    loss = delta_l1_loss(x.double(), mask)
    assert float(loss) == pytest.approx(result.to_table()["mean_abs_delta"][0], rel=1e-9)


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [-1e-3, math.nan, math.inf, (), (0.1, 0.1), ("0.1",), True])
def test_invalid_eps(eps):
    with pytest.raises(InputError, match="eps"):
        temporal_sparsity(relu_llama(), padded_batches(), sites="blocks.0.mlp.post", eps=eps)


def test_feature_maps_and_patterns_are_refused():
    net = actscope.wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
    with pytest.raises(SiteError, match="position axes"):
        temporal_sparsity(net, [{"input": torch.randn(2, 3, 6, 6)}], sites="module:1@output")
    with pytest.raises(SiteError, match="attention pattern"):
        temporal_sparsity(relu_llama(), padded_batches(), sites="blocks.0.attn.pattern")


def test_no_pairs_and_no_tokens_are_errors():
    one_token = [{"input_ids": torch.tensor([[5, 6], [7, 8]]), "attention_mask": torch.tensor([[1, 0], [0, 1]])}]
    with pytest.raises(SiteError, match="no site gave a pair"):
        temporal_sparsity(relu_llama(), one_token, sites="blocks.0.mlp.post")
    with pytest.raises(DataError, match="no real token"):
        temporal_sparsity(relu_llama(), iter(()), sites="blocks.0.mlp.post")
    with pytest.raises(DataError, match="empty"):
        temporal_sparsity(relu_llama(), [], sites="blocks.0.mlp.post")


# -- the training-time loss -----------------------------------------------------------------------
def naive_loss(x: torch.Tensor, mask: torch.Tensor, lam: float) -> float:
    total, count = 0.0, 0
    x = x.detach().double().numpy()
    for b in range(x.shape[0]):
        for t in range(1, x.shape[1]):
            if mask[b, t] and mask[b, t - 1]:
                total += np.abs(x[b, t] - x[b, t - 1]).sum()
                count += x[b, t].size
    return lam * total / count


def test_delta_l1_loss_matches_loop_and_is_differentiable():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4, 2, dtype=torch.float64, requires_grad=True)  # trailing axes are units
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0]])
    loss = delta_l1_loss(x, mask, lam=0.3)
    assert loss.item() == pytest.approx(naive_loss(x, mask, 0.3), rel=1e-12)
    loss.backward()
    assert x.grad[1, 0].abs().sum() == 0 and x.grad[1, 3].abs().sum() == 0 and x.grad[2].abs().sum() == 0
    assert x.grad[0].abs().sum() > 0
    full = delta_l1_loss(x.detach(), None, lam=2.0)
    assert float(full) == pytest.approx(naive_loss(x, torch.ones(3, 6), 2.0), rel=1e-12)


def test_delta_l1_loss_without_pairs_is_a_zero_with_a_graph():
    x = torch.randn(2, 1, 4, requires_grad=True)
    for mask in (None, torch.ones(2, 1)):
        loss = delta_l1_loss(x, mask)
        assert loss.item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize("lam", [-1.0, math.nan, "1", True])
def test_delta_l1_loss_rejects_bad_lam(lam):
    with pytest.raises(InputError, match="lam"):
        delta_l1_loss(torch.zeros(1, 3, 2), lam=lam)


def test_delta_l1_loss_rejects_bad_shapes():
    with pytest.raises(InputError, match=r"\[batch, pos, units\]"):
        delta_l1_loss(torch.zeros(3, 2))
    with pytest.raises(InputError, match="mask"):
        delta_l1_loss(torch.zeros(2, 3, 2), torch.ones(2, 4))
