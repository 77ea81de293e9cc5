"""Extreme-token phenomena per head: attention sink, value-state drain, residual peak, and whether
each head is active or dormant on an input domain (METHODS.md, "Extreme-token phenomena").

For every sequence the *sink token* is its ``sink_position``-th real token (counted over the
attention mask, so left and right padding both work); the *others* are every other real token
of the sequences that have a sink token (optionally only those a ``token_filter`` keeps).

* ``sink_score[layer, head]``: mean over the other tokens, as queries, of the attention
  probability they put on the sink token. The sink token's own query is left out (our choice:
  in a causal model it can only attend to itself, which would add a 1 per sequence).
* ``value_drain[layer, head]``: mean over sequences of the sink token's value-vector norm
  (``blocks.i.attn.v``), divided by the median of the other tokens' value norms. With grouped
  -query attention the values belong to key/value heads: query head ``h`` reads key/value head
  ``h // (heads / kv_heads)`` (the ``repeat_kv`` layout of Hugging Face models), and its ratio is
  that key/value head's.
* ``residual_peak[layer]``: the same ratio for the residual stream after the block
  (``blocks.i.resid.post``).
* ``dormant[layer, head]``: ``sink_score > dormant_threshold`` ("most of its attention mass
  goes to the sink"); a head that is not dormant is active.

Streaming: batches run one at a time under :func:`actscope.capture`; from each, only sums for the
sink token and one float32 norm per other token per (layer, key/value head) and per layer are
kept. The medians are exact medians of those stored norms (``numpy.median``: the mean of the two
middle values for an even count). Sequences shorter than ``sink_position + 1`` real tokens are
skipped and counted in ``n_skipped``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping

import numpy as np
import torch

from ..errors import DataError, InputError, SiteError
from ..results import TableResult
from ..models import Model

SITES = ("blocks.*.attn.pattern", "blocks.*.attn.v", "blocks.*.resid.post")
TokenFilter = Callable[[torch.Tensor], torch.Tensor]  # input_ids [batch, pos] -> bool [batch, pos]


@dataclass(frozen=True)
class ExtremeTokens(TableResult):
    """Sink score, value drain and dormancy per (layer, head); residual peak per layer.

    ``to_table()`` has one row per (layer, head); ``layers_table()`` one row per layer.
    """

    table_name: ClassVar[str] = "extreme_heads"

    sink_position: int
    dormant_threshold: float
    layer: np.ndarray  # [layers] block index of each row of the arrays below
    kv_head: np.ndarray  # [heads] the key/value head each query head reads
    sink_score: np.ndarray  # [layers, heads]
    sink_value_norm: np.ndarray  # [layers, kv_heads] mean over sequences
    median_value_norm: np.ndarray  # [layers, kv_heads] median over the other tokens
    sink_resid_norm: np.ndarray  # [layers] mean over sequences
    median_resid_norm: np.ndarray  # [layers] median over the other tokens
    n_sequences: int  # sequences with a sink token
    n_skipped: int  # sequences too short to have one
    n_others: int  # other tokens (= queries per head behind each sink score)

    @property
    def value_drain(self) -> np.ndarray:
        """``[layers, heads]``: sink value norm / median value norm of the head's kv head."""
        return (self.sink_value_norm / self.median_value_norm)[:, self.kv_head]

    @property
    def residual_peak(self) -> np.ndarray:
        """``[layers]``: sink residual norm / median residual norm of the other tokens."""
        return self.sink_resid_norm / self.median_resid_norm

    @property
    def dormant(self) -> np.ndarray:
        """``[layers, heads]`` bool: the head puts more than ``dormant_threshold`` on the sink."""
        return self.sink_score > self.dormant_threshold

    def to_table(self) -> dict[str, np.ndarray]:
        """One row per (layer, head)."""
        n_layers, n_heads = self.sink_score.shape
        return {
            "layer": np.repeat(self.layer, n_heads).astype(np.int64),
            "head": np.tile(np.arange(n_heads), n_layers).astype(np.int64),
            "kv_head": np.tile(self.kv_head, n_layers).astype(np.int64),
            "sink_score": self.sink_score.reshape(-1),
            "dormant": self.dormant.reshape(-1),
            "sink_value_norm": self.sink_value_norm[:, self.kv_head].reshape(-1),
            "median_value_norm": self.median_value_norm[:, self.kv_head].reshape(-1),
            "value_drain": self.value_drain.reshape(-1),
        }

    def layers_table(self) -> dict[str, np.ndarray]:
        """One row per layer: residual peak, and the layer's dormant heads and mean sink score."""
        return {
            "layer": self.layer.astype(np.int64),
            "sink_resid_norm": self.sink_resid_norm,
            "median_resid_norm": self.median_resid_norm,
            "residual_peak": self.residual_peak,
            "dormant_heads": self.dormant.sum(axis=1).astype(np.int64),
            "mean_sink_score": self.sink_score.mean(axis=1),
        }

    def layers_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.layers_table())


@dataclass(frozen=True)
class DomainStates(TableResult):
    """Per (domain, layer, head): the sink score on that domain and whether the head is dormant."""

    table_name: ClassVar[str] = "head_domains"

    domains: tuple[str, ...]
    dormant_threshold: float
    layer: np.ndarray  # [layers]
    sink_score: np.ndarray  # [domains, layers, heads]

    @property
    def dormant(self) -> np.ndarray:
        return self.sink_score > self.dormant_threshold  # [domains, layers, heads]

    def state(self, domain: str, layer: int, head: int) -> str:
        """``"dormant"`` or ``"active"``."""
        if domain not in self.domains:
            raise InputError(f"unknown domain {domain!r}; the domains are {', '.join(self.domains)}")
        rows = np.flatnonzero(self.layer == layer)
        if len(rows) == 0 or not 0 <= head < self.sink_score.shape[2]:
            raise InputError(f"no head ({layer}, {head}); layers {self.layer.tolist()}, heads 0-{self.sink_score.shape[2] - 1}")
        return "dormant" if self.dormant[self.domains.index(domain), rows[0], head] else "active"

    def to_table(self) -> dict[str, np.ndarray]:
        n_domains, n_layers, n_heads = self.sink_score.shape
        dormant = self.dormant.reshape(-1)
        return {
            "domain": np.repeat(np.array(self.domains, dtype=object), n_layers * n_heads),
            "layer": np.tile(np.repeat(self.layer, n_heads), n_domains).astype(np.int64),
            "head": np.tile(np.arange(n_heads), n_domains * n_layers).astype(np.int64),
            "sink_score": self.sink_score.reshape(-1),
            "dormant": dormant,
            "state": np.where(dormant, "dormant", "active").astype(object),
        }


# -- public functions --------------------------------------------------------------------
def extreme_tokens(
    model: Model,
    data: Any,
    sink_position: int = 0,
    dormant_threshold: float = 0.5,
    *,
    token_filter: TokenFilter | None = None,
    batch_size: int = 8,
    max_length: int = 128,
) -> ExtremeTokens:
    """Measure the attention sink, value drain and residual peak of ``model`` over ``data``.

    ``model``: an :class:`actscope.Model`, any ``nn.Module`` with attention-pattern sites, or a
    model directory. ``data``: a list of strings (the model needs a tokenizer; they are batched
    ``batch_size`` at a time, truncated to ``max_length`` tokens) or an iterable of model-input
    dicts (one forward call each). ``token_filter(input_ids) -> bool [batch, pos]`` restricts
    the other tokens (queries and the medians' population) to the ones it marks, e.g. the
    non-trigger tokens of Bigram-Backcopy; the sink token is always the sink token.
    """
    _check_options(sink_position, dormant_threshold, token_filter)
    model = _as_model(model)
    plan = _plan(model)
    totals = _Totals(_layers(plan))
    from ..trace import capture, eager_attention

    with torch.no_grad(), eager_attention(model):  # switch once (and say so once), not per batch
        for inputs in _input_dicts(model, data, batch_size, max_length):
            with capture(model, plan, announce=False) as captured:
                model(**inputs)
            masks = _batch_masks(inputs, captured.tensor(f"blocks.{totals.layers[0]}.attn.pattern"), sink_position, token_filter)
            totals.add(captured, masks)
    return totals.result(sink_position, float(dormant_threshold))


def classify_domains(
    model: Model,
    domains: Mapping[str, Any],
    sink_position: int = 0,
    dormant_threshold: float = 0.5,
    **options: Any,
) -> DomainStates:
    """Active/dormant state of every head on each input domain (``{"name": data, ...}``).

    Each domain's data is measured with :func:`extreme_tokens` (``options``: ``token_filter``,
    ``batch_size``, ``max_length``); a head is dormant on a domain when its sink score there is
    above ``dormant_threshold``.
    """
    if not isinstance(domains, Mapping) or not domains:
        raise InputError(f"classify_domains: domains must be a non-empty mapping {{name: data}}, got {type(domains).__name__} "
                         f"{domains!r:.60}; pass e.g. {{'code': code_texts, 'prose': prose_texts}}.")
    model = _as_model(model)
    results = [extreme_tokens(model, data, sink_position, dormant_threshold, **options) for data in domains.values()]
    return DomainStates(
        domains=tuple(str(name) for name in domains),
        dormant_threshold=float(dormant_threshold),
        layer=results[0].layer,
        sink_score=_frozen(np.stack([r.sink_score for r in results])),
    )


# -- validation and inputs ---------------------------------------------------------------
def _check_options(sink_position: Any, dormant_threshold: Any, token_filter: Any) -> None:
    if isinstance(sink_position, bool) or not isinstance(sink_position, int) or sink_position < 0:
        raise InputError(f"extreme_tokens: sink_position must be an int >= 0 (a real-token index), got {sink_position!r}; "
                         "pass e.g. sink_position=0 for the first token.")
    if isinstance(dormant_threshold, bool) or not isinstance(dormant_threshold, (int, float)) or not 0 <= dormant_threshold <= 1:
        raise InputError(f"extreme_tokens: dormant_threshold must be a probability in [0, 1], got {dormant_threshold!r}; "
                         "pass e.g. dormant_threshold=0.5.")
    if token_filter is not None and not callable(token_filter):
        raise InputError(f"extreme_tokens: token_filter must be a function input_ids -> bool mask, got "
                         f"{type(token_filter).__name__}; pass e.g. token_filter=lambda ids: ids != 5.")


def _as_model(model: Model) -> Any:
    from ..models import Model, load, wrap

    if isinstance(model, Model):
        return model
    if isinstance(model, torch.nn.Module):
        return wrap(model)
    if isinstance(model, (str, os.PathLike)):
        return load(model)
    raise InputError(f"extreme_tokens: cannot use a {type(model).__name__} as a model; pass an actscope.Model, "
                     "an nn.Module or a model directory.")


def _plan(model: Model) -> Any:
    from ..sites import plan_sites

    try:
        return plan_sites(model, list(SITES))
    except SiteError as exc:
        raise SiteError(f"extreme_tokens needs the sites {', '.join(SITES)} of {model.name}, which it does not offer "
                        f"({exc}); use a model family with an adapter (see `actscope sites`).") from exc


def _layers(plan: Any) -> list[int]:
    by_name: dict[str, set[int]] = {}
    for site in plan.sites:
        by_name.setdefault(site.name.split(".", 2)[-1], set()).add(site.layer)
    common = set.intersection(*by_name.values())
    if len(by_name) != 3 or not common:
        raise SiteError(f"extreme_tokens found no block with all of {', '.join(SITES)}; found {sorted(by_name)}.")
    return sorted(common)


def _input_dicts(model: Model, data: Any, batch_size: int, max_length: int) -> Iterator[dict[str, Any]]:
    """Model-input dicts on the model's device: tokenized batches of strings, or the user's dicts."""
    from ..feeding import input_batches

    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise DataError(f"extreme_tokens: data must be a list of strings or of model-input dicts, got {type(data).__name__} "
                        f"{data!r:.60}; wrap a single text or dict in a list.")
    if isinstance(data, (list, tuple)) and data and all(isinstance(item, str) for item in data):
        yield from input_batches(model, list(data), batch_size=batch_size, max_length=max_length)
        return
    device = model.device
    count = 0
    for i, item in enumerate(data):  # lazily: a generator of dicts is streamed, never held whole
        if not isinstance(item, Mapping):
            raise DataError(f"extreme_tokens: data item {i} is a {type(item).__name__}, not a model-input dict; pass only "
                            "strings or only dicts like {'input_ids': ..., 'attention_mask': ...}.")
        count += 1
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
    if count == 0:
        raise DataError("extreme_tokens: data is empty; pass at least one string or model-input dict.")


# -- per-batch masks ---------------------------------------------------------------------
@dataclass(frozen=True)
class _BatchMasks:
    has_sink: torch.Tensor  # [batch] bool: the sequence has a sink token
    sink_col: torch.Tensor  # [batch] int64 column of the sink token (0 where there is none)
    others: torch.Tensor  # [batch, pos] bool: real tokens other than the sink that count


def _batch_masks(
    inputs: Mapping[str, Any], pattern: torch.Tensor, sink_position: int, token_filter: TokenFilter | None
) -> _BatchMasks:
    batch, _, queries, keys = pattern.shape  # [batch, head, q, k]
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        real = mask.detach().cpu().bool()[:, -queries:]  # [batch, pos]
    else:
        real = torch.ones(batch, queries, dtype=torch.bool)
    rank = real.long().cumsum(dim=1) - 1  # real-token index of each column
    is_sink = real & (rank == sink_position)  # [batch, pos]
    has_sink = is_sink.any(dim=1)
    sink_col = is_sink.long().argmax(dim=1)
    others = real & ~is_sink & has_sink[:, None]
    if token_filter is not None:
        others &= _filtered(inputs, token_filter, others.shape)
    return _BatchMasks(has_sink, sink_col, others)


def _filtered(inputs: Mapping[str, Any], token_filter: TokenFilter, shape: torch.Size) -> torch.Tensor:
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise InputError("extreme_tokens: token_filter needs input_ids in each batch, but this one has only "
                         f"{', '.join(inputs)}; drop token_filter or pass input_ids.")
    keep = token_filter(ids)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != tuple(shape):
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise InputError(f"extreme_tokens: token_filter must return a bool tensor shaped like input_ids {tuple(shape)}, got "
                         f"{got}; return e.g. ids != trigger_id.")
    return keep.detach().cpu()


# -- accumulation ------------------------------------------------------------------------
class _Totals:
    """Running sums for the sink token and the stored norms of the other tokens, per layer."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = layers
        self.attention: dict[int, torch.Tensor] = {}  # layer -> [heads] float64 sum over queries
        self.sink_value: dict[int, torch.Tensor] = {}  # layer -> [kv_heads] float64 sum over sequences
        self.other_value: dict[int, list[torch.Tensor]] = {l: [] for l in layers}  # [n, kv_heads] float32
        self.sink_resid: dict[int, torch.Tensor] = {}  # layer -> [] float64
        self.other_resid: dict[int, list[torch.Tensor]] = {l: [] for l in layers}  # [n] float32
        self.n_heads = self.n_kv_heads = 0
        self.n_sequences = self.n_skipped = self.n_others = 0

    def add(self, captured: Any, masks: _BatchMasks) -> None:
        for layer in self.layers:
            pattern = captured.tensor(f"blocks.{layer}.attn.pattern")  # [batch, head, q, k]
            values = captured.tensor(f"blocks.{layer}.attn.v")  # [batch, pos, kv_head, d_head]
            resid = captured.tensor(f"blocks.{layer}.resid.post")  # [batch, pos, d_model]
            self._add_attention(layer, pattern, masks)
            self._add_norms(self.sink_value, self.other_value, layer, values.double().norm(dim=-1), masks)
            self._add_norms(self.sink_resid, self.other_resid, layer, resid.double().norm(dim=-1), masks)
            self.n_heads, self.n_kv_heads = pattern.shape[1], values.shape[2]
        self.n_sequences += int(masks.has_sink.sum())
        self.n_skipped += int((~masks.has_sink).sum())
        self.n_others += int(masks.others.sum())

    def _add_attention(self, layer: int, pattern: torch.Tensor, masks: _BatchMasks) -> None:
        batch, heads, queries, _ = pattern.shape
        index = masks.sink_col.view(batch, 1, 1, 1).expand(batch, heads, queries, 1)
        on_sink = pattern.double().gather(3, index)[..., 0]  # [batch, head, q]
        rows = on_sink.transpose(1, 2)[masks.others]  # [n, head]
        self.attention[layer] = self.attention.get(layer, 0) + rows.sum(dim=0)

    @staticmethod
    def _add_norms(sink: dict, others: dict, layer: int, norms: torch.Tensor, masks: _BatchMasks) -> None:
        # norms: [batch, pos] or [batch, pos, kv_head], float64
        at_sink = norms[torch.arange(norms.shape[0]), masks.sink_col][masks.has_sink]  # [n_seq, ...]
        sink[layer] = sink.get(layer, 0) + at_sink.sum(dim=0)
        others[layer].append(norms[masks.others].float())  # [n, ...]

    def result(self, sink_position: int, dormant_threshold: float) -> ExtremeTokens:
        if self.n_sequences == 0:
            raise DataError(f"extreme_tokens: no sequence has a real token at sink_position {sink_position} "
                            f"({self.n_skipped} sequences, all shorter); pass longer inputs or a smaller sink_position.")
        if self.n_others == 0:
            raise DataError("extreme_tokens: no token other than the sink token was measured (sequences of one token, or "
                            "a token_filter that keeps nothing); pass longer inputs or a looser token_filter.")
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"extreme_tokens: {self.n_heads} query heads cannot share {self.n_kv_heads} key/value heads "
                             "evenly; this model's value site does not match its attention pattern.")
        layers = self.layers
        return ExtremeTokens(
            sink_position=sink_position,
            dormant_threshold=dormant_threshold,
            layer=_frozen(np.array(layers, dtype=np.int64)),
            kv_head=_frozen(np.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)),
            sink_score=_frozen(np.stack([self.attention[l].numpy() for l in layers]) / self.n_others),
            sink_value_norm=_frozen(np.stack([self.sink_value[l].numpy() for l in layers]) / self.n_sequences),
            median_value_norm=_frozen(np.stack([_median(self.other_value[l]) for l in layers])),
            sink_resid_norm=_frozen(np.array([float(self.sink_resid[l]) for l in layers]) / self.n_sequences),
            median_resid_norm=_frozen(np.array([float(_median(self.other_resid[l])) for l in layers])),
            n_sequences=self.n_sequences,
            n_skipped=self.n_skipped,
            n_others=self.n_others,
        )


def _median(parts: list[torch.Tensor]) -> np.ndarray:
    """Exact median over the first axis of the stored per-token norms (float64 result)."""
    return np.median(torch.cat(parts).numpy().astype(np.float64), axis=0)


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    array.setflags(write=False)
    return array


__all__ = ["DomainStates", "ExtremeTokens", "SITES", "classify_domains", "extreme_tokens"]
