"""Extreme-token phenomena (metrics/extreme.py) against naive loops over full captured tensors,
and the Bigram-Backcopy task and trainer (zoo/backcopy.py)."""
from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import DataError, InputError, SiteError
from actscope.metrics.extreme import DomainStates, ExtremeTokens, classify_domains, extreme_tokens
from actscope.models.attention import RELU_ATTENTION, relu_attention
from actscope.zoo.backcopy import BOS, BackcopyTask, load_backcopy, read_meta, task_of, train_backcopy
from actscope.zoo.tiny import tiny_model

from conftest import model_state

RTOL = 1e-6


# -- helpers ---------------------------------------------------------------------------
def _padded_batches(family: str, side: str) -> list[dict[str, torch.Tensor]]:
    """Two batches with padding (one sequence of a single real token, one too short for
    sink_position 2) on the given side."""
    generator = torch.Generator().manual_seed(3)
    lengths = [[7, 4, 1], [5, 2, 7]]
    batches = []
    for rows in lengths:
        ids = torch.randint(3, 128, (len(rows), 7), generator=generator)
        mask = torch.zeros_like(ids)
        for b, n in enumerate(rows):
            if side == "right":
                mask[b, :n] = 1
            else:
                mask[b, 7 - n:] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _keep_even(ids: torch.Tensor) -> torch.Tensor:
    return ids % 2 == 0


def _naive(model, batches, sink_position, token_filter=None):
    """Per-element loops over the full captured tensors of every batch."""
    sites = ["blocks.*.attn.pattern", "blocks.*.attn.v", "blocks.*.resid.post"]
    n_layers = model.config.num_hidden_layers
    attention = {}  # (layer, head) -> list of probabilities
    sink_v, other_v, sink_r, other_r = {}, {}, {}, {}
    n_sequences = n_others = 0
    for batch in batches:
        with torch.no_grad(), actscope.capture(model, sites, announce=False) as cap:
            model(**batch)
        mask, ids = batch["attention_mask"], batch["input_ids"]
        for b in range(mask.shape[0]):
            real = [t for t in range(mask.shape[1]) if mask[b, t]]
            if len(real) <= sink_position:
                continue
            n_sequences += 1
            sink = real[sink_position]
            others = [t for t in real if t != sink and (token_filter is None or bool(token_filter(ids)[b, t]))]
            n_others += len(others)
            for layer in range(n_layers):
                pattern = cap.tensor(f"blocks.{layer}.attn.pattern").double()
                values = cap.tensor(f"blocks.{layer}.attn.v").double()
                resid = cap.tensor(f"blocks.{layer}.resid.post").double()
                for h in range(pattern.shape[1]):
                    attention.setdefault((layer, h), []).extend(float(pattern[b, h, q, sink]) for q in others)
                for g in range(values.shape[2]):
                    norm = lambda t: math.sqrt(sum(float(x) ** 2 for x in values[b, t, g]))  # noqa: E731
                    sink_v.setdefault((layer, g), []).append(norm(sink))
                    other_v.setdefault((layer, g), []).extend(norm(t) for t in others)
                rnorm = lambda t: math.sqrt(sum(float(x) ** 2 for x in resid[b, t]))  # noqa: E731
                sink_r.setdefault(layer, []).append(rnorm(sink))
                other_r.setdefault(layer, []).extend(rnorm(t) for t in others)
    return attention, sink_v, other_v, sink_r, other_r, n_sequences, n_others


# -- metric vs naive -------------------------------------------------------------------
@pytest.mark.parametrize(
    "family,side,sink_position,use_filter",
    [("llama", "right", 0, False), ("llama", "left", 2, True), ("gpt2", "left", 0, False), ("gpt2", "right", 1, True)],
)
def test_matches_naive_loops(family, side, sink_position, use_filter):
    module, _ = tiny_model(family)
    batches = _padded_batches(family, side)
    token_filter = _keep_even if use_filter else None
    before = model_state(module)
    result = extreme_tokens(module, batches, sink_position, token_filter=token_filter)
    assert model_state(module) == before  # hooks removed, attention implementation restored

    attention, sink_v, other_v, sink_r, other_r, n_sequences, n_others = _naive(module, batches, sink_position, token_filter)
    assert (result.n_sequences, result.n_others) == (n_sequences, n_others)
    assert result.n_skipped == 6 - n_sequences
    n_layers, n_heads = result.sink_score.shape
    n_kv = len({key[1] for key in sink_v})
    assert n_layers == module.config.num_hidden_layers and n_heads == 4
    for layer in range(n_layers):
        for h in range(n_heads):
            g = h * n_kv // n_heads  # the key/value head query head h reads
            assert result.kv_head[h] == g
            np.testing.assert_allclose(result.sink_score[layer, h], statistics.fmean(attention[layer, h]), rtol=RTOL)
            drain = statistics.fmean(sink_v[layer, g]) / statistics.median(other_v[layer, g])
            np.testing.assert_allclose(result.value_drain[layer, h], drain, rtol=RTOL)
        peak = statistics.fmean(sink_r[layer]) / statistics.median(other_r[layer])
        np.testing.assert_allclose(result.residual_peak[layer], peak, rtol=RTOL)
        np.testing.assert_allclose(result.median_resid_norm[layer], statistics.median(other_r[layer]), rtol=RTOL)


def test_gqa_model_has_fewer_value_heads():
    module, inputs = tiny_model("llama")  # 4 query heads, 2 key/value heads
    result = extreme_tokens(module, [inputs])
    assert result.kv_head.tolist() == [0, 0, 1, 1]
    assert result.sink_value_norm.shape == (2, 2)
    assert result.value_drain[:, 0].tolist() == result.value_drain[:, 1].tolist()
    assert result.value_drain[:, 1].tolist() != result.value_drain[:, 2].tolist()


def test_a_generator_of_dicts_is_streamed():
    module, _ = tiny_model("llama")
    batches = _padded_batches("llama", "right")
    listed = extreme_tokens(module, batches)
    streamed = extreme_tokens(module, (batch for batch in batches))
    assert streamed.n_others == listed.n_others
    np.testing.assert_array_equal(streamed.sink_score, listed.sink_score)
    with pytest.raises(DataError, match="data is empty"):
        extreme_tokens(module, iter([]))


def test_text_data_is_tokenized_and_batched(minilm):
    texts = ["the cat sat on the mat", "a much longer sentence with many more words in it than the first", "hi"]
    whole = extreme_tokens(minilm, texts, batch_size=2)
    one_by_one = [{k: v for k, v in minilm.tokenizer(t, return_tensors="pt").items()} for t in texts]
    alone = extreme_tokens(minilm, one_by_one)
    assert whole.n_others == alone.n_others == sum(len(minilm.tokenizer(t)["input_ids"]) - 1 for t in texts)
    # Padding must not change anything: same figures batched (padded) and one at a time.
    np.testing.assert_allclose(whole.sink_score, alone.sink_score, rtol=1e-5)
    np.testing.assert_allclose(whole.residual_peak, alone.residual_peak, rtol=1e-5)


# -- tables and dormancy ---------------------------------------------------------------
def _hand_result(sink_score):
    sink_score = np.array(sink_score, dtype=float)
    layers, heads = sink_score.shape
    return ExtremeTokens(
        sink_position=0, dormant_threshold=0.5, layer=np.arange(layers), kv_head=np.arange(heads) // 2,
        sink_score=sink_score, sink_value_norm=np.full((layers, heads // 2), 1.0),
        median_value_norm=np.full((layers, heads // 2), 4.0), sink_resid_norm=np.array([30.0] * layers),
        median_resid_norm=np.array([3.0] * layers), n_sequences=1, n_skipped=0, n_others=5,
    )


def test_dormant_by_hand_and_tables():
    result = _hand_result([[0.9, 0.5, 0.2, 0.51], [0.0, 1.0, 0.49, 0.7]])
    assert result.dormant.tolist() == [[True, False, False, True], [False, True, False, True]]  # 0.5 is not "most"
    heads = result.to_table()
    assert heads["layer"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert heads["head"].tolist() == [0, 1, 2, 3] * 2
    assert heads["kv_head"].tolist() == [0, 0, 1, 1] * 2
    assert heads["value_drain"].tolist() == [0.25] * 8
    layers = result.layers_table()
    assert layers["residual_peak"].tolist() == [10.0, 10.0]
    assert layers["dormant_heads"].tolist() == [2, 2]
    assert list(result.to_pandas().columns) == list(heads)
    assert len(result.layers_pandas()) == 2


def test_domain_states_by_hand():
    scores = np.array([[[0.9, 0.1], [0.6, 0.6]], [[0.2, 0.1], [0.6, 0.4]]])  # [domain, layer, head]
    states = DomainStates(("code", "prose"), 0.5, np.array([0, 1]), scores)
    assert states.state("code", 0, 0) == "dormant" and states.state("prose", 0, 0) == "active"
    assert states.state("prose", 1, 1) == "active" and states.state("code", 1, 1) == "dormant"
    table = states.to_table()
    assert table["state"].tolist() == ["dormant", "active", "dormant", "dormant", "active", "active", "dormant", "active"]
    assert table["domain"].tolist() == ["code"] * 4 + ["prose"] * 4
    with pytest.raises(InputError, match="unknown domain 'poetry'"):
        states.state("poetry", 0, 0)
    with pytest.raises(InputError, match="no head"):
        states.state("code", 0, 2)


def test_classify_domains_matches_per_domain_scores():
    module, _ = tiny_model("llama")
    domains = {"right": _padded_batches("llama", "right")[:1], "left": _padded_batches("llama", "left")[1:]}
    scores = {name: extreme_tokens(module, data).sink_score for name, data in domains.items()}
    threshold = float(np.median(np.concatenate([s.ravel() for s in scores.values()])))
    states = classify_domains(module, domains, dormant_threshold=threshold)
    for d, name in enumerate(domains):
        np.testing.assert_array_equal(states.sink_score[d], scores[name])
        for layer in range(2):
            for head in range(4):
                expected = "dormant" if scores[name][layer, head] > threshold else "active"
                assert states.state(name, layer, head) == expected
    assert set(states.to_table()["state"]) == {"active", "dormant"}


# -- bad input -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"sink_position": -1}, "sink_position must be an int >= 0"),
    ({"sink_position": True}, "sink_position must be an int >= 0"),
    ({"sink_position": 1.0}, "sink_position must be an int >= 0"),
    ({"dormant_threshold": 1.5}, r"dormant_threshold must be a probability in \[0, 1\], got 1.5"),
    ({"token_filter": "even"}, "token_filter must be a function"),
    ({"token_filter": lambda ids: ids % 2}, "token_filter must return a bool tensor"),
    ({"token_filter": lambda ids: torch.zeros(1, dtype=torch.bool)}, "token_filter must return a bool tensor"),
])
def test_bad_options(kwargs, match):
    module, inputs = tiny_model("llama")
    with pytest.raises(InputError, match=match):
        extreme_tokens(module, [inputs], **kwargs)


def test_bad_data():
    module, inputs = tiny_model("llama")
    with pytest.raises(DataError, match="data is empty"):
        extreme_tokens(module, [])
    with pytest.raises(DataError, match="wrap a single text or dict in a list"):
        extreme_tokens(module, inputs)
    with pytest.raises(DataError, match="data item 1 is a int"):
        extreme_tokens(module, [inputs, 3])
    with pytest.raises(DataError, match="has no tokenizer"):
        extreme_tokens(module, ["some text"])
    with pytest.raises(DataError, match="no sequence has a real token at sink_position 6"):
        extreme_tokens(module, [inputs], sink_position=6)
    with pytest.raises(DataError, match="no token other than the sink token"):
        extreme_tokens(module, [inputs], token_filter=lambda ids: torch.zeros_like(ids, dtype=torch.bool))
    with pytest.raises(InputError, match="cannot use a int as a model"):
        extreme_tokens(3, [inputs])
    with pytest.raises(SiteError, match="extreme_tokens needs the sites"):
        extreme_tokens(torch.nn.Linear(3, 3), [{"input": torch.zeros(1, 3)}])
    with pytest.raises(InputError, match="domains must be a non-empty mapping"):
        classify_domains(module, {})


# -- the Bigram-Backcopy task ----------------------------------------------------------
def test_task_obeys_the_copy_rule_exactly():
    task = BackcopyTask(vocab_size=64, n_triggers=3, seed=0)
    ids = task.sample(300, 48, seed=1)
    assert ids.shape == (300, 48) and ids.dtype == torch.int64
    assert (ids[:, 0] == BOS).all() and (ids[:, 1:] != BOS).all()
    trigger = task.is_trigger(ids)
    assert not trigger[:, 1].any()  # x1 is never a trigger
    copies = 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1] - 1):
            if int(ids[b, t]) in task.triggers:
                assert ids[b, t + 1] == ids[b, t - 1]
                copies += 1
    assert copies == int(trigger[:, :-1].sum()) > 300  # the rule was exercised many times
    assert not (trigger[:, 1:] & trigger[:, :-1]).any()  # two triggers are never adjacent


def test_task_follows_its_bigram_chain_elsewhere():
    task = BackcopyTask(seed=0)
    P = task.transition
    assert torch.allclose(P[BOS].sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (P[:, BOS] == 0).all() and (P[BOS, list(task.triggers)] == 0).all()
    ids = task.sample(2000, 24, seed=2)
    prev, nxt = ids[:, :-1].reshape(-1), ids[:, 1:].reshape(-1)
    keep = ~task.is_trigger(prev)
    counts = torch.zeros(64, 64, dtype=torch.float64)
    counts.index_put_((prev[keep], nxt[keep]), torch.ones(int(keep.sum()), dtype=torch.float64), accumulate=True)
    # The most visited row's empirical next-token distribution is close to the chain's row.
    row = int(counts.sum(1).argmax())
    empirical = counts[row] / counts[row].sum()
    assert 0.5 * float((empirical - P[row]).abs().sum()) < 0.1
    assert float((empirical - torch.roll(P[row], 1)).abs().sum()) > 0.3  # and far from a wrong row


def test_task_is_seeded():
    a, b = BackcopyTask(seed=0), BackcopyTask(seed=1)
    assert torch.equal(a.sample(4, 16, seed=5), BackcopyTask(seed=0).sample(4, 16, seed=5))
    assert not torch.equal(a.transition, b.transition)
    assert not torch.equal(a.sample(4, 16, seed=5), a.sample(4, 16, seed=6))


def test_task_bad_input():
    with pytest.raises(InputError, match="vocab_size must be an int >= 8"):
        BackcopyTask(vocab_size=4)
    with pytest.raises(InputError, match="leaves fewer than 2 ordinary tokens"):
        BackcopyTask(vocab_size=8, n_triggers=6)
    with pytest.raises(InputError, match="length must be an int >= 2"):
        BackcopyTask().sample(3, 1)
    with pytest.raises(InputError, match="activation 'gelu' is not supported"):
        train_backcopy(activation="gelu")
    with pytest.raises(InputError, match="optimizer must be one of"):
        train_backcopy(optimizer="lion")
    with pytest.raises(InputError, match="n_layers must be an int >= 1"):
        train_backcopy(n_layers=0)


def test_train_backcopy_saves_a_loadable_model(tmp_path):
    out = tmp_path / "bb"
    path = train_backcopy(n_layers=2, steps=3, out_dir=out)
    assert path == out and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    meta = read_meta(path)
    assert meta["kind"] == "backcopy" and meta["config"]["n_layers"] == 2 and len(meta["loss_log"]) == 3
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert train_backcopy(n_layers=2, steps=3, out_dir=out) == path  # reused, not retrained
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    model = actscope.load(path)
    assert model.n_layers == 2
    task = task_of(path)
    result = extreme_tokens(model, [task.inputs(4, 12, seed=0)])
    assert result.sink_score.shape == (2, 1) and result.n_others == 4 * 11
    (path / "actscope_zoo.json").write_text(json.dumps({**meta, "config": {**meta["config"], "steps": 4}}))
    assert train_backcopy(n_layers=2, steps=3, out_dir=out) == path  # stale config: retrained
    assert read_meta(path)["config"]["steps"] == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is not a backcopy model directory"):
        train_backcopy(steps=3, out_dir=tmp_path / "other")


# -- ReLU attention (the Bigram-Backcopy mitigation) ------------------------------------------
def _naive_relu_attention(query, key, value, visible, scaling):
    """One (batch, head, query) at a time: ReLU(q·k·scaling) / (number of visible keys)."""
    b, h, q_len, _ = query.shape
    weights = torch.zeros(b, h, q_len, key.shape[2], dtype=query.dtype)
    for i in range(b):
        for j in range(h):
            for q in range(q_len):
                keys = [k for k in range(key.shape[2]) if visible[i, q, k]]
                for k in keys:
                    weights[i, j, q, k] = max(float(query[i, j, q] @ key[i, j // (h // key.shape[1]), k]) * scaling, 0.0) / len(keys)
    values = value.repeat_interleave(h // value.shape[1], dim=1)
    return (weights @ values).transpose(1, 2), weights


@pytest.mark.parametrize("mask_kind", ["additive", "bool", "none"])
def test_relu_attention_matches_a_naive_loop(mask_kind):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 5, 8, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(2, 2, 5, 8, generator=generator, dtype=torch.float64) for _ in range(2))  # 2 kv heads
    visible = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5).clone()
    if mask_kind != "none":
        visible[1, :, 0] = False  # left padding in the second sequence
        visible[1, 0, 0] = True  # (its padded query still sees itself, as transformers' masks do)
    additive = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
    mask = {"additive": additive[:, None], "bool": visible[:, None], "none": None}[mask_kind]
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    output, weights = relu_attention(module, query, key, value, mask, scaling=0.35)
    expected_output, expected_weights = _naive_relu_attention(query, key, value, visible, 0.35)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(output, expected_output, rtol=1e-12, atol=1e-12)


def test_relu_attention_trains_and_is_observed_as_trained(tmp_path, caplog):
    path = train_backcopy(activation="relu", steps=3, out_dir=tmp_path / "relu")
    assert read_meta(path)["config"]["activation"] == "relu"
    model = load_backcopy(path)
    assert model.module.config._attn_implementation == RELU_ATTENTION
    inputs = BackcopyTask().inputs(3, 10, seed=1)
    with caplog.at_level("WARNING", logger="actscope"), actscope.capture(model, "blocks.0.attn.pattern") as captured:
        with torch.no_grad():
            logits = model(**inputs).logits
    assert "switching to eager" not in caplog.text  # kept its own attention: it returns the pattern
    pattern = captured.tensor("blocks.0.attn.pattern")  # [batch, head, query, key]
    assert bool((pattern >= 0).all()) and not torch.allclose(pattern.sum(-1), torch.ones(3, 1, 10))  # ReLU, not softmax
    assert bool((pattern.triu(1) == 0).all())  # causal
    assert model.module.config._attn_implementation == RELU_ATTENTION  # after the capture too
    plain = actscope.load(path)  # transformers does not save the choice: softmax, other outputs
    with torch.no_grad():
        assert not torch.allclose(plain.module(**inputs).logits, logits)
    result = extreme_tokens(model, [inputs])
    assert result.sink_score.shape == (1, 1) and math.isfinite(float(result.sink_score[0, 0]))
