"""Activation memory per layer for a given input size (METHODS.md, "Outliers and memory").

MCUNetV2 observes that, run layer by layer, the first blocks of a CNN need an order of magnitude
more activation memory than the rest. :func:`activation_memory` measures it with hooks on one
forward pass (under ``torch.no_grad``):

* ``output_bytes``: the bytes of every tensor a module returns (nested tuples, lists, dicts and
  model outputs included; a tensor returned twice counts once), ``elements × element size``,
  summed over the module's calls. Views (``Flatten``, ``Identity``) count at their logical size,
  as an executor that does not alias them would store them.
* ``input_bytes``: the same for the tensors the module is called with (positional and keyword).
* ``peak_bytes``: the largest ``input_bytes + output_bytes`` of one call of any *leaf* module
  (one without children) inside the row's module. Executing layer by layer, a layer's input
  and output must be live together, so this is what MCUNetV2 tabulates per layer. It assumes
  every module runs out of place (a BatchNorm or ReLU module counts its input and output; a
  deployment that folds BatchNorm into the convolution and runs activations in place needs
  less), and beyond that it is a **lower bound**: tensors kept for a skip connection,
  functional ops between modules (``F.relu``, residual adds) and framework workspaces are not
  seen by module hooks. A measured allocator peak is not reported: on the CPU there is none to
  read, and it would count weights and caches too.

``dtype`` reports floating activations as if stored in that type (e.g. ``torch.int8`` for the
int8 deployments MCUNetV2 assumes); integer tensors (token ids, expert indices) keep their own.

Rows: a model with an adapter gets one row per block (its module's input, output and peak)
and one per canonical site (the tensor the site reads); any other model one row per module,
the root included (``module == ""``); ``modules=True`` adds module rows to adapter models too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..hooks import Hooks, hooks
from ..sites import Plan, Site, plan_sites
from ..trace import Tracer
from ..results import TableResult
from ..models import Model

UNDEFINED = -1  # input/peak bytes of a site row: a site reads one tensor, it runs nothing


# -- byte counting ---------------------------------------------------------------------------
def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every distinct tensor in a tensor, tuple/list, dict or model output, in order (a
    tensor found twice is listed once)."""
    found: dict[int, torch.Tensor] = {}

    def visit(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            found.setdefault(id(item), item)
        elif isinstance(item, (tuple, list)):
            for part in item:
                visit(part)
        elif isinstance(item, Mapping):
            for part in item.values():
                visit(part)

    visit(value)
    return list(found.values())


def tensor_bytes(value: Any, dtype: torch.dtype | None = None) -> int:
    """Bytes of the tensors in ``value``; floating ones counted at ``dtype``'s size if given."""
    total = 0
    for tensor in tensors_in(value):
        size = _itemsize(dtype) if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(found, torch.dtype):
        raise InputError(f"activation_memory: dtype must be a torch.dtype or its name, got {dtype!r}; e.g. torch.int8 or 'float16'")
    return found


# -- per-module recording ------------------------------------------------------------------------
@dataclass
class ModuleMemory:
    """What one module produced over the forward pass."""

    kind: str
    leaf: bool
    calls: int = 0
    shape: tuple[int, ...] | None = None  # first output tensor's shape, first call
    elements: int = 0
    output_bytes: int = 0
    input_bytes: int = 0
    call_peak: int = 0  # largest input + output bytes of one call


def record_modules(registry: Hooks, dtype: torch.dtype | None) -> dict[str, ModuleMemory]:
    """Hook every module under the registry's root (removed with the registry); fill records as it runs."""
    records: dict[str, ModuleMemory] = {}
    for name, module in registry.root.named_modules():
        record = records[name] = ModuleMemory(type(module).__name__, not any(True for _ in module.children()))
        registry.after(module, _recorder(record, dtype), with_kwargs=True)
    return records


def _recorder(record: ModuleMemory, dtype: torch.dtype | None):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        outputs = tensors_in(output)
        out_bytes = tensor_bytes(outputs, dtype)
        in_bytes = tensor_bytes([args, kwargs], dtype)
        if record.shape is None and outputs:
            record.shape = tuple(outputs[0].shape)
        record.calls += 1
        record.elements += sum(t.numel() for t in outputs)
        record.output_bytes += out_bytes
        record.input_bytes += in_bytes
        record.call_peak = max(record.call_peak, out_bytes + in_bytes)

    return hook


def leaf_peaks(records: Mapping[str, ModuleMemory]) -> dict[str, int]:
    """Per module: the largest one-call input + output bytes of a leaf inside it (or itself)."""
    peaks = {name: 0 for name in records}
    for name, record in records.items():
        if not record.leaf:
            continue
        for ancestor in _ancestors(name):
            if ancestor in peaks:
                peaks[ancestor] = max(peaks[ancestor], record.call_peak)
    return peaks


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` → ``a.b.c``, ``a.b``, ``a``, ``""`` (the root)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:n]) for n in range(len(parts), -1, -1)]


class _SiteBytes(Tracer):
    """Bytes of the tensor every canonical site reads (experts: the gathered values)."""

    def __init__(self, model: Model, plan: Plan, dtype: torch.dtype | None) -> None:
        super().__init__(model, plan, announce=False)
        self.dtype = dtype
        self.bytes: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.elements: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        tensor = value[0] if site.hook.layout == "tokens" else value  # (values [n, d], token index)
        self.bytes[site.label] = self.bytes.get(site.label, 0) + tensor_bytes(tensor, self.dtype)
        self.shapes.setdefault(site.label, tuple(tensor.shape))
        self.elements[site.label] = self.elements.get(site.label, 0) + tensor.numel()
        self.calls[site.label] = self.calls.get(site.label, 0) + 1


# -- the result ----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ActivationMemory(TableResult):
    """One row per block and canonical site (adapter models) or per module (others).

    Columns: ``name``, ``level`` (``block``/``site``/``module``), ``layer`` (block index, −1
    outside blocks), ``module`` (path), ``kind`` (module class or site layout), ``calls``,
    ``shape`` (first output), ``elements``, ``output_bytes``, ``input_bytes`` and
    ``peak_bytes`` (−1 for site rows, see the module docstring for their definitions).
    """

    table_name: ClassVar[str] = "activation_memory"
    columns: Mapping[str, np.ndarray]
    dtype: str
    peak_bytes: int = field(default=0)  # largest input + output of one call of any leaf module
    leaf_output_bytes: int = field(default=0)  # every leaf module's outputs, summed

    def to_table(self) -> dict[str, np.ndarray]:
        return {name: column.copy() for name, column in self.columns.items()}


def _row(name: str, level: str, layer: int, module: str, kind: str, calls: int, shape: Any,
         elements: int, output_bytes: int, input_bytes: int, peak_bytes: int) -> dict[str, Any]:
    return {"name": name, "level": level, "layer": layer, "module": module, "kind": kind, "calls": calls,
            "shape": "" if shape is None else str(tuple(shape)), "elements": elements,
            "output_bytes": output_bytes, "input_bytes": input_bytes, "peak_bytes": peak_bytes}


def _module_rows(records: Mapping[str, ModuleMemory], peaks: Mapping[str, int], names: Sequence[str],
                 level: str, labels: Mapping[str, tuple[str, int]] | None = None) -> list[dict[str, Any]]:
    rows = []
    for path in names:
        record = records[path]
        label, layer = (labels or {}).get(path, (path, -1))
        rows.append(_row(label, level, layer, path, record.kind, record.calls, record.shape, record.elements,
                         record.output_bytes, record.input_bytes, peaks[path]))
    return rows


def _site_rows(tracer: _SiteBytes) -> list[dict[str, Any]]:
    rows = []
    for site in tracer.plan.sites:
        if site.label not in tracer.bytes:
            continue  # not reached by this input (e.g. a module the forward skipped)
        layer = -1 if site.layer is None else site.layer
        rows.append(_row(site.label, "site", layer, site.path, site.hook.layout, tracer.calls[site.label],
                         tracer.shapes[site.label], tracer.elements[site.label], tracer.bytes[site.label],
                         UNDEFINED, UNDEFINED))
    return rows


def _block_paths(model: Model) -> dict[str, tuple[str, int]]:
    from ..models import resolve_module

    found = resolve_module(model.module, model.adapter.blocks)
    if found is None:
        return {}
    path, blocks = found
    return {f"{path}.{i}": (f"blocks.{i}", i) for i in range(len(blocks))}


def _memory_plan(model: Model, sites: Any) -> Plan | None:
    if model.adapter is None and sites is None:
        return None
    if sites is not None:
        return plan_sites(model, sites)
    # Attention probabilities exist only under eager attention; counting them would switch
    # the model away from the implementation whose memory is being measured.
    return Plan(tuple(Site(e.name, e.path, e.hook, e.index) for e in model.catalog.values() if not e.hook.needs_eager))


def _call(model: Model, inputs: Any) -> None:
    if isinstance(inputs, Mapping):
        model(**inputs)
    elif isinstance(inputs, torch.Tensor):
        model(inputs)
    elif isinstance(inputs, (tuple, list)):
        model(*inputs)
    else:
        raise InputError(
            f"activation_memory: inputs must be a dict of keyword arguments, a tensor or a tuple of tensors, "
            f"got {type(inputs).__name__}; e.g. tokenizer(['text'], return_tensors='pt') or torch.zeros(1, 3, 224, 224)"
        )


def activation_memory(
    model: Model, inputs: Any, dtype: torch.dtype | str | None = None, *, sites: str | Sequence[str] | None = None,
    modules: bool = False,
) -> ActivationMemory:
    """Bytes of every layer's activations for one forward pass on ``inputs`` (their size
    is what matters: batch, positions or image size).

    ``model``: an :class:`actscope.Model` or any ``nn.Module``. ``inputs``: keyword arguments
    (a dict), one tensor, or a tuple of positional tensors. ``dtype``: count floating
    activations at this type's size (default: as computed). ``sites``: canonical sites to
    tabulate (default: every site of the adapter except attention patterns, which need eager
    attention). ``modules``: add one row per module on adapter models.
    """
    from ..models import Model, wrap

    dtype = _check_dtype(dtype)
    model = model if isinstance(model, Model) else wrap(model)
    plan = _memory_plan(model, sites)
    tracer = _SiteBytes(model, plan, dtype) if plan is not None else None
    with hooks(model.module) as registry, torch.no_grad():
        records = record_modules(registry, dtype)
        if tracer is not None:
            registry.enter(tracer.attached())
        _call(model, inputs)
    peaks = leaf_peaks(records)
    rows: list[dict[str, Any]] = []
    if model.adapter is not None:
        blocks = _block_paths(model)
        rows += _module_rows(records, peaks, list(blocks), "block", blocks)
    if model.adapter is None or modules:
        rows += _module_rows(records, peaks, list(records), "module")
    if tracer is not None:
        rows += _site_rows(tracer)
    columns = {key: np.array([row[key] for row in rows], dtype=object if isinstance(rows[0][key], str) else np.int64) for key in rows[0]}
    leaf_bytes = sum(record.output_bytes for record in records.values() if record.leaf)
    return ActivationMemory(columns, str(dtype or "as computed").replace("torch.", ""), peaks.get("", 0), leaf_bytes)


__all__ = ["ActivationMemory", "activation_memory", "leaf_peaks", "tensor_bytes", "tensors_in"]
