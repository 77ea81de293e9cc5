"""Llama-style causal LMs trained on real English (:mod:`actscope.zoo.doctext`), large enough that
a SiLU MLP is not trivially sparse: 4 layers, 256 wide, 1024 gated-MLP units per layer, a
4096-token byte-level BPE vocabulary learned from the training texts, in a ReLU and a SiLU variant.

:func:`doc_lm` returns the cached model directory for an activation and seed, training it first
(about ten minutes on one CPU core with the defaults) through the zoo's atomic cache. The ReLU and
SiLU models of one seed start from the same initial weights and see the same batches; only
``hidden_act`` differs. Training text is packed: documents, each ``<bos> text <eos>``, are
concatenated and cut into rows of ``max_len`` tokens. The held-out texts (one in twenty, by content
hash) are never trained on; ``actscope_zoo.json`` records their loss and the MLP activation ratios.
These models are for the Sparsing Law reproduction; the test suite trains only a miniature one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from actscope.errors import InputError
from actscope.zoo.cache import holds_model, save_quietly, train_cached, training_meta, write_meta, zoo_dir
from actscope.zoo.doctext import SOURCES, doc_texts, fingerprint, split_texts
from actscope.zoo.lm import ACTIVATIONS, _llama_config, _mlp_activation_ratios, corpus_loss, fit_causal_lm

__all__ = ["VERSION", "DocLMConfig", "doc_lm", "train_doc_lm", "doc_corpus"]

VERSION = "1"
HELD_OUT_SCORED = 300  # held-out texts scored for the record in actscope_zoo.json


@dataclass(frozen=True)
class DocLMConfig:
    """Everything that determines a trained doc LM, the corpus included (by fingerprint)."""

    activation: str = "relu"
    seed: int = 1
    steps: int = 800
    d_model: int = 256
    d_ff: int = 1024
    n_layers: int = 4
    n_heads: int = 4
    vocab_size: int = 4096
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    max_len: int = 128
    sources: tuple[str, ...] = SOURCES
    max_texts: int | None = None  # None: every training text
    corpus: str = ""  # fingerprint of the texts; filled in by doc_corpus

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"] = list(self.sources)
        return d


def doc_corpus(cfg: DocLMConfig) -> tuple[list[str], list[str], DocLMConfig]:
    """(training texts, held-out texts, ``cfg`` with its corpus fingerprint)."""
    texts = doc_texts(tuple(cfg.sources))
    train, held_out = split_texts(texts)
    if cfg.max_texts is not None:
        train = train[: cfg.max_texts]
    return train, held_out, dataclasses.replace(cfg, corpus=fingerprint(train + held_out))


def _packed_rows(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """``<bos> text <eos>`` for every text, concatenated and cut into rows of ``max_len`` tokens."""
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    stream: list[int] = []
    for enc in encoded:
        stream += [tokenizer.bos_token_id, *enc.ids, tokenizer.eos_token_id]
    return [stream[i:i + max_len] for i in range(0, len(stream) - max_len + 1, max_len)]


def _shuffled_batches(n_rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of row indices: epochs of a seeded shuffle, as many as ``steps`` needs."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n_rows))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def _train_into(directory: Path, cfg: DocLMConfig, train: list[str], held_out: list[str]) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from actscope.zoo.tokenizer import build_bpe_tokenizer

    started = time.perf_counter()
    tokenizer = build_bpe_tokenizer(train, cfg.vocab_size)
    rows = _packed_rows(tokenizer, train, cfg.max_len)
    if len(rows) < cfg.batch_size:
        raise InputError(f"train_doc_lm: the training texts make only {len(rows)} rows of {cfg.max_len} tokens; "
                         f"pass a larger max_texts or a smaller batch_size (now {cfg.batch_size}).")
    batches = _shuffled_batches(len(rows), cfg.batch_size, cfg.steps, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(_llama_config(cfg, tokenizer))
    loss_log = fit_causal_lm(model, rows, batches, cfg, tokenizer.pad_token_id, f"doc-lm-{cfg.activation}")
    scored = held_out[:HELD_OUT_SCORED]
    record = {"held_out_loss": corpus_loss(model, tokenizer, scored, max_len=cfg.max_len), "held_out_texts": len(scored),
              "train_rows": len(rows), "epochs": round(cfg.steps * cfg.batch_size / len(rows), 3),
              "mlp_activation_ratio": _mlp_activation_ratios(model, tokenizer, scored)}
    save_quietly(model, directory)
    tokenizer.save_pretrained(directory)
    meta = training_meta("doc-lm", VERSION, cfg.to_dict(), loss_log, record, started)
    write_meta(directory, meta)  # last: a directory without it never counts as a model
    return meta


def _check(cfg: DocLMConfig) -> None:
    if cfg.activation not in ACTIVATIONS:
        raise InputError(f"doc LM: activation must be one of {ACTIVATIONS}, got {cfg.activation!r}; "
                         "pass activation='relu' or activation='silu'.")
    for name in ("steps", "seed", "d_model", "d_ff", "n_layers", "batch_size", "vocab_size"):
        value = getattr(cfg, name)
        least = 0 if name == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"train_doc_lm: {name} must be an int >= {least}, got {value!r}; "
                             f"pass e.g. {name}={getattr(DocLMConfig(), name)}.")
    if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
        raise InputError(f"train_doc_lm: d_model must be a multiple of {2 * cfg.n_heads} ({cfg.n_heads} heads with "
                         f"an even head size), got {cfg.d_model}; pass e.g. d_model=256.")
    if cfg.vocab_size < 300:
        raise InputError(f"train_doc_lm: vocab_size must be at least 300 (256 bytes, 4 special tokens and merges), "
                         f"got {cfg.vocab_size}; pass e.g. vocab_size=4096.")


def _default_dir(cfg: DocLMConfig) -> Path:
    blob = json.dumps(cfg.to_dict(), sort_keys=True).encode()
    return zoo_dir(f"doc-lm-{cfg.activation}-s{cfg.seed}-v{VERSION}-{hashlib.sha256(blob).hexdigest()[:10]}")


def train_doc_lm(activation: str = "relu", seed: int = 1, out_dir: str | os.PathLike | None = None, *,
                 force: bool = False, **settings) -> Path:
    """Train (or reuse) a doc LM; return its directory (``settings``: other :class:`DocLMConfig`
    fields). ``out_dir`` defaults to the cache; a directory that is not a zoo model is refused."""
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(DocLMConfig)} - {"corpus"})
    if unknown or "corpus" in settings:
        raise InputError(f"train_doc_lm: unknown setting(s) {unknown or ['corpus']}; pass fields of DocLMConfig "
                         "other than corpus (it is computed from the texts).")
    cfg = DocLMConfig(activation=activation, seed=seed, **settings)
    _check(cfg)
    train, held_out, cfg = doc_corpus(cfg)
    return train_cached(out_dir, _default_dir(cfg), lambda tmp: _train_into(tmp, cfg, train, held_out),
                        lambda path: holds_model(path, VERSION, cfg.to_dict(), files=("model.safetensors", "tokenizer.json")),
                        force=force, caller="train_doc_lm", what="an actscope zoo model directory",
                        guard=out_dir is not None)


def doc_lm(activation: str = "relu", seed: int = 1) -> Path:
    """The cached default doc LM for ``activation`` and ``seed``, trained first if needed."""
    return train_doc_lm(activation, seed)

