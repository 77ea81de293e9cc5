"""Per-step training scalars as one long table, ``training_steps`` (step, metric, site, value).

Any callback (and any user code) records named scalars per training step into a
:class:`StepLog`; :func:`write_steps` puts the table into a run directory (a new run, or beside
the tables of an existing actscope run), where ``actscope report`` draws one chart per metric
against steps. ``site`` is ``""`` for a scalar of the whole model (the loss).

Values may be 0-d tensors on the model's device: they are read back only when the table is
asked for, so recording adds no device synchronisation to the loop.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from ..errors import InputError
from ..results import TableResult

TABLE = "training_steps"


@dataclass(frozen=True, eq=False)
class TrainingSteps(TableResult):
    """One row per (step, metric, site)."""

    table_name: ClassVar[str] = TABLE

    step: np.ndarray  # [rows] int64
    metric: np.ndarray  # [rows] object
    site: np.ndarray  # [rows] object ("" for the whole model)
    value: np.ndarray  # [rows] float64

    def to_table(self) -> dict[str, np.ndarray]:
        return {"step": self.step, "metric": self.metric, "site": self.site, "value": self.value}

    def series(self, metric: str) -> dict[str, tuple[list[int], list[float]]]:
        """``{site: (steps, values)}`` of one metric, sites in first-seen order."""
        chosen = self.metric == metric
        if not chosen.any():
            known = ", ".join(dict.fromkeys(self.metric.tolist())) or "none"
            raise InputError(f"no metric '{metric}' was recorded; recorded: {known}")
        out: dict[str, tuple[list[int], list[float]]] = {}
        for site in dict.fromkeys(self.site[chosen].tolist()):
            rows = chosen & (self.site == site)
            out[site or "model"] = (self.step[rows].tolist(), self.value[rows].tolist())
        return out

    def plot(self, metric: str, path: str | os.PathLike | None = None) -> str:
        """One metric against steps, a line per site, as a standalone SVG (also written to ``path``)."""
        from ..drawing.charts import lines

        svg = lines(f"steps-{metric}", self.series(metric), title=f"{metric} per training step", x_label="step", y_label=metric)
        if path is not None:
            Path(path).write_text(svg, encoding="utf-8")
        return svg


class StepLog:
    """Collects ``(step, metric, site, value)`` rows; shared by several callbacks if you pass
    the same log to each."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, str, str, Any]] = []

    def record(self, step: int, metric: str, value: float | torch.Tensor, site: str = "") -> None:
        if not isinstance(metric, str) or not metric:
            raise InputError(f"a step metric needs a non-empty name, got {metric!r}")
        value = value.detach() if isinstance(value, torch.Tensor) else value
        self._rows.append((int(step), metric, str(site), value))

    def extend(self, steps: TrainingSteps) -> None:
        """Add every row of ``steps`` (e.g. ``DeadNeuronRates.as_steps()``)."""
        self._rows += list(zip(steps.step.tolist(), steps.metric.tolist(), steps.site.tolist(), steps.value.tolist()))

    def __len__(self) -> int:
        return len(self._rows)

    def result(self) -> TrainingSteps:
        rows = self._rows
        return TrainingSteps(
            step=np.array([r[0] for r in rows], dtype=np.int64),
            metric=np.array([r[1] for r in rows], dtype=object),
            site=np.array([r[2] for r in rows], dtype=object),
            value=np.array([float(r[3]) for r in rows], dtype=np.float64),
        )

    def to_pandas(self) -> Any:
        return self.result().to_pandas()


def write_steps(path: str | os.PathLike, steps: StepLog | TrainingSteps, *, model: Any = None,
                config: Mapping[str, Any] | None = None) -> Path:
    """Write ``steps`` as the ``training_steps`` table of the run at ``path``: a new run, or the
    actscope run already there (its other tables kept, this one replaced). ``model`` (optional)
    names the model in a new run's manifest; ``config`` is stored under ``manifest['training']``.
    ``actscope report PATH`` then draws each metric against steps."""
    from ..store import read_run, write_run

    table = (steps.result() if isinstance(steps, StepLog) else steps).to_table()
    target = Path(path)
    training = dict(config or {})
    if (target / "manifest.json").is_file():
        data = read_run(target)
        manifest = {**data.manifest, "training": training}
        write_run(target, manifest=manifest, tables={**data.tables, TABLE: table}, arrays=data.arrays, state=data.state(), overwrite=True)
    else:
        manifest = {"kind": "training", "training": training}
        if model is not None:
            manifest["model"] = {"name": getattr(model, "name", type(model).__name__)}
        write_run(target, manifest=manifest, tables={TABLE: table})
    return target
