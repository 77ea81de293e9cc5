"""The shape of an adapter: a data table from canonical site names to hook points.

An adapter never re-implements a model. It only says, for one model family, which module
to hook for each canonical site (``blocks.{i}.mlp.post`` …), whether to read that module's
input or output, and how to turn what the hook sees into a tensor with a known layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch

# How a site's tensor maps onto (tokens × units); see trace.flatten_reading.
#   "units"    [batch, pos, unit] or [batch, unit]: last axis is the unit axis
#   "channels" [batch, channel, *spatial]: axis 1 is the unit axis (convolutions)
#   "heads"    [batch, pos, head, d_head]: per-head vectors, units are head×d_head
#   "pattern"  [batch, head, query, key]: attention probabilities
#   "tokens"   (values [n, unit], flat token index [n]) already gathered (MoE experts)
#   "flat"     [batch·pos, unit]: tokens flattened by the model (router logits)
Layout = Literal["units", "channels", "heads", "pattern", "tokens", "flat"]


@dataclass(frozen=True)
class HookCall:
    """What one hook invocation saw."""

    module: torch.nn.Module
    args: tuple
    kwargs: dict
    output: Any = None


@dataclass(frozen=True)
class ReadContext:
    """What a reader may need besides the call: the site's indices and the model config."""

    index: Mapping[str, int]
    config: Any = None


Reader = Callable[[HookCall, ReadContext], Any]


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a tensor, tuple/list or ModelOutput-like object."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, Mapping):
        for item in value.values():
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def read_input(call: HookCall, ctx: ReadContext) -> torch.Tensor:
    """The module's main input: the first positional tensor, else ``hidden_states``."""
    found = first_tensor(call.args)
    if found is None:
        found = call.kwargs.get("hidden_states", first_tensor(call.kwargs))
    return found


def read_output(call: HookCall, ctx: ReadContext) -> torch.Tensor:
    """The module's main output: the tensor itself or the first element of a tuple."""
    return first_tensor(call.output)


def read_output_item(position: int) -> Reader:
    """Element ``position`` of a tuple output (e.g. attention weights at 1)."""

    def read(call: HookCall, ctx: ReadContext) -> torch.Tensor:
        return call.output[position]

    return read


@dataclass(frozen=True)
class Hook:
    """One hook point: module path template, input or output side, reader and layout.

    ``path`` may hold ``{i}`` (block index) and ``{e}`` (expert index); it is resolved on the
    top-level model first and then under the model's base model (``model.model``,
    ``model.bert``…), so one table serves ``LlamaModel`` and ``LlamaForCausalLM`` alike.
    """

    path: str
    at: Literal["input", "output"]
    read: Reader | None = None
    layout: Layout = "units"
    needs_eager: bool = False

    def reader(self) -> Reader:
        if self.read is not None:
            return self.read
        return read_input if self.at == "input" else read_output


@dataclass(frozen=True)
class Adapter:
    """Canonical site templates of one model family.

    ``sites`` keys are canonical names with placeholders, e.g. ``"blocks.{i}.mlp.post"`` or
    ``"blocks.{i}.moe.experts.{e}.post"`` or ``"embed"``. ``blocks`` is the path of the block
    list (its length gives the ``{i}`` range); ``experts`` gives the ``{e}`` range from the
    config (0 when the family has no experts).
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    sites: Mapping[str, Hook]
    experts: Callable[[Any], int] = field(default=lambda config: 0)
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", with_derived_sites(self.sites))


def with_derived_sites(sites: Mapping[str, Hook]) -> dict[str, Hook]:
    """The table plus the sites every family gets from its own: ``attn.z_norm``, the L2 norm of
    each head's output ``attn.z`` (``[batch, pos, head]``: one unit per head, so a run keeps
    per-head statistics and top-activating tokens)."""
    derived = dict(sites)
    for name, hook in sites.items():
        if name.endswith(".attn.z") and hook.layout == "heads":
            derived.setdefault(name + "_norm", Hook(hook.path, hook.at, head_norms(hook.reader()), "units", hook.needs_eager))
    return derived


def head_norms(split: Reader) -> Reader:
    """``[batch, pos, head, d_head]`` from ``split`` → ``[batch, pos, head]`` L2 norms."""

    def read(call: HookCall, ctx: ReadContext) -> torch.Tensor:
        return torch.linalg.vector_norm(split(call, ctx), dim=-1)

    return read
