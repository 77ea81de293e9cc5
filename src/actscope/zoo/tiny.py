"""Tiny random-init models of every family with a card, built from configs (no network).

Each family card (:mod:`actscope.models.adapters`) says how to build its tiny model
(:class:`~actscope.models.adapters.base.Tiny`: 2 blocks, hidden size 32–64, 4 heads, vocabulary
128, 4 experts with top-2 routing for mixture-of-experts families); :func:`tiny_model` builds it
with a fixed seed, in eval mode, together with a small example input. They exist for tests:
their weights mean nothing. A new family's card is enough for it to appear here.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..models.adapters import cards

BATCH, POSITIONS = 2, 6

_TINY = {card.family: card.tiny for card in cards() if card.tiny is not None}
TINY_CONFIGS: dict[str, Callable[[], Any]] = {family: tiny.config for family, tiny in _TINY.items()}
MODEL_CLASSES: dict[str, str] = {family: tiny.model_class for family, tiny in _TINY.items()}  # transformers class names
FAMILIES: tuple[str, ...] = tuple(_TINY)


def tiny_config(family: str) -> Any:
    """The tiny config of ``family`` (one of :data:`FAMILIES`)."""
    if family not in _TINY:
        raise KeyError(f"no tiny config for family '{family}'; known: {', '.join(FAMILIES)}")
    return _TINY[family].config()


def tiny_model(family: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A random-init model of ``family`` (eval mode, seeded) and a small example input."""
    import transformers

    config = tiny_config(family)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[family])(config)
    model.eval()
    return model, example_inputs(family, config, seed)


def example_inputs(family: str, config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments for one forward call: ``[2, 6]`` token ids, or two images."""
    generator = torch.Generator().manual_seed(seed)
    tiny = _TINY[family]
    if tiny.images:
        size = config.image_size
        return {"pixel_values": torch.randn(BATCH, config.num_channels, size, size, generator=generator)}
    ids = torch.randint(tiny.first_token, config.vocab_size, (BATCH, POSITIONS), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


__all__ = ["FAMILIES", "MODEL_CLASSES", "TINY_CONFIGS", "example_inputs", "tiny_config", "tiny_model"]
