"""Two synthetic sequence tasks and a tiny Mixtral-shaped MoE model trained on their mixture (MoTE).

A sequence is ``BOS marker x1 … xL SEP y1 … yL`` over symbols ``x_i`` drawn uniformly:

* task A (marker ``A``): ``y`` is ``x`` reversed, ``y_i = x_(L+1-i)``;
* task B (marker ``B``): ``y_i = π(x_i)`` for a fixed random permutation ``π`` of the symbols
  (drawn once from the task seed).

Token ids: ``0`` BOS, ``1`` the A marker, ``2`` the B marker, ``3`` SEP, ``4 …`` the symbols.
The model is scored only on the ``y`` tokens (next-token prediction, teacher forcing); there is
no padding. Both tasks read every ``x``, so the tasks differ in the rule, not in the tokens seen.

:func:`train_moe_tasks` trains a Mixtral-shaped model from a config (by default 2 blocks,
d_model 64, 8 experts of 64 units, top-2 routing, 4 heads; Adam, 600 steps of 64 sequences,
half of each task; cross-entropy on the ``y`` tokens plus Mixtral's load-balancing loss with
coefficient 0.02 so every expert gets used) on one CPU thread, and saves it with
``save_pretrained`` under ``$ACTSCOPE_CACHE/zoo/moe-tasks-…``: trained into a temporary sibling
and renamed into place when complete (``actscope_zoo.json``, written last, marks it complete).
It has no tokenizer: feed it :meth:`TwoTasks.inputs` dicts; :func:`task_of` gives the tasks.
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
from actscope.zoo.cache import (holds_model, meta_of_kind, read_meta, save_quietly, train_cached, training_meta,
                                 write_meta, zoo_dir)

VERSION = "1"
BOS, MARK_A, MARK_B, SEP = 0, 1, 2, 3
FIRST_SYMBOL = 4
TASKS = ("A", "B")
EVAL_SEED = 999_983  # held-out sequences; training draws from other seeds


@dataclass(frozen=True)
class TwoTasks:
    """Task A (reverse) and task B (a fixed symbol permutation), ``length`` symbols each."""

    n_symbols: int = 16
    length: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("n_symbols", self.n_symbols, 2)
        _check_int("length", self.length, 1)
        _check_int("seed", self.seed, 0)

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.n_symbols

    @property
    def sequence_length(self) -> int:
        return 3 + 2 * self.length

    @cached_property
    def permutation(self) -> torch.Tensor:
        """Task B's map ``π`` over symbol numbers ``0 … n_symbols-1``."""
        return torch.randperm(self.n_symbols, generator=torch.Generator().manual_seed(self.seed))

    def sample(self, task: str, n: int, seed: int = 0) -> torch.Tensor:
        """``[n, 3 + 2·length]`` token ids of task ``"A"`` or ``"B"``."""
        _check_task(task)
        _check_int("n", n, 1)
        x = torch.randint(0, self.n_symbols, (n, self.length), generator=torch.Generator().manual_seed(seed))
        y = x.flip(1) if task == "A" else self.permutation[x]
        head = torch.tensor([BOS, MARK_A if task == "A" else MARK_B])
        sep = torch.tensor([SEP])
        return torch.cat([head.expand(n, 2), x + FIRST_SYMBOL, sep.expand(n, 1), y + FIRST_SYMBOL], dim=1)

    def inputs(self, task: str, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Model-input dict ``{input_ids, attention_mask}`` of :meth:`sample` sequences."""
        ids = self.sample(task, n, seed)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @property
    def scored(self) -> slice:
        """Positions whose *next* token is a ``y`` token (the logits that are scored)."""
        start = 2 + self.length  # the SEP position predicts y1
        return slice(start, start + self.length)


def _check_task(task: Any) -> None:
    if task not in TASKS:
        raise InputError(f"moe tasks: task must be one of {TASKS}, got {task!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"moe tasks: {name} must be an int >= {minimum}, got {value!r}; pass e.g. {name}={max(minimum, 1)}.")


def task_loss(model: Any, tasks: TwoTasks, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the ``y`` tokens, and ``[n, length]`` bool hits of the argmax."""
    return scored_loss(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, tasks, ids)


def scored_loss(logits: torch.Tensor, tasks: TwoTasks, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and argmax hits of model logits ``[n, positions, vocab]`` on the ``y`` tokens."""
    logits = logits[:, tasks.scored].float()  # [n, length, vocab]
    target = ids[:, tasks.scored.start + 1:tasks.scored.stop + 1]  # [n, length]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return loss, logits.argmax(-1) == target


def evaluate(model: Any, tasks: TwoTasks, task: str, n: int = 512, seed: int = EVAL_SEED) -> dict[str, float]:
    """Held-out loss (nats per ``y`` token) and token accuracy of ``model`` on one task."""
    _check_task(task)
    with torch.no_grad():
        loss, hits = task_loss(model, tasks, tasks.sample(task, n, seed + TASKS.index(task)))
    return {"loss": float(loss), "accuracy": float(hits.float().mean())}


def task_of(path: str | os.PathLike) -> TwoTasks:
    """The tasks a trained directory was trained on."""
    meta = meta_of_kind(path, "moe-tasks", "a trained two-task MoE model", "train_moe_tasks")
    return TwoTasks(*meta["config"]["task"])


@dataclass(frozen=True)
class MoETasksConfig:
    """Everything that determines a trained two-task MoE model (apart from library versions)."""

    n_layers: int = 2
    d_model: int = 64
    d_expert: int = 64
    n_experts: int = 8
    top_k: int = 2
    n_heads: int = 4
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    aux_coef: float = 0.02
    seed: int = 0
    task: tuple[int, int, int] = (16, 6, 0)  # n_symbols, length, task seed

    def make_tasks(self) -> TwoTasks:
        return TwoTasks(*self.task)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task"] = list(self.task)
        return d


def _mixtral(cfg: MoETasksConfig) -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    tasks = cfg.make_tasks()
    config = MixtralConfig(
        vocab_size=tasks.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_expert,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, router_aux_loss_coef=cfg.aux_coef,
        max_position_embeddings=max(tasks.sequence_length, 32), tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    return MixtralForCausalLM(config)


def _check_config(cfg: MoETasksConfig) -> None:
    minimums = {"n_layers": 1, "d_model": 4, "d_expert": 1, "n_experts": 2, "top_k": 1, "n_heads": 1, "steps": 1, "batch_size": 2, "seed": 0}
    for name, minimum in minimums.items():
        _check_int(name, getattr(cfg, name), minimum)
    if cfg.top_k > cfg.n_experts:
        raise InputError(f"train_moe_tasks: top_k {cfg.top_k} exceeds n_experts {cfg.n_experts}; lower top_k")
    if cfg.d_model % (2 * cfg.n_heads):
        raise InputError(f"train_moe_tasks: d_model {cfg.d_model} must be a multiple of 2·n_heads = {2 * cfg.n_heads}; pass e.g. d_model=64.")
    cfg.make_tasks()  # validates the task parameters


def _train_into(directory: Path, cfg: MoETasksConfig) -> dict[str, Any]:
    started = time.perf_counter()
    tasks = cfg.make_tasks()
    model = _mixtral(cfg)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    half = cfg.batch_size // 2
    loss_log: list[list[float]] = []
    window: list[float] = []
    for step in range(cfg.steps):
        seed = (cfg.seed + 1) * 1_000_003 + 2 * step  # fresh sequences every step, never the held-out seed
        ids = torch.cat([tasks.sample("A", half, seed), tasks.sample("B", cfg.batch_size - half, seed + 1)])
        out = model(input_ids=ids, output_router_logits=True)
        loss = scored_loss(out.logits, tasks, ids)[0]
        optimizer.zero_grad(set_to_none=True)
        (loss + cfg.aux_coef * out.aux_loss).backward()
        optimizer.step()
        window.append(float(loss.detach()))
        if (step + 1) % max(cfg.steps // 20, 1) == 0 or step + 1 == cfg.steps:
            loss_log.append([step + 1, round(sum(window) / len(window), 5)])  # mean since the last entry
            window = []
    model.eval()
    held_out = {task: evaluate(model, tasks, task) for task in TASKS}
    meta = training_meta("moe-tasks", VERSION, cfg.to_dict(), loss_log, held_out, started)
    save_quietly(model, directory)
    write_meta(directory, meta)  # last: marks the model complete
    return meta


# -- cache ----------------------------------------------------------------------------

def default_dir(cfg: MoETasksConfig) -> Path:
    """``<cache>/zoo/moe-tasks-L<layers>-E<experts>k<top_k>-s<steps>-seed<seed>-v<VERSION>``
    (other settings are stored in ``actscope_zoo.json`` and checked on reuse)."""
    name = f"moe-tasks-L{cfg.n_layers}-E{cfg.n_experts}k{cfg.top_k}-s{cfg.steps}-seed{cfg.seed}-v{VERSION}"
    return zoo_dir(name)



def train_moe_tasks(
    steps: int = MoETasksConfig.steps, seed: int = 0, *, n_layers: int = 2, n_experts: int = 8, top_k: int = 2,
    out_dir: str | os.PathLike | None = None, force: bool = False,
) -> Path:
    """Train (or reuse) the tiny two-task MoE model; return its directory.

    The directory loads with ``actscope.load(dir)`` (no tokenizer: feed
    ``task_of(dir).inputs(...)`` dicts); its ``actscope_zoo.json`` holds the configuration, the
    loss log and the held-out loss / accuracy per task. A valid cached model with the same
    configuration is reused unless ``force``.
    """
    cfg = MoETasksConfig(n_layers=n_layers, n_experts=n_experts, top_k=top_k, steps=steps, seed=seed)
    _check_config(cfg)
    return train_cached(out_dir, default_dir(cfg), lambda tmp: _train_into(tmp, cfg),
                        lambda path: holds_model(path, VERSION, cfg.to_dict()),
                        force=force, caller="train_moe_tasks", what="a trained model directory")


__all__ = ["MoETasksConfig", "TwoTasks", "default_dir", "evaluate", "read_meta", "task_of", "scored_loss", "task_loss", "train_moe_tasks"]
