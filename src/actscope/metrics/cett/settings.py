"""The ordered settings each method bisects over, as ``{site: intervention}`` edits.

* :class:`CettSettings` — one CETT target c shared by all layers; setting j is the j-th
  breakpoint of the recorded curves (c = 0 first), layer l thresholded at
  ``ε_l(c) / ‖W_out[:, i]‖``.
* :class:`TopkSettings` — one k shared by all layers; setting j keeps ``k = d_ff − j`` units
  per token by magnitude (j = 0 is dense).
* :class:`FatSettings` — one global magnitude threshold t (FAT-ε); setting 0 is t = 0 (dense),
  setting j ≥ 1 the (j−1)-th point of a log grid up to the largest calibration |a|.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...interventions import threshold
from ...sites import plan_sites
from .core import output_projection, unit_thresholds
from .curves import CettCurves, eps_of
from .search import fat_grid, topk_abs
from ...models import Model


class CettSettings:
    method = "cett"

    def __init__(self, curves: CettCurves, model: Model) -> None:
        self.curves = curves
        self.points = curves.breakpoints()  # [(c, per-layer grid index)]
        plan = plan_sites(model, list(curves.sites))
        self.w_out = {site.label: output_projection(model, site)[0] for site in plan.sites}

    def __len__(self) -> int:
        return len(self.points)

    def value(self, j: int) -> float:
        return self.points[j][0]

    def eps(self, j: int) -> np.ndarray:
        return eps_of(self.curves.grid, self.points[j][1])

    def edits(self, j: int) -> dict[str, Any]:
        return {
            site: threshold(unit_thresholds(float(e), self.w_out[site]))
            for site, e in zip(self.curves.sites, self.eps(j))
        }


@dataclass(frozen=True)
class TopkSettings:
    sites: tuple[str, ...]
    units: int  # the smallest d_ff of the sites
    method: str = "topk"

    def __len__(self) -> int:
        return self.units

    def value(self, j: int) -> float:
        return float(self.units - j)

    def edits(self, j: int) -> dict[str, Any]:
        return {site: topk_abs(self.units - j) for site in self.sites}


class FatSettings:
    method = "fat"

    def __init__(self, sites: tuple[str, ...], max_abs: float, points: int) -> None:
        self.sites = sites
        self.grid = fat_grid(max_abs, points)

    def __len__(self) -> int:
        return len(self.grid) + 1

    def value(self, j: int) -> float:
        return 0.0 if j == 0 else float(self.grid[j - 1])

    def edits(self, j: int) -> dict[str, Any]:
        t = torch.tensor(self.value(j), dtype=torch.float64)
        return {site: threshold(t) for site in self.sites}
