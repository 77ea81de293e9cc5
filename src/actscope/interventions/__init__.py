"""Interventions: pure tensor → tensor functions (``zero``, ``scale``, ``set_value``, ``clamp``,
``add``, ``mean``, ``resample``, ``patch``, ``topk``, ``threshold``), ``edit``, the context that
applies them to sites, ``replace_activation``, the context that swaps an MLP's activation
function, and ``experts``, the context that switches MoE experts off or on (all nest and
compose). ``recode`` moves a hidden state by gradient steps towards a read-out's target during
the forward pass (latent recoding)."""
from .context import Editor, edit
from .experts import ExpertEdit, experts
from .functions import (
    add,
    clamp,
    mean,
    means_from,
    patch,
    replace_activation,
    resample,
    scale,
    set_value,
    threshold,
    topk,
    zero,
)
from .recoding import lm_readout, recode

__all__ = [
    "Editor",
    "ExpertEdit",
    "add",
    "clamp",
    "edit",
    "experts",
    "lm_readout",
    "mean",
    "means_from",
    "patch",
    "recode",
    "replace_activation",
    "resample",
    "scale",
    "set_value",
    "threshold",
    "topk",
    "zero",
]
