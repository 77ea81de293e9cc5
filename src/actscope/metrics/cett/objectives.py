"""The pluggable "performance" of the CETT-PPL-p% search (METHODS.md, *(our choice)*).

An objective makes one pass over its evaluation data per call. ``reference(model)`` runs the
dense model once and keeps what later passes compare with; ``degradation(model, reference)``
runs the model as it is (edited) and returns a number that is 0 for the dense model and grows
as quality drops. The search finds the sparsest setting whose degradation is ≤ p:

* :class:`CausalLMLoss` — mean next-token cross-entropy L over real tokens (each real token
  predicts the next real one); degradation ``exp(L_sparse − L_dense) − 1``: the perplexity
  ratio minus 1, exactly the paper's ``exp(L_sparse − L_dense) = 1 + p``.
* :class:`MaskedLMLoss` — mean cross-entropy at masked positions: a fixed, seeded choice of
  ``mask_fraction`` of each batch's real, non-special tokens is replaced by the mask token
  (the same inputs for every pass); degradation ``exp(L_sparse − L_dense) − 1``.
* :class:`EmbeddingFidelity` — sentence embedding ``e`` = mean of the last hidden state over
  real tokens (the pooling of sentence-transformers models such as MiniLM); fidelity =
  ``(1/N) Σ_n cos(e_n^sparse, e_n^dense)`` over the N texts; degradation ``1 − fidelity``
  (the loss-ratio analogue: "the embeddings lose at most p of their cosine").
* :class:`ClassifierKL` — per example (per real token for ``[batch, pos, classes]`` logits)
  ``KL(softmax(dense) ‖ softmax(sparse))``, averaged; degradation ``exp(mean KL) − 1``: the
  perplexity ratio of the sparse model measured against the dense model's soft labels.
* :class:`ClassifierAccuracy` — accuracy against given labels; degradation
  ``1 − accuracy_sparse / accuracy_dense`` (relative loss of accuracy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Sequence

import torch

from ...errors import DataError, InputError
from ...feeding import materialised, real_token_mask
from ...models import Model


class Objective(Protocol):
    """One pass over evaluation data per call; see the module docstring."""

    name: str

    def reference(self, model: Model) -> Any: ...

    def degradation(self, model: Model, reference: Any) -> float: ...


@dataclass(frozen=True)
class _Reference:
    batches: list[dict[str, torch.Tensor]]
    value: Any  # the dense loss, embeddings, log-probabilities or accuracy


def _forward(model: Model, inputs: dict[str, torch.Tensor]) -> Any:
    with torch.no_grad():
        return model.module(**inputs)


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        raise InputError(
            f"the model returns {type(output).__name__} without logits; this objective needs a model with a "
            "prediction head (…ForCausalLM, …ForMaskedLM, …ForSequenceClassification); use EmbeddingFidelity for encoders"
        )
    return logits.float()


def _degradation_of_loss(loss: float, dense: float) -> float:
    return math.exp(loss - dense) - 1.0


# -- causal LM -----------------------------------------------------------------------------
class _Evaluated:
    """An objective measured on fixed evaluation batches: the dense reference keeps the
    batches and the dense value of ``measure(model, batches)``, which subclasses define."""

    def batches(self, model: Model) -> list[dict[str, torch.Tensor]]:
        return materialised(model, self.data, batch_size=self.batch_size, max_length=self.max_length, what="evaluation")

    def reference(self, model: Model) -> _Reference:
        batches = self.batches(model)
        return _Reference(batches, self.measure(model, batches))


class _LossRatio(_Evaluated):
    """Objectives whose degradation is ``exp(L_sparse − L_dense) − 1`` of the loss ``measure``."""

    def degradation(self, model: Model, reference: _Reference) -> float:
        return _degradation_of_loss(self.measure(model, reference.batches), reference.value)


@dataclass(frozen=True)
class CausalLMLoss(_LossRatio):
    """Perplexity ratio of a causal LM on ``data`` (strings, a text source or input dicts)."""

    name: ClassVar[str] = "causal_lm_loss"
    data: Any
    batch_size: int = 16
    max_length: int = 128

    def measure(self, model: Model, batches: Sequence[dict[str, torch.Tensor]]) -> float:
        """Mean next-token cross-entropy (nats) over real tokens that have a real successor."""
        total, count = next_token_loss(model, batches)
        if count == 0:
            raise DataError("the evaluation texts have no token followed by another; pass longer texts")
        return total / count


def next_token_loss(model: Model, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(summed next-token cross-entropy in nats, tokens scored) over real tokens that have a
    real successor."""
    total, count = 0.0, 0
    for inputs in batches:
        logits = _logits(_forward(model, inputs))[:, :-1]  # [batch, pos-1, vocab]
        mask = real_token_mask(inputs)
        both = mask[:, :-1] & mask[:, 1:]
        target = inputs["input_ids"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits[both], target[both], reduction="sum"))
        count += int(both.sum())
    return total, count


# -- masked LM -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskedLMLoss(_LossRatio):
    """Masked-LM loss ratio; ``mask_token_id`` defaults to the tokenizer's."""

    name: ClassVar[str] = "masked_lm_loss"
    data: Any
    mask_fraction: float = 0.15
    seed: int = 0
    mask_token_id: int | None = None
    special_ids: tuple[int, ...] | None = None
    batch_size: int = 16
    max_length: int = 128

    def batches(self, model: Model) -> list[dict[str, torch.Tensor]]:
        """The evaluation batches with masked inputs and ``labels`` (−100 = not scored)."""
        if not 0 < self.mask_fraction < 1:
            raise InputError(f"mask_fraction must be between 0 and 1, got {self.mask_fraction!r}; e.g. 0.15")
        mask_id, special = self._ids(model)
        generator = torch.Generator().manual_seed(self.seed)
        out = []
        for inputs in materialised(model, self.data, batch_size=self.batch_size, max_length=self.max_length, what="evaluation"):
            ids = inputs["input_ids"]
            eligible = real_token_mask(inputs) & ~torch.isin(ids, torch.tensor(special, device=ids.device))
            chosen = (torch.rand(ids.shape, generator=generator) < self.mask_fraction).to(ids.device) & eligible
            labels = torch.where(chosen, ids, torch.full_like(ids, -100))
            out.append({**inputs, "input_ids": torch.where(chosen, torch.full_like(ids, mask_id), ids), "labels": labels})
        if not any(bool((b["labels"] != -100).any()) for b in out):
            raise DataError("no token was masked; pass more or longer texts, or raise mask_fraction")
        return out

    def _ids(self, model: Model) -> tuple[int, tuple[int, ...]]:
        tokenizer = model.tokenizer
        mask_id = self.mask_token_id if self.mask_token_id is not None else getattr(tokenizer, "mask_token_id", None)
        if mask_id is None:
            raise InputError("MaskedLMLoss needs a mask token: load a model with a masked-LM tokenizer or pass mask_token_id=")
        special = self.special_ids if self.special_ids is not None else tuple(getattr(tokenizer, "all_special_ids", ()) or ())
        return int(mask_id), tuple(int(s) for s in special)

    @staticmethod
    def measure(model: Model, batches: Sequence[dict[str, torch.Tensor]]) -> float:
        """Mean cross-entropy over the masked positions of all batches."""
        total, count = 0.0, 0
        for batch in batches:
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = _logits(_forward(model, inputs))
            scored = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[scored], labels[scored], reduction="sum"))
            count += int(scored.sum())
        return total / count


# -- embedding fidelity --------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingFidelity(_Evaluated):
    """``1 − mean cosine(sparse, dense)`` of mean-pooled sentence embeddings."""

    name: ClassVar[str] = "embedding_fidelity"
    data: Any
    batch_size: int = 16
    max_length: int = 128

    @staticmethod
    def measure(model: Model, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """``[N, d_model]`` float64: mean of the last hidden state over each text's real tokens."""
        rows = []
        for inputs in batches:
            output = _forward(model, inputs)
            hidden = getattr(output, "last_hidden_state", None)
            hidden = output[0] if hidden is None else hidden  # [batch, pos, d_model]
            mask = real_token_mask(inputs).to(torch.float64)[..., None]
            rows.append((hidden.to(torch.float64) * mask).sum(1) / mask.sum(1).clamp_min(1))
        return torch.cat(rows)

    def degradation(self, model: Model, reference: _Reference) -> float:
        cosine = torch.nn.functional.cosine_similarity(self.measure(model, reference.batches), reference.value, dim=-1)
        return 1.0 - float(cosine.mean())


# -- classifiers ---------------------------------------------------------------------------
def _rows(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[rows, classes]``: per example, or per real token for per-token logits."""
    if logits.dim() == 3:
        return logits[real_token_mask(inputs)]
    return logits.reshape(-1, logits.shape[-1])


@dataclass(frozen=True)
class ClassifierKL(_Evaluated):
    """``exp(mean KL(dense ‖ sparse)) − 1`` over examples (or real tokens)."""

    name: ClassVar[str] = "classifier_kl"
    data: Any
    batch_size: int = 16
    max_length: int = 128

    @staticmethod
    def measure(model: Model, batches: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Per batch, ``[rows, classes]`` log-probabilities in float64."""
        return [torch.log_softmax(_rows(_logits(_forward(model, b)), b).double(), dim=-1) for b in batches]

    def degradation(self, model: Model, reference: _Reference) -> float:
        total, count = 0.0, 0
        for dense, sparse in zip(reference.value, self.measure(model, reference.batches)):
            total += float((dense.exp() * (dense - sparse)).sum())
            count += dense.shape[0]
        return math.exp(total / count) - 1.0


@dataclass(frozen=True)
class ClassifierAccuracy(_Evaluated):
    """``1 − accuracy_sparse / accuracy_dense`` against ``labels`` (one per logits row)."""

    name: ClassVar[str] = "classifier_accuracy"
    data: Any
    labels: Sequence[int]
    batch_size: int = 16
    max_length: int = 128

    def measure(self, model: Model, batches: Sequence[dict[str, torch.Tensor]]) -> float:
        predicted = torch.cat([_rows(_logits(_forward(model, b)), b).argmax(-1).cpu() for b in batches])
        labels = torch.as_tensor(list(self.labels))
        if predicted.shape != labels.shape:
            raise InputError(
                f"ClassifierAccuracy: {len(labels)} labels for {len(predicted)} predictions; give one label per example"
            )
        return float((predicted == labels).double().mean())

    def reference(self, model: Model) -> _Reference:
        reference = super().reference(model)
        if reference.value == 0:
            raise InputError("the dense model gets every example wrong, so an accuracy ratio means nothing; use ClassifierKL")
        return reference

    def degradation(self, model: Model, reference: _Reference) -> float:
        return 1.0 - self.measure(model, reference.batches) / reference.value
