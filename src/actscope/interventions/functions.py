"""Interventions as small pure functions: each takes a site's tensor with units on the last
axis (``[..., units]``; for per-head sites ``[..., head, d_head]``) and returns a new tensor of
the same shape. They never modify their input.

Replacing a whole MLP activation function (GELU/SiLU → ReLU) is not a function of one
site's tensor, so it is a context of its own, :func:`replace_activation` (at the end of this
file), that nests with ``edit``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import InputError
from ..models import Model, ModelLike

Intervention = Callable[[torch.Tensor], torch.Tensor]


def zero() -> Intervention:
    """Ablate: every selected unit becomes 0."""
    return torch.zeros_like


def scale(factor: float) -> Intervention:
    """Multiply the selected units by ``factor``."""
    return lambda x: x * factor


def set_value(value: float | torch.Tensor) -> Intervention:
    """Clamp the selected units to ``value`` (a number, or a tensor broadcastable to them)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(value, dtype=x.dtype, device=x.device).expand_as(x).clone()

    return apply


def add(vector: torch.Tensor | float) -> Intervention:
    """Add a vector (broadcast over the leading axes) or a number."""
    return lambda x: x + torch.as_tensor(vector, dtype=x.dtype, device=x.device)


def topk(k: int) -> Intervention:
    """Keep the ``k`` largest entries of each token's last axis, zero the rest (Lazy Neuron's
    Top-k activation; "largest" by value, as for ReLU activations)."""
    if k < 1:
        raise InputError(f"top-k needs k >= 1, got {k}")

    def apply(x: torch.Tensor) -> torch.Tensor:
        if k >= x.shape[-1]:
            return x.clone()
        kept = torch.topk(x, k, dim=-1).indices
        return torch.zeros_like(x).scatter(-1, kept, x.gather(-1, kept))

    return apply


def threshold(t: float | torch.Tensor) -> Intervention:
    """Zero entries with ``|a| < t`` (``t`` a number or one threshold per unit): the CETT /
    FAT-ε edit ``a_i ← 0 if |a_i| < threshold_i``."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        limit = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return torch.where(x.abs() < limit, torch.zeros_like(x), x)

    return apply


def clamp(min: float | torch.Tensor | None = None, max: float | torch.Tensor | None = None) -> Intervention:  # noqa: A002
    """Clip the selected units into ``[min, max]`` (either bound may be omitted; numbers or
    one bound per unit). Unlike ``set_value``, values already inside the bounds are kept."""
    if min is None and max is None:
        raise InputError("clamp() needs min=, max= or both, e.g. clamp(max=5.0); to fix units at one value use set_value(v)")
    if isinstance(min, (int, float)) and isinstance(max, (int, float)) and min > max:
        raise InputError(f"clamp(): min {min} is above max {max}; swap them")

    def apply(x: torch.Tensor) -> torch.Tensor:
        low = None if min is None else torch.as_tensor(min, dtype=x.dtype, device=x.device)
        high = None if max is None else torch.as_tensor(max, dtype=x.dtype, device=x.device)
        return torch.clamp(x, low, high)

    return apply


def mean(values: torch.Tensor | Sequence[float]) -> Intervention:
    """Mean-ablate: each selected unit becomes its mean ``values[u]`` (one number per selected
    unit, in selection order; read them from a run with :func:`means_from`)."""
    means = torch.as_tensor(values, dtype=torch.float64)
    if means.dim() != 1:
        raise InputError(f"mean(): give one value per unit (a 1-D tensor), got shape {tuple(means.shape)}")

    def apply(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != means.shape[0]:
            raise InputError(
                f"mean(): {means.shape[0]} means for a site with {x.shape[-1]} selected units; read them for the "
                "same selection, e.g. means_from(run, 'blocks.3.mlp.post[17,42]') for edit key 'blocks.3.mlp.post[17,42]'"
            )
        return means.to(dtype=x.dtype, device=x.device).expand_as(x).clone()

    return apply


def means_from(run: Any, site: str) -> torch.Tensor:
    """Per-unit means of ``site`` (``'blocks.3.mlp.post'`` or ``'blocks.3.mlp.post[17,42]'``)
    from a run's ``neurons`` table (float64, ``[units]`` in unit order), for :func:`mean`."""
    import numpy as np

    from ..sites import ITEM, _indices

    match = ITEM.match(site.strip())
    if match is None:
        raise InputError(f"means_from(): cannot parse site '{site}'; write e.g. blocks.3.mlp.post or blocks.3.mlp.post[17,42]")
    base, select = match.group("base").strip(), match.group("select")
    table = run.neurons.to_pydict() if hasattr(run, "neurons") else run.table("neurons").to_pydict()
    names = np.asarray(table["site"], dtype=object)
    bases = np.array([name.split("[")[0] for name in names], dtype=object)
    rows = np.flatnonzero(bases == base)
    if rows.size == 0:
        raise InputError(f"means_from(): the run has no neurons of '{base}'; it has: {', '.join(sorted(set(names)))}")
    units = np.asarray(table["unit"], dtype=np.int64)[rows]
    means = np.asarray(table["mean"], dtype=np.float64)[rows]
    wanted = _indices(select, site) if select and select.strip() else tuple(sorted(units.tolist()))
    by_unit = dict(zip(units.tolist(), means.tolist()))
    missing = [u for u in wanted if u not in by_unit]
    if missing:
        raise InputError(f"means_from(): the run recorded no mean for {base} unit(s) {missing[:5]}; it has units {min(by_unit)}-{max(by_unit)}")
    return torch.tensor([by_unit[u] for u in wanted], dtype=torch.float64)


def resample(source: torch.Tensor, seed: int = 0) -> Intervention:
    """Resample-ablate: every token's selected units become one random row of ``source``
    (activations of other inputs captured earlier, ``[n, units]``; for per-head sites
    ``[n, head, d_head]``). Rows are drawn uniformly with replacement, independently per token,
    from one generator seeded here: a sequence of calls is reproducible, each call draws anew."""
    if not isinstance(source, torch.Tensor) or source.dim() < 2 or source.shape[0] == 0:
        got = tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
        raise InputError(f"resample(): source must be a non-empty [n, units] tensor of captured activations, got {got}")
    source = source.detach()
    generator = torch.Generator().manual_seed(seed)

    def apply(x: torch.Tensor) -> torch.Tensor:
        trailing = tuple(source.shape[1:])
        if tuple(x.shape[x.dim() - len(trailing):]) != trailing:
            raise InputError(
                f"resample(): source rows have shape {trailing} but the site's selected units have {tuple(x.shape[-len(trailing):])}; "
                "capture the source at the same site and selection (actscope.capture(..., flat=True))"
            )
        tokens = x.shape[: x.dim() - len(trailing)]
        rows = torch.randint(source.shape[0], tokens, generator=generator)  # [*tokens]
        return source[rows].to(dtype=x.dtype, device=x.device)

    return apply


def patch(cached: torch.Tensor) -> Intervention:
    """Replace the selected units by ``cached``, a tensor of exactly their shape (e.g.
    ``actscope.capture(model, site).tensor(site)`` from a clean run on inputs of the same
    shape; for a unit selection index it the same way, ``cached[..., [17, 42]]``)."""
    if not isinstance(cached, torch.Tensor):
        raise InputError(f"patch(): give the cached activations as a tensor, got {type(cached).__name__}")
    cached = cached.detach()

    def apply(x: torch.Tensor) -> torch.Tensor:
        if cached.shape != x.shape:
            raise InputError(
                f"patch(): the cached tensor has shape {tuple(cached.shape)} but the edited site has {tuple(x.shape)}; "
                "capture it on inputs of the same shape (no KV cache), and index a unit selection the same way"
            )
        return cached.to(dtype=x.dtype, device=x.device).clone()

    return apply


# -- replacing an MLP's activation function ------------------------------------------------
# Attribute names of the MLP activation module across families (Llama/Gemma/Mixtral ``act_fn``,
# GPT-2/NeoX ``act``, OPT/Phi-3/ViT ``activation_fn``, BERT/RoBERTa ``intermediate_act_fn``).
ACT_NAMES = ("act", "act_fn", "activation_fn", "intermediate_act_fn")


def _named_activations() -> dict[str, Intervention]:
    import torch.nn.functional as F

    return {
        "relu": torch.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "identity": lambda x: x,
    }


@contextmanager
def replace_activation(model: ModelLike, where: Any = None, new_fn: str | Intervention = "relu") -> Iterator[tuple[str, ...]]:
    """Replace the MLP activation function of some blocks inside a ``with`` block.

    ``where``: None (every block), a block index, a list of them, or a selection string
    (``'blocks.3'``, ``'blocks.0-2.mlp'``, ``'blocks.*'``). ``new_fn``: ``'relu'``, ``'gelu'``,
    ``'gelu_tanh'``, ``'silu'``, ``'identity'`` or any tensor → tensor function. The activation
    modules are found under each block of the family's adapter table (``blocks`` path) by their
    attribute name (:data:`ACT_NAMES`; MoE experts and shared experts included). Each gets a
    forward hook that returns ``new_fn(input)`` instead of the module's output (registered
    first, so ``edit`` hooks on the same module see the replaced value); hooks are removed on
    any exit and no parameter, buffer or module is changed. It composes with ``edit``: an edit
    of ``blocks.{i}.mlp.post`` sees the neuron computed with the new function. Yields the
    module paths whose activation was replaced.
    """
    from ..hooks import hooks
    from ..models import as_model

    model = as_model(model)
    function = _activation_function(new_fn)
    paths = _activation_modules(model, _block_indices(model, where))
    with hooks(model.module) as registry:
        for path in paths:
            registry.after(model.module.get_submodule(path), lambda mod, args, output: function(args[0]), prepend=True)
        yield tuple(paths)


def _activation_function(new_fn: str | Intervention) -> Intervention:
    if callable(new_fn):
        return new_fn
    known = _named_activations()
    if new_fn not in known:
        raise InputError(f"replace_activation(): unknown activation '{new_fn}'; use one of {', '.join(known)} or pass a function")
    return known[new_fn]


def _block_indices(model: Model, where: Any) -> list[int]:
    from ..sites import _segment_matches

    count = model.n_layers
    if model.adapter is None or not count:
        raise InputError(f"replace_activation(): {model.name} has no adapter table with blocks; wrap the MLP's activation module yourself")
    if where is None:
        return list(range(count))
    if isinstance(where, int) and not isinstance(where, bool):
        chosen = [where]
    elif isinstance(where, str):
        parts = where.strip().split(".")
        if len(parts) < 2 or parts[0] != "blocks" or (len(parts) > 2 and parts[2] != "mlp"):
            raise InputError(f"replace_activation(): cannot read blocks from '{where}'; write e.g. 'blocks.3', 'blocks.0-2' or 'blocks.*.mlp'")
        chosen = [i for i in range(count) if _segment_matches(parts[1], str(i))]
    else:
        chosen = [int(i) for i in where]
    bad = [i for i in chosen if not 0 <= i < count]
    if bad or not chosen:
        raise InputError(f"replace_activation(): block(s) {bad or where!r} do not exist; {model.name} has blocks 0-{count - 1}")
    return sorted(set(chosen))


def _activation_modules(model: Model, blocks: list[int]) -> list[str]:
    """Paths of the activation modules of ``blocks``; refuses an instance shared with other blocks."""
    from ..models.model import resolve_module

    prefix, block_list = resolve_module(model.module, model.adapter.blocks)
    owners: dict[int, set[int]] = {}
    paths: dict[int, list[str]] = {}
    for index, block in enumerate(block_list):
        for name, module in block.named_modules():
            if name and name.split(".")[-1] in ACT_NAMES:
                owners.setdefault(id(module), set()).add(index)
                if index in blocks:
                    paths.setdefault(id(module), []).append(f"{prefix}.{index}.{name}")
    if not paths:
        raise InputError(f"replace_activation(): found no activation module ({', '.join(ACT_NAMES)}) in blocks {blocks} of {model.name}")
    shared = [key for key in paths if not owners[key] <= set(blocks)]
    if shared:
        raise InputError(f"replace_activation(): {paths[shared[0]][0]} is one module shared with blocks outside {blocks}; select them all")
    return [found[0] for found in paths.values()]
