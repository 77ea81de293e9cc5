"""The run's unit-page tables, from the unit-page accumulators (:mod:`actscope.stats.pages`).

* ``examples`` gains ``window_start`` and ``window``: the unit's activation (float32) on every
  token from ``window_start`` to ``window_start + len(window) - 1`` of the example's document,
  at most 10 before and 5 after the example's token, cut at the document's start and end.
* ``tokens``: ``doc``, ``pos``, ``token`` — the text of every token a window or sample shows.
* ``samples``: per unit, examples from quantile bins of the tokens it fires on (``a > 0``): the
  unit's uniform sample of its firing tokens (64 a unit) is sorted by value and cut into
  :data:`BINS` equal bins (``q_lo``–``q_hi`` of the distribution); from each, the
  :data:`PER_BIN` sampled tokens with the smallest hash keys (a random pick) are shown.
* ``unit_hist``: per unit, a :data:`HIST_BINS`-bin histogram from 0 to the largest sampled value
  of that same sample (``count``), and ``share``: count / sampled × frac_pos, the estimated
  share of all tokens in the bin (the rest, 1 − frac_pos, is a ≤ 0).
* ``cofiring``: per unit, the :data:`PARTNERS` units of its site that co-fire with it most
  (``rank`` 0 first; ``other`` the partner, ``jaccard``, ``shared`` = |F_u ∩ F_v|, ``fired`` and
  ``other_fired`` = |F_u| and |F_v|, ``tokens`` the sample's size). Co-firing of units u and v is
  the Jaccard index |F_u ∩ F_v| / |F_u ∪ F_v| of the sets of tokens each fires on (``a > 0``),
  over the run's co-firing sample (the 1024 tokens with the smallest hash keys, the same tokens
  for every site); pairs sharing fewer than :data:`MIN_BOTH` tokens are left out, ties go to the
  lower unit. Work: ``units² × 1024`` multiply-adds a site, in blocks of :data:`BLOCK` units
  (memory: the sample and one ``BLOCK × units`` block).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..sites import Plan, Site
from ..trace import split_token_id
from .tables import _contexts

BINS = 4
PER_BIN = 2
HIST_BINS = 16
PARTNERS = 5
MIN_BOTH = 2
BLOCK = 256

Context = Callable[[int, int], tuple[str, str, str]]
Pieces = Callable[[int], list[str]]


def page_sites(plan: Plan, stats: Mapping[str, Any]) -> list[Site]:
    return [s for s in plan.sites if s.hook.layout != "pattern" and getattr(stats.get(s.label), "pages", None) is not None]


def window_columns(plan: Plan, stats: Mapping[str, Any], examples: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``window_start`` (int64) and ``window`` (pyarrow list<float32>) for the rows of the
    examples table (built from the same accumulators, so in the same order)."""
    import pyarrow as pa

    starts, rows, keeps = [], [], []
    for site in _unit_sites(plan, stats):
        stat = stats[site.label]
        tok = stat.top.tok
        real = (tok >= 0).numpy()  # [U, k] the rows the examples table has, unit then rank
        pages = stat.pages.windows if stat.pages is not None else None
        if pages is None or not bool((pages.tok == tok).all()):  # (the windows always follow the table)
            starts.append(np.full(int(real.sum()), -1, dtype=np.int64))
            rows.append(np.zeros((int(real.sum()), 1), dtype=np.float32))
            keeps.append(np.zeros((int(real.sum()), 1), dtype=bool))
            continue
        values = pages.values.numpy()[real]  # [rows, W]
        _, pos = split_token_id(tok[torch.from_numpy(real)])
        start, keep = _cut(pos.numpy() - pages.before, values)
        starts.append(start)
        rows.append(values)
        keeps.append(keep)
    if sum(len(s) for s in starts) != len(examples.get("site", ())):  # examples built from other accumulators
        return {}
    width = max((r.shape[1] for r in rows), default=1)
    values = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows]) if rows else np.zeros((0, 1), np.float32)
    keep = np.concatenate([np.pad(k, ((0, 0), (0, width - k.shape[1]))) for k in keeps]) if keeps else np.zeros((0, 1), bool)
    offsets = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int32)
    windows = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[keep], type=pa.float32()))
    return {"window_start": np.concatenate(starts) if starts else np.zeros(0, np.int64), "window": windows}


def _cut(start: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(start, keep)``: each window without the positions before its document (negative) and
    the missing positions after its end (trailing NaN)."""
    column = np.arange(values.shape[1])[None, :]
    lead = np.maximum(0, -start)[:, None]
    present = ~np.isnan(values)
    last = values.shape[1] - 1 - np.argmax(present[:, ::-1], axis=1)  # the example's own token is never NaN
    return np.maximum(start, 0), (column >= lead) & (column <= last[:, None])


def samples_table(plan: Plan, stats: Mapping[str, Any], context: Context | None) -> dict[str, np.ndarray]:
    """Per unit, PER_BIN sampled firing tokens from each of BINS quantile bins (see above)."""
    parts = []
    for site in page_sites(plan, stats):
        sample = stats[site.label].pages.sample
        value, tok = sample.value.numpy(), sample.tok.numpy()  # [U, R], key order
        unit, slot, bins = _picks(value, (tok >= 0).sum(1))
        if not len(unit):
            continue
        chosen_tok = torch.from_numpy(tok[unit, slot])
        doc, pos = (t.numpy() for t in split_token_id(chosen_tok))
        texts = _contexts(context, doc.tolist(), pos.tolist())
        parts.append({
            "site": np.array([site.label] * len(unit), dtype=object), "layer": np.full(len(unit), _layer(site), dtype=np.int64),
            "unit": _names(site, unit), "bin": bins, "q_lo": bins / BINS, "q_hi": (bins + 1) / BINS,
            "value": value[unit, slot].astype(np.float64), "doc": doc, "pos": pos,
            "left": np.array([t[0] for t in texts], dtype=object), "token": np.array([t[1] for t in texts], dtype=object),
            "right": np.array([t[2] for t in texts], dtype=object),
        })
    return _concat(parts)


def _picks(value: np.ndarray, filled: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(unit, slot, bin)`` of the shown samples, ordered by unit, bin, then value."""
    units, size = value.shape
    ranked = np.where(np.arange(size)[None, :] < filled[:, None], value, np.inf)
    rank = np.argsort(np.argsort(ranked, axis=1, kind="stable"), axis=1, kind="stable")  # [U, R] by value
    bins = rank * BINS // np.maximum(filled, 1)[:, None]  # [U, R]
    real = np.arange(size)[None, :] < filled[:, None]
    onehot = (bins[:, :, None] == np.arange(BINS)[None, None, :]) & real[:, :, None]  # [U, R, BINS]
    seen = np.cumsum(onehot, axis=1)  # in key order: the first PER_BIN of each bin are a random pick
    keep = real & (np.take_along_axis(seen, np.minimum(bins, BINS - 1)[:, :, None], 2)[:, :, 0] <= PER_BIN)
    unit, slot = np.nonzero(keep)
    order = np.lexsort((value[unit, slot], bins[unit, slot], unit))
    return unit[order], slot[order], bins[unit, slot][order].astype(np.int64)


def unit_hist_table(plan: Plan, stats: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per unit with a sample, HIST_BINS bins from 0 to its largest sampled value."""
    parts = []
    for site in page_sites(plan, stats):
        stat = stats[site.label]
        value = stat.pages.sample.value.numpy().astype(np.float64)  # [U, R], NaN padding
        filled = (stat.pages.sample.tok >= 0).sum(1).numpy()
        units = np.flatnonzero(filled > 0)
        if not len(units):
            continue
        top = np.nanmax(value[units], axis=1)  # [n]
        width = np.where(top > 0, top / HIST_BINS, 1.0)
        index = np.clip(np.floor(value[units] / width[:, None]), 0, HIST_BINS - 1)  # the largest value in the last bin
        counts = np.stack([np.sum(index == b, axis=1) for b in range(HIST_BINS)], axis=1)  # [n, HIST_BINS] (NaN never ==)
        frac_pos = stat.ladder.frac_pos.numpy()[units]
        n = len(units)
        parts.append({
            "site": np.array([site.label] * n * HIST_BINS, dtype=object),
            "layer": np.full(n * HIST_BINS, _layer(site), dtype=np.int64),
            "unit": np.repeat(_names(site, units), HIST_BINS), "bin": np.tile(np.arange(HIST_BINS, dtype=np.int64), n),
            "lo": (width[:, None] * np.arange(HIST_BINS)[None, :]).reshape(-1),
            "hi": (width[:, None] * np.arange(1, HIST_BINS + 1)[None, :]).reshape(-1),
            "count": counts.reshape(-1).astype(np.int64), "sampled": np.repeat(filled[units].astype(np.int64), HIST_BINS),
            "share": (counts / filled[units][:, None] * frac_pos[:, None]).reshape(-1),
        })
    return _concat(parts)


def cofiring_table(plan: Plan, stats: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per unit, its PARTNERS most co-firing units of the same site (see above)."""
    parts = []
    for site in page_sites(plan, stats):
        fired = stats[site.label].pages.cofire.firing()  # [n, U] bool
        if fired.shape[0] == 0:
            continue
        part = _partners(fired)
        if len(part["unit"]):
            part["unit"], part["other"] = _names(site, part["unit"]), _names(site, part["other"])
            rows = len(part["unit"])
            parts.append({"site": np.array([site.label] * rows, dtype=object), "layer": np.full(rows, _layer(site), dtype=np.int64),
                          **part, "tokens": np.full(rows, fired.shape[0], dtype=np.int64)})
    return _concat(parts)


def _partners(fired: torch.Tensor) -> dict[str, np.ndarray]:
    """Jaccard top-PARTNERS of every unit of ``fired`` ``[n, U]``, block by block."""
    matrix = fired.to(torch.float32)  # [n, U]
    counts = matrix.sum(0)  # [U]
    units = matrix.shape[1]
    top = min(PARTNERS, units - 1)
    out: dict[str, list] = {"unit": [], "rank": [], "other": [], "jaccard": [], "shared": [], "fired": [], "other_fired": []}
    if top < 1:
        return {key: np.zeros(0) for key in out}
    for start in range(0, units, BLOCK):
        block = torch.arange(start, min(units, start + BLOCK))
        both = matrix[:, block].T @ matrix  # [B, U] tokens on which both fire
        union = counts[block, None] + counts[None, :] - both
        jaccard = torch.where((both >= MIN_BOTH) & (union > 0), both / union.clamp(min=1), torch.full_like(both, -1.0))
        jaccard[torch.arange(len(block)), block] = -1.0  # not its own partner
        score, other = torch.topk(jaccard, top, dim=1)  # ties: the lower unit first
        keep = score > 0
        unit = block[:, None].expand(-1, top)[keep]
        out["unit"].append(unit.numpy())
        out["rank"].append(torch.arange(top).expand(len(block), -1)[keep].numpy())
        out["other"].append(other[keep].numpy())
        out["jaccard"].append(score[keep].double().numpy())
        out["shared"].append(both.gather(1, other)[keep].numpy().astype(np.int64))
        out["fired"].append(counts[unit].numpy().astype(np.int64))
        out["other_fired"].append(counts[other[keep]].numpy().astype(np.int64))
    return {key: np.concatenate(value).astype(np.int64 if key not in ("jaccard",) else np.float64) for key, value in out.items()}


def tokens_table(examples: Mapping[str, Any], samples: Mapping[str, np.ndarray], pieces: Pieces | None) -> dict[str, np.ndarray]:
    """``doc``, ``pos``, ``token``: the text of every token of a window or a sample."""
    if pieces is None or "window" not in examples:
        return {}
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.list_value_length(examples["window"]), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    docs = [np.repeat(np.asarray(examples["doc"], dtype=np.int64), lengths), np.asarray(samples.get("doc", []), dtype=np.int64)]
    starts = np.repeat(np.asarray(examples["window_start"], dtype=np.int64), lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = [starts + within, np.asarray(samples.get("pos", []), dtype=np.int64)]
    doc, pos = np.concatenate(docs), np.concatenate(positions)
    if not len(doc):
        return {}
    key = np.unique(doc * (int(pos.max()) + 1) + pos)
    doc, pos = key // (int(pos.max()) + 1), key % (int(pos.max()) + 1)
    cache: dict[int, list[str]] = {}
    texts = []
    for d, p in zip(doc.tolist(), pos.tolist()):
        if d not in cache:
            cache[d] = pieces(d)
        texts.append(cache[d][p] if p < len(cache[d]) else "")
    return {"doc": doc.astype(np.int64), "pos": pos.astype(np.int64), "token": np.array(texts, dtype=object)}


# -- helpers ---------------------------------------------------------------------------------
def _unit_sites(plan: Plan, stats: Mapping[str, Any]) -> list[Site]:
    return [s for s in plan.sites if s.hook.layout != "pattern" and s.label in stats]


def _names(site: Site, index: np.ndarray) -> np.ndarray:
    index = np.asarray(index, dtype=np.int64)
    return np.asarray(site.units, dtype=np.int64)[index] if site.units else index


def _layer(site: Site) -> int:
    return -1 if site.layer is None else site.layer


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
