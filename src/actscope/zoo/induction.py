"""A 2-layer attention-only transformer trained on repeated random sequences (induction heads).

Sequences are ``BOS r r`` with ``r`` = ``L`` tokens drawn uniformly from ``1 … vocab−1``
(``BOS = 0``), fresh every step, and ``L`` drawn every step from ``min_seq_len … seq_len``. The first repeat is unpredictable; the second is predictable
only by copying from context, which is what induction heads do (a previous-token head in
layer 0 feeding a head in layer 1 that attends to the token after the previous occurrence).

The model is a Hugging Face ``LlamaForCausalLM`` (eager attention, RoPE) made attention-only:
its MLPs have one neuron and a zero ``down_proj`` that is never trained, so every MLP adds
exactly 0 to the residual stream (our choice: this keeps the standard class, so ``actscope.load``
and every canonical site, ``blocks.*.attn.pattern`` included, work on the saved directory).

:func:`train_induction` trains it with Adam on one CPU thread (about 15 s with the defaults
here) and saves it under ``$ACTSCOPE_CACHE/zoo/induction-…`` (trained into a temporary
sibling, renamed into place when complete; ``actscope_zoo.json``, written last, marks it
complete).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from actscope.errors import InputError
from actscope.zoo.cache import holds_model, read_meta, save_quietly, train_cached, training_meta, write_meta, zoo_dir

VERSION = "1"
BOS = 0


@dataclass(frozen=True)
class InductionConfig:
    """Everything that determines a trained model (apart from library versions)."""

    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    vocab_size: int = 64
    seq_len: int = 16  # the longest repeat; held-out figures use this length
    min_seq_len: int = 4  # each step draws its repeat length from min_seq_len … seq_len
    batch_size: int = 32
    steps: int = 1500
    lr: float = 1e-3  # 3e-3 diverged (seed 0) before induction formed
    seed: int = 0


def _check(cfg: InductionConfig) -> None:
    for name in ("n_layers", "n_heads", "d_model", "vocab_size", "seq_len", "min_seq_len", "batch_size", "steps", "seed"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise InputError(f"train_induction: {name} must be a positive int, got {value!r}")
    if cfg.d_model % (2 * cfg.n_heads):
        raise InputError(f"train_induction: d_model {cfg.d_model} must be a multiple of 2·n_heads = {2 * cfg.n_heads} "
                         "(an even head size for rotary embeddings); pass e.g. d_model=64")
    if not 2 <= cfg.min_seq_len <= cfg.seq_len:
        raise InputError(f"train_induction: need 2 <= min_seq_len <= seq_len, got {cfg.min_seq_len} and {cfg.seq_len}")
    if cfg.vocab_size < 3:
        raise InputError(f"train_induction: vocab_size must be >= 3 (BOS and two tokens), got {cfg.vocab_size}")


def sequences(cfg: InductionConfig, batch: int, seed: int, seq_len: int | None = None) -> torch.Tensor:
    """``[batch, 1 + 2·seq_len]`` ids ``BOS r r`` (``r`` uniform in ``1 … vocab−1``)."""
    from actscope.explain.induction import repeated_tokens

    return repeated_tokens(seq_len or cfg.seq_len, batch, seed, low=1, high=cfg.vocab_size, bos=BOS)


def copy_targets(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions of the second repeat whose next token is a copy, and those tokens.

    For ``BOS r r`` the query at ``1 + seq_len + j`` (``j = 0 … seq_len − 2``) predicts ``r[j+1]``.
    Returns ``(positions [seq_len − 1], targets [batch, seq_len − 1])``.
    """
    positions = torch.arange(1 + seq_len, 2 * seq_len)
    return positions, ids[:, positions + 1]


def copy_metrics(logits: torch.Tensor, ids: torch.Tensor, seq_len: int) -> dict[str, float]:
    """Loss and accuracy of the copied tokens of the second repeat."""
    positions, targets = copy_targets(ids, seq_len)
    chosen = logits[:, positions].float()  # [batch, seq_len-1, vocab]
    loss = torch.nn.functional.cross_entropy(chosen.reshape(-1, chosen.shape[-1]), targets.reshape(-1))
    accuracy = (chosen.argmax(-1) == targets).float().mean()
    return {"copy_loss": float(loss), "copy_accuracy": float(accuracy)}


def _llama(cfg: InductionConfig) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=1, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, max_position_embeddings=2 * cfg.seq_len + 8,
        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=None, pad_token_id=None,
    )
    config._attn_implementation = "eager"  # train with the attention that pattern sites observe
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()  # attention-only: every MLP adds exactly 0
    return model


def _attention_parameters(model: Any) -> list[torch.nn.Parameter]:
    """Everything but the (zeroed) MLPs."""
    return [p for name, p in model.named_parameters() if ".mlp." not in name and ".post_attention_layernorm." not in name]


def _train_into(directory: Path, cfg: InductionConfig) -> dict[str, Any]:
    started = time.perf_counter()
    model = _llama(cfg)
    model.train()
    optimizer = torch.optim.Adam(_attention_parameters(model), lr=cfg.lr)
    log: list[list[float]] = []
    lengths = torch.randint(cfg.min_seq_len, cfg.seq_len + 1, (cfg.steps,), generator=torch.Generator().manual_seed(cfg.seed))
    for step in range(cfg.steps):
        # A repeat length that changes every step: a fixed one lets a single head copy from a
        # fixed relative offset (RoPE) without looking at tokens, which is not induction.
        ids = sequences(cfg, cfg.batch_size, seed=cfg.seed * 1_000_003 + step + 1, seq_len=int(lengths[step]))
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % max(cfg.steps // 10, 1) == 0:
            log.append([step + 1, round(float(loss.detach()), 4)])
    model.eval()
    held_out = sequences(cfg, 256, seed=999_983)
    with torch.no_grad():
        metrics = copy_metrics(model(input_ids=held_out).logits, held_out, cfg.seq_len)
    meta = training_meta("induction", VERSION, asdict(cfg), log, metrics, started)
    save_quietly(model, directory)
    write_meta(directory, meta)  # last: marks the model complete
    return meta


def default_dir(cfg: InductionConfig) -> Path:
    name = f"induction-L{cfg.n_layers}-H{cfg.n_heads}-d{cfg.d_model}-s{cfg.steps}-seed{cfg.seed}-v{VERSION}"
    return zoo_dir(name)



def train_induction(cfg: InductionConfig | None = None, *, out_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Train (or reuse from the cache) the attention-only model; return its directory.

    Load it with ``actscope.load(dir)``; ``read_meta(dir)`` holds the configuration, the loss log
    and the held-out copy loss / accuracy on the second repeat.
    """
    cfg = cfg or InductionConfig()
    _check(cfg)
    return train_cached(out_dir, default_dir(cfg), lambda tmp: _train_into(tmp, cfg),
                        lambda path: holds_model(path, VERSION, asdict(cfg), files=("model.safetensors",)),
                        force=force, caller="train_induction", what="a trained induction model")


__all__ = ["BOS", "InductionConfig", "copy_metrics", "copy_targets", "default_dir", "read_meta", "sequences", "train_induction"]
