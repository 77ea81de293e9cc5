"""Induction-head score: a hand-made pattern gives the hand count, a model's scores equal a naive
loop over the attention weights Hugging Face returns, and the attention-only zoo model is cached
atomically with MLPs that add exactly 0."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import InputError
from actscope.explain.induction import (
    induction_score_from_pattern, induction_scores, previous_token_score_from_pattern, previous_token_scores,
    repeated_tokens,
)
from actscope.zoo.induction import InductionConfig, copy_targets, read_meta, sequences, train_induction
from actscope.zoo.tiny import tiny_model
from conftest import model_state


def test_hand_made_pattern_gives_the_hand_count():
    # One sequence BOS r r with |r| = 3: positions 0 (BOS), 1-3 first repeat, 4-6 second repeat.
    # Head 0 attends exactly like an induction head; head 1 half-way; head 2 uniformly.
    seq_len, size = 3, 7
    pattern = torch.zeros(1, 3, size, size, dtype=torch.float64)
    for q in range(size):
        pattern[0, 2, q, : q + 1] = 1.0 / (q + 1)
        pattern[0, 0, q, q] = 1.0
        pattern[0, 1, q, q] = 1.0
    for q, k in ((4, 2), (5, 3), (6, 4)):  # query -> the token after its previous occurrence
        pattern[0, 0, q] = 0.0
        pattern[0, 0, q, k] = 1.0
        pattern[0, 1, q] = 0.0
        pattern[0, 1, q, k] = 0.5
        pattern[0, 1, q, 0] = 0.5
    scores = induction_score_from_pattern(pattern, seq_len, offset=1)
    uniform = (1 / 5 + 1 / 6 + 1 / 7) / 3  # head 2 puts 1/(q+1) on every key
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.5, uniform], dtype=torch.float64), rtol=1e-12, atol=0)
    previous = previous_token_score_from_pattern(pattern, offset=1)  # queries 2..6, key q-1
    # heads 0 and 1 never put weight on q-1 (themselves, BOS, or q-2); head 2 puts 1/(q+1) there
    hand = [0.0, 0.0, (1 / 3 + 1 / 4 + 1 / 5 + 1 / 6 + 1 / 7) / 5]
    torch.testing.assert_close(previous, torch.tensor(hand, dtype=torch.float64), rtol=1e-12, atol=0)


def test_repeated_tokens_layout():
    ids = repeated_tokens(5, 3, seed=1, low=2, high=9, bos=0)
    assert ids.shape == (3, 11)
    assert torch.equal(ids[:, 0], torch.zeros(3, dtype=torch.int64))
    assert torch.equal(ids[:, 1:6], ids[:, 6:])
    assert int(ids[:, 1:].min()) >= 2 and int(ids[:, 1:].max()) < 9
    assert torch.equal(ids, repeated_tokens(5, 3, seed=1, low=2, high=9, bos=0))
    with pytest.raises(InputError, match="seq_len must be"):
        repeated_tokens(1, 3, high=9)


def naive_scores(attentions, seq_len, offset):
    """Loops over the attention weights HF returns (output_attentions=True)."""
    out = np.zeros((len(attentions), attentions[0].shape[1]))
    for layer, pattern in enumerate(attentions):
        for head in range(pattern.shape[1]):
            values = [float(pattern[b, head, offset + seq_len + j, offset + j + 1])
                      for b in range(pattern.shape[0]) for j in range(seq_len)]
            out[layer, head] = sum(values) / len(values)
    return out


def test_model_scores_equal_a_naive_loop_and_the_model_is_restored():
    module, _ = tiny_model("llama")  # sdpa attention by default: the score switches to eager and back
    before = model_state(module)
    scores = induction_scores(module, seq_len=5, batch=3, seed=2)
    assert model_state(module) == before
    ids = repeated_tokens(5, 3, seed=2, low=1, high=module.config.vocab_size, bos=0)  # config BOS is 0
    module.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = module(input_ids=ids, output_attentions=True).attentions
    finally:
        module.set_attn_implementation(before[3])
    np.testing.assert_allclose(scores.scores, naive_scores(attentions, 5, 1), rtol=1e-6)
    table = scores.to_table()
    np.testing.assert_array_equal(table["layer"], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(table["head"], [0, 1, 2, 3] * 2)
    previous = previous_token_scores(module, seq_len=5, batch=3, seed=2)
    assert previous.scores.shape == (2, 4) and np.all((previous.scores > 0) & (previous.scores < 1))


def test_zoo_model_is_attention_only_and_cached_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path))
    cfg = InductionConfig(steps=3, seq_len=6, min_seq_len=3, batch_size=4)
    directory = train_induction(cfg)
    assert directory.parent == tmp_path / "zoo"
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # no temporary left behind
    meta = read_meta(directory)
    assert meta["config"]["steps"] == 3 and 0.0 <= meta["held_out"]["copy_accuracy"] <= 1.0
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    assert train_induction(cfg) == directory and (directory / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    model = actscope.load(directory)
    ids = sequences(cfg, 2, seed=5)
    with torch.no_grad(), actscope.capture(model, "blocks.*.mlp.out") as captured:
        model(input_ids=ids)
    for site in ("blocks.0.mlp.out", "blocks.1.mlp.out"):
        assert torch.count_nonzero(captured.tensor(site)) == 0  # the MLPs add exactly 0
    positions, targets = copy_targets(ids, 6)
    assert torch.equal(positions, torch.arange(7, 12)) and torch.equal(targets, ids[:, 2:7])
    with pytest.raises(InputError, match="min_seq_len"):
        train_induction(InductionConfig(seq_len=4, min_seq_len=5))
