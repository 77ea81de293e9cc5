"""Cards for families that have none, found by structure: :func:`card_by_layout`.

Hugging Face has over a hundred decoder families and most are built like one that has a card
(OLMo, Helium, SmolLM3 … are Llama's modules under other class names). A model whose
``model_type`` has no card gets the first card, in registry order, whose *layout* its modules
match, as a copy whose ``family`` says so (``"olmo (llama layout)"``, no tiny model); a model that
matches none keeps module sites only. One warning on the ``actscope`` logger says which layout was
taken, once per model. The layout is compared with the card's own tiny model, built on the meta
device (no memory used, no random numbers drawn):

* **blocks**: the card's ``blocks`` path is a non-empty ``nn.ModuleList`` in both;
* **modules**: in block 0 and in the last block, every module that a site of the card (or its
  readout's per-block norms) passes through — the block itself, the attention and MLP containers,
  each projection and norm — exists and has exactly the children the card's model has there, by
  name. This is what tells a pre-norm block (``input_layernorm``, ``post_attention_layernorm``)
  from a post-norm one with the same projection names (OLMo 2's ``post_attention_layernorm``,
  ``post_feedforward_layernorm``), where the same site paths would read other tensors;
* **above the blocks**: ``embed`` and the readout's final modules resolve, and the modules on the
  way to them and to the blocks hold no child the card's model lacks (a projection between the
  embeddings and block 0, a second rotary table …); heads such as ``lm_head`` may be missing;
* **MLP**: the activation (and up projection) the card's ``mlp`` names are attributes of the
  container of the output projection;
* **shapes**: the card's own readers, run on zeros as wide as the hooked projections, give
  ``attn.z`` as ``heads × head_dim`` and ``attn.v`` as whole value heads of ``head_dim`` (heads and
  ``head_dim`` from the config), and ``mlp.pre`` as wide as the input of the projection
  ``mlp.post`` feeds.

What structure cannot show is arithmetic written inline in a ``forward``: a multiplier on the
embeddings or the residual stream, a clamp on q/k/v, the rule a router renormalises by. A matched
mixture-of-experts model keeps its sites (expert neurons are recomputed from the experts module's
own inputs) but its router's renormalisation rule is refused as unknown. The family tests
(``tests/test_families.py``) are how a matched family is confirmed before it gets a card.
"""
from __future__ import annotations

import dataclasses
import logging
from functools import lru_cache
from typing import Any, Callable, Iterable
from weakref import WeakKeyDictionary

import torch

from ...errors import InputError
from .base import Adapter, Hook, HookCall, ReadContext, Router, Tiny, out_in_weight, resolve_module
from .common import config_value, n_heads

log = logging.getLogger("actscope")

# What each module was matched to (None: no layout), so a model is matched and announced once.
_MATCHED: WeakKeyDictionary = WeakKeyDictionary()

Check = Callable[[torch.nn.Module, torch.nn.Module, Adapter], "str | None"]


def card_by_layout(module: torch.nn.Module, cards: Iterable[Adapter]) -> Adapter | None:
    """The first of ``cards`` whose layout ``module`` matches, as a copy named after the model's
    own type (see the module docstring); None when it matches none."""
    if module not in _MATCHED:
        _MATCHED[module] = _match(module, cards)
    return _MATCHED[module]


def _match(module: torch.nn.Module, cards: Iterable[Adapter]) -> Adapter | None:
    model_type = getattr(module.config, "model_type", None) or type(module).__name__
    for card in cards:
        reason = layout_mismatch(module, card)
        if reason is None:
            found = as_layout(card, model_type)
            log.warning("%s: model type '%s' has no actscope card of its own; its modules match the %s layout, so "
                        "its sites come from the %s card (family '%s')",
                        type(module).__name__, model_type, card.family, card.family, found.family)
            return found
        log.debug("%s is not the %s layout: %s", model_type, card.family, reason)
    return None


def as_layout(card: Adapter, model_type: str) -> Adapter:
    """``card`` for a model of ``model_type`` matched to its layout: its family names both."""
    router = card.router and Router(card.router.experts, unknown_renormalisation(model_type))
    return dataclasses.replace(card, family=f"{model_type} ({card.family} layout)", model_types=(model_type,),
                               router=router, tiny=None,
                               notes=f"no card of its own: its modules match the {card.family} layout")


def unknown_renormalisation(model_type: str) -> Callable[[Any], bool]:
    """A router rule that refuses: whether top-k weights are renormalised is code, not structure."""

    def renormalise(config: Any) -> bool:
        raise InputError(
            f"model type '{model_type}' has no actscope card, so whether its router renormalises the top-k "
            "weights is unknown (its sites come from a matched layout, which cannot show that rule); routing "
            "measurements and expert edits need a card for the family"
        )

    return renormalise


def layout_mismatch(module: torch.nn.Module, card: Adapter) -> str | None:
    """Why ``module`` does not have ``card``'s layout, in words; None when it does."""
    if getattr(module, "config", None) is None:
        return "the model has no config"
    reference = reference_model(card)
    if reference is None:
        return f"the {card.family} card has no tiny model to compare with"
    for check in CHECKS:
        reason = check(module, reference, card)
        if reason is not None:
            return reason
    return None


def reference_model(card: Adapter) -> torch.nn.Module | None:
    """The card's tiny model on the meta device: its structure without weights (None when the card
    has no tiny model or the installed transformers cannot build it)."""
    if card.tiny is None:
        return None
    try:
        return _built(card.tiny)
    except (ImportError, AttributeError):
        return None


@lru_cache(maxsize=None)
def _built(tiny: Tiny) -> torch.nn.Module:
    import transformers

    with torch.device("meta"):
        return getattr(transformers, tiny.model_class)(tiny.config())


# -- the checks ----------------------------------------------------------------------------------
def same_blocks(module: torch.nn.Module, reference: torch.nn.Module, card: Adapter) -> str | None:
    if _block_count(module, card) == 0:
        return f"no non-empty module list at '{card.blocks}'"
    return None


def same_block_modules(module: torch.nn.Module, reference: torch.nn.Module, card: Adapter) -> str | None:
    """In block 0 and the last block, each module on the card's site paths has the reference's children."""
    last, reference_last = _block_count(module, card) - 1, _block_count(reference, card) - 1
    for mine, theirs in ((0, 0), (last, reference_last)):
        for relative in _block_paths(reference, card, theirs):
            path, reference_path = _in_block(card, mine, relative), _in_block(card, theirs, relative)
            found = resolve_module(module, path)
            if found is None:
                return f"no module '{path}'"
            expected = _children(resolve_module(reference, reference_path))
            if _children(found) != expected:
                return f"'{path}' has children {sorted(_children(found))}, the {card.family} layout {sorted(expected)}"
    return None


def nothing_extra_above_blocks(module: torch.nn.Module, reference: torch.nn.Module, card: Adapter) -> str | None:
    """``embed`` and the final modules resolve; their ancestors hold no module the reference lacks."""
    base, reference_base = _base(module), _base(reference)
    for path in _top_paths(card):
        if resolve_module(reference, path) is None:
            continue  # the card's own model has none (OPT's project_out): nothing to expect
        if resolve_module(module, path) is None:
            return f"no module '{path}'"
        parts = path.split(".")
        for depth in range(len(parts) + 1):
            prefix = ".".join(parts[:depth])
            mine, theirs = _submodule(base, prefix), _submodule(reference_base, prefix)
            if mine is None or theirs is None or isinstance(mine, torch.nn.ModuleList):
                continue
            extra = _children(mine) - _children(theirs)
            if extra:
                return f"'{prefix or type(base).__name__}' has modules the {card.family} layout lacks: {sorted(extra)}"
    return None


def same_mlp_attributes(module: torch.nn.Module, reference: torch.nn.Module, card: Adapter) -> str | None:
    if card.mlp is None or "blocks.{i}.mlp.post" not in card.sites:
        return None
    found = resolve_module(module, card.sites["blocks.{i}.mlp.post"].path.format(i=0))
    if found is None:
        return None  # a mixture-of-experts block 0: no dense MLP to look at
    container = module.get_submodule(found[0].rpartition(".")[0])
    missing = [name for name in (card.mlp.act, card.mlp.up) if name and not hasattr(container, name)]
    return f"the MLP has no {', '.join(missing)}" if missing else None


def shapes_fit(module: torch.nn.Module, reference: torch.nn.Module, card: Adapter) -> str | None:
    """The card's readers, run on zeros of the projections' widths, give the config's head shapes."""
    config = module.config
    try:
        heads, d_head = n_heads(config), head_dim(config)
    except AttributeError:
        return "the config gives no number of attention heads"
    z = _dry_read(module, card, "blocks.{i}.attn.z", config)
    if z is not None and z[-2:] != (heads, d_head):
        return f"attn.z would be {z[-2:]} (heads, head_dim), the config says {(heads, d_head)}"
    v = _dry_read(module, card, "blocks.{i}.attn.v", config)
    if v is not None and (len(v) < 2 or v[-1] != d_head or not v[-2] or heads % v[-2]):
        return f"attn.v would be {v[-2:]} (value heads, head_dim) for {heads} heads of {d_head}"
    pre = _dry_read(module, card, "blocks.{i}.mlp.pre", config)
    post = _width(module, card, "blocks.{i}.mlp.post")
    if pre is not None and post is not None and pre[-1:] != (post,):
        return f"mlp.pre would be {pre[-1:]} wide but the output projection takes {post}"
    return None


CHECKS: tuple[Check, ...] = (same_blocks, same_block_modules, nothing_extra_above_blocks, same_mlp_attributes, shapes_fit)


# -- helpers -------------------------------------------------------------------------------------
def head_dim(config: Any) -> int:
    """The config's ``head_dim``, else hidden size / heads."""
    try:
        return config_value(config, "head_dim")
    except AttributeError:
        return config_value(config, "hidden_size", "n_embd", "d_model") // n_heads(config)


def _dry_read(module: torch.nn.Module, card: Adapter, site: str, config: Any) -> tuple[int, ...] | None:
    """The shape ``site``'s reader makes of zeros as wide as its projection's side (block 0):
    None when the card has no such site there or the module is no linear layer, ``()`` when the
    reader cannot split that width."""
    hook: Hook | None = card.sites.get(site)
    found = resolve_module(module, hook.path.format(i=0)) if hook is not None else None
    width = _width(module, card, site)
    if found is None or width is None:
        return None
    x = torch.zeros(1, 1, width)
    call = HookCall(found[1], (x,), {}, None) if hook.at == "input" else HookCall(found[1], (), {}, x)
    try:
        return tuple(hook.reader()(call, ReadContext({"i": 0}, config)).shape)
    except (RuntimeError, ValueError, AttributeError, TypeError):
        return ()


def _width(module: torch.nn.Module, card: Adapter, site: str) -> int | None:
    """The width on the hooked side of ``site``'s linear layer in block 0 (None: no such layer)."""
    hook = card.sites.get(site)
    found = resolve_module(module, hook.path.format(i=0)) if hook is not None else None
    weight = out_in_weight(found[1]) if found is not None else None  # [out, in]
    if weight is None:
        return None
    return int(weight.shape[1] if hook.at == "input" else weight.shape[0])


def _base(root: torch.nn.Module) -> torch.nn.Module:
    """The base model (``model.model``, ``model.transformer`` …) that card paths are relative to."""
    base = getattr(root, getattr(root, "base_model_prefix", "") or "", None)
    return base if isinstance(base, torch.nn.Module) else root


def _submodule(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _children(found: tuple[str, torch.nn.Module] | torch.nn.Module) -> frozenset[str]:
    module = found[1] if isinstance(found, tuple) else found
    return frozenset(name for name, _ in module.named_children())


def _block_count(root: torch.nn.Module, card: Adapter) -> int:
    found = resolve_module(root, card.blocks)
    return len(found[1]) if found is not None and isinstance(found[1], torch.nn.ModuleList) else 0


def _in_block(card: Adapter, block: int, relative: str) -> str:
    return f"{card.blocks}.{block}" + (f".{relative}" if relative else "")


def _block_paths(reference: torch.nn.Module, card: Adapter, block: int) -> list[str]:
    """Every module path inside a block (relative to it) on the way to a site's module, for the
    sites the card's own model has in ``block``; the block itself is ``""``."""
    prefix = f"{card.blocks}.{{i}}"
    relatives = [hook.path[len(prefix):].lstrip(".") for hook in card.sites.values() if hook.path.startswith(prefix)]
    relatives += list(card.readout.post_norms or ())
    paths: set[str] = set()
    for relative in relatives:
        if resolve_module(reference, _in_block(card, block, relative)) is None:
            continue  # a site the card's own model lacks in this block (a dense MLP in an MoE block …)
        parts = relative.split(".") if relative else []
        paths.update(".".join(parts[:depth]) for depth in range(len(parts) + 1))
    return sorted(paths)


def _top_paths(card: Adapter) -> list[str]:
    """The card's paths outside the blocks that must be there: the blocks, ``embed``, the final modules."""
    embed = card.sites.get("embed")
    return [card.blocks, *([embed.path] if embed is not None and not embed.path.startswith(card.blocks) else []),
            *card.readout.final]
