"""TEAL over every projection of a block (METHODS.md, "TEAL as published").

Every linear layer of a block (``nn.Linear`` or transformers' ``Conv1D``: q, k, v, o or a fused
qkv, gate, up, down, …) zeroes the entries of its input with ``|x| ≤ t``, one threshold per
projection. How sparse each projection is comes from a block-wise greedy search
(:func:`allocate`):

* every projection starts at sparsity 0; a projection at sparsity ``s`` has the threshold
  ``t = quantile(|x|, s)`` of its input's entries over the calibration tokens;
* the block's sparsity is the share of its projection weights a token does not read: the
  parameter-weighted mean ``Σ_p n_p s_p / Σ_p n_p`` (a zeroed input entry skips one row of the
  transposed weight);
* at each step every projection is tried sparser by as much as raises the block's sparsity by
  ``step`` (``step / share``: a small projection moves further than a large one, so every trial
  buys the same share of the block's weights, as in TEAL's search; the last step only as far as
  the target needs), the block is run on its own dense inputs (captured once from the dense
  model) and the relative error of its output ``Σ ‖y − y_dense‖² / Σ ‖y_dense‖²`` over the real
  tokens is measured; the projection with the smallest error takes the step;
* until the block reaches the target. The model-level target is the same for every block, so
  the model's sparsity (the mean over blocks) is the target too.

``allocation="uniform"`` gives every projection the target instead (TEAL's uniform baseline).
Sparse execution swaps each projection's ``forward`` for :class:`SparseLinear`: the input
entries above the threshold pick rows of the transposed weight (:mod:`~actscope.sparse.kernels`),
the rest are never read. A projection is a leaf, so its own hooks still see the right tensors
(its input, and the output it returns) and nothing hides below it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..errors import InputError
from ..hooks import SWAP_MARK, Hooks, hooks
from ..models import Model
from ..models.adapters import out_in_weight
from .forwards import Tally, _thresholded
from .swaps import BOTH, SwapMark

SCOPES = ("all", "mlp")
ALLOCATIONS = ("greedy", "uniform")
DEFAULT_STEP = 0.005  # of the block's sparsity per step (TEAL's 0.05 for q on Llama-3-8B is ≈ 0.004)
MAX_SPARSITY = 0.99  # a projection keeps at least 1 % of its input entries


@dataclass(frozen=True)
class Projection:
    """One linear layer of block ``layer``; ``name`` is its path inside the block."""

    layer: int
    name: str
    module: torch.nn.Module

    @property
    def key(self) -> str:
        """Its threshold tensor's name in a calibration."""
        return f"{self.layer}.{self.name}"

    @property
    def params(self) -> int:
        return int(out_in_weight(self.module).numel())


def is_projection(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def block_module(model: Model, layer: int) -> torch.nn.Module:
    """The decoder layer ``layer`` (the module whose output is ``blocks.{layer}.resid.post``)."""
    from ..models.model import resolve_module

    site = model.adapter.sites["blocks.{i}.resid.post"]
    found = resolve_module(model.module, site.path.format(i=layer))
    if found is None:
        raise InputError(f"{model.name}: block {layer} has no {site.path.format(i=layer)}; is this a {model.family} model?")
    return found[1]


def block_projections(model: Model, layers: list[int], scope: str) -> dict[int, list[Projection]]:
    """Per layer its projections, in module order: every linear layer of the block (``all``),
    or the MLP's only (``mlp``). Every block must have the same ones."""
    from .families import mlp_blocks

    mlp = {b.layer: {id(m) for m in (b.first, b.up, b.down) if m is not None} for b in mlp_blocks(model)}
    found = {}
    for layer in layers:
        block = block_module(model, layer)
        found[layer] = [Projection(layer, name, m) for name, m in block.named_modules()
                        if is_projection(m) and (scope == "all" or id(m) in mlp[layer])]
    names = {layer: [p.name for p in found[layer]] for layer in layers}
    first = names[layers[0]]
    if not first or any(n != first for n in names.values()):
        raise InputError(f"{model.name}: TEAL over projections needs blocks with the same linear layers; found {names}")
    return found


# -- calibration -------------------------------------------------------------------------------
def threshold_of(values: np.ndarray, sparsity: float) -> float:
    """``|x| ≤ t`` is zeroed: the ``sparsity`` quantile of the input's ``|x|`` (0 keeps all but
    exact zeros, which change no sum)."""
    return float(np.quantile(values, sparsity)) if sparsity > 0 else 0.0


def allocate(model: Model, projections: list[Projection], values: dict[str, np.ndarray], batches: list[dict],
             target: float, allocation: str, step: float) -> tuple[dict[str, float], float]:
    """``({key: sparsity}, the block's final relative output error)`` for one block."""
    weights = np.array([p.params for p in projections], dtype=np.float64)
    weights /= weights.sum()
    calls = _BlockCalls(model, block_module(model, projections[0].layer), batches)
    known: dict[tuple[str, float], float] = {}  # the search asks for the same quantiles again and again

    def thresholds(s: np.ndarray) -> dict[str, float]:
        for i, p in enumerate(projections):
            if (p.key, s[i]) not in known:
                known[(p.key, s[i])] = threshold_of(values[p.key], s[i])
        return {p.key: known[(p.key, s[i])] for i, p in enumerate(projections)}
    if allocation == "uniform":
        sparsity = np.full(len(projections), target)
        return dict(zip((p.key for p in projections), sparsity.tolist())), calls.error(projections, thresholds(sparsity))
    sparsity = np.zeros(len(projections))
    error = 0.0
    while weights @ sparsity < target - 1e-12:
        need = (target - weights @ sparsity) / weights  # the move that would reach the target alone
        moves = np.minimum(np.minimum(step / weights, need), MAX_SPARSITY - sparsity)
        best = None
        for i in np.flatnonzero(moves > 1e-12):
            trial = sparsity.copy()
            trial[i] += moves[i]
            trial_error = calls.error(projections, thresholds(trial))
            if best is None or trial_error < best[1]:
                best = (i, trial_error)
        if best is None:
            raise InputError(f"block {projections[0].layer}: every projection is at {MAX_SPARSITY:.0%} sparsity and the block "
                             f"is at {weights @ sparsity:.3f}, below the target {target}; ask for a lower sparsity")
        sparsity[best[0]] += moves[best[0]]
        error = best[1]
    return dict(zip((p.key for p in projections), sparsity.tolist())), error


class _Stop(Exception):
    """Ends a forward pass once the block's input is captured."""


class _BlockCalls:
    """One block's calls on the calibration batches (its inputs from the dense model), and its
    dense outputs, to run the block alone with thresholds."""

    def __init__(self, model: Model, block: torch.nn.Module, batches: list[dict]) -> None:
        from ..feeding import real_token_mask
        from ..models.adapters.base import first_tensor

        self.block, self._first = block, first_tensor
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []
        for inputs in batches:
            seen: list = []

            def capture(module: Any, args: tuple, kwargs: dict) -> None:
                seen.append((_cloned(args), _cloned(kwargs)))
                raise _Stop

            with torch.no_grad(), hooks(model.module) as registry:
                registry.before(block, capture, with_kwargs=True)
                try:
                    model.module(**inputs, **_no_cache(model))
                except _Stop:
                    pass
            if not seen:
                raise InputError(f"{model.name}: the forward pass never reached block {block!r}")
            self.calls.append((*seen[0], real_token_mask(inputs)))
        self.dense = [self._run(args, kwargs) for args, kwargs, _ in self.calls]

    def _run(self, args: tuple, kwargs: dict) -> torch.Tensor:
        with torch.no_grad():
            return self._first(self.block(*args, **kwargs)).double()

    def error(self, projections: list[Projection], thresholds: dict[str, float]) -> float:
        """Relative squared error of the block's output with ``thresholds`` on its projections."""
        with hooks(self.block) as registry:
            for p in projections:
                if thresholds[p.key] > 0:
                    registry.before(p.module, zero_at_most(thresholds[p.key]))
            diff = total = 0.0
            for (args, kwargs, real), dense in zip(self.calls, self.dense):
                out = self._run(args, kwargs)
                rows = real.to(out.device)
                diff += float(((out - dense)[rows] ** 2).sum())
                total += float((dense[rows] ** 2).sum())
        return diff / max(total, 1e-300)


def zero_at_most(limit: Any) -> Callable:
    """A forward pre-hook zeroing the input entries with ``|x| ≤ limit``."""
    return lambda module, args: (torch.where(args[0].abs() <= limit, 0, args[0]), *args[1:])


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_cloned(v) for v in value)
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    return value


def _no_cache(model: Model) -> dict:
    """``use_cache=False`` where the forward takes it: a block called again must not extend a cache."""
    try:
        parameters = inspect.signature(model.module.forward).parameters
    except (TypeError, ValueError):
        return {}
    takes = "use_cache" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return {"use_cache": False} if takes else {}


# -- execution ---------------------------------------------------------------------------------
class SparseLinear:
    """The replacement forward of one projection: ``where(|x| > t, x, 0) @ Wᵀ + b``, reading
    only the rows of the transposed weight of the input entries some row keeps."""

    def __init__(self, projection: Projection, threshold: torch.Tensor, part: float, record: Callable) -> None:
        weight = out_in_weight(projection.module).detach()  # [out, in]
        self.layer, self.part, self.record = projection.layer, part, record
        self.w_t = weight.t().contiguous()  # [in, out]
        bias = getattr(projection.module, "bias", None)
        self.bias = bias.detach() if isinstance(bias, torch.Tensor) else None
        self.t = threshold

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [n, d_in]
        with torch.no_grad():
            y, kept, read = _thresholded(rows, self.w_t, self.t, self.bias)
        inactive = 1 - kept.double() / rows.shape[1]
        self.record(self.layer, Tally(inactive, inactive, read / rows.shape[1]), rows.shape[0], self.part)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def threshold_for(projection: Projection, value: Any) -> torch.Tensor:
    """A projection's threshold as a 0-d tensor in the dtype and on the device of its weight (the
    values it compares with), the same for sparse execution and its dense reference."""
    weight = out_in_weight(projection.module)
    return torch.as_tensor(value, dtype=torch.float32).reshape(()).to(dtype=weight.dtype, device=weight.device)


def install_projections(registry: Hooks, projections: dict[int, list[Projection]], thresholds: Callable[[Projection], Any],
                        record: Callable) -> None:
    """Swap every projection's forward for a :class:`SparseLinear` while ``registry`` lives."""
    mark = SwapMark(BOTH, "a projection under TEAL sparse execution keeps its input and output hooks")
    for block in projections.values():
        total = sum(p.params for p in block)
        for p in block:
            runner = SparseLinear(p, threshold_for(p, thresholds(p)), p.params / total, record)
            setattr(runner, SWAP_MARK, mark)
            registry.swap_forward(p.module, runner)


__all__ = ["ALLOCATIONS", "DEFAULT_STEP", "SCOPES", "Projection", "SparseLinear", "allocate", "block_projections"]
