"""Induction-head score for every head (METHODS.md, "Circuit reuse").

On sequences ``[BOS] r r`` (``r`` = ``seq_len`` uniformly random tokens, repeated once), a query
at position ``offset + seq_len + j`` of the second repeat holds the token whose previous
occurrence is ``offset + j`` in the first repeat; an induction head attends to the token
*after* it, ``offset + j + 1``. The score of a head is the mean over the batch and over every
query of the second repeat (``j = 0 … seq_len − 1``) of that attention probability.

Our choices: the previous occurrence is always the copy in the first repeat (when ``r`` itself
repeats a token, earlier occurrences are not counted); the BOS token is optional; tokens are
drawn uniformly from ``[low, high)`` with a seeded generator.

:func:`previous_token_scores` is the companion score of the heads that build induction: the
mean attention from every position after the first real token to the position just before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import InputError
from ..results import TableResult
from ..models import Model, ModelLike


@dataclass(frozen=True)
class HeadScores(TableResult):
    """One score per (layer, head): ``scores[layer, head]``."""

    table_name: ClassVar[str] = "induction"

    kind: str  # "induction" or "previous_token"
    scores: np.ndarray  # [layers, heads]
    layers: np.ndarray  # [layers] block index of each row
    seq_len: int
    batch: int

    def to_table(self) -> dict[str, np.ndarray]:
        n_layers, n_heads = self.scores.shape
        return {
            "layer": np.repeat(self.layers, n_heads),
            "head": np.tile(np.arange(n_heads), n_layers),
            "score": self.scores.reshape(-1),
        }

    def top(self, n: int = 1) -> list[tuple[int, int]]:
        """The ``n`` (layer, head) pairs with the highest score, best first."""
        order = np.argsort(-self.scores.reshape(-1), kind="stable")[:n]
        heads = self.scores.shape[1]
        return [(int(self.layers[i // heads]), int(i % heads)) for i in order]


def repeated_tokens(seq_len: int, batch: int, seed: int = 0, *, low: int = 0, high: int, bos: int | None = None) -> torch.Tensor:
    """``[batch, (1 if bos) + 2·seq_len]`` int64: ``[bos] r r`` with ``r`` uniform in ``[low, high)``."""
    for name, value, minimum in (("seq_len", seq_len, 2), ("batch", batch, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InputError(f"induction: {name} must be an int >= {minimum}, got {value!r}")
    if high - low < 2:
        raise InputError(f"induction: tokens are drawn from [{low}, {high}), which holds fewer than 2 ids; widen the range")
    generator = torch.Generator().manual_seed(seed)
    random = torch.randint(low, high, (batch, seq_len), generator=generator)
    parts = [random, random]
    if bos is not None:
        parts.insert(0, torch.full((batch, 1), bos, dtype=torch.int64))
    return torch.cat(parts, dim=1)


def induction_score_from_pattern(pattern: torch.Tensor, seq_len: int, offset: int = 0) -> torch.Tensor:
    """``[heads]``: mean over batch and second-repeat queries of ``pattern[b, h, q, q − seq_len + 1]``.

    ``pattern``: ``[batch, head, query, key]`` attention probabilities of a ``[prefix] r r``
    sequence whose first repeat starts at ``offset``.
    """
    if pattern.shape[-1] < offset + 2 * seq_len or pattern.shape[-2] < offset + 2 * seq_len:
        raise InputError(f"induction: a pattern of shape {tuple(pattern.shape)} is shorter than offset + 2·seq_len = {offset + 2 * seq_len}")
    queries = torch.arange(offset + seq_len, offset + 2 * seq_len)  # second repeat
    keys = queries - seq_len + 1  # the token after the previous occurrence
    return pattern[:, :, queries, keys].double().mean(dim=(0, 2))


def previous_token_score_from_pattern(pattern: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``[heads]``: mean over batch and queries ``q > offset`` of ``pattern[b, h, q, q − 1]``."""
    queries = torch.arange(offset + 1, pattern.shape[-2])
    return pattern[:, :, queries, queries - 1].double().mean(dim=(0, 2))


def induction_scores(
    model: Model, seq_len: int = 16, batch: int = 8, seed: int = 0, *, bos: int | None = None,
    low: int | None = None, high: int | None = None,
) -> HeadScores:
    """Induction-head score of every head of every block (``blocks.*.attn.pattern``).

    ``bos``: a token put in front (default: the config's ``bos_token_id`` when it has one,
    else none). Tokens come from ``[low, high)``; by default ``high`` is the vocabulary size
    and ``low`` is 1 when BOS is token 0 (so BOS never appears inside ``r``), else 0. The
    patterns come from one forward with ``blocks.*.attn.pattern`` captured (which switches
    to eager attention for that pass and restores the model's setting).
    """
    ids, offset = _sequences(model, seq_len, batch, seed, bos, low, high)
    patterns = _patterns(model, ids)
    scores = torch.stack([induction_score_from_pattern(p, seq_len, offset) for p in patterns.values()])
    return HeadScores("induction", scores.numpy(), _layers(patterns), seq_len, batch)


def previous_token_scores(
    model: Model, seq_len: int = 16, batch: int = 8, seed: int = 0, *, bos: int | None = None,
    low: int | None = None, high: int | None = None,
) -> HeadScores:
    """Previous-token score of every head on the same ``[BOS] r r`` sequences."""
    ids, offset = _sequences(model, seq_len, batch, seed, bos, low, high)
    patterns = _patterns(model, ids)
    scores = torch.stack([previous_token_score_from_pattern(p, offset) for p in patterns.values()])
    return HeadScores("previous_token", scores.numpy(), _layers(patterns), seq_len, batch)


def _sequences(model: ModelLike, seq_len: int, batch: int, seed: int, bos: int | None, low: int | None, high: int | None) -> tuple[torch.Tensor, int]:
    from ..models import as_model

    model = as_model(model)
    config = model.config
    vocab = getattr(config, "vocab_size", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    if high is None:
        if vocab is None:
            raise InputError(f"induction: {model.name} has no config.vocab_size; pass high= (the token range's end)")
        high = int(vocab)
    if low is None:
        low = bos + 1 if bos is not None and bos == 0 else 0
    ids = repeated_tokens(seq_len, batch, seed, low=low, high=high, bos=bos).to(model.device)
    return ids, (1 if bos is not None else 0)


def _patterns(model: ModelLike, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{site: [batch, head, q, k]}`` for every block's attention pattern, one forward."""
    from ..trace import capture
    from ..models import as_model

    model = as_model(model)
    with torch.no_grad(), capture(model, "blocks.*.attn.pattern", announce=False) as captured:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return {label: captured.tensor(label) for label in captured.tensors}


def _layers(patterns: dict[str, torch.Tensor]) -> np.ndarray:
    return np.asarray([int(label.split(".")[1]) for label in patterns], dtype=np.int64)


__all__ = [
    "HeadScores", "induction_score_from_pattern", "induction_scores", "previous_token_score_from_pattern",
    "previous_token_scores", "repeated_tokens",
]
