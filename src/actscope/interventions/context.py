"""``edit``: apply interventions to sites for the duration of a ``with`` block.

Each edited site gets one hook that reads the site's tensor, lets the intervention compute a
replacement, and hands that to the model instead (a forward-pre-hook for input sites, a
forward hook for output sites). Hooks live in the hook registry (:mod:`actscope.hooks`):
whatever happens inside, they are removed and the model's parameters, buffers and flags are
never touched. Gradients flow
through edits, so they also work inside training steps (clamping through training).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..errors import SiteError
from ..models.adapters.base import HookCall, ReadContext, read_input, read_output
from ..sites import Site, plan_sites
from ..hooks import Hooks, hooks
from ..models import Model, ModelLike, as_model
from ..trace import auto_layout

Intervention = Callable[[torch.Tensor], torch.Tensor]
PLAIN_READERS = (None, read_input, read_output)


@dataclass(frozen=True)
class Editor:
    """What an ``edit`` block applies: (site, interventions) pairs in order."""

    edits: tuple[tuple[Site, tuple[Intervention, ...]], ...]

    @property
    def sites(self) -> list[str]:
        return [site.label for site, _ in self.edits]


@contextmanager
def edit(model: ModelLike, edits: Mapping[str, Intervention | Sequence[Intervention]]) -> Iterator[Editor]:
    """Apply ``{site selection: intervention(s)}`` to ``model`` inside the block.

    Keys use the site grammar (globs, ranges, ``[units]``, ``[head=…]``, module sites); an
    intervention receives only the selected units (or heads) and the rest pass unchanged.
    Several interventions on one key apply in order; nested ``edit`` blocks compose.
    """
    model = as_model(model)
    editor = Editor(tuple(_planned(model, edits)))
    with hooks(model.module) as registry:
        for site, functions in editor.edits:
            _register(registry, model, site, functions)
        yield editor


def _planned(model: Model, edits: Mapping[str, Any]) -> list[tuple[Site, tuple[Intervention, ...]]]:
    planned = []
    for key, value in edits.items():
        functions = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if not functions or not all(callable(f) for f in functions):
            raise SiteError(f"edit '{key}': give an intervention function (e.g. actscope.interventions.zero()), got {value!r}")
        for site in plan_sites(model, key).sites:
            _check_editable(site)
            planned.append((site, functions))
    return planned


def _check_editable(site: Site) -> None:
    if site.name.endswith(".moe.router"):
        # transformers 5.x routers return (logits, top-k weights, top-k indices) and the block
        # routes by the latter two, so an edit of the logits would silently change nothing.
        raise SiteError(
            f"{site.label}: editing router logits does not change routing; switch experts off or on with "
            "actscope.interventions.experts(model, off={layer: [expert, ...]}, on=...)"
        )
    layout, read = site.hook.layout, site.hook.read
    if layout in ("pattern", "tokens"):
        what = "attention probabilities" if layout == "pattern" else "recomputed MoE expert neurons"
        raise SiteError(
            f"{site.label}: {what} cannot be edited in place; edit attn.z (per-head outputs) or "
            "the router instead"
        )
    read_only = getattr(read, "read_only", None)  # a derived site (SAE features) says why it cannot be written back
    if read_only:
        raise SiteError(f"{site.label}: {read_only}")
    if getattr(read, "write_back", None) is not None or getattr(read, "write_to", None) is not None:
        return  # a derived site that maps an edited view back onto its module's tensor, or onto another site's
    if read not in PLAIN_READERS and getattr(read, "view_of", None) not in PLAIN_READERS[1:]:
        raise SiteError(
            f"{site.label} is computed from its module's tensor (a slice), so it cannot be written back; "
            f"edit the module instead, e.g. 'module:{site.path}@{site.hook.at}'"
        )


def _register(registry: Hooks, model: Model, site: Site, functions: tuple[Intervention, ...]) -> None:
    if getattr(site.hook.read, "write_to", None) is not None:  # read at one site, written at another (transcoder features)
        _register_elsewhere(registry, model, site, functions)
        return
    module = model.module.get_submodule(site.path)
    ctx = ReadContext(dict(site.index), model.config)
    name = f"edit {site.label} ({site.path}@{site.hook.at})"

    if site.hook.at == "input":
        def pre_hook(mod, args, kwargs):
            call = HookCall(mod, args, kwargs)
            return _replace_input(args, kwargs, _edited(site, functions, call, ctx))

        registry.before(module, pre_hook, with_kwargs=True, name=name)
        return

    def hook(mod, args, kwargs, output):
        return _replace_output(site, output, _edited(site, functions, HookCall(mod, args, kwargs, output), ctx))

    registry.after(module, hook, with_kwargs=True, name=name)


def _register_elsewhere(registry: Hooks, model: Model, site: Site, functions: tuple[Intervention, ...]) -> None:
    """A derived site whose edits land on another site: a hook on the site's module computes the
    edited view and the change it makes (``read.delta``: None when nothing changed), and an edit
    of ``read.write_to`` adds that change to its tensor when the same forward call reaches it."""
    read, target = site.hook.read, site.hook.read.write_to
    module = model.module.get_submodule(site.path)
    ctx = ReadContext(dict(site.index), model.config)
    pending: list[torch.Tensor | None] = []

    def observe(call: HookCall) -> None:
        view = read(call, ctx)
        if view is not None:
            pending.append(read.delta(call, ctx, view, _apply(site, functions, view)))

    name = f"edit {site.label} ({site.path}@{site.hook.at}, written at {target.label})"
    if site.hook.at == "input":
        registry.before(module, lambda mod, args, kwargs: observe(HookCall(mod, args, kwargs)), with_kwargs=True, name=name)
    else:
        registry.after(module, lambda mod, args, kwargs, output: observe(HookCall(mod, args, kwargs, output)), with_kwargs=True,
                       name=name)

    def add(x: torch.Tensor) -> torch.Tensor:
        if not pending:
            raise SiteError(f"{site.label}: {target.label} ran before {site.name} in this forward call, so the edit has no "
                            "change to write; a transcoder must read a site the model runs before the one it writes")
        delta = pending.pop(0)
        return x if delta is None else x + delta.to(x.dtype).reshape(x.shape)

    _register(registry, model, target, (add,))


def _edited(site: Site, functions: tuple[Intervention, ...], call: HookCall, ctx: ReadContext) -> torch.Tensor:
    """The site's base tensor after the interventions, in the module's own shape."""
    base = read_input(call, ctx) if site.hook.at == "input" else read_output(call, ctx)
    view = site.hook.read(call, ctx) if site.hook.read is not None else base  # [..., units] or heads view
    write_back = getattr(site.hook.read, "write_back", None)
    if write_back is not None:  # e.g. SAE features: the module's tensor + decode(edited) − decode(features)
        return write_back(call, ctx, base, view, _apply(site, functions, view))
    layout = auto_layout(view, call.module) if site.hook.layout == "auto" else site.hook.layout
    if layout == "channels":
        view = view.movedim(1, -1)  # feature maps: channels last for the intervention
        return _apply(site, functions, view).movedim(-1, 1).reshape(base.shape)
    return _apply(site, functions, view).reshape(base.shape)


def _apply(site: Site, functions: tuple[Intervention, ...], view: torch.Tensor) -> torch.Tensor:
    axis, chosen = (-2, site.heads) if site.heads is not None else (-1, site.units)
    if chosen is not None and max(chosen) >= view.shape[axis]:
        raise SiteError(f"{site.label}: index {max(chosen)} is out of range; the site has {view.shape[axis]}")
    index = torch.tensor(chosen, device=view.device) if chosen is not None else None
    part = view if index is None else view.index_select(axis, index)
    for function in functions:
        result = function(part)
        if not isinstance(result, torch.Tensor) or result.shape != part.shape:
            got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise SiteError(f"{site.label}: an intervention must return a tensor of shape {tuple(part.shape)}, got {got}")
        part = result
    return part if index is None else view.index_copy(axis % view.dim(), index, part.to(view.dtype))


def _replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    for position, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            return args[:position] + (new,) + args[position + 1:], kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, key: new}


def _replace_output(site: Site, output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    raise SiteError(f"{site.label}: the module returns {type(output).__name__}; edit a tensor-valued module instead")
