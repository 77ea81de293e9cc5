"""``measure``: every measurement of METHODS.md "Sparsity and neuron health" that applies to one
model and one text data set, by name — what ``actscope profile --metrics`` runs and writes into
the run directory beside the profile's own tables.

The catalogue is a data table (``MEASUREMENTS``): each entry says when it applies (a reason
string when it does not) and how to run it. A measurement returns named tables (written as
``<name>.parquet``) and a few summary lines for the CLI.

Data split (our choice): the CETT search needs held-out evaluation text, so the last
``held_out`` share of the documents is its evaluation set and the rest its calibration set (the
one held-out rule, :func:`actscope.feeding.split_held_out`); every other measurement reads the
first ``max_documents`` documents.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .errors import InputError, SiteError
from .feeding import HELD_OUT
from .models import Model, ModelLike

NEURONS = "blocks.*.mlp.post"
ALL = "all"


@dataclass(frozen=True)
class MeasureConfig:
    """Options shared by the measurements (see the module docstring for the data split)."""

    p: float = 0.01  # CETT-PPL-p%: the allowed degradation
    sweep: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05)  # the sparsity-versus-p curve
    held_out: float = HELD_OUT  # the one held-out rule (actscope.feeding.split_held_out)
    max_documents: int = 128
    batch_size: int = 16
    max_length: int = 128
    checkpoints: tuple[str, ...] = ()  # earlier checkpoints of the model, in training order (SeND)

    def checked(self) -> "MeasureConfig":
        if isinstance(self.held_out, bool) or not isinstance(self.held_out, (int, float)) or not 0 < self.held_out < 1:
            raise InputError(f"held_out must be a fraction between 0 and 1, got {self.held_out!r}; e.g. {HELD_OUT}")
        if self.max_documents < 2:
            raise InputError(f"max_documents must be at least 2, got {self.max_documents!r}")
        from pathlib import Path

        missing = [c for c in self.checkpoints if isinstance(c, str) and not Path(c).is_dir()]
        if missing:
            raise InputError(f"checkpoint directory not found: {', '.join(missing)}; give existing model directories in training order")
        return self


@dataclass(frozen=True)
class Measured:
    """One measurement's outcome: tables (name → columns) and summary lines for people."""

    name: str
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    summary: tuple[str, ...] = ()
    skipped: str | None = None  # why it did not apply (then tables are empty)


@dataclass(frozen=True)
class Measurement:
    name: str
    what: str
    applies: Callable[[Any, MeasureConfig], str | None]  # (model, config) → None, or why it does not apply
    run: Callable[[Any, Sequence[str], MeasureConfig], Measured]


def measure(model: ModelLike, texts: Sequence[str], metrics: str | Sequence[str] = ALL, config: MeasureConfig | None = None,
            progress: Callable[[str], None] | None = None) -> list[Measured]:
    """Run the named measurements (``"all"``, a comma-separated string or a list) on ``texts``.

    Measurements that do not apply to ``model`` come back with ``skipped`` set; asking for an
    unknown name fails before anything runs.
    """
    from .models import as_model

    config = (config or MeasureConfig()).checked()
    chosen = resolve_metrics(metrics)
    texts = checked_texts(texts)
    model = as_model(model)
    results = []
    for entry in chosen:
        reason = entry.applies(model, config)
        if reason is not None:
            results.append(Measured(entry.name, skipped=reason))
            continue
        if progress is not None:
            progress(entry.name)
        results.append(entry.run(model, texts, config))
    return results


def resolve_metrics(metrics: str | Sequence[str]) -> list[Measurement]:
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    names = [n for n in names if n]
    if names == [ALL]:
        return list(MEASUREMENTS.values())
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown or not names:
        raise InputError(
            f"unknown measurement {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
            f"{', '.join(MEASUREMENTS)} or 'all'"
        )
    return [MEASUREMENTS[n] for n in dict.fromkeys(names)]


def checked_texts(texts: Sequence[str]) -> list[str]:
    """The non-empty documents of ``texts``; at least 2 (every measurement splits or pairs them)."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if len(texts) < 2:
        raise InputError(f"measurements need at least 2 non-empty text documents, got {len(texts)}; pass a larger data set")
    return texts


# -- when a measurement applies -------------------------------------------------------------
Check = Callable[[Any, MeasureConfig], "str | None"]


def _has_sites(selection: str, what: str) -> Check:
    def applies(model: Model, config: MeasureConfig) -> str | None:
        try:
            from .sites import plan_sites

            plan_sites(model, selection)
        except SiteError:
            return f"the model has no {what} sites ({selection})"
        return None

    return applies


def _all_of(*checks: Check) -> Check:
    def applies(model: Model, config: MeasureConfig) -> str | None:
        return next((reason for reason in (check(model, config) for check in checks) if reason), None)

    return applies


def _has_tokenizer(model: Model, config: MeasureConfig) -> str | None:
    return None if model.tokenizer is not None else "the model has no tokenizer (text measurements need one)"


def _is_moe(model: Model, config: MeasureConfig) -> str | None:
    routed = model.adapter is not None and model.adapter.router is not None
    return None if routed else "the model is not a supported mixture of experts"


def _has_checkpoints(model: Model, config: MeasureConfig) -> str | None:
    if config.checkpoints:
        return None
    return ("needs earlier checkpoints of the model (--checkpoints DIR,DIR,… in training order); the Efficient "
            "EigenScore of sampled generations is Python-only: actscope.metrics.eigenscore")


# -- the measurements ------------------------------------------------------------------------
def _head(texts: Sequence[str], config: MeasureConfig) -> list[str]:
    return list(texts[: config.max_documents])


def _cett_split(texts: Sequence[str], config: MeasureConfig) -> tuple[list[str], list[str]]:
    from .feeding import split_held_out

    return split_held_out(_head(texts, config), config.held_out)


OBJECTIVES = (  # class-name suffix of the model → the CETT performance metric (first match)
    ("ForCausalLM", "CausalLMLoss"),
    ("LMHeadModel", "CausalLMLoss"),
    ("ForMaskedLM", "MaskedLMLoss"),
    ("ForSequenceClassification", "ClassifierKL"),
    ("ForImageClassification", "ClassifierKL"),
    ("", "EmbeddingFidelity"),  # a bare encoder: the fidelity of its mean-pooled embeddings
)


def objective_for(model: Model, texts: Sequence[str], config: MeasureConfig) -> Any:
    from .metrics.cett import objectives as cett_objectives

    name = type(model.module).__name__
    chosen = next(objective for suffix, objective in OBJECTIVES if name.endswith(suffix))
    return getattr(cett_objectives, chosen)(texts, batch_size=config.batch_size, max_length=config.max_length)


def _cett(model: Model, texts: Sequence[str], config: MeasureConfig) -> Measured:
    from .metrics.cett import cett_sparsity

    calibration, evaluation = _cett_split(texts, config)
    objective = objective_for(model, evaluation, config)
    result = cett_sparsity(model, calibration, objective, p=config.p, sweep=config.sweep, batch_size=config.batch_size,
                           max_length=config.max_length)
    sweep = result.sweep.to_table()
    lines = [f"CETT-{objective.name}-{config.p:.1%}: sparsity {result.sparsity:.1%} of the MLP neurons ({NEURONS}; activation ratio "
             f"{1 - result.sparsity:.1%}, dense {1 - _dense_sparsity(result):.1%}), degradation "
             f"{result.degradation:.2%}, {result.passes} evaluation passes"]
    ps = sorted(set(sweep["p"]))
    lines.append(f"  sparsity at p = {' / '.join(f'{p:.1%}' for p in ps)}:")
    for method in dict.fromkeys(sweep["method"]):
        by_p = {p: s for m, p, s in zip(sweep["method"], sweep["p"], sweep["sparsity"]) if m == method}
        lines.append(f"    {method:>4}: {' / '.join(f'{by_p[p]:.1%}' if p in by_p else '—' for p in ps)}")
    return Measured("cett", {"cett_sweep": sweep, "cett_layers": result.to_table(),
                             "cett_thresholds": result.thresholds.to_table()}, tuple(lines))


def _dense_sparsity(result: Any) -> float:
    import numpy as np

    units = np.asarray(result.curves.units, dtype=float)
    return 1.0 - float((np.asarray(result.dense_activation_ratio) * units).sum() / units.sum())


def _temporal(model: Model, texts: Sequence[str], config: MeasureConfig) -> Measured:
    from .metrics.temporal import temporal_sparsity

    result = temporal_sparsity(model, _head(texts, config), NEURONS, batch_size=config.batch_size, max_length=config.max_length)
    table = result.to_table()
    rows = [i for i, eps in enumerate(table["eps"]) if eps == max(table["eps"])]
    mean = sum(table["temporal_sparsity"][i] for i in rows) / len(rows)
    return Measured("temporal", {"temporal": table},
                    (f"temporal sparsity of the MLP neurons ({NEURONS}, |Δa| ≤ {max(table['eps']):g}), mean over layers: {mean:.1%}",))


def _core(model: Model, texts: Sequence[str], config: MeasureConfig) -> Measured:
    import numpy as np

    from .metrics.core import core_neurons

    sample = _head(texts, config)[:32]  # core sets are per text; a few dozen texts show the spread
    result = core_neurons(model, sample, NEURONS, batch_size=config.batch_size, max_length=config.max_length)
    last = result.sites[-1]
    matrix = result.similarity_matrix(last)
    off_diagonal = matrix[~np.eye(len(matrix), dtype=bool)]
    lines = (f"core neurons (α={result.alpha}, β={result.beta}) at {last}: mean overlap between texts {off_diagonal.mean():.1%}",)
    return Measured("core", {"core_neurons": result.to_table(), "core_stability": result.curve.to_table()}, lines)


def _codes(model: Model, texts: Sequence[str], config: MeasureConfig) -> Measured:
    from .feeding import materialised
    from .metrics.codes import activation_codes

    batches = materialised(model, _head(texts, config), batch_size=config.batch_size, max_length=config.max_length, what="code")
    result = activation_codes(model, batches, NEURONS, per="token")
    lines = (f"activation codes of the MLP neurons ({NEURONS}; one per token, {result.n_bits} varying units): {result.n_distinct} distinct of "
             f"{result.n_codes}, redundancy ratio {result.redundancy_ratio:.4f}",)
    return Measured("codes", {"activation_codes": result.to_table()}, lines)


def _extreme(model: Model, texts: Sequence[str], config: MeasureConfig) -> Measured:
    from .metrics.extreme import extreme_tokens

    result = extreme_tokens(model, _head(texts, config), batch_size=config.batch_size, max_length=config.max_length)
    dormant = int(result.dormant.sum())
    lines = (f"attention sinks: {dormant} of {result.dormant.size} heads dormant (> {result.dormant_threshold:g} on the first "
             f"token); largest residual peak {float(result.residual_peak.max()):.1f}× the median",)
    return Measured("extreme", {"extreme_heads": result.to_table(), "extreme_layers": result.layers_table()}, lines)


def _outliers(model: Model, texts: Sequence[str], config: MeasureConfig) -> Measured:
    from .metrics.outliers import outlier_channels

    result = outlier_channels(model, _head(texts, config), batch_size=config.batch_size, max_length=config.max_length)
    summary = result.summary().to_table()
    lines = tuple(f"outliers at {site}: {n} channels with max/median > {result.threshold:g}"
                  for site, n in zip(summary["site"], summary["outlier_channels"]))
    return Measured("outliers", {"outliers": result.to_table(), "outlier_sites": summary}, lines)


def _memory(model: Model, texts: Sequence[str], config: MeasureConfig) -> Measured:
    from .feeding import materialised
    from .metrics.memory import activation_memory

    inputs = materialised(model, _head(texts, config), batch_size=config.batch_size, max_length=config.max_length, what="memory")[0]
    result = activation_memory(model, inputs)
    shape = tuple(inputs["input_ids"].shape)
    lines = (f"activation memory for one batch {shape}: largest layer call {result.peak_bytes / 2**20:.2f} MiB, "
             f"all layer outputs {result.leaf_output_bytes / 2**20:.2f} MiB",)
    return Measured("memory", {"activation_memory": result.to_table()}, lines)


def _moe(model: Model, texts: Sequence[str], config: MeasureConfig) -> Measured:
    import numpy as np

    from .metrics.moe import moe_routing

    result = moe_routing(model, _head(texts, config), batch_size=config.batch_size, max_length=config.max_length)
    table = result.to_table()
    lines = (f"MoE routing: expert frequency {np.nanmin(table['frequency']):.1%} – {np.nanmax(table['frequency']):.1%}",)
    return Measured("moe", {"moe_experts": table}, lines)


def _sensitivity(model: Model, texts: Sequence[str], config: MeasureConfig) -> Measured:
    from .metrics.sensitivity import neuron_sensitivity

    checkpoints = [*config.checkpoints, model]  # training order, this model last (our choice)
    result = neuron_sensitivity(checkpoints, _head(texts, config)[:64], tokenizer=model.tokenizer, batch_size=config.batch_size)
    lines = (f"sensitive neurons at {result.site} over {result.n_checkpoints} checkpoints: the top {result.top:.0%} "
             f"({int(result.is_sensitive.sum())} units) hold {_share(result):.1%} of the total sensitivity",)
    return Measured("sensitivity", {"sensitivity": result.to_table()}, lines)


def _share(result: Any) -> float:
    total = float(result.sensitivity.sum())
    return float(result.sensitivity[result.is_sensitive].sum()) / total if total > 0 else float("nan")


MEASUREMENTS: dict[str, Measurement] = {m.name: m for m in (
    Measurement("cett", "CETT-PPL-p% sparsity, its sparsity-versus-p curve and Top-k / FAT-ε beside it (Sparsing Law)",
                _all_of(_has_sites(NEURONS, "MLP neuron"), _has_tokenizer), _cett),
    Measurement("temporal", "temporal (delta) sparsity of the MLP neurons", _all_of(_has_sites(NEURONS, "MLP neuron"), _has_tokenizer), _temporal),
    Measurement("core", "CoreInfer core neurons: sizes, stability, overlap between texts",
                _all_of(_has_sites(NEURONS, "MLP neuron"), _has_tokenizer), _core),
    Measurement("codes", "activation codes (a > 0) and their redundancy ratio (hash encoders)",
                _all_of(_has_sites(NEURONS, "MLP neuron"), _has_tokenizer), _codes),
    Measurement("extreme", "attention sink score, value drain, residual peak, dormant heads (Active-dormant heads)",
                _all_of(_has_sites("blocks.*.attn.pattern", "attention pattern"), _has_tokenizer), _extreme),
    Measurement("outliers", "per-channel max/median and kurtosis of the residual stream",
                _all_of(_has_sites("blocks.*.resid.post", "residual stream"), _has_tokenizer), _outliers),
    Measurement("memory", "activation memory per layer for one batch", _has_tokenizer, _memory),
    Measurement("moe", "per-expert routing frequency and neuron activation ratio", _all_of(_is_moe, _has_tokenizer), _moe),
    Measurement("sensitivity", "sensitive neurons (SeND) across earlier checkpoints and this model",
                _all_of(_has_checkpoints, _has_tokenizer), _sensitivity),
)}
