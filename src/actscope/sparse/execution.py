"""``sparsify(model, calibration)``: run every MLP block sparsely for the duration of a context.

On entry the weights are laid out (:mod:`~actscope.sparse.layout`) and each block's MLP forward
is swapped for :class:`~actscope.sparse.forwards.SparseMlp` by setting the module's ``forward``
attribute; one root pre-hook reads each call's padding mask and prefill/decoding state. On
exit (normal or by an exception) the forwards are restored exactly as they were and the hook
is removed: parameters, buffers and hooks are untouched, so the model is what it was.

OPT keeps ``fc1``/``activation_fn``/``fc2`` on the decoder layer, with no MLP module: there
``fc1`` and the activation pass their input through and ``fc2`` runs the whole sparse MLP.
Hooks that the swapped forwards would hide are refused (:mod:`~actscope.sparse.swaps`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch

from ..errors import InputError
from ..hooks import hooks
from ..results import TableResult
from .calibration import Calibration
from .calls import CallTracker
from .families import MlpBlock, mlp_blocks, refuse_unsupported_projections, refuse_unsupported_weights
from .forwards import SparseMlp, Tally
from .layout import lay_out
from .projections import install_projections
from .swaps import install, refuse_hooks, refuse_nested
from ..models import Model, ModelLike


@dataclass(frozen=True, eq=False)
class RealisedSparsity(TableResult):
    """Measured per layer over the real tokens the context ran: ``sparsity`` (share of the
    skippable activations inactive, as ``Calibration.expected_sparsity``), ``weight_skipped``
    (share of the MLP's weights a token did not need), ``read`` (share of the MLP's weights the
    kernels read, averaged over calls: a batch reads the union of its tokens' rows). The
    ``decode_`` columns count only the tokens of decoding calls (a KV cache in use), which is
    where CoreInfer skips anything: its prefill runs dense."""

    table_name: ClassVar[str] = "sparse_realised"
    layers: np.ndarray
    tokens: np.ndarray
    sparsity: np.ndarray
    weight_skipped: np.ndarray
    read: np.ndarray
    decode_tokens: np.ndarray
    decode_sparsity: np.ndarray
    decode_weight_skipped: np.ndarray

    def to_table(self) -> dict[str, np.ndarray]:
        return {"layer": self.layers, "tokens": self.tokens, "sparsity": self.sparsity,
                "weight_skipped": self.weight_skipped, "read": self.read, "decode_tokens": self.decode_tokens,
                "decode_sparsity": self.decode_sparsity, "decode_weight_skipped": self.decode_weight_skipped}


class SparseHandle:
    """What ``sparsify`` yields: the calibration and the realised sparsity so far."""

    def __init__(self, calibration: Calibration, tracker: CallTracker) -> None:
        self.calibration, self._tracker = calibration, tracker
        self.reset()

    def reset(self) -> None:
        """Forget the counts (e.g. after a warm-up)."""
        n = len(self.calibration.layers)
        # [phase, layer]: phase 0 = every call, 1 = decoding calls only. Counts are weighted by
        # each runner's part of its block (1 for a sparse MLP; a projection's share of the
        # block's projection weights under TEAL over projections, so that the parts add to 1).
        self._tokens = np.zeros((2, n))
        self._sparsity, self._skipped = np.zeros((2, n)), np.zeros((2, n))
        self._read, self._calls = np.zeros(n), np.zeros(n)
        self._position = {layer: i for i, layer in enumerate(self.calibration.layers)}

    def record(self, layer: int, tally: Tally, n: int, part: float = 1.0) -> None:
        info = self._tracker.current
        rows = info.rows(n) if info is not None else None
        real = rows[1].to(tally.sparsity.device) if rows is not None else torch.ones(n, dtype=torch.bool, device=tally.sparsity.device)
        i = self._position[layer]
        phases = (0,) if info is None or info.prefill else (0, 1)
        for phase in phases:
            self._tokens[phase, i] += part * int(real.sum())
            self._sparsity[phase, i] += part * float(tally.sparsity[real].sum())
            self._skipped[phase, i] += part * float(tally.weight_skipped[real].sum())
        self._read[i] += part * tally.read
        self._calls[i] += part

    def realised(self) -> RealisedSparsity:
        tokens = np.where(self._tokens > 0, self._tokens, 1)
        sparsity, skipped = self._sparsity / tokens, self._skipped / tokens
        return RealisedSparsity(np.array(self.calibration.layers), np.rint(self._tokens[0]).astype(np.int64), sparsity[0],
                                skipped[0], self._read / np.where(self._calls > 0, self._calls, 1),
                                np.rint(self._tokens[1]).astype(np.int64), sparsity[1], skipped[1])

    @property
    def sparsity(self) -> np.ndarray:
        """``[layers]`` realised sparsity so far."""
        return self.realised().sparsity


@contextmanager
def sparsify(model: ModelLike, calibration: Calibration, *, check_weights: bool = True) -> Iterator[SparseHandle]:
    """Run ``model``'s MLP blocks sparsely with ``calibration`` while the block runs.

    ``check_weights``: compare the model's weight hash with the calibration's (reads every
    weight once; pass False only for a calibration you just loaded for this model).

    Hooks and sparse execution: each MLP block's forward is replaced, so hooks inside the MLP
    (``blocks.{i}.mlp.pre``, ``blocks.{i}.mlp.post``, module sites under the MLP; for OPT the
    hooks of ``fc1``/``activation_fn`` and the input of ``fc2``) would never fire or would see
    the wrong tensor. They are refused with an :class:`~actscope.errors.InputError` in both
    orders: entering ``sparsify`` while such hooks exist (``edit``/``observe``/``capture`` or
    your own ``register_forward_hook``), and ``edit``/``observe``/``capture`` on such a site
    inside ``sparsify``. ``blocks.{i}.mlp.out`` (the MLP's output), the residual stream,
    attention sites, ``embed`` and ``logits`` work as usual and see the sparse model. To look
    at the neurons with the same skips, use :func:`dense_with_thresholds` instead. A second
    ``sparsify``, ``calibrate`` or ``dense_with_thresholds`` inside ``sparsify`` is refused too.

    Models whose MLP weights accelerate offloads (CPU or disk) or that are quantised are refused
    (:func:`~actscope.sparse.families.refuse_unsupported_weights` says why); a model split over
    GPUs with ``device_map`` runs sparsely, each block on its own device.
    """
    from ..models import as_model

    model = as_model(model)
    blocks = mlp_blocks(model)
    refuse_nested(model, blocks, "a second sparsify")
    refuse_unsupported_weights(model, blocks)
    check_match(model, blocks, calibration, check_weights)
    tracker = CallTracker()
    handle = SparseHandle(calibration, tracker)
    if calibration.by_projection:
        found = projections_of(model, calibration)
        refuse_unsupported_projections(model, found)
        with hooks(model.module) as registry:
            tracker.attach(registry)
            install_projections(registry, found, lambda p: calibration.thresholds[p.key], handle.record)
            yield handle
        return
    refuse_hooks(model, blocks)
    cores: dict[int, torch.Tensor] = {}
    with hooks(model.module) as registry:
        tracker.attach(registry)
        for block in blocks:
            # OPT's activation module is bypassed below, so the runner keeps its own forward.
            act = _own_forward(block.act) if block.spec.chained else block.act
            runner = SparseMlp(block, lay_out(block, calibration.method == "teal"), calibration.method,
                               _thresholds(calibration, block), dict(calibration.settings), tracker, cores, handle.record, act)
            install(registry, block, runner)
        yield handle


def check_match(model: Model, blocks: list[MlpBlock], calibration: Calibration, check_weights: bool) -> None:
    """Refuse a calibration made for another model (shapes always; weights when asked)."""
    if not isinstance(calibration, Calibration):
        raise InputError(f"calibration must be an actscope.sparse.Calibration, got {type(calibration).__name__}; "
                         "use actscope.sparse.calibrate or actscope.sparse.Calibration.load")
    if model.module.training:
        raise InputError(f"{model.name} is in training mode; sparse execution is for inference: call model.eval()")
    shapes = (tuple(b.layer for b in blocks), tuple(b.units for b in blocks))
    if calibration.family != model.family or (calibration.layers, calibration.units) != shapes:
        raise InputError(
            f"the calibration is for model '{calibration.model_name}' ({calibration.family}, {len(calibration.layers)} MLP layers "
            f"of {sorted(set(calibration.units))} units), not for model '{model.name}' ({model.family}, {len(blocks)} layers of "
            f"{sorted(set(shapes[1]))} units); calibrate this model"
        )
    if check_weights:
        from ..store.bound import check_weights as check_bound_weights

        check_bound_weights(calibration.bound_kind, calibration.model_name, calibration.weight_hash, model, "the calibration")


def _thresholds(calibration: Calibration, block: MlpBlock) -> dict[str, torch.Tensor]:
    """The block's thresholds in the dtype and on the device of its weights: of the values it
    computes with, for a quantised or offloaded output projection (on the device it runs on)."""
    from ..models.adapters.base import dense_weight

    weight = block.down.weight
    if weight.device.type == "meta" or not weight.is_floating_point() or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        weight = dense_weight(block.down)
    return {kind: calibration.threshold(block.layer, kind).to(dtype=weight.dtype, device=weight.device)
            for kind in calibration.kinds}


def projections_of(model: Model, calibration: Calibration) -> dict:
    """The model's projections that a TEAL-over-projections calibration names (refused when the
    model's differ, e.g. a calibration of another family that slipped through)."""
    from .projections import block_projections

    found = block_projections(model, list(calibration.layers), calibration.settings["projections"])
    names = [p.name for p in found[calibration.layers[0]]]
    if names != list(calibration.settings["names"]):
        raise InputError(f"the calibration has thresholds for projections {list(calibration.settings['names'])}, model "
                         f"'{model.name}' has {names}; calibrate this model")
    return found


def _own_forward(module: Any) -> Callable:
    """The forward ``module`` has now, kept before it is swapped (functions pass as they are)."""
    if not isinstance(module, torch.nn.Module):
        return module
    return module.__dict__.get("forward") or type(module).forward.__get__(module)
