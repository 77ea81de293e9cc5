"""Activation patching (METHODS.md, "Explanation and intervention").

Run the model on a *clean* input and keep each site's activations; then run it on a
*corrupted* input once per component (a whole site, one head, one unit or one position of a
site) with only that component replaced by its clean value, and report the metric and the
recovered fraction ``(m_patched − m_corrupt) / (m_clean − m_corrupt)``.

Clean activations are recorded through :func:`actscope.edit` with an identity intervention
that keeps a copy of what it sees, so the cached tensor has exactly the shape (and unit or
head selection) that the patching intervention later receives. Every pass runs under
``torch.no_grad()``; the model is only touched through ``edit``'s hooks, which are removed
whatever happens. Each patched site is assumed to run once per forward pass (a module called
twice, e.g. shared weights, keeps the clean value of its last call). Dropout is whatever the
model's mode says: call ``model.eval()`` first for deterministic metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..results import TableResult
from ..models import Model, ModelLike, as_model

Metric = Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]  # (logits, inputs) -> scalar
PER = ("site", "head", "unit", "position")
DEFAULT_SITES = "blocks.*.attn.z"
ROW_COLUMNS = ("per", "site", "layer", "head", "unit", "position", "metric")  # the per-row arrays


# -- metric -------------------------------------------------------------------------------
def logit_difference(correct_ids: Sequence[int] | torch.Tensor | int, wrong_ids: Sequence[int] | torch.Tensor | int) -> Metric:
    """Metric: mean over the batch of ``logit[correct] − logit[wrong]`` at each row's last real
    token (the last position whose attention mask is 1; the last position without a mask).

    ``correct_ids`` / ``wrong_ids``: one token id for the whole batch, or one per row.
    """

    def metric(logits: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        last = last_positions(logits, inputs)  # [batch, vocab]
        rows = torch.arange(last.shape[0], device=last.device)
        correct = _ids_for(correct_ids, last.shape[0], last.device)
        wrong = _ids_for(wrong_ids, last.shape[0], last.device)
        return (last[rows, correct] - last[rows, wrong]).mean()

    return metric


def last_positions(logits: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``[batch, vocab]``: each row's logits at its last real token (left or right padding);
    ``[batch, classes]`` outputs are returned as they are."""
    if logits.dim() == 2:
        return logits
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return logits[:, -1]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.to(torch.int64) * (positions + 1)).argmax(dim=1)  # the largest real position
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


def _ids_for(ids: Any, batch: int, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.int64, device=device).reshape(-1)
    if ids.numel() == 1:
        return ids.expand(batch)
    if ids.numel() != batch:
        raise InputError(f"logit_difference: got {ids.numel()} token ids for a batch of {batch}; give one id, or one per row")
    return ids


# -- result -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentEffects(TableResult):
    """Per component: the metric with that component patched (or its first-order estimate)
    and the recovered fraction. One row per component; ``per`` says what a component is.

    ``effect = metric − metric_corrupt``; ``recovered = effect / (metric_clean − metric_corrupt)``.
    ``head``, ``unit`` and ``position`` are −1 where they do not apply; ``layer`` is −1 for
    sites outside blocks. ``forward_passes`` / ``backward_passes`` count every model pass.
    """

    table_name: ClassVar[str] = "patching"

    method: str  # "exact" (activation patching) or "attribution"
    metric_clean: float
    metric_corrupt: float
    per: np.ndarray  # [n] str
    site: np.ndarray  # [n] str
    layer: np.ndarray  # [n] int
    head: np.ndarray  # [n] int
    unit: np.ndarray  # [n] int
    position: np.ndarray  # [n] int
    metric: np.ndarray  # [n] float
    forward_passes: int = 0
    backward_passes: int = 0

    @property
    def effect(self) -> np.ndarray:
        return self.metric - self.metric_corrupt

    @property
    def recovered(self) -> np.ndarray:
        gap = self.metric_clean - self.metric_corrupt
        return self.effect / gap if gap != 0 else np.full(len(self.metric), np.nan)

    def __len__(self) -> int:
        return len(self.metric)

    def keys(self) -> list[tuple]:
        """One hashable key per row: (per, site, head, unit, position)."""
        return list(zip(self.per.tolist(), self.site.tolist(), self.head.tolist(), self.unit.tolist(), self.position.tolist()))

    def only(self, per: str) -> "ComponentEffects":
        """The rows of one kind of component (``"site"``, ``"head"``, ``"unit"``, ``"position"``)."""
        return self._rows(self.per == per)

    def top(self, n: int = 10) -> "ComponentEffects":
        """The ``n`` rows with the largest ``|effect|`` (the same order as ``|recovered|``)."""
        return self._rows(np.argsort(-np.abs(np.nan_to_num(self.effect)), kind="stable")[:n])

    def _rows(self, selection: np.ndarray) -> "ComponentEffects":
        return replace(self, **{name: getattr(self, name)[selection] for name in ROW_COLUMNS})

    def to_table(self) -> dict[str, np.ndarray]:
        return {
            "per": self.per, "site": self.site, "layer": self.layer, "head": self.head, "unit": self.unit,
            "position": self.position, "metric": self.metric, "effect": self.effect, "recovered": self.recovered,
        }


# -- inputs, outputs and the model --------------------------------------------------------
def as_inputs(model: Model, value: Any, what: str) -> dict[str, Any]:
    """A model-input dict from a dict, a token-id tensor ``[batch, pos]``, or text(s)."""
    if isinstance(value, Mapping):
        return dict(value)
    if getattr(model.config, "is_encoder_decoder", False):
        raise InputError(
            f"{what}: {model.name} is an encoder-decoder, whose next-token logits depend on what its decoder reads, "
            "which a prompt alone does not say; pass input dicts with decoder_input_ids (and a metric that reads the "
            "decoder's logits), or use a decoder-only or encoder model"
        )
    if isinstance(value, torch.Tensor):
        ids = value if value.dim() == 2 else value.reshape(1, -1)
        return {"input_ids": ids.to(model.device)}
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)):
        if model.tokenizer is None:
            raise InputError(f"{what}: text needs a tokenizer, and {model.name} has none; pass token ids or an input dict")
        texts = [value] if isinstance(value, str) else list(value)
        if len(texts) > 1 and getattr(model.tokenizer, "pad_token", None) is None:
            raise InputError(f"{what}: several texts need padding, and the tokenizer has no pad token; set one or pass token ids")
        encoded = model.tokenizer(texts, return_tensors="pt", padding=len(texts) > 1)
        return {k: v.to(model.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
    raise InputError(f"{what}: expected an input dict, a [batch, pos] tensor of token ids or text, got {type(value).__name__}")


def check_pair(clean: Mapping[str, Any], corrupted: Mapping[str, Any]) -> None:
    """Patching swaps activations position by position: both inputs need the same shape."""
    for key in ("input_ids", "pixel_values", "inputs_embeds"):
        a, b = clean.get(key), corrupted.get(key)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            raise InputError(
                f"clean and corrupted {key} have shapes {tuple(a.shape)} and {tuple(b.shape)}; patching needs the same "
                "batch and number of positions (make the prompts the same length in tokens, or pad both to one length)"
            )


def output_logits(output: Any) -> torch.Tensor:
    """The logits (or the main tensor) of a model output."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(f"the model returned {type(output).__name__}; the metric needs logits (a tensor or .logits)")


def scalar(value: Any, what: str = "metric") -> torch.Tensor:
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise InputError(f"the {what} must return one number, got a tensor of shape {tuple(value.shape)}; reduce it (e.g. .mean())")
    return value.reshape(())


def evaluate(model: Model, inputs: Mapping[str, Any], metric: Metric, edits: Mapping[str, Any] | None = None) -> float:
    """``metric`` of one forward pass of ``model`` on ``inputs``, with optional ``edits``."""
    from ..interventions import edit

    with torch.no_grad(), edit(model, edits or {}):
        return float(scalar(metric(output_logits(model(**inputs)), inputs)))


def plan_editable(model: Model, sites: Any) -> list[Any]:
    from ..interventions.context import _check_editable
    from ..sites import plan_sites

    planned = list(plan_sites(model, sites).sites)
    for site in planned:
        _check_editable(site)
    return planned


class Recorder:
    """An identity intervention that keeps (a copy of) the last tensor it saw."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.value = x.detach().clone()
        return x


def record(model: Model, inputs: Mapping[str, Any], sites: Sequence[Any], metric: Metric) -> tuple[dict[str, torch.Tensor], float]:
    """One forward: each site's tensor as its intervention sees it, and the metric."""
    from ..interventions import edit

    recorders = {site.label: Recorder() for site in sites}
    with torch.no_grad(), edit(model, recorders):
        value = float(scalar(metric(output_logits(model(**inputs)), inputs)))
    return {label: r.value for label, r in recorders.items()}, value


# -- components ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Component:
    """One patchable piece of a site: ``index`` selects it in the intervention's tensor."""

    site: Any
    per: str
    index: tuple
    head: int = -1
    unit: int = -1
    position: int = -1


def components(site: Any, value: torch.Tensor, per: str) -> Iterator[Component]:
    """The components of one site's tensor ``value`` (as the intervention receives it)."""
    if per == "site":
        yield Component(site, per, (Ellipsis,))
    elif per == "head":
        if site.hook.layout != "heads":
            raise InputError(f"per='head' needs per-head sites (attn.z, attn.v); {site.label} has units; use per='unit' or 'site'")
        for i, head in enumerate(site.heads if site.heads is not None else range(value.shape[-2])):
            yield Component(site, per, (Ellipsis, i, slice(None)), head=head)
    elif per == "unit":
        if site.hook.layout == "heads":
            raise InputError(f"per='unit' needs unit sites (e.g. mlp.post); {site.label} is per head; use per='head'")
        for i, unit in enumerate(site.units if site.units is not None else range(value.shape[-1])):
            yield Component(site, per, (Ellipsis, i), unit=unit)
    elif per == "position":
        if value.dim() < 3:
            raise InputError(f"per='position' needs a [batch, pos, …] site; {site.label} has shape {tuple(value.shape)}")
        for position in range(value.shape[1]):
            yield Component(site, per, (slice(None), position), position=position)
    else:
        raise InputError(f"per must be one of {', '.join(PER)}, got {per!r}")


def patch_from(clean: torch.Tensor, index: tuple) -> Callable[[torch.Tensor], torch.Tensor]:
    """Intervention: the tensor with ``[index]`` replaced by the clean value there."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        if clean.shape != x.shape:
            raise InputError(f"the clean activation has shape {tuple(clean.shape)}, the corrupted run {tuple(x.shape)}; "
                             "clean and corrupted inputs need the same shape")
        out = x.clone()
        out[index] = clean[index].to(device=x.device, dtype=x.dtype)
        return out

    return apply


def effects_table(method: str, rows: list[tuple[Component, float]], clean: float, corrupt: float, **passes: Any) -> ComponentEffects:
    def column(values: list, dtype: Any) -> np.ndarray:
        return np.asarray(values, dtype=dtype)

    return ComponentEffects(
        method=method, metric_clean=clean, metric_corrupt=corrupt,
        per=column([c.per for c, _ in rows], object), site=column([_site_name(c) for c, _ in rows], object),
        layer=column([c.site.layer if c.site.layer is not None else -1 for c, _ in rows], np.int64),
        head=column([c.head for c, _ in rows], np.int64), unit=column([c.unit for c, _ in rows], np.int64),
        position=column([c.position for c, _ in rows], np.int64), metric=column([m for _, m in rows], np.float64),
        **passes,
    )


def _site_name(component: Component) -> str:
    """Heads and units carry their own index column, so their site is the bare name."""
    return component.site.name if component.per in ("head", "unit") else component.site.label


# -- activation patching ------------------------------------------------------------------
def activation_patching(
    model: ModelLike,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    sites: str | Sequence[str] = DEFAULT_SITES,
    per: str = "site",
) -> ComponentEffects:
    """Exact activation patching: one corrupted forward per component, that component set to
    its clean value, the rest left corrupted.

    ``clean`` / ``corrupted``: input dicts (or ``[batch, pos]`` token ids, or text) of the same
    shape. ``metric(logits, inputs) -> scalar``, e.g. :func:`logit_difference`. ``sites``: any
    editable site selection (``blocks.*.attn.z``, ``blocks.1.mlp.post[0:16]``, module sites).
    ``per``: ``"site"`` (the whole selected tensor), ``"head"`` (attn.z / attn.v sites),
    ``"unit"`` (unit sites) or ``"position"`` (every head and unit at one position).
    Forward passes: 2 (clean and corrupted references) + one per component.
    """
    if per not in PER:
        raise InputError(f"per must be one of {', '.join(PER)}, got {per!r}")
    model = as_model(model)
    clean, corrupted = as_inputs(model, clean, "clean"), as_inputs(model, corrupted, "corrupted")
    check_pair(clean, corrupted)
    planned = plan_editable(model, sites)
    cache, m_clean = record(model, clean, planned, metric)
    m_corrupt = evaluate(model, corrupted, metric)
    rows = []
    for site in planned:
        for component in components(site, cache[site.label], per):
            patched = evaluate(model, corrupted, metric, {site.label: patch_from(cache[site.label], component.index)})
            rows.append((component, patched))
    return effects_table("exact", rows, m_clean, m_corrupt, forward_passes=2 + len(rows))


__all__ = [
    "ComponentEffects", "Metric", "activation_patching", "last_positions", "logit_difference",
]
