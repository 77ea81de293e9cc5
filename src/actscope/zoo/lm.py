"""A tiny Llama-family causal LM trained on the synthetic language, in a ReLU and a SiLU variant.

:func:`train_tiny_lm` trains one (about a minute on two CPU cores) and saves it as an ordinary
Hugging Face model directory: ``config.json`` + ``model.safetensors`` + the tokenizer +
``actscope_zoo.json`` (training configuration, loss log, final train loss, held-out loss, the
unigram entropy of the held-out text, MLP activation ratios, version). :func:`tiny_lm` returns the
cached directory for an activation, training it first when it is missing or stale.

The two variants are trained identically (same seed, so the same initial weights, the same data
and batches, the same number of steps) except for ``hidden_act``. The MLP is Llama's gated one,
``down_proj(act(gate_proj(x)) * up_proj(x))``; with ``relu`` that is the ReLU-gated MLP of
ProSparse / the Sparsing Law paper.

Cache writes are atomic: a model is trained into a temporary sibling directory (``.<name>.tmp-…``) and
renamed into place only once complete, and a directory counts as valid only when its
``actscope_zoo.json`` has the current :data:`VERSION` and the requested configuration and every
model file is present. A leftover temporary directory of a killed run is never read as a model.
If another process published the same model first, its copy is kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from actscope.errors import InputError
from actscope.zoo.cache import ZOO_JSON, cache_root, read_meta, train_cached, write_meta, zoo_dir
from actscope.zoo.synthetic import generate_corpus, unigram_entropy

__all__ = [
    "VERSION",
    "ZOO_JSON",
    "ACTIVATIONS",
    "HELD_OUT_SEED",
    "TrainConfig",
    "tiny_lm",
    "train_tiny_lm",
    "held_out_corpus",
    "cache_root",
    "default_dir",
    "zoo_dir_problem",
    "is_valid_zoo_dir",
    "encode_documents",
    "corpus_loss",
]

log = logging.getLogger(__name__)

VERSION = "1"
ACTIVATIONS = ("relu", "silu")
HELD_OUT_SEED = 1_000_003  # the held-out corpus; training corpora use the training seed
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  ZOO_JSON)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained tiny LM (apart from the library versions)."""

    activation: str = "relu"
    steps: int = 1500
    seed: int = 0
    d_model: int = 64
    d_ff: int = 256
    n_layers: int = 2
    n_heads: int = 4
    batch_size: int = 32
    lr: float = 8e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_len: int = 128

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def without_activation(self) -> dict:
        d = self.to_dict()
        d.pop("activation")
        return d


_DEFAULTS = TrainConfig()


# --------------------------------------------------------------------------------------------
# Paths and validity
# --------------------------------------------------------------------------------------------


def default_dir(cfg: TrainConfig) -> Path:
    """Where the cache keeps the model for ``cfg``.

    ``<cache>/zoo/tiny-lm-<activation>-v<VERSION>`` for the default settings; other settings get
    a short hash of their configuration appended so they never shadow the default model.
    """
    name = f"tiny-lm-{cfg.activation}-v{VERSION}"
    if cfg.without_activation() != _DEFAULTS.without_activation():
        blob = json.dumps(cfg.without_activation(), sort_keys=True).encode()
        name += "-" + hashlib.sha256(blob).hexdigest()[:10]
    return zoo_dir(name)


def zoo_dir_problem(path: str | os.PathLike, cfg: TrainConfig | None = None) -> str | None:
    """Why ``path`` is not a complete zoo model (for ``cfg``, if given), or None if it is."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    if path.name.startswith("."):  # a hidden sibling: the temporary of a training run, or a replaced copy
        return f"{path} is a temporary directory of an unfinished or replaced training run"
    meta = read_meta(path)
    if meta is None:
        return f"{path / ZOO_JSON} is missing or not valid JSON"
    if meta.get("version") != VERSION:
        return f"{path} was written by zoo version {meta.get('version')!r}, expected {VERSION!r}"
    if cfg is not None and meta.get("config") != cfg.to_dict():
        return f"{path} holds a model trained with {meta.get('config')}, expected {cfg.to_dict()}"
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        return f"{path} lacks {', '.join(missing)}"
    return None


def is_valid_zoo_dir(path: str | os.PathLike, cfg: TrainConfig | None = None) -> bool:
    """True when ``path`` is a complete zoo model of the current version (and ``cfg``)."""
    return zoo_dir_problem(path, cfg) is None


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def held_out_corpus(n_docs: int = 200) -> list[str]:
    """Documents from a seed no training run uses (:data:`HELD_OUT_SEED`)."""
    return generate_corpus(n_docs, seed=HELD_OUT_SEED)


def encode_documents(tokenizer, docs: Sequence[str], max_len: int = 128) -> list[list[int]]:
    """Token ids ``<bos> words… <eos>`` per document, truncated to ``max_len`` tokens."""
    ids = tokenizer(list(docs), add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(row + [eos])[:max_len] for row in ids]


def _pad_batch(rows: Sequence[Sequence[int]], pad_id: int):
    from actscope.data import pad_right

    input_ids, mask = pad_right(rows, pad_id)
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


def _batches(rows: list[list[int]], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of row indices; rows of similar length share a batch (less padding)."""
    rng = random.Random(seed)
    group = batch_size * 16
    out: list[list[int]] = []
    for start in range(0, len(rows), group):
        idx = list(range(start, min(start + group, len(rows))))
        idx.sort(key=lambda i: len(rows[i]))
        chunk = [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
        chunk = [c for c in chunk if len(c) == batch_size]
        rng.shuffle(chunk)
        out.extend(chunk)
    return out[:steps]


def corpus_loss(model, tokenizer, docs: Sequence[str], batch_size: int = 64,
                max_len: int = 128) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over the real tokens of ``docs``.

    Each document is scored as ``<bos> words… <eos>``; every word and the ``<eos>`` is predicted.
    """
    import torch

    rows = encode_documents(tokenizer, docs, max_len)
    pad = tokenizer.pad_token_id
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                input_ids, mask, labels = _pad_batch(rows[start:start + batch_size], pad)
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
                target = labels[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                    ignore_index=-100, reduction="sum")
                total += float(loss)
                count += int((target != -100).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _mlp_activation_ratios(model, tokenizer, docs: Sequence[str]) -> dict:
    """Per layer: fraction of the down_proj inputs > 0 and != 0, over real tokens."""
    import torch

    rows = encode_documents(tokenizer, docs)
    layers = model.model.layers
    stats = [[0, 0, 0] for _ in layers]  # positive, nonzero, entries
    current_mask: list = [None]

    def hook_for(i):
        def hook(module, args):
            a = args[0]
            m = current_mask[0].bool()
            real = a[m]  # [n_tokens, d_ff]
            stats[i][0] += int((real > 0).sum())
            stats[i][1] += int((real != 0).sum())
            stats[i][2] += real.numel()
        return hook

    from actscope.hooks import hooks

    model.eval()
    with torch.no_grad(), hooks(model) as registry:
        for i, layer in enumerate(layers):
            registry.before(layer.mlp.down_proj, hook_for(i))
        for start in range(0, len(rows), 64):
            input_ids, mask, _ = _pad_batch(rows[start:start + 64], tokenizer.pad_token_id)
            current_mask[0] = mask
            model(input_ids=input_ids, attention_mask=mask)
    pos = [s[0] / max(s[2], 1) for s in stats]
    nz = [s[1] / max(s[2], 1) for s in stats]
    return {"positive_per_layer": pos, "nonzero_per_layer": nz,
            "positive": sum(s[0] for s in stats) / max(sum(s[2] for s in stats), 1),
            "nonzero": sum(s[1] for s in stats) / max(sum(s[2] for s in stats), 1)}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"train_tiny_lm: {name} must be an int >= {minimum}, got {value!r}; "
                         f"pass e.g. {name}={getattr(_DEFAULTS, name)}.")


def _make_config(activation, steps, seed, d_model, d_ff, n_layers) -> TrainConfig:
    if activation not in ACTIVATIONS:
        raise InputError(f"tiny LM: activation must be one of {ACTIVATIONS}, got {activation!r}; "
                         "pass activation='relu' or activation='silu'.")
    _check_int("steps", steps, 1)
    _check_int("seed", seed, 0)
    _check_int("d_model", d_model, 4)
    _check_int("d_ff", d_ff, 1)
    _check_int("n_layers", n_layers, 1)
    if seed == HELD_OUT_SEED:
        raise InputError(f"train_tiny_lm: seed {seed} is the held-out corpus seed, so the model "
                         "would be evaluated on its own training text; pass another seed.")
    n_heads = _DEFAULTS.n_heads
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise InputError(f"train_tiny_lm: d_model must be a multiple of {2 * n_heads} "
                         f"({n_heads} heads with an even head size), got {d_model}; "
                         "pass e.g. d_model=64.")
    return dataclasses.replace(_DEFAULTS, activation=activation, steps=steps, seed=seed,
                               d_model=d_model, d_ff=d_ff, n_layers=n_layers)


def _llama_config(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        hidden_act=cfg.activation,
        max_position_embeddings=cfg.max_len,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def fit_causal_lm(model, rows: list[list[int]], batches: list[list[int]], cfg, pad_id: int, name: str) -> list[list[float]]:
    """Train ``model`` in place, one AdamW step per batch of row indices (``cfg``: ``lr``,
    ``warmup_steps``, ``steps``, ``weight_decay``; schedule :func:`_lr_at`, gradients clipped to
    norm 1); return the loss log ``[[step, mean loss over the last ~steps/30 steps], …]``."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    loss_log: list[list[float]] = []
    window: list[float] = []
    log_every = max(cfg.steps // 30, 1)
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        input_ids, mask, labels = _pad_batch([rows[i] for i in batch], pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == len(batches):
            mean = sum(window) / len(window)
            loss_log.append([step + 1, round(mean, 5)])
            log.info("%s step %d/%d loss %.4f", name, step + 1, len(batches), mean)
            window = []
    return loss_log


def _train_into(directory: Path, cfg: TrainConfig) -> dict:
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    from actscope.zoo.tokenizer import build_tokenizer

    t0 = time.perf_counter()
    tokenizer = build_tokenizer()
    n_docs = cfg.steps * cfg.batch_size
    docs = generate_corpus(n_docs, seed=cfg.seed)
    rows = encode_documents(tokenizer, docs, cfg.max_len)
    batches = _batches(rows, cfg.batch_size, cfg.steps, seed=cfg.seed)
    # Every step gets a batch; with the default sizes there are exactly enough.
    while len(batches) < cfg.steps:
        batches += batches[: cfg.steps - len(batches)]

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(_llama_config(cfg, tokenizer))
    loss_log = fit_causal_lm(model, rows, batches, cfg, tokenizer.pad_token_id, f"tiny-lm-{cfg.activation}")
    train_seconds = time.perf_counter() - t0

    held_out = held_out_corpus()
    held_out_loss = corpus_loss(model, tokenizer, held_out, max_len=cfg.max_len)
    ratios = _mlp_activation_ratios(model, tokenizer, held_out)
    final_train_loss = loss_log[-1][1]

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    meta = {
        "version": VERSION,
        "kind": "tiny-lm",
        "activation": cfg.activation,
        "config": cfg.to_dict(),
        "final_train_loss": final_train_loss,
        "held_out_loss": held_out_loss,
        "held_out_docs": len(held_out),
        "held_out_seed": HELD_OUT_SEED,
        "unigram_entropy": unigram_entropy(held_out),
        "mlp_activation_ratio": ratios,
        "train_seconds": round(train_seconds, 2),
        "loss_log": loss_log,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    write_meta(directory, meta)  # last: a directory without it never counts as a model
    return meta


def train_tiny_lm(activation: str = "relu", out_dir: str | os.PathLike | None = None,
                  steps: int = _DEFAULTS.steps, seed: int = _DEFAULTS.seed,
                  d_model: int = _DEFAULTS.d_model, d_ff: int = _DEFAULTS.d_ff,
                  n_layers: int = _DEFAULTS.n_layers, force: bool = False) -> Path:
    """Train (or reuse) a tiny Llama-style causal LM on the synthetic language; return its dir.

    ``out_dir`` defaults to the cache (see :func:`default_dir`). Unless ``force``, a directory
    that already holds a valid model with the same settings is returned without training. The
    model is trained into a temporary sibling directory and renamed into place when complete.
    Training uses one CPU thread (the caller's thread setting is restored afterwards).
    """
    cfg = _make_config(activation, steps, seed, d_model, d_ff, n_layers)
    trained: list[dict] = []  # the run's actscope_zoo.json record, when it trained
    # The cache directory is ours to replace; an out_dir is refused unless it looks like a zoo model.
    target = train_cached(out_dir, default_dir(cfg), lambda tmp: trained.append(_train_into(tmp, cfg)),
                          lambda path: is_valid_zoo_dir(path, cfg), force=force, caller="train_tiny_lm",
                          what="an actscope zoo model directory", guard=out_dir is not None,
                          looks_like_model=lambda path: (path / ZOO_JSON).is_file())
    for meta in trained:
        log.info("tiny-lm-%s: held-out loss %.4f (unigram entropy %.4f) in %.1fs -> %s",
                 activation, meta["held_out_loss"], meta["unigram_entropy"], meta["train_seconds"], target)
    return target


def tiny_lm(activation: str = "relu") -> Path:
    """The cached tiny LM for ``activation`` ('relu' or 'silu'), trained first if needed.

    Load it with ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)``; ``path / 'actscope_zoo.json'`` has its losses.
    """
    return train_tiny_lm(activation)
