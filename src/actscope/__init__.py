"""actscope: see, measure, explain and exploit the neuron activations of any PyTorch model.

Only public names live here; heavy libraries are imported lazily by the functions that
need them.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import explain, interventions, metrics, sae, sparse, train
from .errors import ActscopeError, DataError, InputError, ModelLoadError, RunDirError, SiteError
from .harvesting import harvest
from .interventions import edit
from .models import Model, load, wrap
from .profiling import ProfileConfig, profile
from .sae import load_sae, train_sae
from .run import Run, open_run
from .sites import Plan, plan_sites
from .store.activations import open_activations
from .trace import capture, observe

__all__ = [
    "ActscopeError",
    "DataError",
    "InputError",
    "Model",
    "ModelLoadError",
    "Plan",
    "ProfileConfig",
    "Run",
    "RunDirError",
    "SiteError",
    "__version__",
    "capture",
    "edit",
    "explain",
    "harvest",
    "interventions",
    "load",
    "load_sae",
    "metrics",
    "observe",
    "open_activations",
    "open_run",
    "profile",
    "sae",
    "sparse",
    "train",
    "train_sae",
    "plan_sites",
    "wrap",
]
