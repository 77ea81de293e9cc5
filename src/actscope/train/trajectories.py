"""Per-example loss trajectories during training, with bounded memory: :func:`loss_trajectories`,
a training callback (:mod:`.callbacks`) that measures the loss of each example of a fixed tracked
set every ``every`` steps (eval mode, no grad; each module's flag restored).

Memory is at most ``max_points`` measurements × examples: when the buffer is full, every other
measurement is dropped and the stride doubles, so the kept points always span the whole run at an
even spacing. The mean tracked loss goes into the ``training_steps`` table (``tracked_loss``);
``cb.losses()`` gives ``(steps [T], losses [T, n])`` for
:func:`actscope.metrics.opposition.opposing_groups`.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..errors import InputError
from ..hooks import Hooks
from ..metrics.representations import evaluating
from .callbacks import Callback
from .steps import StepLog

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> per-example losses [n]


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


class LossTrajectories(Callback):
    """See the module docstring; build it with :func:`loss_trajectories`."""

    name = "loss_trajectories"

    def __init__(self, model: Any, inputs: torch.Tensor, targets: torch.Tensor, *, loss: LossFn | None = None, every: int = 1,
                 max_points: int = 256, log: StepLog | None = None) -> None:
        super().__init__(model, log=log)
        for name, value, least in (("every", every, 1), ("max_points", max_points, 4)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{name} must be a whole number ≥ {least}, got {value!r}")
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor) or len(inputs) != len(targets) or len(inputs) < 2:
            raise InputError("inputs and targets must be tensors with the same number (≥ 2) of tracked examples")
        self.inputs, self.targets, self.loss = inputs, targets, loss or _cross_entropy
        self.stride, self.max_points = every, max_points
        self._steps: list[int] = []
        self._rows: list[np.ndarray] = []

    def _attach(self, registry: Hooks) -> None:
        """No hooks: the losses are read from the model's outputs."""

    def measure(self) -> np.ndarray:
        """The tracked examples' losses now, ``[n]`` float64."""
        module = self.model.module
        with torch.no_grad(), evaluating(module):
            outputs = module(self.inputs.to(self.model.device))
            values = self.loss(outputs, self.targets.to(outputs.device))
        if values.shape != (len(self.inputs),):
            raise InputError(f"the loss function must return one loss per example ({len(self.inputs)}), got shape {tuple(values.shape)}")
        return values.detach().to("cpu", torch.float64).numpy()

    def _record(self, step: int) -> None:
        if step % self.stride:
            return
        row = self.measure()
        self._steps.append(step)
        self._rows.append(row)
        self.log.record(step, "tracked_loss", float(row.mean()))
        if len(self._rows) > self.max_points:
            keep = [i for i, s in enumerate(self._steps) if s % (2 * self.stride) == 0]
            self._steps = [self._steps[i] for i in keep]
            self._rows = [self._rows[i] for i in keep]
            self.stride *= 2

    def losses(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps [T], losses [T, n])`` kept so far."""
        if not self._rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, len(self.inputs)))
        return np.array(self._steps, dtype=np.int64), np.stack(self._rows)


def loss_trajectories(model: Any, inputs: torch.Tensor, targets: torch.Tensor, *, loss: LossFn | None = None, every: int = 1,
                      max_points: int = 256, log: StepLog | None = None) -> LossTrajectories:
    """A :class:`LossTrajectories` callback: the loss of each of ``inputs`` (with ``targets``;
    ``loss(outputs, targets)`` per example, cross-entropy by default) every ``every`` steps, at
    most ``max_points`` measurements kept."""
    return LossTrajectories(model, inputs, targets, loss=loss, every=every, max_points=max_points, log=log)


__all__ = ["LossTrajectories", "loss_trajectories"]
