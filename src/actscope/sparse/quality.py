"""``evaluate``: what a calibration costs in quality, dense versus sparse perplexity.

Perplexity is ``exp`` of the mean next-token cross-entropy, scored the same way for the dense
and the sparse model:

* cats, teal, cett — every real token that has a real successor predicts it (one forward per
  batch, padding excluded);
* core — CoreInfer is a generation method, so each text is run as generation would: its first
  ``ceil(L/2)`` tokens as the prompt (prefill, which chooses the core sets), the rest fed as
  the continuation through the KV cache; only the continuation's own predictions are scored
  *(our choice of split)*. Texts shorter than 4 tokens are skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import DataError
from ..results import TableResult
from .calibration import Calibration
from ..models import Model, ModelLike


@dataclass(frozen=True, eq=False)
class QualityReport(TableResult):
    """Dense vs sparse perplexity of one calibration on some data (one row)."""

    table_name: ClassVar[str] = "sparse_quality"
    method: str
    setting: str
    scored: str
    tokens: int
    dense_ppl: float
    sparse_ppl: float
    expected_sparsity: float
    realised_sparsity: float  # core: over the continuation's tokens (its prefill is dense)
    weight_skipped: float

    @property
    def increase(self) -> float:
        """Relative perplexity increase (0.01 = +1 %)."""
        return self.sparse_ppl / self.dense_ppl - 1.0

    def to_table(self) -> dict[str, np.ndarray]:
        return {
            "method": np.array([self.method], dtype=object), "setting": np.array([self.setting], dtype=object),
            "scored": np.array([self.scored], dtype=object), "tokens": np.array([self.tokens]),
            "expected_sparsity": np.array([self.expected_sparsity]), "realised_sparsity": np.array([self.realised_sparsity]),
            "weight_skipped": np.array([self.weight_skipped]), "dense_ppl": np.array([self.dense_ppl]),
            "sparse_ppl": np.array([self.sparse_ppl]), "ppl_increase": np.array([self.increase]),
        }


def setting_text(calibration: Calibration) -> str:
    s = calibration.settings
    if calibration.method == "cett":
        return f"p={100 * s['p']:g}%"
    if calibration.method == "core":
        return f"alpha={s['alpha']:g} beta={s['beta']:g}"
    if calibration.method == "teal":  # which TEAL: greedy or uniform, over every projection or the MLP's
        return f"sparsity={s['sparsity']:g} {s['allocation']} {s['projections']}"
    return f"sparsity={s['sparsity']:g}"


def evaluate(model: ModelLike, calibration: Calibration, data: Any, *, batch_size: int = 8, max_length: int = 128) -> QualityReport:
    """Dense and sparse perplexity of ``model`` on ``data`` (strings, a text source or
    model-input dicts) with ``calibration`` (scoring in the module docstring)."""
    from ..models import as_model
    from ..feeding import materialised
    from .execution import sparsify
    from .families import mlp_blocks
    from .swaps import refuse_nested

    model = as_model(model)
    refuse_nested(model, mlp_blocks(model), "evaluate")  # its dense perplexity needs the dense model
    batches = materialised(model, data, what="evaluation", batch_size=batch_size, max_length=max_length)
    score = _continuation_loss if calibration.method == "core" else _all_tokens_loss
    dense, tokens = score(model, batches)
    with sparsify(model, calibration) as handle:
        sparse, _ = score(model, batches)
    realised = handle.realised()
    core = calibration.method == "core"  # its prefill is dense: count the continuation only
    tokens_of = realised.decode_tokens if core else realised.tokens
    mean = lambda v: float(np.average(v, weights=tokens_of)) if tokens_of.sum() else math.nan  # noqa: E731
    return QualityReport(
        method=calibration.method, setting=setting_text(calibration),
        scored="continuation" if calibration.method == "core" else "all tokens", tokens=tokens,
        dense_ppl=math.exp(dense), sparse_ppl=math.exp(sparse),
        expected_sparsity=float(np.mean(calibration.expected_sparsity)),
        realised_sparsity=mean(realised.decode_sparsity if core else realised.sparsity),
        weight_skipped=mean(realised.decode_weight_skipped if core else realised.weight_skipped),
    )


def _all_tokens_loss(model: Model, batches: list[dict]) -> tuple[float, int]:
    from ..metrics.cett.objectives import next_token_loss

    return _mean(*next_token_loss(model, batches))


def _continuation_loss(model: Model, batches: list[dict]) -> tuple[float, int]:
    from ..feeding import real_token_mask

    total, count = 0.0, 0
    with torch.no_grad():
        for inputs in batches:
            for ids, mask in zip(inputs["input_ids"], real_token_mask(inputs)):
                row = ids[mask][None]  # [1, L]
                if row.shape[1] < 4:
                    continue
                split = math.ceil(row.shape[1] / 2)
                cache = model.module(input_ids=row[:, :split], use_cache=True).cache
                logits = model.module(input_ids=row[:, split:], cache=cache, use_cache=True).logits[0, :-1].float()
                total += float(torch.nn.functional.cross_entropy(logits, row[0, split + 1:], reduction="sum"))
                count += logits.shape[0]
    return _mean(total, count)


def _mean(total: float, count: int) -> tuple[float, int]:
    if count == 0:
        raise DataError("the evaluation texts have no token to score; pass longer texts")
    return total / count, count
