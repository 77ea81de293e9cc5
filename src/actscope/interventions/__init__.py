"""Interventions: pure tensor → tensor functions (``zero``, ``scale``, ``set_value``, ``clamp``,
``add``, ``mean``, ``resample``, ``patch``, ``topk``, ``threshold``), ``edit``, the context that
applies them to sites, ``replace_activation``, the context that swaps an MLP's activation
function, and ``experts``, the context that switches MoE experts off or on (all nest and
compose)."""
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

__all__ = [
    "Editor",
    "ExpertEdit",
    "add",
    "clamp",
    "edit",
    "experts",
    "mean",
    "means_from",
    "patch",
    "replace_activation",
    "resample",
    "scale",
    "set_value",
    "threshold",
    "topk",
    "zero",
]
