"""Measurements, one module per family of methods (METHODS.md, "Sparsity and neuron health"):

* :func:`activation_sparsity` — activation ratio per layer, unit and token, dead units;
* :func:`cett_sparsity` — CETT and CETT-PPL-p% sparsity (the :mod:`.cett` package, with its
  objectives such as :class:`CausalLMLoss`, and :class:`CettThresholds`);
* :func:`temporal_sparsity`, :func:`core_neurons` — delta sparsity; CoreInfer core neurons;
* :func:`activation_codes` — activation codes, redundancy, categorisation;
* :func:`neuron_sensitivity`, :func:`eigenscore` — SeND sensitive neurons; EigenScore;
* :func:`extreme_tokens`, :func:`outlier_channels`, :func:`activation_memory`,
  :func:`moe_routing` — attention sinks and dormant heads; outlier channels; activation
  memory; mixture-of-experts routing.

Every function takes an :class:`actscope.Model` or any ``nn.Module`` and returns a frozen
result with ``.to_pandas()``. Imports are lazy so that ``import actscope`` stays light.
"""
from __future__ import annotations

from typing import Any

# A function named like its module must be bound here, once: importing the submodule would
# otherwise leave the package attribute pointing at the module, not the function.
from .eigenscore import eigenscore as eigenscore

_EXPORTS = {
    "activation_sparsity": ".sparsity", "ActivationSparsity": ".sparsity",
    "cett_sparsity": ".cett", "CettSparsity": ".cett", "CettThresholds": ".cett", "CettCurves": ".cett",
    "CausalLMLoss": ".cett", "MaskedLMLoss": ".cett", "EmbeddingFidelity": ".cett", "ClassifierKL": ".cett",
    "ClassifierAccuracy": ".cett",
    "temporal_sparsity": ".temporal", "TemporalSparsity": ".temporal",
    "core_neurons": ".core", "CoreNeurons": ".core",
    "activation_codes": ".codes", "ActivationCodes": ".codes", "categorise_codes": ".codes",
    "neuron_sensitivity": ".sensitivity", "Sensitivity": ".sensitivity",
    "eigenscore": ".eigenscore", "EigenScore": ".eigenscore",
    "extreme_tokens": ".extreme", "ExtremeTokens": ".extreme",
    "outlier_channels": ".outliers", "OutlierChannels": ".outliers",
    "activation_memory": ".memory", "ActivationMemory": ".memory",
    "moe_routing": ".moe", "MoERouting": ".moe",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actscope.metrics' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(_EXPORTS[name], __name__), name)


__all__ = sorted(_EXPORTS)
