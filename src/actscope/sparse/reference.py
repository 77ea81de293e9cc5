"""``dense_with_thresholds(model, calibration)``: the same skips as a mask in the dense model.

The model runs its own dense MLP forward; hooks only zero what the calibration skips:

* cats — a forward hook on the gate (plain MLPs: the first projection) sets the pre-activation
  to 0 where ``|act(pre)| < t``; every supported activation has ``act(0) = 0``, so the neuron
  is 0 there;
* teal — forward pre-hooks zero the entries ``|x| ≤ t`` of the input of every projection the
  calibration covers (uniform over the MLP: of gate/up, or the first projection, and of down);
* cett — a forward pre-hook on the down projection zeroes ``|a_i| < t_i``
  (:func:`actscope.interventions.threshold`, the edit the CETT search measures);
* core — on a prefill call the down projection's input (the neuron) chooses each prompt's core
  set, unchanged; on decoding calls the neurons outside the set are zeroed.

This is the reference sparse execution is tested against, and an easy way to measure the
quality of a calibration without the sparse kernels.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..errors import InputError
from ..hooks import Hooks, hooks
from .calibration import Calibration
from .calls import CallTracker, choose_cores
from .execution import _thresholds, check_match
from .families import MlpBlock, mlp_blocks
from .swaps import refuse_nested
from ..models import ModelLike


@contextmanager
def dense_with_thresholds(model: ModelLike, calibration: Calibration, *, check_weights: bool = True) -> Iterator[None]:
    """The dense model with ``calibration``'s skips applied as masks, while the block runs."""
    from ..models import as_model

    model = as_model(model)
    blocks = mlp_blocks(model)
    refuse_nested(model, blocks, "dense_with_thresholds")
    check_match(model, blocks, calibration, check_weights)
    cores: dict[int, torch.Tensor] = {}
    with hooks(model.module) as registry:
        tracker = CallTracker().attach(registry)
        if calibration.by_projection:  # TEAL over projections: each one's input thresholded
            from .execution import projections_of
            from .projections import threshold_for, zero_at_most

            for projections in projections_of(model, calibration).values():
                for p in projections:
                    registry.before(p.module, zero_at_most(threshold_for(p, calibration.thresholds[p.key])))
        else:
            for block in blocks:
                _apply_skips(registry, block, calibration, tracker, cores)
        yield


def _apply_skips(registry: Hooks, block: MlpBlock, calibration: Calibration, tracker: CallTracker, cores: dict) -> None:
    t = _thresholds(calibration, block)
    method = calibration.method
    if method == "cats":
        registry.after(block.first, _cats_gate(block, t["act"]))
    elif method == "teal":
        zero_small = lambda limit: lambda mod, args: (torch.where(args[0].abs() <= limit, 0, args[0]), *args[1:])  # noqa: E731
        for module in [block.first] + ([block.up] if block.up is not None else []):
            registry.before(module, zero_small(t["in"]))
        registry.before(block.down, zero_small(t["down"]))
    elif method == "cett":
        from ..interventions import threshold

        cut = threshold(t["neuron"])
        registry.before(block.down, lambda mod, args: (cut(args[0]), *args[1:]))
    else:
        registry.before(block.down, _core_mask(block, calibration, tracker, cores))


def _cats_gate(block: MlpBlock, limit: torch.Tensor) -> Any:
    def hook(mod: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if block.spec.fused:  # [gate | up]: only the gate half is thresholded
            gate, up = output.chunk(2, dim=-1)
            return torch.cat([torch.where(block.act(gate).abs() < limit, 0, gate), up], dim=-1)
        return torch.where(block.act(output).abs() < limit, 0, output)

    return hook


def _core_mask(block: MlpBlock, calibration: Calibration, tracker: CallTracker, cores: dict) -> Any:
    settings = calibration.settings

    def pre(mod: Any, args: tuple) -> Any:
        a = args[0]
        rows = a.reshape(-1, a.shape[-1])  # [n, U]
        info = tracker.current
        if info is None or info.prefill:
            cores[block.layer] = choose_cores(rows, info, settings["alpha"], settings["beta"])
            return None
        found = info.rows(rows.shape[0])
        if found is None or block.layer not in cores:
            raise InputError("CORE decoding needs the prompt's prefill inside the same context, with the same batch size")
        keep = cores[block.layer][found[0].to(a.device)]  # [n, U]
        return (torch.where(keep, rows, 0).reshape(a.shape), *args[1:])

    return pre


__all__ = ["dense_with_thresholds"]
