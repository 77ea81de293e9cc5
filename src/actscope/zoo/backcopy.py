"""The Bigram-Backcopy task (METHODS.md, "Extreme-token phenomena") and a tiny model trained on it.

A sequence is ``BOS x1 x2 …``. Tokens follow a fixed bigram Markov chain, except that right
after a *trigger* token the next token copies the token before the trigger:
``x[t] ∈ triggers ⇒ x[t+1] = x[t-1]``. Small transformers trained on it put a sink on BOS:
on non-trigger queries their attention goes to BOS (the head is *dormant*: the bigram needs no
attention), on trigger queries it goes to the previous token (the head is *active*).

Our choices (the paper's exact sampling scheme is not reproduced):

* token ids: ``0`` is BOS, ``1 … n_triggers`` are the triggers, the rest are ordinary tokens;
* the transition matrix is ``softmax(2 · N(0, 1))`` per row over every non-BOS token, drawn
  once from the task seed; the BOS row (the distribution of ``x1``) excludes triggers, so
  ``x1`` is never a trigger and the token before a trigger is never BOS; rows of triggers are
  zero (a trigger is always followed by a copy, never by a bigram draw). Two triggers are
  therefore never adjacent, and a copied token is never a trigger;
* sequences have no padding (attention mask all ones).

:func:`train_backcopy` trains a tiny Llama-shaped model (eager attention, Llama's gated MLP
kept; by default 1 layer, 1 head, d_model 64, d_ff 32, Adam, 4000 steps of 16 sequences of 32
tokens, about 30-45 s on one CPU thread) on freshly sampled sequences and saves it with ``save_pretrained`` under
``$ACTSCOPE_CACHE/zoo/backcopy-…`` (trained into a temporary sibling, renamed into place when
complete). It has no tokenizer: feed it ``BackcopyTask.inputs(...)`` dicts.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from actscope.errors import InputError
from actscope.models.attention import use_relu_attention
from actscope.zoo.cache import (holds_model, meta_of_kind, read_meta, save_quietly, train_cached, training_meta,
                                 write_meta, zoo_dir)

VERSION = "1"
BOS = 0
ACTIVATIONS = ("softmax", "relu")  # of the attention weights (ReLU: actscope.models.attention)
OPTIMIZERS = ("adam", "sgd")
_LOGIT_SCALE = 2.0  # peakedness of the bigram rows: learnable, but far from deterministic


@dataclass(frozen=True)
class BackcopyTask:
    """A seeded Bigram-Backcopy task: ``BOS = 0``, triggers ``1 … n_triggers``."""

    vocab_size: int = 64
    n_triggers: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("vocab_size", self.vocab_size, 8)
        _check_int("n_triggers", self.n_triggers, 1)
        _check_int("seed", self.seed, 0)
        if self.vocab_size - 1 - self.n_triggers < 2:
            raise InputError(f"BackcopyTask: vocab_size {self.vocab_size} leaves fewer than 2 ordinary tokens "
                             f"next to BOS and {self.n_triggers} triggers; raise vocab_size or lower n_triggers.")

    @property
    def triggers(self) -> tuple[int, ...]:
        return tuple(range(1, self.n_triggers + 1))

    @cached_property
    def transition(self) -> torch.Tensor:
        """Bigram probabilities ``[vocab, vocab]`` (row: current token, column: next token)."""
        generator = torch.Generator().manual_seed(self.seed)
        logits = _LOGIT_SCALE * torch.randn(self.vocab_size, self.vocab_size, generator=generator, dtype=torch.float64)
        logits[:, BOS] = -torch.inf  # BOS only starts a sequence
        logits[BOS, list(self.triggers)] = -torch.inf  # x1 is never a trigger
        probs = logits.softmax(dim=-1)
        probs[list(self.triggers)] = 0.0  # a trigger is followed by a copy, never a bigram draw
        return probs

    def sample(self, n_sequences: int, length: int, seed: int = 0) -> torch.Tensor:
        """``[n_sequences, length]`` int64 token ids, each row ``BOS x1 … x(length-1)``."""
        _check_int("n_sequences", n_sequences, 1)
        _check_int("length", length, 2)
        _check_int("seed", seed, 0)
        generator = torch.Generator().manual_seed(seed)
        triggers = torch.tensor(self.triggers)
        ids = torch.full((n_sequences, length), BOS, dtype=torch.int64)
        for t in range(1, length):
            previous = ids[:, t - 1]
            after_trigger = torch.isin(previous, triggers)  # [n]
            rows = self.transition[previous]  # [n, vocab]
            rows[after_trigger] = self.transition[BOS]  # trigger rows are zero; this draw is discarded
            drawn = torch.multinomial(rows, 1, generator=generator)[:, 0]
            # After a trigger the next token copies the token before it (x1 is never a trigger, so t >= 2).
            ids[:, t] = torch.where(after_trigger, ids[:, t - 2 if t >= 2 else 0], drawn)
        return ids

    def inputs(self, n_sequences: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Model-input dict ``{input_ids, attention_mask}`` of :meth:`sample` sequences."""
        ids = self.sample(n_sequences, length, seed)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def is_trigger(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of trigger tokens, same shape as ``ids``."""
        return torch.isin(ids, torch.tensor(self.triggers, device=ids.device))


@dataclass(frozen=True)
class BackcopyConfig:
    """Everything that determines a trained Bigram-Backcopy model (apart from library versions)."""

    n_layers: int = 1
    n_heads: int = 1
    activation: str = "softmax"
    optimizer: str = "adam"
    steps: int = 4000
    seed: int = 0
    d_model: int = 64  # with 32 the sink formed within 6000 steps for seed 0, not seed 1; with 64 for 0-2
    d_ff: int = 32  # the bigram needs no MLP (the embedding-unembedding path holds it); kept Llama-shaped
    batch_size: int = 16  # many small steps: in our runs the sink formed sooner (per second) than with 32 or 64
    length: int = 32
    lr: float = 3e-3
    task: tuple[int, int, int] = (64, 3, 0)  # vocab_size, n_triggers, task seed

    def make_task(self) -> BackcopyTask:
        return BackcopyTask(*self.task)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task"] = list(self.task)
        return d


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"backcopy: {name} must be an int >= {minimum}, got {value!r}; pass e.g. {name}={max(minimum, 1)}.")


def _check_config(cfg: BackcopyConfig) -> None:
    if cfg.activation not in ACTIVATIONS:
        raise InputError(f"train_backcopy: activation {cfg.activation!r} is not supported; pass one of {ACTIVATIONS}.")
    if cfg.optimizer not in OPTIMIZERS:
        raise InputError(f"train_backcopy: optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}.")
    minimums = {"n_layers": 1, "n_heads": 1, "steps": 1, "seed": 0, "d_ff": 1, "batch_size": 1, "length": 4}
    for name, minimum in minimums.items():
        _check_int(name, getattr(cfg, name), minimum)
    if cfg.d_model % (2 * cfg.n_heads):
        raise InputError(f"train_backcopy: d_model {cfg.d_model} must be a multiple of 2·n_heads = {2 * cfg.n_heads} "
                         "(an even head size for rotary embeddings); pass e.g. d_model=64.")
    cfg.make_task()  # validates the task parameters


# -- paths ----------------------------------------------------------------------------
def default_dir(cfg: BackcopyConfig) -> Path:
    """``<cache>/zoo/backcopy-L<layers>-H<heads>-<activation>-<optimizer>-s<steps>-seed<seed>-v<VERSION>``
    (other settings are stored in ``actscope_zoo.json`` and checked on reuse)."""
    name = f"backcopy-L{cfg.n_layers}-H{cfg.n_heads}-{cfg.activation}-{cfg.optimizer}-s{cfg.steps}-seed{cfg.seed}-v{VERSION}"
    return zoo_dir(name)


def task_of(path: str | os.PathLike) -> BackcopyTask:
    """The task a trained backcopy directory was trained on."""
    meta = meta_of_kind(path, "backcopy", "a trained backcopy model", "train_backcopy")
    return BackcopyTask(*meta["config"]["task"])



# -- training -------------------------------------------------------------------------
def _llama(cfg: BackcopyConfig) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.task[0], hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=max(cfg.length, 64), tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=None, pad_token_id=None,  # no padding: a pad id would freeze BOS at zero
    )
    config._attn_implementation = "eager"  # train with the attention that pattern sites observe
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    if cfg.activation == "relu":
        use_relu_attention(model)
    return model


def load_backcopy(path: str | os.PathLike) -> Any:
    """An ``actscope.Model`` of a trained backcopy directory, with the attention it was trained
    with (transformers does not save a ReLU-attention choice: ``actscope.load`` alone would run
    it with softmax)."""
    from actscope.models import load

    meta = meta_of_kind(path, "backcopy", "a trained backcopy model", "train_backcopy")
    model = load(path)
    if meta["config"]["activation"] == "relu":
        use_relu_attention(model.module)
    else:
        model.module.set_attn_implementation("eager")  # as trained; pattern sites need it anyway
    return model


def _optimizer(cfg: BackcopyConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    # SGD needs a far larger step size to make comparable progress in the same steps.
    return torch.optim.SGD(params, lr=cfg.lr * 100, momentum=0.9)


def evaluate(model: Any, task: BackcopyTask, n_sequences: int = 256, length: int = 32, seed: int = 999_983) -> dict[str, float]:
    """Held-out next-token loss, and accuracy of the copied token right after triggers."""
    inputs = task.inputs(n_sequences, length, seed)
    ids = inputs["input_ids"]
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float()  # [n, length-1, vocab]
    target = ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    after_trigger = task.is_trigger(ids[:, :-1])  # queries whose next token is a copy
    hits = (logits.argmax(-1) == target)[after_trigger]
    return {"loss": float(loss), "copy_accuracy": float(hits.float().mean()), "copy_queries": int(after_trigger.sum())}


def _train_into(directory: Path, cfg: BackcopyConfig) -> dict[str, Any]:
    started = time.perf_counter()
    task = cfg.make_task()
    model = _llama(cfg)
    model.train()
    optimizer = _optimizer(cfg, model.parameters())
    loss_log: list[list[float]] = []
    for step in range(cfg.steps):
        inputs = task.inputs(cfg.batch_size, cfg.length, seed=cfg.seed * 1_000_003 + step)  # fresh data every step
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % max(cfg.steps // 20, 1) == 0 or step + 1 == cfg.steps:
            loss_log.append([step + 1, round(float(loss.detach()), 5)])
    model.eval()
    meta = training_meta("backcopy", VERSION, cfg.to_dict(), loss_log, evaluate(model, task), started)
    save_quietly(model, directory)
    write_meta(directory, meta)  # last: marks the model complete
    return meta


def train_backcopy(
    n_layers: int = 1,
    activation: str = "softmax",
    optimizer: str = "adam",
    steps: int = BackcopyConfig.steps,
    seed: int = 0,
    *,
    n_heads: int = 1,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Train (or reuse) a tiny Llama-shaped model on the Bigram-Backcopy task; return its directory.

    ``optimizer``: ``"adam"`` (lr 3e-3) or ``"sgd"`` (momentum 0.9, lr 0.3). ``activation``:
    ``"softmax"`` or ``"relu"`` attention (:mod:`actscope.models.attention`). Load the directory
    with :func:`load_backcopy` (no tokenizer: feed :meth:`BackcopyTask.inputs` dicts, the task is
    :func:`task_of(dir)`); its
    ``actscope_zoo.json`` holds the configuration, the loss log and held-out loss / copy accuracy.
    A valid cached model with the same configuration is reused unless ``force``.
    """
    cfg = BackcopyConfig(n_layers=n_layers, n_heads=n_heads, activation=activation, optimizer=optimizer, steps=steps, seed=seed)
    _check_config(cfg)
    return train_cached(out_dir, default_dir(cfg), lambda tmp: _train_into(tmp, cfg),
                        lambda path: holds_model(path, VERSION, cfg.to_dict()),
                        force=force, caller="train_backcopy", what="a backcopy model directory")


__all__ = ["BOS", "BackcopyConfig", "BackcopyTask", "default_dir", "evaluate", "load_backcopy", "read_meta", "task_of",
           "train_backcopy"]
