"""Inverse participation ratio (IPR) per neuron, of its weights or of its activations:
:func:`ipr` ("To grok or not to grok": memorising neurons).

For a vector ``v`` of ``n`` entries, ``IPR(v) = Σ_k |v_k|⁴ / (Σ_k |v_k|²)²`` (the ``r = 2`` case
of ``Σ|v|^{2r} / (Σ|v|²)^r``). It is 1 when one entry carries all the energy and ``1/n`` when all
entries are equal in size: high IPR is a localised vector, low IPR a spread one. A vector of zeros
has no IPR (NaN).

* **weights** (``module=``): per neuron, the vector of its input weights (``of="input"``: a row of
  ``nn.Linear.weight`` ``[out, in]``, a flattened output channel of a convolution) or of its output
  weights (``of="output"``: a column, the weights that read input unit ``j``). With
  ``basis="fourier"`` the vector is first cut into ``groups`` equal parts (the one-hot blocks of a
  modular-arithmetic input, ``a`` and ``b``), each replaced by the magnitudes of its discrete
  Fourier transform ``|DFT(part)|`` (all frequencies), and the IPR is taken over the concatenation:
  a neuron whose weights are one sinusoid has IPR 1/(2·groups); in modular arithmetic the
  generalising neurons are periodic (high Fourier IPR) and the memorising ones are not (low).
* **activations** (``data=`` and ``sites=``): per unit of a site, the vector of its activations over
  all rows (examples, or real tokens): a unit that fires on a handful of examples has a high IPR.
  Streamed: only ``Σa²`` and ``Σa⁴`` per unit are kept (float64).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..models import Model, as_model
from ..results import TableResult
from ..trace import Tracer, flatten

SIDES = ("input", "output")
BASES = ("identity", "fourier")


@dataclass(frozen=True, eq=False)
class UnitIPR(TableResult):
    """IPR per unit: ``site`` is the module path (weights) or the site label (activations)."""

    table_name: ClassVar[str] = "ipr"

    site: np.ndarray  # [units] object
    unit: np.ndarray  # [units] int64
    ipr: np.ndarray  # [units] float64, NaN where the vector is all zeros
    length: np.ndarray  # [units] int64: entries of each vector (rows, or weights)
    source: str  # "weights" or "activations"
    basis: str

    def to_table(self) -> dict[str, np.ndarray]:
        return {"site": self.site, "unit": self.unit, "ipr": self.ipr, "length": self.length}

    def of(self, site: str | None = None) -> np.ndarray:
        """The IPR values of one site (the only one when ``site`` is None), by unit."""
        names = list(dict.fromkeys(self.site.tolist()))
        if site is None:
            if len(names) != 1:
                raise InputError(f"this result holds {len(names)} sites ({', '.join(names)}); name one")
            site = names[0]
        if site not in names:
            raise InputError(f"no site {site!r} in this result; it holds {', '.join(names)}")
        return self.ipr[self.site == site]

    def ranked(self, site: str | None = None, *, lowest: bool = True) -> np.ndarray:
        """Unit numbers of one site from lowest to highest IPR (or the reverse); NaN units last."""
        values = self.of(site)
        units = self.unit[self.site == (site if site is not None else self.site[0])]
        key = np.where(np.isnan(values), np.inf, values if lowest else -values)
        return units[np.argsort(key, kind="stable")]


def ipr_of(vectors: torch.Tensor, *, basis: str = "identity", groups: int = 1) -> torch.Tensor:
    """IPR of each row of ``vectors`` ``[units, n]`` (float64; see the module docstring)."""
    if basis not in BASES:
        raise InputError(f"basis must be one of {', '.join(BASES)}, got {basis!r}")
    v = vectors.detach().to("cpu", torch.float64)
    if v.dim() != 2:
        raise InputError(f"expected a matrix [units, entries], got shape {tuple(v.shape)}")
    if basis == "fourier":
        v = _fourier(v, groups)
    power2 = v.square().sum(dim=1)
    power4 = v.square().square().sum(dim=1)
    return torch.where(power2 > 0, power4 / power2.square(), torch.full_like(power2, float("nan")))


def _fourier(v: torch.Tensor, groups: int) -> torch.Tensor:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or v.shape[1] % groups:
        raise InputError(f"groups must be a whole number ≥ 1 that divides the {v.shape[1]} weights of each neuron, got {groups!r}")
    parts = v.reshape(v.shape[0], groups, v.shape[1] // groups)
    return torch.fft.fft(parts, dim=-1).abs().reshape(v.shape[0], -1)


def ipr(model: Any, data: Any = None, sites: str | Sequence[str] | None = None, *, module: str | None = None,
        of: str = "input", basis: str = "identity", groups: int = 1, batch_size: int = 256) -> UnitIPR:
    """IPR per neuron of ``model`` (any ``nn.Module`` or actscope ``Model``): of the weights of
    ``module`` (a module path, its ``weight`` read as described in the module docstring), or of
    the activations of ``sites`` over ``data`` (a tensor ``[N, ...]`` fed in batches of
    ``batch_size``, or a list of dicts of keyword inputs). Give exactly one of ``module`` and ``data``."""
    if (module is None) == (data is None):
        raise InputError("ipr needs either module= (the IPR of a layer's weights) or data= with sites= (of activations), not both")
    wrapped = as_model(model)
    if module is not None:
        return _weights(wrapped, module, of, basis, groups)
    if basis != "identity":
        raise InputError("basis='fourier' applies to weights (module=); activations are measured in the unit basis")
    if sites is None:
        raise InputError("ipr over activations needs sites=, e.g. 'module:1@output' or 'blocks.*.mlp.post'")
    return _activations(wrapped, data, sites, batch_size)


def weight_vectors(module: torch.nn.Module, of: str = "input") -> torch.Tensor:
    """Each neuron's weight vector ``[units, n]``: rows of ``weight`` read as ``[out, in, ...]``
    (``of="input"``) or its columns (``"output"``); GPT-2's ``Conv1D`` (``[in, out]``) turned first."""
    if of not in SIDES:
        raise InputError(f"of must be 'input' (each output unit's incoming weights) or 'output' (each input unit's outgoing weights), got {of!r}")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise InputError(f"{type(module).__name__} has no weight matrix (a 'weight' of 2 or more dimensions); choose a Linear or convolution module")
    w = weight.detach()
    if type(module).__name__ == "Conv1D":
        w = w.t()
    if of == "output":
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1)


def _weights(model: Model, path: str, of: str, basis: str, groups: int) -> UnitIPR:
    try:
        owner = model.module.get_submodule(path)
    except AttributeError:
        names = [name for name, m in model.module.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)][:8]
        raise InputError(f"{model.name} has no module {path!r}; modules with weights include {', '.join(names)}") from None
    vectors = weight_vectors(owner, of)
    values = ipr_of(vectors, basis=basis, groups=groups).numpy()
    count = len(values)
    return UnitIPR(site=np.array([path] * count, dtype=object), unit=np.arange(count, dtype=np.int64), ipr=values,
                   length=np.full(count, vectors.shape[1], dtype=np.int64), source="weights", basis=basis)


class _Powers(Tracer):
    """Per site, running ``Σa²`` and ``Σa⁴`` per unit and the number of rows."""

    def __init__(self, model: Model, sites: Any) -> None:
        super().__init__(model, sites, announce=False)
        self.sums: dict[str, list] = {}

    def on_site(self, site: Any, value: Any, module: torch.nn.Module) -> None:
        a = flatten(site, value, self._batch_info(), module).values.to(torch.float64)
        square = a.square()
        before = self.sums.get(site.label)
        now = [square.sum(0), square.square().sum(0), a.shape[0]]
        self.sums[site.label] = now if before is None else [before[0] + now[0], before[1] + now[1], before[2] + now[2]]


def _activations(model: Model, data: Any, sites: Any, batch_size: int) -> UnitIPR:
    from .codes import _forward_calls, _to_device
    from .representations import evaluating

    tracer = _Powers(model, sites)
    calls = _forward_calls(data, batch_size)
    with tracer.attached(), torch.no_grad(), evaluating(model.module):
        for args, kwargs in calls:
            device = model.device
            model(*_to_device(args, device), **_to_device(kwargs, device))
    site, unit, value, length = [], [], [], []
    for chosen in tracer.plan.sites:
        label = chosen.label
        if label not in tracer.sums:
            raise InputError(f"site {label} produced no activation during the forward passes; pick sites the model runs (`actscope sites` lists them)")
        s2, s4, rows = tracer.sums[label]
        s2, s4 = s2.cpu(), s4.cpu()
        values = torch.where(s2 > 0, s4 / s2.square(), torch.full_like(s2, float("nan")))
        site += [label] * len(values)
        unit.append(np.array(chosen.units) if chosen.units is not None else np.arange(len(values)))
        value.append(values.numpy())
        length.append(np.full(len(values), rows))
    return UnitIPR(site=np.array(site, dtype=object), unit=np.concatenate(unit).astype(np.int64), ipr=np.concatenate(value),
                   length=np.concatenate(length).astype(np.int64), source="activations", basis="identity")


__all__ = ["UnitIPR", "ipr", "ipr_of", "weight_vectors"]
