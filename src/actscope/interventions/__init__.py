"""Interventions: pure tensor → tensor functions (``zero``, ``scale``, ``set_value``, ``clamp``,
``add``, ``mean``, ``resample``, ``patch``, ``topk``, ``threshold``), ``edit``, the context that
applies them to sites, and ``replace_activation``, the context that swaps an MLP's activation
function (both nest and compose)."""
from .context import Editor, edit
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
    "add",
    "clamp",
    "edit",
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
