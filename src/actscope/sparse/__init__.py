"""Calibrated sparse MLP execution (METHODS.md, "Exploiting sparsity").

* :func:`calibrate` — what to skip: CATS gate quantiles, TEAL input thresholds, CETT-PPL-p%
  per-unit thresholds, or CoreInfer's per-prompt core sets (α, β);
* :class:`Calibration` — ``cal.save(path)`` / ``Calibration.load(path, model)``: one safetensors
  file, refused for other weights (:mod:`actscope.store.bound`);
* :func:`sparsify` — a context in which every MLP block reads only its active weight rows
  (through :mod:`actscope.sparse.kernels`), exactly equal to :func:`dense_with_thresholds`
  up to float rounding; hooks inside the MLPs (``mlp.pre``, ``mlp.post``) are refused in
  either nesting order, ``mlp.out`` and everything outside the MLPs work
  (:mod:`actscope.sparse.swaps`);
* :func:`evaluate` — dense versus sparse perplexity of a calibration on held-out text.

Imports are lazy so that ``import actscope`` stays light.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "calibrate": ".methods",
    "Calibration": ".calibration",
    "sparsify": ".execution",
    "SparseHandle": ".execution",
    "RealisedSparsity": ".execution",
    "dense_with_thresholds": ".reference",
    "evaluate": ".quality",
    "QualityReport": ".quality",
    "sparse_families": ".families",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actscope.sparse' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(_EXPORTS[name], __name__), name)


__all__ = sorted(_EXPORTS)
