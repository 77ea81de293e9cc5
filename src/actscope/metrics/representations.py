"""Site activations as rows, one forward call at a time: what representation comparisons,
encoding models and drift read.

:func:`site_rows` feeds ``data`` through one model (the one feeding path) and yields, after
each call, every chosen site's values as rows: one row per real token (``pool="tokens"``), or
one per example, the mean (``"mean"``) or the last real token (``"last"``) of its tokens. Each
row carries an id (the global token id ``example << 20 | position``, or the example number),
so two models fed the same data can be lined up row by row (:func:`paired_rows`). Nothing is
kept between calls: memory is one call's activations.

The model is put in eval mode for each forward call (each module's own flag restored after
it), so dropout does not make two passes differ.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from ..errors import DataError, InputError
from ..feeding import calls, is_text_source, source_for
from ..models import Model
from ..sites import Plan, Site
from ..trace import POS_BITS, Tracer, flatten

POOLS = ("tokens", "mean", "last")
CALL_BITS = 52  # a site called several times in one forward: call k's rows get k << CALL_BITS


@dataclass(frozen=True)
class Rows:
    """One forward call's rows, per site label: ``values[label]`` ``[n, units]`` and
    ``ids[label]`` ``[n]`` (sites of different sizes, such as feature maps of different
    resolutions, have different rows; per-example pools give every site the same ones)."""

    values: Mapping[str, torch.Tensor]
    ids: Mapping[str, torch.Tensor]
    input_ids: torch.Tensor | None = None

    def select(self, labels: list[str]) -> "Rows":
        return Rows({label: self.values[label] for label in labels}, {label: self.ids[label] for label in labels}, self.input_ids)


class _Collector(Tracer):
    """Keeps each site's flattened reading of the current call."""

    def __init__(self, model: Model, plan: Plan) -> None:
        super().__init__(model, plan, announce=False)
        self.current: dict[str, list] = {}

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        self.current.setdefault(site.label, []).append(flatten(site, value, self._batch_info(), module))


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise InputError(f"pool must be one of {', '.join(POOLS)} (rows per token, or per example: mean / last token); got {pool!r}")
    return pool


def reusable(data: Any, column: str | None = None) -> Any:
    """Data that can be fed more than once (to two models, or in several passes): a text
    source is loaded into a corpus once; other iterables become a list of their batches."""
    from ..data import load_corpus

    if is_text_source(data):
        return load_corpus(data, column=column)
    if isinstance(data, Mapping):
        return [data]
    return list(data)


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block; every submodule's own training flag restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def site_rows(model: Model, plan: Plan, data: Any, *, pool: str = "tokens", **limits: Any) -> Iterator[Rows]:
    """Each forward call's rows of every site of ``plan`` (see the module docstring).

    Grad mode and eval mode are set around each forward call, not across the ``yield``: two of
    these generators run interleaved (two models), and a context held open across a yield
    would be left in the wrong state when they close in another order."""
    check_pool(pool)
    _refuse_patterns(plan)
    collector = _Collector(model, plan)
    labels = plan.names
    with collector.attached():
        for call in calls(model, source_for(model, data, **limits)):
            collector.next_examples = call.examples
            collector.current = {}
            with torch.no_grad(), evaluating(model.module):
                model(**call.inputs)
            missing = [label for label in labels if label not in collector.current]
            if missing:
                raise DataError(f"{missing[0]} was not reached by the forward pass of {model.name}; choose sites the model computes")
            yield _pooled(collector.current, labels, pool, call.inputs.get("input_ids"))


def _refuse_patterns(plan: Plan) -> None:
    for site in plan.sites:
        if site.hook.layout == "pattern":
            raise InputError(f"{site.label} is an attention pattern [batch, head, query, key], not a representation of tokens; "
                             "compare attn.z, attn.out or resid sites instead")


def reached(model: Model, plan: Plan, data: Any, **limits: Any) -> dict[str, int]:
    """``{label: units}`` of the sites of ``plan`` that the first forward call of ``data``
    reaches (a module the forward never calls is left out)."""
    _refuse_patterns(plan)
    collector = _Collector(model, plan)
    with torch.no_grad(), evaluating(model.module), collector.attached():
        for call in calls(model, source_for(model, data, **limits)):
            collector.next_examples = call.examples
            model(**call.inputs)
            break
    return {label: int(parts[0].values.shape[-1]) for label, parts in collector.current.items()}


def _pooled(readings: dict[str, list], labels: list[str], pool: str, input_ids: Any) -> Rows:
    values, ids = {}, {}
    for label in labels:
        parts = readings[label]
        tok = torch.cat([r.tok + (k << CALL_BITS) for k, r in enumerate(parts)]) if len(parts) > 1 else parts[0].tok
        x = torch.cat([r.values for r in parts]) if len(parts) > 1 else parts[0].values
        if pool != "tokens":
            tok, x = _per_example(tok, x, pool)
        values[label], ids[label] = x, tok
    ids_tensor = input_ids.detach().cpu() if isinstance(input_ids, torch.Tensor) else None
    return Rows(values, ids, ids_tensor)


def _per_example(tok: torch.Tensor, x: torch.Tensor, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of tokens → one row per example (mean, or the last position), in first-seen order."""
    examples = (tok & ((1 << CALL_BITS) - 1)) >> POS_BITS
    unique, inverse = torch.unique(examples, return_inverse=True)
    first = torch.full((len(unique),), len(examples), dtype=torch.int64).scatter_reduce_(0, inverse, torch.arange(len(examples)), "amin")
    order = first.argsort()
    if pool == "mean":
        sums = torch.zeros(len(unique), x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, inverse.to(x.device), x.double())
        counts = torch.bincount(inverse, minlength=len(unique)).to(x.device, torch.float64)
        pooled = sums / counts[:, None]
    else:
        last = torch.full((len(unique),), -1, dtype=torch.int64).scatter_reduce_(0, inverse, tok, "amax")  # latest position wins
        rows = torch.nonzero(tok[None, :] == last[:, None])[:, 1]
        pooled = x[rows.to(x.device)]
    return unique[order], pooled[order.to(x.device)]


def paired_rows(model_a: Model, plan_a: Plan, model_b: Model, plan_b: Plan, data: Any, *, pool: str = "tokens",
                **limits: Any) -> Iterator[tuple[Rows, Rows]]:
    """Rows of two models (or two site sets of one model) on the same data, lined up: the
    same ids in the same order. One model is fed once. Two models: with ``pool="tokens"`` they
    must tokenize the data alike (the same token ids), else the rows would pair different
    text; per-example pools pair examples that both models saw. One module wrapped with two
    tokenizers is fed twice (each stream's hooks see the other's forward calls too, and ignore
    them: a stream reads its rows right after its own call)."""
    if model_a.module is model_b.module and model_a.tokenizer is model_b.tokenizer:
        union = Plan(tuple({site.label: site for site in (*plan_a.sites, *plan_b.sites)}.values()))
        for rows in site_rows(model_a, union, data, pool=pool, **limits):
            yield rows.select(plan_a.names), rows.select(plan_b.names)
        return
    stream_a = site_rows(model_a, plan_a, data, pool=pool, **limits)
    stream_b = site_rows(model_b, plan_b, data, pool=pool, **limits)
    try:
        for number, (rows_a, rows_b) in enumerate(_zipped(stream_a, stream_b, pool, model_a, model_b)):
            yield _aligned(rows_a, rows_b, pool, number, model_a, model_b)
    finally:
        stream_a.close()
        stream_b.close()


def _zipped(stream_a: Iterator[Rows], stream_b: Iterator[Rows], pool: str, model_a: Model, model_b: Model) -> Iterator[tuple[Rows, Rows]]:
    sentinel = object()
    while True:
        rows_a, rows_b = next(stream_a, sentinel), next(stream_b, sentinel)
        if rows_a is sentinel and rows_b is sentinel:
            return
        if rows_a is sentinel or rows_b is sentinel:
            if pool == "tokens":
                shorter = model_a.name if rows_a is sentinel else model_b.name
                raise DataError(f"{shorter} ran out of data first: the two models cut the data into different batches "
                                "(their tokenizers differ); compare per example with pool='mean'")
            return
        yield rows_a, rows_b


def _aligned(rows_a: Rows, rows_b: Rows, pool: str, number: int, model_a: Model, model_b: Model) -> tuple[Rows, Rows]:
    """Token rows: the two models must have seen the same token ids (then every site's rows
    match between them). Example rows: keep the examples that every site of both has."""
    if pool == "tokens":
        if not _same_tokens(rows_a.input_ids, rows_b.input_ids):
            raise DataError(f"{model_a.name} and {model_b.name} tokenize batch {number} differently, so token rows would pair "
                            "different text; compare per example with pool='mean' (or pass the same token ids to both)")
        return rows_a, rows_b
    all_ids = [*rows_a.ids.values(), *rows_b.ids.values()]
    if all(torch.equal(all_ids[0], other) for other in all_ids[1:]):
        return rows_a, rows_b
    common = all_ids[0]
    for other in all_ids[1:]:
        common = common[torch.isin(common, other)]
    return _subset(rows_a, common), _subset(rows_b, common)


def _same_tokens(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None or b is None or (a.shape == b.shape and torch.equal(a, b))


def _subset(rows: Rows, keep: torch.Tensor) -> Rows:
    values, ids = {}, {}
    for label, x in rows.values.items():
        where = {int(i): k for k, i in enumerate(rows.ids[label].tolist())}
        index = torch.tensor([where[int(i)] for i in keep.tolist()], dtype=torch.int64)
        values[label], ids[label] = x[index.to(x.device)], keep
    return Rows(values, ids, rows.input_ids)


def same_rows(ids_x: torch.Tensor, ids_y: torch.Tensor, site_x: str, site_y: str) -> None:
    """Refuse to pair two sites whose rows are different tokens or examples."""
    if not torch.equal(ids_x, ids_y):
        raise DataError(f"{site_x} and {site_y} cover different rows in a forward call ({len(ids_x)} vs {len(ids_y)}: e.g. feature "
                        "maps of different sizes, or MoE expert sites); compare them per example with pool='mean'")


__all__ = ["Rows", "site_rows", "reached", "paired_rows", "reusable", "evaluating", "check_pool", "same_rows", "POOLS"]
