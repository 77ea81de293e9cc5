"""Contrast sets (fTRI, MoTE): which units, heads and experts respond more to a behaviour-eliciting
prompt set than to a control set, and what switching them off does to the behaviour.

:func:`contrast` runs both prompt sets and reduces every site to one number per (prompt, item),
the mean over the prompt's real tokens (padding excluded) of:

* **units** (any unit site, e.g. ``blocks.*.mlp.post``, ``blocks.*.resid.post``, module sites):
  the activation ``a``;
* **heads** (``attn.z``, or any per-head site): the L2 norm of the head's output vector
  ``‖z_h‖`` — the size of what the head writes into its output projection (our choice: the
  attention *pattern* says where a head looks, not how much it contributes, and needs eager
  attention; pattern sites are refused);
* **experts** (``moe.router``): 1 when the token's top k holds the expert, else 0 — so the
  per-prompt value is the expert's routing frequency in that prompt, the top k taken from the
  router logits with the model's rule (:func:`actscope.metrics.moe.route`).

With ``B`` and ``C`` the per-prompt values of the behaviour and control prompts (our choices,
METHODS.md names no statistic):

* ``difference = mean(B) − mean(C)``;
* ``effect_size`` is Cohen's d: ``difference / s_p`` with the pooled standard deviation
  ``s_p = sqrt(((n_B−1)·var(B) + (n_C−1)·var(C)) / (n_B+n_C−2))`` (``var`` with ``ddof=1``);
  when ``s_p = 0`` it is 0 for a zero difference and ±inf otherwise;
* ``p_value``: a permutation test of ``difference``. Prompts are stacked behaviour first,
  control second; permutation ``j`` is the ``j``-th ``rng.permutation(n_B + n_C)`` of
  ``rng = numpy.random.default_rng(seed)``, and its first ``n_B`` prompts form the behaviour
  group. ``alternative="greater"`` (default: METHODS asks which items respond *more* on the
  behaviour) counts permutations with ``difference_perm >= difference``; ``"two-sided"``
  compares absolute values. ``p = (1 + count) / (1 + n_permutations)``. Comparisons allow a
  rounding slack of ``1e-9 · max|value|`` of the item, so permutations that only reorder
  equal values count as ties whatever the float summation order.

Rows are ranked by ``effect_size`` (descending; by ``|effect_size|`` for two-sided), ties by
``p_value``; ``rank_by="difference"`` ranks by the raw difference instead (for experts: the
routing-frequency gap, which favours often-used experts over rarely used but consistent ones). :func:`ablation_effect` switches off the top ``n`` and random sets of the same size
and reports the change of a user-given metric; :func:`token_probability` builds such a metric.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError, SiteError
from ..results import TableResult
from ..sites import Site
from ..trace import Tracer, flatten, split_token_id
from ..models import Model, ModelLike

KINDS = ("unit", "head", "expert")
ALTERNATIVES = ("greater", "two-sided")
RANK_BY = ("effect_size", "difference")
PERMUTATION_CHUNK = 256  # permutations per matrix product: bounds memory at chunk × items floats
TIE_SLACK = 1e-9


@dataclass(frozen=True)
class Target:
    """One thing to switch off: a unit of a site, a head of a site, or an expert of a layer."""

    kind: str  # "unit", "head" or "expert"
    site: str  # canonical site name (without a selection)
    layer: int  # -1 outside blocks
    index: int  # unit, head or expert number


# -- per-prompt values ---------------------------------------------------------------------
def site_kind(site: Site) -> str:
    """``unit``, ``head`` or ``expert`` for a site; pattern and gathered-expert sites are refused."""
    if site.hook.layout == "pattern":
        raise SiteError(f"{site.label}: contrast ranks heads by their output norm; use attn.z instead of attn.pattern")
    if site.hook.layout == "tokens":
        raise SiteError(f"{site.label}: contrast ranks experts by routing; use blocks.*.moe.router instead of expert neurons")
    if site.name.endswith("moe.router"):
        return "expert"
    return "head" if site.hook.layout == "heads" else "unit"


class _PromptMeans(Tracer):
    """Per site, the sum and token count of each prompt's per-token values."""

    def __init__(self, model: Model, sites: Any, top_k: int | None) -> None:
        super().__init__(model, sites)
        for site in self.plan.sites:
            site_kind(site)  # refuse pattern / expert-neuron sites before any forward pass
        self.top_k = top_k
        self.sums: dict[str, dict[int, torch.Tensor]] = {site.label: {} for site in self.plan.sites}
        self.counts: dict[str, dict[int, int]] = {site.label: {} for site in self.plan.sites}
        self.items: dict[str, list[int]] = {}

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        kind = site_kind(site)
        values, tok = self._per_token(site, kind, value, module)  # [n, items], [n]
        examples, _ = split_token_id(tok)
        found, row = torch.unique(examples, return_inverse=True)
        sums = torch.zeros(len(found), values.shape[-1], dtype=torch.float64)
        sums.index_add_(0, row, values.detach().double().cpu())
        counts = torch.bincount(row, minlength=len(found))
        for example, total, count in zip(found.tolist(), sums, counts.tolist()):
            previous = self.sums[site.label].get(example)
            self.sums[site.label][example] = total if previous is None else previous + total
            self.counts[site.label][example] = self.counts[site.label].get(example, 0) + count

    def _per_token(self, site: Site, kind: str, value: Any, module: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "head":
            reading = flatten(site, value, self._batch_info(), module)  # [n, heads·d_head]
            d_head = value.shape[-1]
            norms = reading.values.reshape(reading.values.shape[0], -1, d_head).norm(dim=-1)  # [n, heads]
            self.items.setdefault(site.label, list(site.heads or range(norms.shape[-1])))
            return norms, reading.tok
        if kind == "expert":
            from ..metrics.moe import route

            # Route over every expert, then keep the selected ones: routing needs all logits.
            reading = flatten(dataclasses.replace(site, units=None), value, self._batch_info(), module)  # [n, E]
            chosen = route(reading.values, self.top_k, False)[2]  # [n, k]
            routed = torch.zeros_like(reading.values, dtype=torch.float64).scatter_(1, chosen, 1.0)  # [n, E]
            units = list(site.units or range(routed.shape[-1]))
            self.items.setdefault(site.label, units)
            return routed[:, units], reading.tok
        reading = flatten(site, value, self._batch_info(), module)  # [n, units]
        self.items.setdefault(site.label, list(site.units or range(reading.values.shape[-1])))
        return reading.values, reading.tok

    def matrix(self, label: str) -> torch.Tensor:
        """``[prompts, items]`` per-prompt means, prompts in example order."""
        examples = sorted(self.sums[label])
        return torch.stack([self.sums[label][e] / self.counts[label][e] for e in examples])


def prompt_means(model: ModelLike, data: Any, sites: Any, *, batch_size: int = 8, max_length: int = 128) -> tuple[np.ndarray, list[Target]]:
    """Per-prompt means ``[prompts, items]`` (float64) of every item of ``sites``, and the items."""
    from ..models import as_model
    from ..feeding import feed

    model = as_model(model)
    tracer = _PromptMeans(model, sites, _top_k(model, sites))
    feed(tracer, data, batch_size=batch_size, max_length=max_length)
    blocks, targets = [], []
    for site in tracer.plan.sites:
        kind = site_kind(site)
        blocks.append(tracer.matrix(site.label))
        layer = site.layer if site.layer is not None else -1
        targets += [Target(kind, site.name, layer, index) for index in tracer.items[site.label]]
    return torch.cat(blocks, dim=1).numpy(), targets


def _top_k(model: Model, sites: Any) -> int | None:
    from ..sites import plan_sites

    if not any(site.name.endswith("moe.router") for site in plan_sites(model, sites).sites):
        return None
    k = getattr(model.config, "num_experts_per_tok", None)
    if not isinstance(k, int) or k < 1:
        raise InputError(f"contrast: {model.name}'s config has num_experts_per_tok={k!r}; routing needs a whole number >= 1")
    return k


# -- statistics ----------------------------------------------------------------------------
def effect_sizes(behaviour: np.ndarray, control: np.ndarray) -> dict[str, np.ndarray]:
    """Means, difference, pooled std and Cohen's d per column of ``[prompts, items]`` arrays."""
    n_b, n_c = len(behaviour), len(control)
    mean_b, mean_c = behaviour.mean(axis=0), control.mean(axis=0)
    pooled_var = ((n_b - 1) * behaviour.var(axis=0, ddof=1) + (n_c - 1) * control.var(axis=0, ddof=1)) / (n_b + n_c - 2)
    pooled = np.sqrt(pooled_var)
    difference = mean_b - mean_c
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(pooled > 0, difference / np.where(pooled > 0, pooled, 1.0), np.sign(difference) * np.inf)
    d = np.where((pooled == 0) & (difference == 0), 0.0, d)
    return {"behaviour_mean": mean_b, "control_mean": mean_c, "difference": difference, "pooled_std": pooled, "effect_size": d}


def permutation_p_values(
    behaviour: np.ndarray, control: np.ndarray, n_permutations: int, seed: int, alternative: str = "greater"
) -> np.ndarray:
    """One permutation p-value per column (see the module docstring), vectorised over items."""
    values = np.concatenate([behaviour, control])  # [prompts, items]
    n_b, n_c = len(behaviour), len(control)
    observed = behaviour.mean(axis=0) - control.mean(axis=0)  # [items]
    slack = TIE_SLACK * np.abs(values).max(axis=0)
    rng = np.random.default_rng(seed)
    orders = np.stack([rng.permutation(len(values)) for _ in range(n_permutations)])  # [perms, prompts]
    count = np.zeros(values.shape[1], dtype=np.int64)
    for start in range(0, n_permutations, PERMUTATION_CHUNK):
        chunk = orders[start:start + PERMUTATION_CHUNK]
        # Row p of `signs` holds +1/n_B on permutation p's behaviour prompts and -1/n_C elsewhere.
        signs = np.full(chunk.shape, -1.0 / n_c)
        np.put_along_axis(signs, chunk[:, :n_b], 1.0 / n_b, axis=1)
        permuted = signs @ values  # [chunk, items]: difference of means under the permutation
        if alternative == "greater":
            count += (permuted >= observed - slack).sum(axis=0)
        else:
            count += (np.abs(permuted) >= np.abs(observed) - slack).sum(axis=0)
    return (1 + count) / (1 + n_permutations)


# -- the ranking ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ContrastResult(TableResult):
    """One row per unit, head or expert, best-ranked first; see the module docstring."""

    table_name: ClassVar[str] = "contrast"
    columns: Mapping[str, np.ndarray]
    n_behaviour: int
    n_control: int
    n_permutations: int
    seed: int
    alternative: str
    rank_by: str = "effect_size"

    def to_table(self) -> dict[str, np.ndarray]:
        return {name: column.copy() for name, column in self.columns.items()}

    def targets(self, kind: str | None = None) -> list[Target]:
        """Every row as a :class:`Target`, in rank order (only ``kind`` rows when given)."""
        c = self.columns
        rows = [Target(str(k), str(s), int(l), int(i)) for k, s, l, i in zip(c["kind"], c["site"], c["layer"], c["index"])]
        return [row for row in rows if kind is None or row.kind == kind]

    def top(self, n: int, kind: str | None = None) -> list[Target]:
        """The ``n`` best-ranked targets (of ``kind`` when given)."""
        return self.targets(kind)[:n]


def contrast(
    model: ModelLike, behaviour: Any, control: Any, sites: Any = "blocks.*.mlp.post", *,
    n_permutations: int = 1000, seed: int = 0, alternative: str = "greater", rank_by: str = "effect_size",
    batch_size: int = 8, max_length: int = 128,
) -> ContrastResult:
    """Rank the units, heads and experts of ``sites`` by how much more they respond to the
    ``behaviour`` prompts than to the ``control`` prompts.

    ``behaviour`` / ``control``: strings (the model's tokenizer), a text source, or model-input
    dicts (each row one prompt; padding excluded through ``attention_mask``); each needs at
    least two prompts. ``sites``: any selection (unit sites, ``attn.z`` for heads,
    ``moe.router`` for experts). ``rank_by``: ``"effect_size"`` (Cohen's d) or ``"difference"``.
    Returns a :class:`ContrastResult`.
    """
    from ..models import as_model

    _check_options(n_permutations, seed, alternative, rank_by)
    model = as_model(model)
    b_values, targets = prompt_means(model, behaviour, sites, batch_size=batch_size, max_length=max_length)
    c_values, _ = prompt_means(model, control, sites, batch_size=batch_size, max_length=max_length)
    for name, values in (("behaviour", b_values), ("control", c_values)):
        if len(values) < 2:
            raise InputError(f"contrast: the {name} set has {len(values)} prompt(s); give at least 2 (a variance needs two)")
    columns = {
        "site": np.array([t.site for t in targets]), "kind": np.array([t.kind for t in targets]),
        "layer": np.array([t.layer for t in targets], dtype=np.int64), "index": np.array([t.index for t in targets], dtype=np.int64),
        **effect_sizes(b_values, c_values),
        "p_value": permutation_p_values(b_values, c_values, n_permutations, seed, alternative),
    }
    ranked = _ranked(columns, alternative, rank_by)
    return ContrastResult(ranked, len(b_values), len(c_values), n_permutations, seed, alternative, rank_by)


def _check_options(n_permutations: Any, seed: Any, alternative: Any, rank_by: Any) -> None:
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise InputError(f"contrast: n_permutations must be a whole number >= 1, got {n_permutations!r}; e.g. 1000")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"contrast: seed must be a whole number >= 0, got {seed!r}")
    if alternative not in ALTERNATIVES:
        raise InputError(f"contrast: alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    if rank_by not in RANK_BY:
        raise InputError(f"contrast: rank_by must be one of {RANK_BY}, got {rank_by!r}")


def _ranked(columns: dict[str, np.ndarray], alternative: str, rank_by: str) -> dict[str, np.ndarray]:
    score = columns[rank_by] if alternative == "greater" else np.abs(columns[rank_by])
    order = np.lexsort((columns["p_value"], -score))  # last key first: the score, then the p-value
    ranked = {name: column[order] for name, column in columns.items()}
    return {"rank": np.arange(1, len(order) + 1), **ranked}


# -- switching off -------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AblationEffect(TableResult):
    """The behaviour metric with nothing off, with the top targets off, and with random sets off."""

    table_name: ClassVar[str] = "ablation_effect"
    baseline: float
    top: float
    random: tuple[float, ...]
    top_targets: tuple[Target, ...]
    random_targets: tuple[tuple[Target, ...], ...]

    @property
    def top_change(self) -> float:
        return self.top - self.baseline

    @property
    def random_change(self) -> float:
        """Mean change over the random draws."""
        return float(np.mean(self.random)) - self.baseline

    def to_table(self) -> dict[str, np.ndarray]:
        sets = [("baseline", -1, self.baseline, ()), ("top", -1, self.top, self.top_targets)]
        sets += [("random", draw, value, chosen) for draw, (value, chosen) in enumerate(zip(self.random, self.random_targets))]
        return {
            "set": np.array([s[0] for s in sets]), "draw": np.array([s[1] for s in sets], dtype=np.int64),
            "metric": np.array([s[2] for s in sets], dtype=np.float64),
            "change": np.array([s[2] - self.baseline for s in sets], dtype=np.float64),
            "targets": np.array([describe(s[3]) for s in sets]),
        }


def describe(targets: Iterable[Target]) -> str:
    """``blocks.1.mlp.post[3]; blocks.0.moe.router[expert=5]`` — a readable list of targets."""
    names = {"unit": "", "head": "head=", "expert": "expert="}
    return "; ".join(f"{t.site}[{names[t.kind]}{t.index}]" for t in targets)


def ablation_effect(
    model: Model, behaviour_metric: Callable[[Any], float], ranking: ContrastResult | Sequence[Target], n: int,
    random_seed: int = 0, *, draws: int = 1, pool: Sequence[Target] | None = None,
) -> AblationEffect:
    """Switch off the top ``n`` targets, then ``draws`` random sets of the same size, and report
    ``behaviour_metric(model)`` for each (and with nothing off).

    ``ranking``: a :class:`ContrastResult` (its best ``n`` rows) or targets in rank order.
    Random sets are drawn (our choice) from ``pool`` — by default the ranking's other targets —
    without the top ``n``, with as many of each kind as the top set has, by
    ``numpy.random.default_rng(random_seed)``. Units are zeroed with ``actscope.edit``, heads by
    zeroing their ``attn.z`` output, experts forbidden with :func:`actscope.interventions.experts`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"ablation_effect: n must be a whole number >= 1, got {n!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise InputError(f"ablation_effect: draws must be a whole number >= 1, got {draws!r}")
    ranked = ranking.targets() if isinstance(ranking, ContrastResult) else list(ranking)
    if len(ranked) < n:
        raise InputError(f"ablation_effect: the ranking has {len(ranked)} targets, fewer than n={n}; lower n")
    top = tuple(ranked[:n])
    others = [t for t in (ranked if pool is None else pool) if t not in set(top)]
    rng = np.random.default_rng(random_seed)
    random_sets = tuple(_random_like(top, others, rng) for _ in range(draws))
    return AblationEffect(
        _metric(model, behaviour_metric, ()), _metric(model, behaviour_metric, top),
        tuple(_metric(model, behaviour_metric, chosen) for chosen in random_sets), top, random_sets,
    )


def _random_like(top: Sequence[Target], pool: Sequence[Target], rng: np.random.Generator) -> tuple[Target, ...]:
    """As many random pool targets of each kind as ``top`` has."""
    chosen: list[Target] = []
    for kind in KINDS:
        wanted = sum(t.kind == kind for t in top)
        candidates = [t for t in pool if t.kind == kind]
        if wanted > len(candidates):
            raise InputError(
                f"ablation_effect: {wanted} random {kind}s are needed but the pool has only {len(candidates)} "
                "outside the top set; lower n or give a larger pool"
            )
        if wanted:
            chosen += [candidates[i] for i in sorted(rng.choice(len(candidates), size=wanted, replace=False))]
    return tuple(chosen)


def _metric(model: Model, behaviour_metric: Callable[[Any], float], targets: Sequence[Target]) -> float:
    with torch.no_grad(), switched_off(model, targets):
        value = behaviour_metric(model)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"ablation_effect: the behaviour metric must return a number, got {value!r}") from None


def switched_off(model: Model, targets: Sequence[Target]) -> Any:
    """One context that zeroes the unit and head targets and forbids the expert targets."""
    from contextlib import ExitStack

    from ..interventions import edit, zero
    from ..interventions.experts import experts

    edits: dict[str, list[int]] = {}
    off: dict[int, list[int]] = {}
    for t in targets:
        if t.kind == "expert":
            off.setdefault(t.layer, []).append(t.index)
        else:
            edits.setdefault(f"{t.site}[{'head=' if t.kind == 'head' else ''}", []).append(t.index)
    stack = ExitStack()
    try:
        if edits:
            stack.enter_context(edit(model, {f"{key}{','.join(map(str, sorted(idx)))}]": zero() for key, idx in edits.items()}))
        if off:
            stack.enter_context(experts(model, off=off))
    except BaseException:
        stack.close()
        raise
    return stack


# -- a behaviour metric --------------------------------------------------------------------
def token_probability(prompts: Sequence[str] | Sequence[Sequence[int]], tokens: Any, *, batch_size: int = 16) -> Callable[[Any], float]:
    """A behaviour metric: the mean probability the model gives ``tokens`` right after each prompt.

    ``prompts``: strings (tokenized with the model's tokenizer, its default special tokens
    included) or token-id lists. ``tokens``: one token (a string that tokenizes to exactly one
    token, or an id) for every prompt, or a list with one per prompt. The returned callable
    takes the model and returns a float.
    """
    prompts = list(prompts)
    if not prompts:
        raise InputError("token_probability: give at least one prompt")
    targets = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens] * len(prompts)
    if len(targets) != len(prompts):
        raise InputError(f"token_probability: {len(targets)} target tokens for {len(prompts)} prompts; give one per prompt or a single one")

    def metric(model: ModelLike) -> float:
        from ..feeding import calls, token_rows
        from ..models import as_model

        wrapped = as_model(model)
        rows = [_token_ids(wrapped, p) for p in prompts]
        ids = [_single_token(wrapped, t) for t in targets]
        total = 0.0
        for call in calls(wrapped, token_rows(wrapped, rows, batch_size=batch_size)):  # examples: prompt numbers
            with torch.no_grad():
                out = wrapped(**call.inputs)
            logits = out.logits if hasattr(out, "logits") else out[0]  # [batch, pos, vocab]
            last = call.inputs["attention_mask"].sum(dim=1) - 1  # [batch] position of each prompt's last real token
            probs = torch.softmax(logits[torch.arange(len(last)), last.to(logits.device)].float(), dim=-1)  # [batch, vocab]
            chosen = torch.tensor([ids[row] for row in call.examples.tolist()], device=probs.device)
            total += float(probs.gather(1, chosen[:, None]).sum())
        return total / len(rows)

    return metric


def _token_ids(model: Model, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise InputError(f"token_probability: {model.name} has no tokenizer; give prompts as token-id lists")
        ids = list(model.tokenizer(prompt)["input_ids"])
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise InputError(f"token_probability: prompt {prompt!r} has no tokens")
    return ids


def _single_token(model: Model, token: Any) -> int:
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        return int(token)
    if isinstance(token, str) and model.tokenizer is not None:
        ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
        raise InputError(f"token_probability: {token!r} is {len(ids)} tokens ({ids}); give a single token or its id")
    raise InputError(f"token_probability: cannot use {token!r} as a target token; give a token id or a one-token string")


__all__ = [
    "AblationEffect", "ContrastResult", "Target", "ablation_effect", "contrast", "effect_sizes",
    "permutation_p_values", "prompt_means", "switched_off", "token_probability",
]
