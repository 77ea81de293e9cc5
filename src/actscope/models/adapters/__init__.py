"""Adapter registry: one table per model family, looked up by ``config.model_type``.

Adding a family = adding a module with an ``ADAPTERS`` list here and a tiny-config row in
``actscope.zoo.tiny``.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from .base import Adapter, Hook, HookCall, ReadContext

FAMILY_MODULES = ("llama", "gemma", "phi3", "gpt2", "gpt_neox", "opt", "bert", "vit", "moe")


def _registry() -> dict[str, Adapter]:
    table: dict[str, Adapter] = {}
    for name in FAMILY_MODULES:
        for adapter in import_module(f"{__name__}.{name}").ADAPTERS:
            for model_type in adapter.model_types:
                table[model_type] = adapter
    return table


def adapter_for(config: Any) -> Adapter | None:
    """The adapter for a Hugging Face config, or None for an unknown family."""
    model_type = getattr(config, "model_type", None)
    return _registry().get(model_type) if model_type else None


def supported_model_types() -> list[str]:
    return sorted(_registry())


__all__ = ["Adapter", "Hook", "HookCall", "ReadContext", "adapter_for", "supported_model_types"]
