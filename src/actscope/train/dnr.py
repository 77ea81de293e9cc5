"""Dynamic dead neuron rate during training (METHODS.md, "Dead neurons", after AP).

For every training step and every observed site, the **dynamic DNR** is the fraction of
(unit, example) pairs whose output is zero — for token models (unit, token) pairs, padding
excluded — pooled over every forward pass made since the previous step. An ``"all"`` row pools
every site of the step (the overall rate). The per-epoch figure is the mean of the epoch's
per-step rates (*our choice*: per batch, averaged per epoch; the paper gives no formula).

"Zero" is the complement of firing: with ``criterion="pos"`` a pair counts when ``a > 0`` is
false — for a ReLU output exactly ``a == 0`` — and with a float ε when ``|a| > ε`` is false.
NaN counts as zero (it does not fire), as in the run tables.

Usage, inside any training loop::

    with actscope.train.DeadNeuronTracker(model, sites="module:net.1@output") as dnr:
        for epoch in range(epochs):
            for x, y in loader:
                loss = loss_fn(model(x), y)
                loss.backward(); optimizer.step(); optimizer.zero_grad()
                dnr.step()
            dnr.epoch_end()
    dnr.to_pandas()            # step, epoch, site, pairs, zero_pairs, dnr
    dnr.result().per_epoch()   # epoch, site, steps, dnr (mean over the epoch's steps)

Hooks only read, under ``no_grad``, from detached tensors: the model's outputs and gradients
are exactly those of the untracked model. They are removed when the block exits, also after
an exception. Counts stay on the model's device and are read back every 256 steps (and when
the table is read), so tracking adds one device synchronisation per 256 steps to the loop.
"""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch

from ..errors import InputError, SiteError
from ..results import TableResult
from ..sites import Plan, Site
from ..trace import Tracer, flatten
from ..models import Model

ALL = "all"  # site name of the pooled, overall row
POS = "pos"
RELU_MODULES = (torch.nn.ReLU, torch.nn.ReLU6)
FLUSH_EVERY = 256  # steps between reads of the device counters


# -- results ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EpochDeadNeuronRates(TableResult):
    """One row per (epoch, site): the mean of the epoch's per-step dynamic DNRs."""

    table_name: ClassVar[str] = "dead_neuron_rate_epochs"

    epoch: np.ndarray  # [rows] int64
    site: np.ndarray  # [rows] object
    steps: np.ndarray  # [rows] int64, steps averaged
    dnr: np.ndarray  # [rows] float64

    def to_table(self) -> dict[str, np.ndarray]:
        return {"epoch": self.epoch, "site": self.site, "steps": self.steps, "dnr": self.dnr}


@dataclass(frozen=True, eq=False)
class DeadNeuronRates(TableResult):
    """One row per (step, site), plus a pooled ``"all"`` row per step."""

    table_name: ClassVar[str] = "dead_neuron_rate"

    step: np.ndarray  # [rows] int64, 0-based count of dnr.step() calls
    epoch: np.ndarray  # [rows] int64, 0-based count of dnr.epoch_end() calls before the step
    site: np.ndarray  # [rows] object
    pairs: np.ndarray  # [rows] int64, (unit, example/token) pairs observed in the step
    zero_pairs: np.ndarray  # [rows] int64, of which did not fire
    criterion: str = "a > 0"

    @property
    def dnr(self) -> np.ndarray:
        """``[rows]`` float64: zero_pairs / pairs."""
        return self.zero_pairs / np.maximum(self.pairs, 1)

    def to_table(self) -> dict[str, np.ndarray]:
        return {
            "step": self.step, "epoch": self.epoch, "site": self.site,
            "pairs": self.pairs, "zero_pairs": self.zero_pairs, "dnr": self.dnr,
        }

    def plot(self, path: str | os.PathLike | None = None) -> str:
        """The DNR per step, one line per site (and the pooled ``all``), as a standalone SVG
        that any browser opens; also written to ``path`` when given."""
        from ..drawing.charts import lines

        sites = dict.fromkeys(self.site.tolist())
        series = {site: (self.step[self.site == site].tolist(), self.dnr[self.site == site].tolist()) for site in sites}
        svg = lines("dnr", series, title=f"dynamic dead neuron rate ({self.criterion})", x_label="step", y_label="DNR")
        if path is not None:
            Path(path).write_text(svg, encoding="utf-8")
        return svg

    def as_steps(self) -> Any:
        """These rates as ``training_steps`` rows (metric ``dnr``), to go into a
        :class:`~actscope.train.steps.StepLog` beside other callbacks' scalars."""
        from .steps import TrainingSteps

        return TrainingSteps(step=self.step.copy(), metric=np.full(len(self.step), "dnr", dtype=object),
                             site=self.site.copy(), value=self.dnr.astype(np.float64))

    def per_epoch(self) -> EpochDeadNeuronRates:
        """Mean of the per-step DNRs within each epoch, per site (sites in first-seen order)."""
        keys = list(dict.fromkeys(zip(self.epoch.tolist(), self.site.tolist())))
        rates = self.dnr
        rows = [(e, s, (self.epoch == e) & (self.site == s)) for e, s in keys]
        return EpochDeadNeuronRates(
            epoch=np.array([e for e, _, _ in rows], dtype=np.int64),
            site=np.array([s for _, s, _ in rows], dtype=object),
            steps=np.array([int(m.sum()) for _, _, m in rows], dtype=np.int64),
            dnr=np.array([float(rates[m].mean()) for _, _, m in rows], dtype=np.float64),
        )


# -- the tracker -----------------------------------------------------------------------
class DeadNeuronTracker:
    """Records the dynamic dead neuron rate of ``sites`` at every ``step()``.

    ``model``: an actscope ``Model`` or any ``nn.Module``. ``sites``: a site selection
    (canonical such as ``blocks.*.mlp.post``, or ``module:PATH@output``); by default
    ``blocks.*.mlp.post`` for models with an adapter, else the output of every ``nn.ReLU`` /
    ``nn.ReLU6`` module (a module called several times per forward pools its calls).
    ``criterion``: ``"pos"`` (zero means ``a > 0`` is false) or a float ε (``|a| <= ε``).
    Use it as a context manager, or call ``start()`` and ``close()`` yourself.
    """

    def __init__(self, model: Model, sites: str | Sequence[str] | Plan | None = None, *, criterion: str | float = POS) -> None:
        from ..models.loading import wrap
        from ..models.model import Model

        self._threshold = _check_criterion(criterion)
        wrapped = model if isinstance(model, Model) else wrap(model)
        self._tracer = _Counter(wrapped, _default_sites(wrapped) if sites is None else sites, self._threshold)
        self._stack: ExitStack | None = None
        self._rows: list[tuple[int, int, dict[str, tuple[int, Any]]]] = []  # (step, epoch, {site: counts})
        self._flushed = 0  # rows whose counts are already ints
        self._step = 0
        self._epoch = 0

    @property
    def sites(self) -> list[str]:
        return [site.label for site in self._tracer.plan.sites]

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> "DeadNeuronTracker":
        """Register the hooks (``with`` does this for you)."""
        if self._stack is not None:
            raise InputError("this DeadNeuronTracker is already tracking; call close() before starting it again")
        stack = ExitStack()
        stack.enter_context(self._tracer.attached())
        self._stack = stack
        return self

    def close(self) -> None:
        """Remove the hooks; the recorded table stays readable. Forward passes since the last
        ``step()`` are dropped (they belong to no finished step)."""
        stack, self._stack = self._stack, None
        self._tracer.pending.clear()
        if stack is not None:
            stack.close()

    def __enter__(self) -> "DeadNeuronTracker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside this block are not counted (e.g. an evaluation pass)."""
        self._tracer.paused += 1
        try:
            yield
        finally:
            self._tracer.paused -= 1

    # -- recording -----------------------------------------------------------------------
    def step(self) -> None:
        """Close the current step: its rates are those of every forward pass since the last
        ``step()``. A step without any forward pass records no row (the step count still
        advances)."""
        if self._stack is None:
            raise InputError("DeadNeuronTracker.step() was called while not tracking; use it inside "
                             "`with DeadNeuronTracker(model) as dnr:` (or after dnr.start())")
        counts = dict(self._tracer.pending)
        self._tracer.pending.clear()
        if counts:
            self._rows.append((self._step, self._epoch, counts))
        self._step += 1
        if len(self._rows) - self._flushed >= FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        """Turn the device counters of the steps since the last flush into ints: one wait for
        the device every FLUSH_EVERY steps, and no pile of 0-d device tensors in long runs."""
        for _, _, counts in self._rows[self._flushed:]:
            for label, (pairs, zeros) in counts.items():
                counts[label] = (pairs, int(zeros))
        self._flushed = len(self._rows)

    def epoch_end(self) -> None:
        """Mark the end of an epoch: later steps belong to the next one."""
        self._epoch += 1

    # -- results -------------------------------------------------------------------------
    def result(self) -> DeadNeuronRates:
        """The recorded rates (this reads the device counters: call it outside the hot loop)."""
        self._flush()
        rows: list[tuple[int, int, str, int, int]] = []  # step, epoch, site, pairs, zero pairs
        for step, epoch, counts in self._rows:
            seen = [(label, *counts[label]) for label in self.sites if label in counts]
            rows += [(step, epoch, label, pairs, zeros) for label, pairs, zeros in seen]
            rows.append((step, epoch, ALL, sum(s[1] for s in seen), sum(s[2] for s in seen)))
        columns = list(zip(*rows)) if rows else [()] * 5
        return DeadNeuronRates(
            step=np.array(columns[0], dtype=np.int64),
            epoch=np.array(columns[1], dtype=np.int64),
            site=np.array(columns[2], dtype=object),
            pairs=np.array(columns[3], dtype=np.int64),
            zero_pairs=np.array(columns[4], dtype=np.int64),
            criterion="a > 0" if self._threshold is None else f"|a| > {self._threshold:g}",
        )

    def to_pandas(self) -> Any:
        """``step, epoch, site, pairs, zero_pairs, dnr``; one row per (step, site) and a pooled
        ``site == "all"`` row per step."""
        return self.result().to_pandas()


class _Counter(Tracer):
    """Adds, per site, the (pairs, zero pairs) of every forward call to ``pending``."""

    def __init__(self, model: Model, sites: Any, threshold: float | None) -> None:
        super().__init__(model, sites)
        for site in self.plan.sites:
            if site.hook.layout == "pattern":
                raise SiteError(f"{site.label} is an attention pattern, which has no units to be dead; "
                                "track a unit site such as blocks.*.mlp.post or module:PATH@output")
        self.threshold = threshold
        self.pending: dict[str, tuple[int, torch.Tensor]] = {}  # site → (pairs, zero pairs on device)
        self.paused = 0

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        if self.paused:
            return
        values = flatten(site, value, self._batch_info(), module).values  # [real tokens, units]
        fired = values > 0 if self.threshold is None else values.abs() > self.threshold
        zeros = fired.numel() - fired.sum()  # 0-d tensor on the model's device: no sync here
        pairs, before = self.pending.get(site.label, (0, 0))
        self.pending[site.label] = (pairs + fired.numel(), before + zeros)


def _check_criterion(criterion: Any) -> float | None:
    if isinstance(criterion, str) and criterion == POS:
        return None
    if isinstance(criterion, (int, float)) and not isinstance(criterion, bool) and np.isfinite(criterion) and criterion >= 0:
        return float(criterion)
    raise InputError(f"criterion must be 'pos' (zero: a <= 0) or a finite float eps >= 0 (zero: |a| <= eps), got {criterion!r}")


def _default_sites(wrapped: Any) -> str | list[str]:
    """``blocks.*.mlp.post`` with an adapter, else the outputs of the ReLU modules."""
    if wrapped.adapter is not None:
        return "blocks.*.mlp.post"
    names = [f"module:{name}@output" for name, module in wrapped.module.named_modules() if isinstance(module, RELU_MODULES)]
    if not names:
        raise SiteError(
            f"{wrapped.name} has no nn.ReLU module and no adapter, so there is no default site to track; "
            "pass sites, e.g. sites='module:PATH@output' for the module whose output is the activation"
        )
    return names
