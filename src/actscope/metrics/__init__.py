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

Representation geometry (METHODS.md, "Representation geometry", "Module drift"):

* :func:`cka`, :func:`hsic`, :func:`rsa`, :func:`rdm`, :func:`effective_rank`,
  :func:`participation_ratio` — similarity and dimensionality of arrays ``[samples, features]``;
* :func:`compare_representations` — a site × site similarity matrix of one or two models on
  the same data (linear CKA streamed in mini-batches);
* :func:`ridge_cv`, :func:`encoding_scores`, :func:`load_responses`, :func:`noise_ceiling` —
  encoding models: cross-validated ridge R² from activations to recordings, per layer and model;
* :func:`module_drift` — per-module weight and representation change across checkpoints.

Convolution filters (METHODS.md, "Conv filter statistics"): :func:`filter_stats`,
:func:`filter_divergence`, :func:`pooled_divergence` — 3×3 filter distributions, their principal
components, sparsity, variance entropy and KL divergence between layers or models.

Learning dynamics (METHODS.md, "Memorising neurons"):

* :func:`ipr` — inverse participation ratio per neuron, of its weights (optionally in the
  Fourier basis) or of its activations over examples;
* :func:`empirical_ntk`, :func:`kernel_alignment`, :func:`ntk_alignment`,
  :func:`direction_alignment` — the lazy → rich measures (``actscope.train.lazy_rich`` records
  them per training step);
* :func:`opposing_groups`, :func:`opposition_score`, :func:`separating_feature`, :func:`spike_coincidence` — opposing signals
  in per-example loss trajectories (``actscope.train.loss_trajectories`` records them);
* :func:`feature_variance`, :func:`variance_explained` — the share of a representation's variance
  each feature explains, and its decodability by linear and small nonlinear probes (feature
  complexity biases; ``actscope.train.feature_variance_tracker`` records it per training step).

Every function takes an :class:`actscope.Model` or any ``nn.Module`` and returns a frozen
result with ``.to_pandas()``. Imports are lazy so that ``import actscope`` stays light.
"""
from __future__ import annotations

from typing import Any

# A function named like its module must be bound here, once: importing the submodule would
# otherwise leave the package attribute pointing at the module, not the function.
from .eigenscore import eigenscore as eigenscore
from .ipr import ipr as ipr

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
    "cka": ".similarity", "hsic": ".similarity", "rsa": ".similarity", "rdm": ".similarity",
    "effective_rank": ".similarity", "participation_ratio": ".similarity",
    "compare_representations": ".compare", "RepresentationSimilarity": ".compare",
    "ridge_cv": ".encoding", "RidgeFit": ".encoding", "encoding_scores": ".encoding", "EncodingScores": ".encoding",
    "load_responses": ".encoding", "Responses": ".encoding", "noise_ceiling": ".encoding",
    "module_drift": ".drift", "ModuleDrift": ".drift",
    "filter_stats": ".filters", "FilterStats": ".filters", "filter_divergence": ".filters", "pooled_divergence": ".filters",
    "ipr": ".ipr", "UnitIPR": ".ipr",
    "empirical_ntk": ".richness", "kernel_alignment": ".richness", "ntk_alignment": ".richness", "direction_alignment": ".richness",
    "feature_variance": ".complexity", "FeatureVariance": ".complexity", "variance_explained": ".complexity",
    "opposing_groups": ".opposition", "OpposingSignals": ".opposition", "opposition_score": ".opposition", "separating_feature": ".opposition",
    "spike_coincidence": ".opposition", "SpikeCoincidence": ".opposition",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actscope.metrics' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(_EXPORTS[name], __name__), name)


__all__ = sorted(_EXPORTS)
