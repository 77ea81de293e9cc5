"""Every head's attention pattern for one prompt: what the report's attention viewer shows.

:func:`attention_patterns` runs the prompt once with the ``blocks.*.attn.pattern`` sites captured
(eager attention switched on for the call and restored) and returns, per site and head, the
``[query, key]`` probabilities of the prompt's tokens. The first key position is the usual
attention sink; ``sink`` is the mean over queries of the probability put on it (the ``heads``
table's ``first_token_attention`` for this one prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import InputError
from ..models import ModelLike
from ..results import TableResult

PATTERNS = "blocks.*.attn.pattern"
MAX_TOKENS = 64  # positions shown: a 64 × 64 grid per head keeps the page small


@dataclass(frozen=True, eq=False)
class AttentionPatterns(TableResult):
    """One row per (site, head, query, key): the attention probability ``weight``."""

    table_name: ClassVar[str] = "attention"

    tokens: tuple[str, ...]  # the prompt's tokens (text pieces), one per position
    site: np.ndarray  # [rows] object
    layer: np.ndarray  # [rows] int64
    head: np.ndarray  # [rows] int64
    query: np.ndarray  # [rows] int64
    key: np.ndarray  # [rows] int64
    weight: np.ndarray  # [rows] float64

    def to_table(self) -> dict[str, np.ndarray]:
        return {"site": self.site, "layer": self.layer, "head": self.head, "query": self.query, "key": self.key, "weight": self.weight}

    def tokens_table(self) -> dict[str, np.ndarray]:
        """``attention_tokens``: position and text of each token of the prompt."""
        return {"position": np.arange(len(self.tokens), dtype=np.int64), "token": np.array(self.tokens, dtype=object)}

    def pattern(self, site: str, head: int) -> np.ndarray:
        """``[query, key]`` probabilities of one head."""
        rows = (self.site == site) & (self.head == head)
        size = len(self.tokens)
        out = np.zeros((size, size))
        out[self.query[rows], self.key[rows]] = self.weight[rows]
        return out

    def sinks(self) -> dict[tuple[str, int], float]:
        """Per (site, head): the mean over queries of the attention on key position 0."""
        first = self.key == 0
        out = {}
        for site, head in dict.fromkeys(zip(self.site[first].tolist(), self.head[first].tolist())):
            rows = first & (self.site == site) & (self.head == head)
            out[(site, head)] = float(self.weight[rows].mean())
        return out


def attention_patterns(model: ModelLike, prompt: str, sites: str = PATTERNS, *, max_tokens: int = MAX_TOKENS) -> AttentionPatterns:
    """Each head's attention pattern over ``prompt`` (cut to ``max_tokens`` tokens)."""
    from ..feeding import tokenize
    from ..models import as_model
    from ..trace import Capture

    model = as_model(model)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InputError(f"max_tokens must be a whole number of at least 1, got {max_tokens!r}")
    if sites == PATTERNS:
        model.require_card("the attention viewer", "each block's attention pattern (blocks.*.attn.pattern)")
    ids = tokenize(model, [prompt], max_tokens)[0]
    capture = Capture(model, sites, announce=False)
    if any(site.hook.layout != "pattern" for site in capture.plan.sites):
        raise InputError(f"{sites}: the attention viewer shows attention-pattern sites (blocks.*.attn.pattern)")
    with torch.no_grad(), capture.attached():
        model(input_ids=torch.tensor([ids], device=model.device))
    parts = []
    for site in capture.plan.sites:
        pattern = capture.tensors[site.label][0][0].double().cpu()  # [heads, query, key]
        heads = site.heads or tuple(range(pattern.shape[0]))
        if site.heads is not None:
            pattern = pattern[list(site.heads)]
        h, q, k = np.meshgrid(np.asarray(heads), np.arange(pattern.shape[1]), np.arange(pattern.shape[2]), indexing="ij")
        parts.append((site, h.reshape(-1), q.reshape(-1), k.reshape(-1), pattern.reshape(-1).numpy()))
    texts = _pieces(model, ids)
    return AttentionPatterns(
        tuple(texts), np.concatenate([np.array([s.label] * len(h), dtype=object) for s, h, *_ in parts]),
        np.concatenate([np.full(len(h), -1 if s.layer is None else s.layer, dtype=np.int64) for s, h, *_ in parts]),
        *(np.concatenate([p[i] for p in parts]).astype(np.int64) for i in (1, 2, 3)),
        np.concatenate([p[4] for p in parts]).astype(np.float64))


def _pieces(model, ids: list[int]) -> list[str]:
    """The text of each token, as the report shows it."""
    if model.tokenizer is None:
        return [str(i) for i in ids]
    return [model.tokenizer.decode([i]) for i in ids]
