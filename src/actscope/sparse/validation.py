"""Checks a calibration file's header and tensors before :meth:`Calibration.load` trusts them
(after :mod:`actscope.store.bound` checked the envelope: format, version, kind, the model).

A hand-edited or damaged file would otherwise crash deep inside sparse execution or, worse,
run with a NaN threshold or without its method's settings. Every rule is a row of a table:

* :data:`HEADER` — each header key, the test its value must pass and what it must be;
* lists with one entry per layer (:data:`PER_LAYER`, and every ``per_layer`` list);
* :data:`SETTINGS` — the settings each method reads, with their ranges;
* :data:`SHAPES` — the shape of each threshold kind's tensor (``KINDS`` says which kinds a
  method holds): float, finite and ≥ 0.

A refusal names the file, the key or tensor, its bad value, and the fix: recompute
(:func:`actscope.store.bound.refuse`, the same words for every bound file).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn

import torch

from ..store.bound import refuse as refuse_bound, shown
from ..models import Model

METHODS = ("cats", "teal", "cett", "core")
KINDS = {"cats": ("act",), "teal": ("in", "down"), "cett": ("neuron",), "core": ()}  # threshold tensors per method
# (TEAL over projections holds one per projection instead: threshold_kinds)


def by_projection(method: str, settings: Mapping[str, Any]) -> bool:
    """TEAL over every projection (or greedy over the MLP's): one threshold per projection."""
    return method == "teal" and (settings.get("allocation"), settings.get("projections")) != ("uniform", "mlp")


def threshold_kinds(method: str, settings: Mapping[str, Any]) -> tuple[str, ...]:
    """The names after ``"{layer}."`` of a calibration's threshold tensors."""
    return tuple(settings["names"]) if by_projection(method, settings) else KINDS[method]

Rule = tuple[Callable[[Any], bool], str]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _list_of(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(test(x) for x in value)


def _fraction(*, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    """A number in [0, 1], with either end left out."""
    return lambda v: _number(v) and (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)


def _layers(value: Any) -> bool:
    return _list_of(lambda x: _whole(x) and x >= 0)(value) and len(set(value)) == len(value)


def _per_layer(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _list_of(_number)(v) for k, v in value.items())


HEADER: dict[str, Rule] = {
    "method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
    "family": (_text, "the model family's name"),
    "layers": (_layers, "a list of distinct layer numbers ≥ 0"),
    "units": (_list_of(lambda x: _whole(x) and x >= 1), "a list of unit counts ≥ 1"),
    "expected_sparsity": (_list_of(_fraction()), "a list of fractions in [0, 1]"),
    "expected_weight_skipped": (_list_of(_fraction()), "a list of fractions in [0, 1]"),
    "per_layer": (_per_layer, "an object of per-layer lists of numbers"),
    "settings": (lambda v: isinstance(v, dict), "an object"),
}
PER_LAYER = ("units", "expected_sparsity", "expected_weight_skipped")

_SPARSITY: Rule = (_fraction(high_open=True), "a fraction in [0, 1)")
_SHARE: Rule = (_fraction(low_open=True), "a fraction in (0, 1]")
SETTINGS: dict[str, dict[str, Rule]] = {
    "cats": {"sparsity": _SPARSITY},
    "teal": {"sparsity": _SPARSITY, "allocation": (lambda v: v in ("greedy", "uniform"), "greedy or uniform"),
             "projections": (lambda v: v in ("all", "mlp"), "all or mlp")},
    "cett": {"p": (lambda v: _number(v) and v > 0, "a fraction > 0: the allowed perplexity increase")},
    "core": {"alpha": _SHARE, "beta": _SHARE},
}

SHAPES: dict[str, Callable[[int], list[int]]] = {
    "act": lambda units: [1], "in": lambda units: [1], "down": lambda units: [1], "neuron": lambda units: [units],
}  # any other kind is a projection's: [1]


def refuse(source: Path, problem: str) -> NoReturn:
    refuse_bound(source, "sparse-calibration", problem)


def _check_rules(source: Path, values: Mapping[str, Any], rules: Mapping[str, Rule], where: str, missing: str) -> None:
    for key, (test, what) in rules.items():
        if key not in values:
            refuse(source, missing.format(key=key, what=what))
        if not test(values[key]):
            refuse(source, f"{where} '{key}' is {shown(values[key])}, expected {what}")


def check_header(source: Path, header: Mapping[str, Any]) -> None:
    """Keys, types and ranges of the header; one entry per layer in every per-layer list."""
    _check_rules(source, header, HEADER, "header", "its header has no '{key}'")
    layers = header["layers"]
    lists = {**{key: header[key] for key in PER_LAYER}, **{f"per_layer.{k}": v for k, v in header["per_layer"].items()}}
    for key, values in lists.items():
        if len(values) != len(layers):
            refuse(source, f"header '{key}' has {len(values)} entries for {len(layers)} layers ({layers})")
    method = header["method"]
    _check_rules(source, header["settings"], SETTINGS[method], "settings",
                 f"settings '{{key}}' is missing, a {method} calibration needs it ({{what}})")
    if by_projection(method, header["settings"]):
        names = header["settings"].get("names")
        if not (_list_of(_text)(names) and names and len(set(names)) == len(names)):
            refuse(source, f"settings 'names' is {shown(names)}, expected the list of the blocks' projection names")


def check_tensors(source: Path, header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Exactly the method's tensors (``"{layer}.{kind}"`` and ``units``), each of its shape,
    float, finite and ≥ 0; ``units`` equal to the header's."""
    method = header["method"]
    kinds = threshold_kinds(method, header["settings"])
    shapes = {f"{layer}.{kind}": SHAPES.get(kind, lambda units: [1])(units) for layer, units in zip(header["layers"], header["units"])
              for kind in kinds}
    holds = _holds(method, kinds, header["layers"])
    for name in [*shapes, "units"]:
        if name not in tensors:
            refuse(source, f"tensor '{name}' is missing ({holds})")
    for name in tensors:
        if name not in shapes and name != "units":
            refuse(source, f"it has an extra tensor '{name}' ({holds})")
    units = tensors["units"].tolist()
    if units != header["units"]:
        refuse(source, f"tensor 'units' is {shown(units)}, the header says {shown(header['units'])}")
    for name, shape in shapes.items():
        _check_threshold(source, name, tensors[name], shape)


def _holds(method: str, kinds: tuple[str, ...], layers: list[int]) -> str:
    if not kinds:
        return f"a {method} calibration holds only 'units'"
    each = " and ".join(f"'{{layer}}.{kind}'" for kind in kinds)
    return f"a {method} calibration holds {each} for layers {layers}, and 'units'"


def _check_threshold(source: Path, name: str, tensor: torch.Tensor, shape: list[int]) -> None:
    if list(tensor.shape) != shape:
        refuse(source, f"tensor '{name}' has shape {list(tensor.shape)}, expected {shape}")
    if not tensor.is_floating_point():
        refuse(source, f"tensor '{name}' has dtype {str(tensor.dtype).removeprefix('torch.')}, expected a floating-point dtype")
    bad = ~torch.isfinite(tensor) | (tensor < 0)
    if bool(bad.any()):
        refuse(source, f"tensor '{name}' holds {float(tensor[bad][0]):g}; thresholds are finite and ≥ 0")


def check_model(source: Path, header: Mapping[str, Any], model: Model, blocks: list) -> None:
    """The header's layers and units are the model's MLP blocks (its weight hash already matched)."""
    layers, units = [b.layer for b in blocks], [b.units for b in blocks]
    if (header["layers"], header["units"]) != (layers, units):
        refuse(source, f"it covers MLP layers {header['layers']} of {header['units']} units, model '{model.name}' has "
                       f"layers {layers} of {units} units")
