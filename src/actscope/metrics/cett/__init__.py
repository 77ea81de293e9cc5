"""CETT and CETT-PPL-p% sparsity (Sparsing Law; METHODS.md, "CETT"): one package, one entry
point, :func:`cett_sparsity` (in :mod:`.sparsity`).

* :mod:`.core` — the output projection behind a neuron site, CETT of a dropped set, thresholds;
* :mod:`.curves` — the one calibration pass recording CETT(ε) per layer;
* :mod:`.objectives` — what "performance" means: perplexity, masked-LM loss, fidelity, KL, accuracy;
* :mod:`.search` — counted evaluation passes and the bisection over settings;
* :mod:`.settings` — the settings of each method (CETT's c, Top-k's k, FAT-ε's threshold);
* :mod:`.thresholds` — per-unit thresholds for one c, applied as an edit, saved bound to the weights
  (``save`` / ``CettThresholds.load``; a whole result: ``CettSparsity.load``);
* :mod:`.sparsity` — the whole method and its result.
"""
from .core import cett_of_dropped, output_projection, unit_thresholds
from .curves import CettCurves, record_cett_curves
from .objectives import CausalLMLoss, ClassifierAccuracy, ClassifierKL, EmbeddingFidelity, MaskedLMLoss, Objective
from .sparsity import CettSparsity, SparsitySweep, SweepRow, cett_sparsity
from .thresholds import CettThresholds, thresholds_for

__all__ = [
    "CausalLMLoss",
    "CettCurves",
    "CettSparsity",
    "CettThresholds",
    "ClassifierAccuracy",
    "ClassifierKL",
    "EmbeddingFidelity",
    "MaskedLMLoss",
    "Objective",
    "SparsitySweep",
    "SweepRow",
    "cett_of_dropped",
    "cett_sparsity",
    "output_projection",
    "record_cett_curves",
    "thresholds_for",
    "unit_thresholds",
]
