"""The shape of an adapter: a data table from canonical site names to hook points.

An adapter never re-implements a model. It only says, for one model family, which module
to hook for each canonical site (``blocks.{i}.mlp.post`` …), whether to read that module's
input or output, and how to turn what the hook sees into a tensor with a known layout.
"""
from __future__ import annotations

from dataclasses import dataclass
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


def resolve_module(root: torch.nn.Module, path: str) -> tuple[str, torch.nn.Module] | None:
    """Find ``path`` on ``root`` or under its base model; return (full path, module) or None.
    This is how every card path (a :class:`Hook`'s, ``blocks``, the readout's) is found."""
    candidates = [path]
    prefix = getattr(root, "base_model_prefix", "")
    if prefix and hasattr(root, prefix):
        candidates.append(f"{prefix}.{path}" if path else prefix)
    for candidate in candidates:
        try:
            return candidate, root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


@dataclass(frozen=True)
class Mlp:
    """How a block's MLP computes its neuron, beyond where the sites hook (what sparse execution,
    CETT and the family tests read). The first projection is the module ``mlp.pre`` reads (the
    gate of a gated MLP), the output projection the one ``mlp.post`` feeds; their container is the
    output projection's parent. ``down(act(gate(x)) · up(x))`` when ``gated``, else
    ``down(act(first(x)))``. A weight's orientation is read from its module's type
    (:func:`out_in_weight`: ``nn.Linear`` stores ``[out, in]``, GPT-2's ``Conv1D`` ``[in, out]``)."""

    gated: bool
    act: str  # the activation's attribute on the container
    up: str = ""  # gated and not fused: the up projection's attribute on the container
    fused: bool = False  # gated: one projection outputs [gate | up] (Phi-3)
    chained: bool = False  # no MLP module: the projections and the activation live on the block (OPT)


@dataclass(frozen=True)
class Router:
    """How a mixture-of-experts layer routes each token: softmax over every expert (in float32),
    the top ``k`` (``config.num_experts_per_tok``), their weights renormalised to sum to one when
    ``renormalise(config)``. ``experts(config)`` is the number of experts."""

    experts: Callable[[Any], int]
    renormalise: Callable[[Any], bool]


@dataclass(frozen=True)
class Readout:
    """How the residual stream reaches the unembedding (neuron → vocabulary decoding).

    Pre-norm models: ``final`` are the modules applied after the last block, in order (the final
    norm; OPT's ``project_out``). Post-norm encoders: ``post_norms`` are each block's two norms on
    the residual path, after attention and after the MLP (relative to the block); a neuron's
    direction passes its own block's second and both of every later block's. ``norm_offset``: an
    RMSNorm that scales by ``offset + weight`` (Gemma's ``1 + weight``). ``bidirectional``: an
    encoder, whose unit at position p writes into the prediction of p itself, not of p + 1."""

    final: tuple[str, ...] = ()
    post_norms: tuple[str, str] | None = None
    norm_offset: float = 0.0
    bidirectional: bool = False


@dataclass(frozen=True)
class Tiny:
    """A tiny random-init model of the family for tests: ``config()`` builds its Hugging Face
    config, ``model_class`` names the transformers class; inputs are token ids from
    ``first_token`` up (RoBERTa's lowest ids are special), or images when ``images``."""

    config: Callable[[], Any]
    model_class: str
    first_token: int = 0
    images: bool = False


@dataclass(frozen=True)
class Adapter:
    """A family's card: everything actscope knows about one model family, in one place.

    ``sites`` keys are canonical names with placeholders, e.g. ``"blocks.{i}.mlp.post"`` or
    ``"blocks.{i}.moe.experts.{e}.post"`` or ``"embed"``. ``blocks`` is the path of the block
    list (its length gives the ``{i}`` range). ``mlp``: how the dense MLP computes its neuron
    (None: no dense MLP to run sparsely); ``router``: how a mixture-of-experts layer routes (its
    experts give the ``{e}`` range); ``readout``: the path from the stream to the unembedding;
    ``tiny``: the family's tiny test model. Nothing outside the cards branches on a family.
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    sites: Mapping[str, Hook]
    mlp: Mlp | None = None
    router: Router | None = None
    readout: Readout = Readout()
    tiny: Tiny | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", with_derived_sites(self.sites))

    def experts(self, config: Any) -> int:
        """The number of experts of a mixture-of-experts layer (0 for a dense family)."""
        return int(self.router.experts(config)) if self.router is not None else 0


def out_in_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """A linear layer's weight as ``[out, in]``: ``nn.Linear``'s own, the transpose of
    transformers' ``Conv1D`` (GPT-2, which computes ``x @ W + b`` with ``W [in, out]``), or None
    for any other module. A plain layer's weight is returned as a view, never a copy; a layer
    whose weight is quantised (optimum-quanto, torchao, bitsandbytes) gives its dequantised
    float weight and one offloaded by accelerate (its weight on the meta device until it runs)
    the weight read from the offload (:func:`dense_weight`): copies, as the layer holds no float
    weight to view."""
    if isinstance(module, torch.nn.Linear):
        return dense_weight(module)
    if type(module).__name__ == "Conv1D":
        weight = dense_weight(module)
        return weight.T if weight is not None and weight.dim() == 2 else None
    return None


def dense_weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor | None:
    """``module``'s parameter or buffer ``name`` as a plain tensor with values (None when there is
    none): the tensor itself when it is one, the dequantised weight of a quantised layer, and,
    for a module offloaded by accelerate, the tensor its hook would load, on the device where
    the module runs. Refuses a tensor on the meta device that no offload holds."""
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor):
        return None
    if tensor.device.type == "meta":
        found = offloaded(module, name)
        if found is None:
            from ...errors import InputError

            raise InputError(
                f"{type(module).__name__}.{name} is on the 'meta' device (it holds no values) and no accelerate "
                "offload holds it; load the model's weights (actscope.load, or from_pretrained without a meta-device init)"
            )
        tensor = found
    return dequantised(tensor)


def dequantised(tensor: torch.Tensor) -> torch.Tensor:
    """A quantised weight's float values (``[out, in]`` like the weight); any other tensor as it
    is. optimum-quanto's and torchao's tensors dequantise themselves; bitsandbytes' ``Params4bit``
    through its quantisation state and ``Int8Params`` through its row scales (``SCB``)."""
    if getattr(tensor, "is_quantized", False):  # PyTorch's own quantised tensors
        return tensor.dequantize()
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return tensor
    kind = type(tensor).__name__
    if kind == "Params4bit":
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(tensor.data, tensor.quant_state)
    if kind == "Int8Params" and getattr(tensor, "SCB", None) is not None:
        return tensor.data.float() * (tensor.SCB.float().view(-1, 1) / 127.0)
    if getattr(type(tensor), "dequantize", torch.Tensor.dequantize) is not torch.Tensor.dequantize:
        return tensor.dequantize()
    return tensor


def is_quantised(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds quantised values (what :func:`dequantised` expands)."""
    return dequantised(tensor) is not tensor


def offloaded(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The tensor accelerate's offload hook on ``module`` loads into ``name`` when the module
    runs (on the device where it runs), or None when no offload holds it."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        weights = getattr(candidate, "weights_map", None)
        if getattr(candidate, "offload", False) and weights is not None:
            try:
                value = weights[name]
            except KeyError:
                continue
            device = getattr(candidate, "execution_device", None)
            return value.to(device) if device is not None else value
    return None


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
