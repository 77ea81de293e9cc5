"""Core neurons (CoreInfer, see METHODS.md): the few units a sentence relies on.

Definitions, with the choices the paper leaves open marked *(our choice)*:

* **Token-wise core set** of a token: among its *positive* activations (``a > 0``; NaN is not
  positive), the ``k = ceil(α · n_pos)`` largest, ties broken by the lower unit index.
  *(our choice)* ``α · n_pos`` is rounded to 9 decimals before the ceiling, so float noise
  cannot add a unit (``0.7 · 10`` gives 7, not 8). A token with no positive unit has an
  empty core set.
* **Sentence-wise core set**: count, per unit, the tokens whose core set holds it; keep the
  ``m = ceil(β · U)`` units with the highest counts (same rounding), ties broken by the lower
  unit index. ``U`` is the number of units of the site, i.e. β is a fraction of *all* units of
  the layer (of the selected units when the site selects some, ties then going to the unit
  listed first). *(our choice)* units with a
  count of 0 are never kept, so a short sentence can have fewer than ``m``.
* Every real token of the tokenized text counts, special tokens (BOS, CLS, SEP) included.
* **Overlap** of a core set A with a reference B is ``|A ∩ B| / |B|`` *(our choice)*; the
  Jaccard index ``|A ∩ B| / |A ∪ B|`` is given beside it. **Stability**: A is the core set of
  a token prefix of the text (the prefix is run through the model on its own, so this is
  exact for encoders too), B the full text's. **Similarity** of texts a and b: A = a's core
  set, B = b's (symmetric whenever both sets have ``m`` units, the usual case).

The paper's use: the sentence-wise core set computed at prefill is the only part of the MLP
kept for every decoding step; :meth:`CoreNeurons.core_set` is that set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..errors import DataError, InputError, SiteError
from ..sites import Plan, Site, plan_sites
from ..trace import Tracer, flatten, split_token_id
from ..results import TableResult
from ..models import Model, ModelLike

DEFAULT_PREFIXES = (1, 2, 4, 8, 16, 32, 64)


# -- definitions ------------------------------------------------------------------------------
def ceil_fraction(fraction: float, count: int) -> int:
    """``ceil(fraction · count)`` after rounding the product to 9 decimals (float noise)."""
    return math.ceil(round(fraction * count, 9))


def token_core(values: torch.Tensor, alpha: float) -> torch.Tensor:
    """Token-wise core sets: ``[tokens, units]`` activations → ``[tokens, units]`` bool."""
    positive = values > 0  # [n, U]
    k = torch.ceil(torch.round(alpha * positive.sum(1).to(torch.float64), decimals=9))  # [n]
    score = torch.where(positive, values, torch.full_like(values, -math.inf))
    # A stable descending sort keeps equal values in unit order: ties go to the lower index.
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # [n, U]
    ranks = torch.arange(values.shape[1], device=values.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)  # rank of each unit in its token
    return rank < k.to(rank.device)[:, None]


def sentence_core(counts: np.ndarray, beta: float) -> np.ndarray:
    """Sentence-wise core set: positions of the ``ceil(β·U)`` most counted units (count ≥ 1),
    ties to the lower index, returned in ascending order."""
    size = ceil_fraction(beta, len(counts))
    order = np.lexsort((np.arange(len(counts)), -counts))  # count descending, then index
    chosen = order[:size]
    return np.sort(chosen[counts[chosen] > 0])


def overlap(a: np.ndarray, b: np.ndarray) -> tuple[int, float, float]:
    """(shared units, ``|A∩B|/|B|``, Jaccard ``|A∩B|/|A∪B|``); NaN where a denominator is 0."""
    shared = len(np.intersect1d(a, b))
    union = len(a) + len(b) - shared
    return shared, shared / len(b) if len(b) else math.nan, shared / union if union else math.nan


# -- results ----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TextCore:
    """Core neurons of one text at one site."""

    text: int
    site: str
    layer: int
    units: np.ndarray  # [U] unit ids (the selection's, or 0..U-1)
    counts: np.ndarray  # [U] int64: tokens whose core set holds the unit
    positive: np.ndarray  # [tokens] int64: positive units per token
    token_sizes: np.ndarray  # [tokens] int64: token-wise core set sizes
    packed: np.ndarray  # np.packbits of the [tokens, U] token-wise core sets, axis 1
    core: np.ndarray  # unit ids of the sentence-wise core set, ascending

    @property
    def tokens(self) -> int:
        return len(self.positive)

    def token_cores(self) -> np.ndarray:
        """``[tokens, U]`` bool: the token-wise core sets (columns follow ``units``)."""
        return np.unpackbits(self.packed, axis=1, count=len(self.units)).astype(bool)


@dataclass(frozen=True, eq=False)
class CoreStability(TableResult):
    """Overlap of prefix core sets with the full text's: one row per text × site × prefix."""

    table_name: ClassVar[str] = "core_stability"
    columns: dict

    def to_table(self) -> dict[str, np.ndarray]:
        return dict(self.columns)


@dataclass(frozen=True, eq=False)
class CoreSimilarity(TableResult):
    """Overlap of two texts' core sets: one row per site."""

    table_name: ClassVar[str] = "core_similarity"
    columns: dict

    def to_table(self) -> dict[str, np.ndarray]:
        return dict(self.columns)


@dataclass(frozen=True, eq=False)
class CoreNeurons(TableResult):
    """Core neurons of each text at each site; ``to_table`` has one row per text × site."""

    table_name: ClassVar[str] = "core_neurons"
    texts: tuple[str, ...]
    sites: tuple[str, ...]
    alpha: float
    beta: float
    cores: tuple[TextCore, ...]  # text-major: cores[text * len(sites) + site]
    curve: CoreStability

    def entry(self, text: int | str, site: str | None = None) -> TextCore:
        return self.cores[self._text(text) * len(self.sites) + self._site(site)]

    def core_set(self, text: int | str, site: str | None = None) -> np.ndarray:
        """Unit ids of the sentence-wise core set (what CoreInfer keeps for decoding)."""
        return self.entry(text, site).core

    def token_cores(self, text: int | str, site: str | None = None) -> np.ndarray:
        return self.entry(text, site).token_cores()

    def stability(self, text: int | str | None = None, site: str | None = None) -> CoreStability:
        """The stability curve, for one text and/or site or all of them."""
        keep = np.ones(len(self.curve.columns["text"]), dtype=bool)
        if text is not None:
            keep &= self.curve.columns["text"] == self._text(text)
        if site is not None:
            keep &= self.curve.columns["site"] == self.sites[self._site(site)]
        return CoreStability({key: column[keep] for key, column in self.curve.columns.items()})

    def similarity(self, text_a: int | str, text_b: int | str) -> CoreSimilarity:
        """Overlap ``|A∩B|/|B|`` and Jaccard of two texts' core sets, one row per site."""
        rows = []
        for site in self.sites:
            a, b = self.entry(text_a, site), self.entry(text_b, site)
            shared, share, jaccard = overlap(a.core, b.core)
            rows.append({"site": site, "layer": a.layer, "text_a": a.text, "text_b": b.text, "size_a": len(a.core),
                         "size_b": len(b.core), "shared": shared, "overlap": share, "jaccard": jaccard})
        return CoreSimilarity(_columns(rows))

    def similarity_matrix(self, site: str | None = None) -> np.ndarray:
        """``[texts, texts]``: entry (i, j) is ``|A_i ∩ A_j| / |A_j|`` at ``site``."""
        cores = [self.entry(i, site).core for i in range(len(self.texts))]
        return np.array([[overlap(a, b)[1] for b in cores] for a in cores])

    def to_table(self) -> dict[str, np.ndarray]:
        rows = [{
            "text": entry.text,
            "site": entry.site,
            "layer": entry.layer,
            "units": len(entry.units),
            "tokens": entry.tokens,
            "mean_positive": float(entry.positive.mean()),
            "mean_token_core": float(entry.token_sizes.mean()),
            "core_target": ceil_fraction(self.beta, len(entry.units)),
            "core_size": len(entry.core),
        } for entry in self.cores]
        return _columns(rows)

    def _text(self, text: int | str) -> int:
        if isinstance(text, str):
            if text not in self.texts:
                raise InputError(f"text {text[:60]!r} was not measured; pass one of the measured texts or its index")
            return self.texts.index(text)
        if isinstance(text, bool) or not isinstance(text, (int, np.integer)) or not 0 <= text < len(self.texts):
            raise InputError(f"text index {text!r} is out of range; {len(self.texts)} texts were measured (0-{len(self.texts) - 1})")
        return int(text)

    def _site(self, site: str | None) -> int:
        if site is None:
            if len(self.sites) > 1:
                raise SiteError(f"several sites were measured ({', '.join(self.sites)}); name one with site=...")
            return 0
        if site not in self.sites:
            raise SiteError(f"'{site}' was not measured; measured: {', '.join(self.sites)}")
        return self.sites.index(site)


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {key: np.array([row[key] for row in rows], dtype=object if isinstance(rows[0][key], str) else None) for key in rows[0]}


# -- measuring ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _RowCore:
    counts: np.ndarray  # [U] int64
    positive: np.ndarray  # [tokens]
    token_sizes: np.ndarray  # [tokens]
    packed: np.ndarray | None  # kept for full texts only


class _CoreTracer(Tracer):
    """Turns each forward call's real tokens into per-row (text or prefix) core statistics."""

    def __init__(self, model: Model, plan: Plan, alpha: float, full_rows: int) -> None:
        super().__init__(model, plan)
        self.alpha = alpha
        self.full_rows = full_rows  # rows below this number are full texts, the rest prefixes
        self.rows: dict[tuple[int, str], _RowCore] = {}

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        reading = flatten(site, value, self._batch_info(), module)
        core = token_core(reading.values, self.alpha).cpu()  # [n, U]
        positive = (reading.values > 0).sum(1).cpu()  # [n]
        rows, counts = torch.unique_consecutive(split_token_id(reading.tok)[0], return_counts=True)
        for row, part, pos in zip(rows.tolist(), core.split(counts.tolist()), positive.split(counts.tolist())):
            packed = np.packbits(part.numpy(), axis=1) if row < self.full_rows else None
            self.rows[(row, site.label)] = _RowCore(part.sum(0).numpy().astype(np.int64), pos.numpy(), part.sum(1).numpy(), packed)


def core_neurons(
    model: ModelLike,
    texts: Sequence[str],
    site: str | Sequence[str] | Plan = "blocks.*.mlp.post",
    *,
    alpha: float = 0.4,
    beta: float = 0.2,
    prefixes: Sequence[int] = DEFAULT_PREFIXES,
    batch_size: int = 8,
    max_length: int = 128,
) -> CoreNeurons:
    """Core neurons of each text at each selected site (see the module docstring).

    ``model`` is a Model, an nn.Module with a tokenizer (``actscope.wrap(m, tokenizer)``) or a
    model directory. Each text is tokenized with the tokenizer's special tokens and truncated
    to ``max_length``; texts are run in right-padded batches of ``batch_size`` (padding is
    excluded). ``prefixes``: token counts for the stability curve; each one shorter than a
    text is run on its own as that text's first tokens, and the full text is the curve's last
    point. Pass ``prefixes=()`` to skip the curve.
    """
    from ..feeding import feed, token_rows, tokenize
    from ..models import as_model

    _check_fraction("alpha", alpha)
    _check_fraction("beta", beta)
    texts, lengths = _checked_texts(texts), _checked_prefixes(prefixes)
    model = as_model(model)
    ids = tokenize(model, texts, max_length)
    plan = plan_sites(model, site)
    _refuse_patterns(plan)
    rows = [(t, len(row)) for t, row in enumerate(ids)]
    rows += [(t, k) for t, row in enumerate(ids) for k in lengths if k < len(row)]
    tracer = _CoreTracer(model, plan, alpha, len(texts))
    feed(tracer, token_rows(model, [ids[t][:k] for t, k in rows], batch_size=batch_size))  # row number = example
    _check_seen(plan, tracer.rows, len(rows))
    cores = tuple(_text_core(t, s, tracer.rows[(t, s.label)], beta) for t in range(len(texts)) for s in plan.sites)
    curve = _stability(plan, rows, tracer.rows, cores, beta)
    return CoreNeurons(tuple(texts), tuple(plan.names), float(alpha), float(beta), cores, curve)


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise InputError(f"{name} must be a fraction in (0, 1], got {value!r}; the paper uses alpha=0.4, beta=0.2-0.4")


def _checked_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise DataError(f"texts must be a non-empty list of strings, got {texts!r:.80}; wrap a single text as [text]")
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise DataError(f"texts[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a string; pass the texts themselves")
    return list(texts)


def _checked_prefixes(prefixes: Any) -> list[int]:
    values = list(prefixes)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1]
    if bad:
        raise InputError(f"prefixes are token counts ≥ 1, got {bad[0]!r} in {values!r}; pass e.g. prefixes=(1, 2, 4, 8)")
    return sorted({int(v) for v in values})


def _refuse_patterns(plan: Plan) -> None:
    for site in plan.sites:
        if site.hook.layout == "pattern":
            raise SiteError(f"{site.label} is an attention pattern, not units per token; choose unit sites such as blocks.*.mlp.post")
        if site.hook.layout == "tokens":  # an expert sees only the tokens routed to it
            raise SiteError(f"{site.label} holds only the tokens routed to one expert, so a text has no core set there; "
                            "choose dense unit sites such as blocks.*.mlp.post or blocks.*.resid.post")


def _check_seen(plan: Plan, found: dict, rows: int) -> None:
    for site in plan.sites:
        missing = [r for r in range(rows) if (r, site.label) not in found]
        if missing:
            raise SiteError(f"{site.label} was not reached for input row {missing[0]} (of {rows}); the model's forward "
                            "pass does not run that module on these inputs; choose another site")


def _text_core(text: int, site: Site, row: _RowCore, beta: float) -> TextCore:
    units = np.asarray(site.units if site.units else range(len(row.counts)), dtype=np.int64)
    return TextCore(text, site.label, -1 if site.layer is None else site.layer, units, row.counts, row.positive,
                    row.token_sizes, row.packed, units[sentence_core(row.counts, beta)])


def _stability(plan: Plan, rows: list[tuple[int, int]], found: dict, cores: tuple[TextCore, ...], beta: float) -> CoreStability:
    """Rows per (text, site, prefix): prefix core vs full core, the full text last."""
    sites = plan.sites
    points = sorted(((t, s, k, r) for r, (t, k) in enumerate(rows) for s in range(len(sites))), key=lambda p: (p[0], p[1], p[2]))
    table = []
    for t, s, k, r in points:
        full = cores[t * len(sites) + s]
        prefix = full.units[sentence_core(found[(r, sites[s].label)].counts, beta)]
        shared, share, jaccard = overlap(prefix, full.core)
        table.append({"text": t, "site": full.site, "layer": full.layer, "prefix_tokens": k, "tokens": full.tokens,
                      "core_size": len(prefix), "full_core_size": len(full.core), "shared": shared,
                      "overlap": share, "jaccard": jaccard})
    return CoreStability(_columns(table))
