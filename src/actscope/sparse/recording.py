"""One dense pass over calibration data that keeps |values| of chosen MLP tensors per layer.

What a calibration method reads, per block (real tokens only, padding excluded):

* ``act``: ``|act(pre-activation)|``, the gate of gated MLPs (CATS);
* ``in``: ``|x|``, the MLP input that the gate/up (or first) projection reads (TEAL);
* ``down``: ``|a|``, the neuron, i.e. the input of the output projection (TEAL, uniform).

:func:`record_inputs` keeps ``|x|`` of the input of any modules (TEAL over every projection).

Large calibrations are subsampled *(our choice)*: when the data holds more than ``max_values``
entries of a tensor per layer, each entry is kept with the same probability
``max_values / entries`` (seeded), so quantiles stay unbiased and memory stays bounded.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..hooks import Hooks, hooks
from .calls import CallTracker
from .families import MlpBlock
from ..models import Model

DEFAULT_MAX_VALUES = 1 << 22


def record_abs(
    model: Model, blocks: Sequence[MlpBlock], batches: list[dict], kinds: Sequence[str], *, max_values: int = DEFAULT_MAX_VALUES, seed: int = 0
) -> dict[tuple[int, str], np.ndarray]:
    """``{(layer, kind): float32 |values| [m]}`` over the real tokens of ``batches``."""
    keys = [(b.layer, k) for b in blocks for k in kinds]

    def attach(registry: Hooks, keep: Any) -> None:
        for block in blocks:
            for kind in kinds:
                _hook(registry, block, kind, keep)

    return _record(model, batches, keys, attach, max_values, seed)


def record_inputs(
    model: Model, modules: dict[Any, torch.nn.Module], batches: list[dict], *, max_values: int = DEFAULT_MAX_VALUES, seed: int = 0
) -> dict[Any, np.ndarray]:
    """``{key: float32 |x| [m]}``: the entries of each module's input over the real tokens."""
    def attach(registry: Hooks, keep: Any) -> None:
        for key, module in modules.items():
            registry.before(module, lambda mod, args, key=key: keep(key, None, args[0]))

    return _record(model, batches, list(modules), attach, max_values, seed)


def _record(model: Model, batches: list[dict], keys: list, attach: Any, max_values: int, seed: int) -> dict[Any, np.ndarray]:
    """One dense pass; ``attach(registry, keep)`` hooks ``keep(layer, kind, values)`` (kind None:
    ``layer`` is the whole key) wherever values are recorded."""
    tokens = sum(int(_real(inputs).sum()) for inputs in batches)
    generator = torch.Generator().manual_seed(seed)
    kept: dict[Any, list[np.ndarray]] = {key: [] for key in keys}
    tracker = CallTracker()

    def keep(layer: int, kind: str, values: torch.Tensor) -> None:
        rows = values.reshape(-1, values.shape[-1])  # [n, width]
        found = tracker.current.rows(rows.shape[0]) if tracker.current is not None else None
        if found is not None:
            rows = rows[found[1].to(rows.device)]
        flat = rows.detach().abs().float().reshape(-1).cpu()
        rate = min(1.0, max_values / max(tokens * values.shape[-1], 1))
        if rate < 1.0:
            flat = flat[torch.rand(flat.shape, generator=generator) < rate]
        kept[layer if kind is None else (layer, kind)].append(flat.numpy())

    with torch.no_grad(), hooks(model.module) as registry:
        tracker.attach(registry)
        attach(registry, keep)
        for inputs in batches:
            model.module(**inputs)
    return {key: np.concatenate(parts) if parts else np.zeros(0, np.float32) for key, parts in kept.items()}


def _hook(registry: Hooks, block: MlpBlock, kind: str, keep: Any) -> None:
    layer = block.layer
    if kind in ("in", "down"):
        registry.before(block.first if kind == "in" else block.down, lambda mod, args: keep(layer, kind, args[0]))
        return

    def on_first(mod: Any, args: Any, output: torch.Tensor) -> None:
        pre = output.chunk(2, dim=-1)[0] if block.spec.fused else output  # [gate | up]: the gate
        keep(layer, kind, block.act(pre))

    registry.after(block.first, on_first)


def _real(inputs: dict) -> torch.Tensor:
    from ..feeding import real_token_mask

    return real_token_mask(inputs)
