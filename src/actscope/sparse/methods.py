"""``calibrate``: the four ways of choosing what to skip (METHODS.md, "Exploiting sparsity").

* **cats** — per layer one threshold ``t`` = the ``sparsity`` quantile (linear interpolation)
  of ``|act(gate)|`` (plain MLPs: ``|act(pre)|``) over the calibration tokens. A unit with
  ``|act(gate)| < t`` is skipped: its up row and down row are never read (plain MLPs: only its
  down row, since the activation has to be computed first).
* **teal** — TEAL as published (the default, ``allocation="greedy", projections="all"``): one
  threshold per linear layer of each block (q, k, v, o, gate, up, down, or the family's fused
  ones), the sparsity of each chosen by TEAL's block-wise greedy search so that each block (the
  parameter-weighted mean over its projections) reaches the target (:mod:`~.projections`).
  ``allocation="uniform"`` gives every projection the target; ``projections="mlp"`` covers the
  MLP's projections only. ``allocation="uniform", projections="mlp"`` is the uniform MLP-only
  variant: per layer two thresholds, the ``sparsity`` quantiles of ``|x|`` (the MLP input, read
  by gate and up) and of ``|a|`` (the input of the down projection), run by the sparse MLP.
  Input entries with ``|x| ≤ t`` are zeroed: their rows of the transposed weights are skipped.
* **cett** — per-unit thresholds of CETT-PPL-p% (:func:`actscope.metrics.cett.cett_sparsity`,
  objective :class:`~actscope.metrics.cett.CausalLMLoss` on ``eval_data`` or, by default, the
  calibration data); a neuron with ``|a_i| < t_i`` is skipped. Its activation needs gate and
  up, so only the down projection is sparse.
* **core** — CoreInfer: the calibration holds α and β = 1 − ``sparsity`` *(our choice of how a
  target sparsity maps to β)*; each prompt's sentence-wise core set is chosen from its dense
  prefill and fixed while decoding (:mod:`actscope.sparse.calls`).

Every method also skips units whose activation is exactly 0 (ReLU's own sparsity): skipping a
zero changes no sum. Expected sparsity is measured on the calibration data.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .calibration import Calibration
from .validation import METHODS
from .families import MlpBlock, mlp_blocks
from .projections import ALLOCATIONS, DEFAULT_STEP, SCOPES, allocate, block_projections, threshold_of
from .recording import DEFAULT_MAX_VALUES, record_abs, record_inputs
from .swaps import refuse_nested
from ..models import Model, ModelLike


def calibrate(
    model: ModelLike,
    data: Any,
    *,
    method: str,
    sparsity: float | None = None,
    p: float | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    alpha: float = 0.4,
    eval_data: Any = None,
    max_values: int = DEFAULT_MAX_VALUES,
    allocation: str | None = None,
    projections: str | None = None,
    step: float = DEFAULT_STEP,
) -> Calibration:
    """Calibrate ``method`` (cats, teal, cett, core) on ``data`` (strings, a text source or
    model-input dicts). cats/teal/core take a target ``sparsity`` in [0, 1); cett takes ``p``,
    the allowed perplexity increase as a fraction (0.01 = 1 %). teal only: ``allocation``
    (``"greedy"``, the default, or ``"uniform"``), ``projections`` (``"all"``, the default, or
    ``"mlp"``) and the greedy search's ``step``."""
    from ..models import as_model
    from ..feeding import materialised
    from ..store import weight_hash

    _check_method_settings(method, sparsity, p)
    teal = _teal_options(method, allocation, projections, step)
    model = as_model(model)
    _check_eval_mode(model)
    blocks = mlp_blocks(model)
    refuse_nested(model, blocks, "calibrate")
    if method == "cett":
        fields = _cett(model, data, p, batch_size, max_length, eval_data)
    else:
        batches = materialised(model, data, what="calibration", batch_size=batch_size, max_length=max_length)
        if method == "teal" and teal != ("uniform", "mlp"):
            fields = _teal_projections(model, blocks, batches, sparsity, *teal, step, max_values)
        else:
            fields = {"cats": _cats, "teal": _teal, "core": _core}[method](model, blocks, batches, sparsity, alpha, max_values)
    return Calibration(
        method=method, family=model.family, model_name=model.name, weight_hash=weight_hash(model.module),
        layers=tuple(b.layer for b in blocks), units=tuple(b.units for b in blocks), **fields,
    )


def _check_method_settings(method: Any, sparsity: Any, p: Any) -> None:
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "cett":
        if p is None or sparsity is not None:
            raise InputError("method 'cett' takes p (the allowed perplexity increase, 0.01 = 1 %) and no sparsity; "
                             "e.g. calibrate(model, data, method='cett', p=0.01)")
        return
    if p is not None or sparsity is None:
        raise InputError(f"method {method!r} takes a target sparsity and no p; e.g. calibrate(model, data, method={method!r}, sparsity=0.5)")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity < 1:
        raise InputError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}; e.g. 0.5")


def _teal_options(method: str, allocation: Any, projections: Any, step: Any) -> tuple[str, str]:
    if method != "teal":
        if allocation is not None or projections is not None:
            raise InputError(f"allocation and projections are TEAL's options; method {method!r} takes neither")
        return ("", "")
    allocation = "greedy" if allocation is None else allocation
    projections = "all" if projections is None else projections
    if allocation not in ALLOCATIONS:
        raise InputError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if projections not in SCOPES:
        raise InputError(f"projections must be one of {', '.join(SCOPES)}, got {projections!r}")
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or not 0 < step <= 0.5:
        raise InputError(f"step (the block sparsity the greedy search adds per step) must be in (0, 0.5], got {step!r}; "
                         f"e.g. {DEFAULT_STEP}")
    return allocation, projections


def _check_eval_mode(model: Model) -> None:
    if model.module.training:
        raise InputError(f"{model.name} is in training mode; sparse calibration and execution are for inference: call model.eval()")


def _quantile(values: np.ndarray, q: float, what: str) -> float:
    if values.size == 0:
        raise InputError(f"the calibration data gave no {what} values (no real tokens?); pass more text")
    return float(np.quantile(values, q))  # linear interpolation between order statistics


def _weight_share(block: MlpBlock, gate_up: float, down: float) -> float:
    """Share of the MLP's weights skipped when ``gate_up`` of each input-side matrix and
    ``down`` of the output projection are skipped (gated MLPs have two input-side matrices)."""
    inputs = 2 if block.spec.gated else 1
    return (inputs * gate_up + down) / (inputs + 1)


def _cats(model: Model, blocks: list[MlpBlock], batches: list, sparsity: float, alpha: float, max_values: int) -> dict:
    values = record_abs(model, blocks, batches, ("act",), max_values=max_values)
    thresholds, expected, skipped = {}, [], []
    for block in blocks:
        v = values[(block.layer, "act")]
        t = _quantile(v, sparsity, "gate activation")
        thresholds[f"{block.layer}.act"] = torch.tensor([t], dtype=torch.float32)
        share = float(np.mean((v < np.float32(t)) | (v == 0)))
        expected.append(share)
        # Gated: the up and down rows of a skipped unit (the gate is read in full); plain: its down row.
        skipped.append(2 * share / 3 if block.spec.gated else share / 2)
    return dict(thresholds=thresholds, expected_sparsity=np.array(expected), expected_weight_skipped=np.array(skipped),
                settings={"sparsity": float(sparsity)})


def _teal(model: Model, blocks: list[MlpBlock], batches: list, sparsity: float, alpha: float, max_values: int) -> dict:
    values = record_abs(model, blocks, batches, ("in", "down"), max_values=max_values)
    thresholds, expected, s_in, s_down = {}, [], [], []
    for block in blocks:
        for kind, shares in (("in", s_in), ("down", s_down)):
            v = values[(block.layer, kind)]
            t = _quantile(v, sparsity, f"{kind} input")
            thresholds[f"{block.layer}.{kind}"] = torch.tensor([t], dtype=torch.float32)
            shares.append(float(np.mean(v <= np.float32(t))))
        expected.append(_weight_share(block, s_in[-1], s_down[-1]))
    return dict(thresholds=thresholds, expected_sparsity=np.array(expected), expected_weight_skipped=np.array(expected),
                per_layer={"expected_in_sparsity": np.array(s_in), "expected_down_sparsity": np.array(s_down)},
                settings={"sparsity": float(sparsity), "allocation": "uniform", "projections": "mlp"})


def _teal_projections(model: Model, blocks: list[MlpBlock], batches: list, sparsity: float, allocation: str, scope: str,
                      step: float, max_values: int) -> dict:
    """TEAL over every projection (or the MLP's), greedy or uniform (:mod:`~.projections`)."""
    found = block_projections(model, [b.layer for b in blocks], scope)
    values = record_inputs(model, {p.key: p.module for ps in found.values() for p in ps}, batches, max_values=max_values)
    for key, v in values.items():
        if v.size == 0:
            raise InputError(f"the calibration data gave no input values for {key} (no real tokens?); pass more text")
    thresholds, expected, errors, per_projection = {}, [], [], {}
    for layer, projections in found.items():
        chosen, error = allocate(model, projections, values, batches, float(sparsity), allocation, step)
        params = np.array([p.params for p in projections], dtype=np.float64)
        shares = []
        for p in projections:
            t = threshold_of(values[p.key], chosen[p.key])
            thresholds[p.key] = torch.tensor([t], dtype=torch.float32)
            shares.append(float(np.mean(values[p.key] <= np.float32(t))))
            per_projection.setdefault(f"sparsity {p.name}", []).append(chosen[p.key])
        expected.append(float(params @ np.array(shares) / params.sum()))
        errors.append(error)
    names = [p.name for p in next(iter(found.values()))]
    return dict(thresholds=thresholds, expected_sparsity=np.array(expected), expected_weight_skipped=np.array(expected),
                per_layer={"block_error": np.array(errors), **{k: np.array(v) for k, v in per_projection.items()}},
                settings={"sparsity": float(sparsity), "allocation": allocation, "projections": scope, "step": float(step),
                          "names": names})


def _core(model: Model, blocks: list[MlpBlock], batches: list, sparsity: float, alpha: float, max_values: int) -> dict:
    from ..hooks import hooks
    from .calls import CallTracker, choose_cores

    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha <= 1:
        raise InputError(f"alpha must be a fraction in (0, 1], got {alpha!r}; the paper uses 0.4")
    beta = 1.0 - float(sparsity)
    sizes: dict[int, list[float]] = {b.layer: [] for b in blocks}
    def hook_for(block: MlpBlock) -> Any:
        def pre(mod: Any, args: tuple) -> None:
            cores = choose_cores(args[0].reshape(-1, args[0].shape[-1]), tracker.current, alpha, beta)  # [batch, U]
            sizes[block.layer].extend((cores.sum(1).double() / block.units).tolist())
        return pre

    with torch.no_grad(), hooks(model.module) as registry:
        tracker = CallTracker().attach(registry)
        for block in blocks:
            registry.before(block.down, hook_for(block))
        for inputs in batches:
            model.module(**inputs)
    expected = np.array([1.0 - float(np.mean(sizes[b.layer])) for b in blocks])
    return dict(thresholds={}, expected_sparsity=expected, expected_weight_skipped=expected.copy(),
                settings={"sparsity": float(sparsity), "alpha": float(alpha), "beta": beta})


def _cett(model: Model, data: Any, p: float, batch_size: int, max_length: int, eval_data: Any) -> dict:
    from ..metrics.cett import CausalLMLoss, cett_sparsity

    objective = CausalLMLoss(eval_data if eval_data is not None else data, batch_size=batch_size, max_length=max_length)
    result = cett_sparsity(model, data, objective, p=p, sweep=(), baselines=False, batch_size=batch_size, max_length=max_length)
    found = result.thresholds
    blocks = mlp_blocks(model)
    thresholds = {f"{layer}.neuron": torch.from_numpy(found.thresholds[site]).to(torch.float32)
                  for site, layer in zip(found.sites, found.layers)}
    if set(found.layers) != {b.layer for b in blocks}:
        raise InputError(f"the CETT search covered layers {found.layers}, the model has {[b.layer for b in blocks]}")
    expected = 1.0 - np.asarray(result.activation_ratio, dtype=np.float64)
    skipped = np.array([_weight_share(b, 0.0, s) for b, s in zip(blocks, expected)])
    return dict(thresholds=thresholds, expected_sparsity=expected, expected_weight_skipped=skipped,
                per_layer={"eps": np.asarray(found.eps, dtype=np.float64)},
                settings={"p": float(p), "c": float(found.c), "degradation": float(result.degradation),
                          "converged": bool(result.converged), "passes": int(result.passes)})


__all__ = ["calibrate"]
