"""The family cards: one module per family, each an ``ADAPTERS`` list of cards, looked up by
``config.model_type``.

Adding a family = adding its module (sites, MLP, router, readout, tiny model: see
:class:`~actscope.models.adapters.base.Adapter`) and its name in :data:`FAMILY_MODULES`; the
tiny-model zoo, the family tests and every feature that reads cards pick it up from there. A model
whose family has no card gets the card whose layout its modules match (:func:`card_for`).
"""
from __future__ import annotations

from functools import lru_cache
from importlib import import_module
from typing import Any

from .base import Adapter, Hook, HookCall, Mlp, ReadContext, Readout, Router, Tiny, out_in_weight, resolve_module
from .layouts import card_by_layout

FAMILY_MODULES = ("llama", "gemma", "phi3", "gpt2", "gpt_neox", "gptj", "falcon", "stablelm", "opt", "bert", "vit", "moe")


@lru_cache(maxsize=1)
def cards() -> tuple[Adapter, ...]:
    """Every family card, in the order of :data:`FAMILY_MODULES`."""
    return tuple(card for name in FAMILY_MODULES for card in import_module(f"{__name__}.{name}").ADAPTERS)


def _registry() -> dict[str, Adapter]:
    return {model_type: card for card in cards() for model_type in card.model_types}


def adapter_for(config: Any) -> Adapter | None:
    """The card for a Hugging Face config, or None for a family without one."""
    model_type = getattr(config, "model_type", None)
    return _registry().get(model_type) if model_type else None


def card_for(module: Any) -> Adapter | None:
    """The card of a model: by its config's ``model_type``, else the first card whose layout its
    modules match (a copy named e.g. ``"olmo (llama layout)"``, announced once on the ``actscope``
    logger; see :mod:`.layouts`), else None (module sites only). A module without a config has
    no card."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    card = adapter_for(config)
    if card is not None:
        return card
    return card_by_layout(module, cards())


def supported_model_types() -> list[str]:
    return sorted(_registry())


__all__ = ["Adapter", "Hook", "HookCall", "Mlp", "ReadContext", "Readout", "Router", "Tiny", "adapter_for", "card_for", "cards",
           "out_in_weight", "resolve_module", "supported_model_types"]
