"""Which forwards sparse execution swaps in each MLP block, and the hooks it therefore refuses.

Sparse execution is the one place actscope replaces ``forward``: the point is not to run the
dense modules. A hook below a swapped forward never fires, and some of the swapped module's own
hooks see the wrong tensor, so an edit there would silently do nothing and an observation would
see nothing. Composing them exactly would need the dense ``[n, d_mlp]`` activation inside the
sparse forward, which is what it avoids computing; so such hooks are refused, in both orders:

* ``sparsify`` entered while they exist (anyone's): :func:`refuse_hooks`, before any swap;
* ``edit``/``observe``/``capture`` inside ``sparsify``: every swapped forward carries a
  :class:`SwapMark` (attribute :data:`actscope.hooks.SWAP_MARK`) that the hook registry reads
  before it adds any hook.

What is swapped per block (:func:`swap_plan`) and which of the module's own hooks stay right:

========================  =====================  ===========================  ================
family                    module                 its forward becomes          hooks still right
========================  =====================  ===========================  ================
every family but OPT      the MLP container      the sparse MLP               input, output
OPT (``chained``)         ``fc1``                its input, passed through    input
OPT                       ``activation_fn``      its input, passed through    none
OPT                       ``fc2``                the sparse MLP               output
========================  =====================  ===========================  ================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..errors import InputError
from ..hooks import SWAP_MARK, Hooks, swap_mark
from .families import MlpBlock
from ..models import Model

STILL_WORKS = "blocks.{i}.mlp.out, blocks.{i}.resid.*, blocks.{i}.attn.*, embed and logits"
RUNNER, PASS = "runner", "passthrough"
BOTH = ("input", "output")


@dataclass(frozen=True)
class SwapMark:
    """Carried by a swapped forward: the module's own hook points whose tensors stay right,
    and the reason and fix a refused hook is told (after "cannot hook SITE (PATH@AT)")."""

    keeps: tuple[str, ...]
    explain: str


class Passthrough:
    """OPT's ``fc1`` and activation under sparse execution: ``fc2`` runs the whole MLP."""

    def __init__(self, mark: SwapMark) -> None:
        setattr(self, SWAP_MARK, mark)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


def swap_plan(block: MlpBlock) -> list[tuple[torch.nn.Module, str, tuple[str, ...]]]:
    """``(module, RUNNER or PASS, its own hook points that stay right)`` per swapped module."""
    if not block.spec.chained:
        return [(block.container, RUNNER, BOTH)]
    if not isinstance(block.act, torch.nn.Module):
        raise InputError(f"block {block.layer}'s activation is not a module, so its forward cannot be bypassed")
    return [(block.first, PASS, ("input",)), (block.act, PASS, ()), (block.down, RUNNER, ("output",))]


def install(registry: Hooks, block: MlpBlock, runner: Any) -> None:
    """Swap ``block``'s forwards (``runner`` for the sparse MLP) for as long as ``registry`` lives."""
    explain = _explain(block, module_names(registry.root))
    for module, role, keeps in swap_plan(block):
        mark = SwapMark(keeps, explain)
        if role == RUNNER:
            setattr(runner, SWAP_MARK, mark)
        registry.swap_forward(module, runner if role == RUNNER else Passthrough(mark))


def _explain(block: MlpBlock, names: dict[int, str]) -> str:
    if block.spec.chained:
        what = (f"{names[id(block.down)]} computes block {block.layer}'s whole MLP in one sparse call and "
                f"{names[id(block.first)]} and {names[id(block.act)]} pass their input through")
    else:
        what = f"{names[id(block.container)]} computes its whole MLP in one sparse call"
    return (f"under sparse execution (actscope.sparse.sparsify): {what}, so hooks there would never fire or would see "
            f"the wrong tensor; under sparse execution {STILL_WORKS} still work: use blocks.{block.layer}.mlp.out, or leave "
            "the sparsify block first (actscope.sparse.dense_with_thresholds applies the same skips to the dense model, "
            "where every site can be hooked)")


# -- refusals ------------------------------------------------------------------------------------
def module_names(root: torch.nn.Module) -> dict[int, str]:
    """``{id(module): its path}`` for messages (the root is ``<root>``)."""
    return {id(m): name or "<root>" for name, m in root.named_modules()}


def refuse_nested(model: Model, blocks: list[MlpBlock], action: str) -> None:
    """Refuse ``action`` (which needs the dense forwards) inside a ``sparsify`` block: any
    forward of the model swapped (the MLPs', or TEAL's projections')."""
    if any(swap_mark(module) is not None for module in model.module.modules()):
        raise InputError(f"model '{model.name}' already runs sparsely (inside a sparsify block); {action} needs the "
                         "dense MLP forwards: call it outside the sparsify block")


def refuse_hooks(model: Model, blocks: list[MlpBlock]) -> None:
    """Refuse to swap while hooks exist where the swapped forwards would hide them."""
    names = module_names(model.module)
    found = [f"{names[id(module)]}@{at}" for block in blocks for module, at in _hidden_hooks(block)]
    if not found:
        return
    sites = _site_names(model)
    listed = ", ".join(f"{point} ({sites[point]})" if point in sites else point for point in found)
    raise InputError(
        f"hooks are registered inside the MLP blocks of model '{model.name}', whose forwards sparse execution "
        f"replaces: {listed}. They would never fire or would see the wrong tensor (an edit would be silently skipped, an "
        f"observation would see nothing); under sparse execution {STILL_WORKS} still work. Fix: exit the "
        "edit/observe/capture block (or remove your hooks) before entering sparsify, or hook blocks.{i}.mlp.out instead"
    )


def _hidden_hooks(block: MlpBlock) -> Iterator[tuple[torch.nn.Module, str]]:
    """``(module, "input"|"output")`` of each forward (pre-)hook the swaps would hide."""
    for swapped, _, keeps in swap_plan(block):
        for module in swapped.modules():
            kept = keeps if module is swapped else ()
            for at, hooks in (("input", module._forward_pre_hooks), ("output", module._forward_hooks)):
                if hooks and at not in kept:
                    yield module, at


def _site_names(model: Model) -> dict[str, str]:
    """``{"PATH@AT": canonical MLP site name}``, to name a hooked module the way users do."""
    from ..errors import SiteError
    from ..sites import plan_sites

    try:
        return {f"{s.path}@{s.hook.at}": s.name for s in plan_sites(model, "blocks.*.mlp.*").sites}
    except SiteError:
        return {}
