"""SeND training: periodically find the sensitive neurons and drop them deterministically.

Every ``snapshot_every`` steps the callback records the representation of fixed probe inputs
at ``site`` (the paper's: the penultimate block's output at the second-to-last token; the model
runs in eval mode for it, without the drop). Every ``every`` steps, from the last ``history``
snapshots, it scores each unit's sensitivity (``actscope.metrics.sensitivity``:
``Σ_t |E_{t+1} − E_t| · Var_t(E)``, averaged over the probe inputs) and, for the next ``window``
steps, zeroes the ``top`` fraction of most sensitive units of ``site`` in every training forward
pass (deterministic dropout; gradients do not flow through dropped units). Evaluation passes
(module in eval mode) are never dropped.

Recorded per step: ``dropped_units`` (how many units are zeroed in that step) and, at each
identification, ``sensitivity_top_share`` (the share of total sensitivity the dropped units hold).

*Our choices* where the paper leaves it open: dropped units are zeroed without rescaling the
others; the drop starts at the first identification that has at least two snapshots.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..hooks import Hooks
from ..interventions import edit
from ..metrics.sensitivity import (AUTO_SITE, DEFAULT_POSITION, _encode_inputs, _representation, _resolve_site, sensitive_mask,
                                   sensitivity_from_trajectory)
from .callbacks import Callback
from .steps import StepLog


class SeND(Callback):
    name = "send"

    def __init__(self, model: Any, probe: Any, *, site: str = AUTO_SITE, every: int = 50, window: int = 25,
                 snapshot_every: int = 10, history: int = 5, top: float = 0.1, position: int = DEFAULT_POSITION,
                 log: StepLog | None = None) -> None:
        super().__init__(model, log=log)
        for name, value, low in (("every", every, 1), ("window", window, 1), ("snapshot_every", snapshot_every, 1), ("history", history, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"SeND: {name} must be an int >= {low}, got {value!r}")
        sensitive_mask(np.zeros(1), top)  # checks top
        self.site = _resolve_site(self.model, site)
        self.probe = _encode_inputs(probe, self.model.tokenizer)
        self.every, self.window, self.snapshot_every, self.history = every, window, snapshot_every, history
        self.top, self.position = float(top), position
        self._snapshots: list[torch.Tensor] = []  # [inputs, units] each
        self.dropped: torch.Tensor | None = None  # bool [units] while a window is open
        self._until = -1  # the drop applies to steps < _until
        self.identifications: list[tuple[int, np.ndarray]] = []  # (step, indices dropped)

    def _attach(self, registry: Hooks) -> None:
        registry.enter(edit(self.model, {self.site: self._drop}))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropped is None or self.steps >= self._until or not self.model.module.training:
            return x
        return x * (~self.dropped).to(device=x.device, dtype=x.dtype)

    def snapshot(self) -> None:
        """Record the probe representation now (``step()`` does this every ``snapshot_every`` steps)."""
        values = _representation(self.model, self.probe, self.site, self.position, batch_size=32)  # [inputs, units]
        self._snapshots = (self._snapshots + [values])[-self.history:]

    def _record(self, step: int) -> None:
        active = self.dropped is not None and step < self._until
        self.log.record(step, "dropped_units", int(self.dropped.sum()) if active else 0, self.site)
        done = step + 1  # steps completed after this one
        if done % self.snapshot_every == 0:
            self.snapshot()
        if done % self.every == 0 and len(self._snapshots) >= 2:
            self._identify(step)

    def _identify(self, step: int) -> None:
        per_input = sensitivity_from_trajectory(torch.stack(self._snapshots))  # [inputs, units]
        sensitivity = per_input.mean(dim=0).numpy()
        mask = sensitive_mask(sensitivity, self.top)
        total = float(sensitivity.sum())
        self.log.record(step, "sensitivity_top_share", float(sensitivity[mask].sum()) / total if total > 0 else 0.0, self.site)
        self.dropped = torch.from_numpy(mask)
        self._until = step + 1 + self.window
        self.identifications.append((step, np.flatnonzero(mask)))

    def _detached(self) -> None:
        super()._detached()
        self.dropped, self._until = None, -1


def send(model: Any, probe: Any, *, site: str = AUTO_SITE, every: int = 50, window: int = 25, snapshot_every: int = 10,
         history: int = 5, top: float = 0.1, position: int = DEFAULT_POSITION, log: StepLog | None = None) -> SeND:
    """A :class:`SeND` callback: ``probe`` are the fixed inputs whose representation at ``site``
    defines sensitivity (texts with the model's tokenizer, token ids or an input dict)."""
    return SeND(model, probe, site=site, every=every, window=window, snapshot_every=snapshot_every, history=history, top=top,
                position=position, log=log)
