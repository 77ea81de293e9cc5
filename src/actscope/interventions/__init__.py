"""Interventions: pure tensor → tensor functions (``zero``, ``scale``, ``set_value``, ``add``,
``topk``, ``threshold``) and ``edit``, the context that applies them to sites."""
from .context import Editor, edit
from .functions import add, scale, set_value, threshold, topk, zero

__all__ = ["Editor", "add", "edit", "scale", "set_value", "threshold", "topk", "zero"]
