"""Tests of actscope.zoo: the synthetic language, its tokenizer and the cached tiny LMs.

The two full-size models are trained once (about half a minute each) into the user-level cache
(``$ACTSCOPE_CACHE`` or ``~/.cache/actscope``) and reused by later runs; the cache-mechanics tests
use a temporary cache and models trained for a handful of steps.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from actscope.errors import InputError
from actscope.zoo import build_tokenizer, generate_corpus, held_out_corpus, tiny_lm, train_tiny_lm
from actscope.zoo import lm as zoo_lm
from actscope.zoo.synthetic import lexicon, unigram_entropy, vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread mostly waits on a shared machine


# --------------------------------------------------------------------------------------------
# The synthetic language
# --------------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_seed_dependent():
    a = generate_corpus(60, seed=3)
    assert a == generate_corpus(60, seed=3)
    assert a != generate_corpus(60, seed=4)
    assert generate_corpus(60, seed=3)[:10] == generate_corpus(10, seed=3)
    for doc in a:
        words = doc.split(" ")
        assert all(words), "words are separated by single spaces"
        assert 1 <= words.count(".") <= 4 and words[-1] == "."


def test_vocabulary_has_about_200_distinct_words_in_classes():
    words = vocabulary()
    assert 180 <= len(words) <= 230
    assert len(set(words)) == len(words)
    classes = set(lexicon().word_class.values())
    assert {"noun", "det", "adj", "verb", "name", "pron", "num", "punct"} <= classes


def test_grammar_rules_hold():
    lx = lexicon()
    docs = generate_corpus(400, seed=11)
    n_checked = n_counts = 0
    for doc in docs:
        words = doc.split()
        assert all(w in lx.word_class for w in words)
        # Determiner -> (adjectives) -> noun of the determiner's class and number.
        for i, w in enumerate(words):
            if w in lx.determiners:
                j = i + 1
                while words[j] in lx.adjectives:
                    j += 1
                cls, number, _ = lx.determiners[w]
                assert words[j] in lx.nouns, doc
                assert lx.nouns[words[j]][:2] == (cls, number), doc
                n_checked += 1
        # Brackets and quotes close, properly nested, within the sentence.
        stack: list[str] = []
        for w in words:
            if w in "(«":
                stack.append(w)
            elif w in ")»":
                assert stack and stack.pop() == {")": "(", "»": "«"}[w], doc
            elif w == ".":
                assert not stack, doc
        assert not stack
        # Counting runs go up one number word at a time.
        for i, w in enumerate(words):
            if w == "tal":
                run = []
                for v in words[i + 1:]:
                    if v not in lx.numbers:
                        break
                    run.append(lx.numbers.index(v))
                assert len(run) >= 2 and run == list(range(run[0], run[0] + len(run))), doc
                n_counts += 1
    assert n_checked > 500 and n_counts > 50


def test_pronoun_agrees_with_the_protagonist():
    lx = lexicon()
    checked = 0
    for doc in generate_corpus(300, seed=5):
        words = doc.split()
        if words[0] not in lx.names:
            continue
        hero_class = lx.names[words[0]]
        # Pronouns outside quotations refer back to the protagonist.
        depth = 0
        for w in words:
            depth += (w == "«") - (w == "»")
            if depth == 0 and w in lx.pronouns:
                assert lx.pronouns[w] == hero_class, doc
                checked += 1
    assert checked > 50


def test_bad_corpus_arguments_raise_input_error():
    with pytest.raises(InputError, match="n_docs"):
        generate_corpus(-1, seed=0)
    with pytest.raises(InputError, match="seed"):
        generate_corpus(3, seed="zero")
    with pytest.raises(InputError, match="empty"):
        unigram_entropy([])


def test_held_out_corpus_differs_from_training_corpus():
    held = held_out_corpus(50)
    assert held == held_out_corpus(50)
    assert held != generate_corpus(50, seed=0)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_prepends_bos(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    assert len(tok) == len(vocabulary()) + 4
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<bos>", "<eos>", "<pad>", "<unk>")
    docs = generate_corpus(20, seed=1)
    enc = tok(docs)
    for doc, ids in zip(docs, enc["input_ids"]):
        assert ids[0] == tok.bos_token_id
        assert ids.count(tok.bos_token_id) == 1
        assert tok.unk_token_id not in ids
        assert len(ids) == len(doc.split()) + 1
        assert tok.decode(ids, skip_special_tokens=True) == doc
    assert tok("zzz lo")["input_ids"] == [tok.bos_token_id, tok.unk_token_id,
                                           tok.convert_tokens_to_ids("lo")]

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again(docs)["input_ids"] == enc["input_ids"]
    batch = again(docs[:3], padding=True, return_tensors="pt")
    assert batch["input_ids"][:, 0].eq(again.bos_token_id).all()
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"][0, lengths[0]:].eq(again.pad_token_id).all()  # padded right


# --------------------------------------------------------------------------------------------
# The cached tiny LMs (trained once into the user-level cache)
# --------------------------------------------------------------------------------------------


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tok


def _mlp_nonzero_fraction(model, tok, docs) -> float:
    """Fraction of down_proj inputs (act(gate) * up) that are not exactly 0, real tokens only."""
    counts = [0, 0]
    mask_box = {}

    def hook(module, args):
        a = args[0][mask_box["m"]]
        counts[0] += int((a != 0).sum())
        counts[1] += a.numel()

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook)
               for layer in model.model.layers]
    try:
        batch = tok(docs, padding=True, return_tensors="pt")
        mask_box["m"] = batch["attention_mask"].bool()
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return counts[0] / counts[1]


@pytest.fixture(scope="module")
def relu_dir() -> Path:
    return tiny_lm("relu")


@pytest.fixture(scope="module")
def silu_dir() -> Path:
    return tiny_lm("silu")


def test_cached_relu_model_loads_and_has_learnt_the_language(relu_dir):
    assert relu_dir.name == f"tiny-lm-relu-v{zoo_lm.VERSION}"
    assert zoo_lm.is_valid_zoo_dir(relu_dir)
    assert (relu_dir / "model.safetensors").is_file()
    model, tok = _load(relu_dir)
    assert model.config.hidden_act == "relu"
    assert model.config.model_type == "llama"
    assert model.config.tie_word_embeddings is False
    assert model.config.vocab_size == len(tok)

    meta = json.loads((relu_dir / zoo_lm.ZOO_JSON).read_text())
    assert meta["version"] == zoo_lm.VERSION and meta["activation"] == "relu"
    assert len(meta["loss_log"]) > 10
    assert meta["loss_log"][-1][1] < meta["loss_log"][0][1] - 1.0

    docs = held_out_corpus(100)
    loss = zoo_lm.corpus_loss(model, tok, docs)
    entropy = unigram_entropy(docs)
    # A real learning check: far below the best context-free predictor.
    assert loss < 0.6 * entropy, (loss, entropy)
    # The saved and reloaded model scores the held-out text as it did right after training.
    assert abs(zoo_lm.corpus_loss(model, tok, held_out_corpus()) - meta["held_out_loss"]) < 1e-3

    # A trained ReLU(-gated) MLP is sparse.
    assert _mlp_nonzero_fraction(model, tok, docs[:50]) < 0.5


def test_cached_model_is_reused_without_training(relu_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the cached model should not be retrained")

    monkeypatch.setattr(zoo_lm, "_train_into", boom)
    assert tiny_lm("relu") == relu_dir


def test_relu_and_silu_variants_differ_only_in_activation(relu_dir, silu_dir):
    meta = {p: json.loads((p / zoo_lm.ZOO_JSON).read_text()) for p in (relu_dir, silu_dir)}
    cfg_r, cfg_s = dict(meta[relu_dir]["config"]), dict(meta[silu_dir]["config"])
    assert (cfg_r.pop("activation"), cfg_s.pop("activation")) == ("relu", "silu")
    assert cfg_r == cfg_s
    model, tok = _load(silu_dir)
    assert model.config.hidden_act == "silu"
    docs = held_out_corpus(50)
    assert zoo_lm.corpus_loss(model, tok, docs) < 0.6 * unigram_entropy(docs)
    assert _mlp_nonzero_fraction(model, tok, docs) > 0.95  # SiLU has no exact zeros


# --------------------------------------------------------------------------------------------
# Cache mechanics (temporary cache, models trained for a few steps)
# --------------------------------------------------------------------------------------------

TINY = dict(steps=3)


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tiny_target() -> Path:
    return zoo_lm.default_dir(zoo_lm._make_config("relu", 3, 0, 64, 256, 2))


def test_default_cache_location(tmp_cache):
    cfg = zoo_lm.TrainConfig(activation="silu")
    assert zoo_lm.default_dir(cfg) == tmp_cache / "zoo" / f"tiny-lm-silu-v{zoo_lm.VERSION}"
    other = _tiny_target()
    assert other.parent == tmp_cache / "zoo"
    assert other.name.startswith(f"tiny-lm-relu-v{zoo_lm.VERSION}-")


def test_leftover_temp_dir_and_wrong_version_are_not_valid(tmp_cache):
    target = _tiny_target()
    # A killed run's temp dir, even one that looks complete, is never a model.
    leftover = target.parent / f".{target.name}.tmp-abc123"
    leftover.mkdir(parents=True)
    for name in zoo_lm.REQUIRED_FILES:
        (leftover / name).write_text("{}")
    (leftover / zoo_lm.ZOO_JSON).write_text(json.dumps({"version": zoo_lm.VERSION}))
    assert not zoo_lm.is_valid_zoo_dir(leftover)
    # A directory written by another version is stale.
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / zoo_lm.ZOO_JSON).write_text(json.dumps({"version": "0"}))
    assert "version" in zoo_lm.zoo_dir_problem(target)

    path = train_tiny_lm("relu", **TINY)
    assert path == target
    assert zoo_lm.is_valid_zoo_dir(path)
    meta = json.loads((path / zoo_lm.ZOO_JSON).read_text())
    assert meta["version"] == zoo_lm.VERSION and meta["config"]["steps"] == 3
    assert leftover.is_dir()  # a recent temp dir may belong to a live run: left alone
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.old-")]
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp-")] == [
        leftover.name]

    # An old leftover is cleaned up by the next training run of that model.
    os.utime(leftover, (0, 0))
    train_tiny_lm("relu", force=True, **TINY)
    assert not leftover.exists()


def test_interrupted_training_leaves_no_valid_looking_cache(tmp_cache, monkeypatch):
    real = zoo_lm._train_into

    def killed(directory, cfg):
        (directory / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo_lm, "_train_into", killed)
    with pytest.raises(KeyboardInterrupt):
        train_tiny_lm("relu", **TINY)
    target = _tiny_target()
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the temp dir was removed

    monkeypatch.setattr(zoo_lm, "_train_into", real)
    assert zoo_lm.is_valid_zoo_dir(train_tiny_lm("relu", **TINY))


def test_concurrent_finisher_keeps_the_existing_copy(tmp_cache, monkeypatch):
    import shutil

    real = zoo_lm._train_into
    target = _tiny_target()

    def racing(directory, cfg):
        meta = real(directory, cfg)
        shutil.copytree(directory, target)  # another process published first
        (target / "winner").write_text("other process")
        return meta

    monkeypatch.setattr(zoo_lm, "_train_into", racing)
    assert train_tiny_lm("relu", **TINY) == target
    assert (target / "winner").is_file()
    assert zoo_lm.is_valid_zoo_dir(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_out_dir_and_argument_checks(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an actscope zoo"):
        train_tiny_lm("relu", out_dir=mine, **TINY)
    assert (mine / "notes.txt").read_text() == "keep me"

    out = train_tiny_lm("silu", out_dir=tmp_path / "model", **TINY)
    assert out == tmp_path / "model" and zoo_lm.is_valid_zoo_dir(out)
    model, tok = _load(out)
    assert model.config.hidden_act == "silu"

    with pytest.raises(InputError, match="activation"):
        train_tiny_lm("gelu", out_dir=tmp_path / "x")
    with pytest.raises(InputError, match="steps"):
        train_tiny_lm("relu", out_dir=tmp_path / "x", steps=0)
    with pytest.raises(InputError, match="held-out"):
        train_tiny_lm("relu", out_dir=tmp_path / "x", seed=zoo_lm.HELD_OUT_SEED)


def test_shared_cache_helper_refuses_reuses_replaces_and_restores_threads(tmp_path):
    """zoo.cache.train_cached, which every zoo trainer uses, on a toy model (no training)."""
    from actscope.zoo import cache

    threads_seen: list[int] = []

    def train_into(tmp: Path) -> None:
        threads_seen.append(torch.get_num_threads())
        (tmp / "weights.bin").write_text("w")
        cache.write_meta(tmp, {"version": "t"})

    def valid(path: Path) -> bool:
        return cache.read_meta(path) == {"version": "t"} and (path / "weights.bin").is_file()

    def run(out_dir=None, **kw) -> Path:
        return cache.train_cached(out_dir, tmp_path / "zoo" / "toy", train_into, valid, caller="toy_trainer",
                                  what="a toy model", **kw)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"^toy_trainer: .*mine exists and is not a toy model, so it is left alone"):
        run(mine)
    assert (mine / "notes.txt").read_text() == "keep me" and threads_seen == []

    torch.set_num_threads(2)
    try:
        target = run()
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(1)
    assert target == tmp_path / "zoo" / "toy" and valid(target) and threads_seen == [1]
    assert run() == target and threads_seen == [1]  # valid: reused, not retrained
    (target / cache.ZOO_JSON).write_text(json.dumps({"version": "old"}))  # stale: replaced
    assert run() == target and valid(target) and threads_seen == [1, 1]
    assert run(force=True) == target and threads_seen == [1, 1, 1]
    assert sorted(p.name for p in target.parent.iterdir()) == ["toy"]  # no temp or stale copy left
