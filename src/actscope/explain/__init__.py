"""Explaining units, heads and experts (METHODS.md, "Explanation and intervention"):

* :func:`decode` / :func:`decode_agreement` — a neuron's promoted and suppressed tokens through
  the final norm and the unembedding, and whether its top contexts agree;
* :func:`top_examples` — a run's top-activating contexts of chosen units;
* :func:`contrast` / :func:`ablation_effect` / :func:`token_probability` — contrast sets (effect
  size, permutation p-value) and what switching the top units off does to a behaviour;
* :func:`activation_patching`, :func:`attribution_patching` (+ :func:`compare_effects`),
  :func:`subspace_patching` / :func:`learn_subspace`, :func:`circuit_overlap`,
  :func:`induction_scores` — which components carry a behaviour;
* :func:`steering_vector` / :func:`steer` / :func:`steering_sweep` — add a contrastive, unit or
  feature direction while the model generates, and measure what it does;
* :func:`logit_lens` / :func:`fit_tuned_lens` / :func:`lens_kl` — what each layer would predict;
* :func:`attention_patterns` — every head's pattern over a prompt (the report's attention viewer);
* vision (docs/vision.md): :func:`facets` (multifaceted feature visualisation; single images with
  :func:`actscope.explain.visualize.visualize`, targets :class:`Target`, settings :class:`VisConfig`),
  :func:`discriminative_stimuli` (most discriminative stimuli), :func:`receptive_field`.

Every function takes an :class:`actscope.Model` or any ``nn.Module`` and returns a frozen
result with ``.to_pandas()``. Imports are lazy so that ``import actscope`` stays light.
"""
from __future__ import annotations

from typing import Any

# A function named like its module must be bound here, once: importing the submodule would
# otherwise leave the package attribute pointing at the module, not the function.
from .contrast import contrast as contrast
from .decode import decode as decode

_EXPORTS = {
    "decode": ".decode", "decode_agreement": ".decode", "DecodedNeurons": ".decode", "DecodeAgreement": ".decode",
    "top_examples": ".examples", "TopExamples": ".examples",
    "contrast": ".contrast", "ablation_effect": ".contrast", "token_probability": ".contrast",
    "ContrastResult": ".contrast", "AblationEffect": ".contrast",
    "activation_patching": ".patching", "logit_difference": ".patching", "ComponentEffects": ".patching",
    "attribution_patching": ".attribution", "compare_effects": ".attribution", "EffectAgreement": ".attribution",
    "subspace_patching": ".subspace", "learn_subspace": ".subspace", "row_null_split": ".subspace",
    "SubspacePatch": ".subspace", "LearnedSubspace": ".subspace", "RowNullSplit": ".subspace",
    "circuit_overlap": ".circuits", "CircuitOverlap": ".circuits",
    "induction_scores": ".induction", "repeated_tokens": ".induction", "HeadScores": ".induction",
    "steering_vector": ".steering", "steer": ".steering", "steered": ".steering", "steering_sweep": ".steering",
    "SteeringVector": ".steering", "Steered": ".steering", "SteeringSweep": ".steering",
    "logit_lens": ".lens", "fit_tuned_lens": ".lens", "lens_kl": ".lens", "LensResult": ".lens", "TunedLens": ".lens",
    "attention_patterns": ".attention", "AttentionPatterns": ".attention",
    "facets": ".visualize", "Target": ".visualize", "VisConfig": ".visualize",
    "discriminative_stimuli": ".mds", "receptive_field": ".receptive",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actscope.explain' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(_EXPORTS[name], __name__), name)


__all__ = sorted(_EXPORTS)
