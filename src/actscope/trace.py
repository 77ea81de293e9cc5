"""Context managers that own every hook: ``observe`` streams sites into accumulators,
``capture`` keeps their tensors (with a memory guard).

Hooks are registered through PyTorch's handle-returning methods and removed in ``finally``,
whatever happens inside (exception, KeyboardInterrupt, nesting). Hooks only read: outputs
stay bit-identical. Attention-pattern sites switch the model to eager attention for the
duration and restore the previous implementation afterwards.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .errors import MemoryGuardError, SiteError
from .hooks import Hooks, hooks
from .models import Model, ModelLike, as_model
from .models.adapters.base import HookCall, ReadContext
from .models.attention import PATTERN_RETURNING
from .sites import Plan, Site, module_entry, plan_sites

log = logging.getLogger("actscope")

POS_BITS = 20  # a global token id is example_index << POS_BITS | position
MAX_POS = 1 << POS_BITS


def token_id(example: torch.Tensor | int, position: torch.Tensor | int) -> torch.Tensor | int:
    return (example << POS_BITS) | position


def split_token_id(tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tok >> POS_BITS, tok & (MAX_POS - 1)


@dataclass
class BatchInfo:
    """What the current forward call is about: padding mask and example numbers."""

    mask: torch.Tensor | None  # [batch, pos] bool, or None when there is no padding
    examples: torch.Tensor  # [batch] int64
    length: int | None = None  # positions of the call's first input (input_ids: [batch, pos])


@dataclass(frozen=True)
class Reading:
    """A site's values for the current call, flattened to real tokens × selected units."""

    values: torch.Tensor  # [n, units]
    tok: torch.Tensor  # [n] global token ids


class Tracer:
    """Registers the hooks of a plan and hands each site's tensor to ``on_site``."""

    def __init__(self, model: ModelLike, sites: str | Sequence[str] | Plan | None = None, *, announce: bool = True) -> None:
        self.announce = announce
        self.model = as_model(model)
        self.plan = plan_sites(self.model, sites)
        self.batch: BatchInfo | None = None
        self.next_examples: torch.Tensor | None = None
        self._example_counter = 0

    # -- lifecycle ---------------------------------------------------------------------
    @contextmanager
    def attached(self) -> Iterator["Tracer"]:
        with hooks(self.model.module) as registry:
            if self.plan.needs_eager:
                registry.enter(eager_attention(self.model, self.announce))
            registry.before(self.model.module, self._on_root_call, with_kwargs=True)
            for site in self.plan.sites:
                self._register(registry, site)
            yield self

    def _register(self, registry: Hooks, site: Site) -> None:
        module = self.model.module.get_submodule(site.path)
        read = site.hook.reader()
        ctx = ReadContext(dict(site.index), self.model.config)
        name = f"hook {site.label} ({site.path}@{site.hook.at})"

        if site.hook.at == "input":
            def pre_hook(mod, args, kwargs):
                self._deliver(site, read, HookCall(mod, args, kwargs), ctx)

            registry.before(module, pre_hook, with_kwargs=True, name=name)
            return

        def hook(mod, args, kwargs, output):
            self._deliver(site, read, HookCall(mod, args, kwargs, output), ctx)

        registry.after(module, hook, with_kwargs=True, name=name)

    def _on_root_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        grid = _batch_grid(args, kwargs)
        batch_size = grid[0] if grid else 1
        if self.next_examples is not None and len(self.next_examples) == batch_size:
            examples = self.next_examples.to(torch.int64).cpu()
        else:
            examples = torch.arange(self._example_counter, self._example_counter + batch_size)
        self._example_counter = int(examples.max()) + 1 if len(examples) else self._example_counter
        mask = kwargs.get("attention_mask")
        mask = mask.detach().bool().cpu() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        length = grid[1] if grid is not None and len(grid) >= 2 else None
        self.batch = BatchInfo(mask, examples, length)

    # -- delivery ----------------------------------------------------------------------
    def _deliver(self, site: Site, read: Any, call: HookCall, ctx: ReadContext) -> None:
        # Readers may compute (MoE experts): never build autograd graphs for observation.
        with torch.no_grad():
            value = read(call, ctx)
            if value is not None:
                self.on_site(site, value, call.module)

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:  # pragma: no cover
        raise NotImplementedError

    def _batch_info(self) -> BatchInfo:
        return self.batch or BatchInfo(None, torch.zeros(1, dtype=torch.int64))


def _batch_grid(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return tuple(value.shape)
    return None


# -- flattening ------------------------------------------------------------------------
def flatten(site: Site, value: Any, batch: BatchInfo, module: torch.nn.Module | None = None) -> Reading:
    """Turn a site's raw tensor into (real tokens × selected units) with global token ids."""
    layout = site.hook.layout
    if layout == "tokens":
        values, flat_index = value
        return _select_units(site, _gather_tokens(values, flat_index, batch))
    x = value.detach()
    if layout == "auto":
        layout = auto_layout(x, module)
    if layout == "channels":
        x = x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])  # [batch, positions, channels]
    elif layout == "heads":
        if site.heads is not None:
            _check_range(site, site.heads, x.shape[-2], "head")
            x = x[..., list(site.heads), :]
        x = x.reshape(*x.shape[:-2], -1)
    elif layout == "flat":
        x = _unflatten_tokens(x, batch)
    if x.dim() == 2:
        x = x.unsqueeze(1)  # [batch, 1, units]: one "token" per example
    elif x.dim() > 3:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    return _select_units(site, _real_tokens(x, batch))


def auto_layout(x: torch.Tensor, module: torch.nn.Module | None) -> str:
    """Module sites: 4-D and larger tensors are feature maps [batch, channel, *spatial], as are
    the 3-D outputs of 1-D convolutions; everything else has units on the last axis."""
    is_conv = isinstance(module, torch.nn.modules.conv._ConvNd)
    return "channels" if x.dim() >= 4 or (is_conv and x.dim() == 3) else "units"


def _unflatten_tokens(x: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
    """[batch·pos, units] → [batch, pos, units] when the grid is known."""
    if batch.mask is not None and x.shape[0] == batch.mask.numel():
        return x.reshape(*batch.mask.shape, x.shape[-1])
    size = len(batch.examples)
    if batch.length and x.shape[0] == size * batch.length:
        return x.reshape(size, batch.length, x.shape[-1])
    if x.shape[0] % size == 0:
        return x.reshape(size, x.shape[0] // size, x.shape[-1])
    return x.unsqueeze(0)


def _real_tokens(x: torch.Tensor, batch: BatchInfo) -> Reading:
    """Drop padding from [batch, pos, units]; positions count from the mask's end when a
    KV cache makes the site shorter than the mask (decoding)."""
    size, length, units = x.shape
    examples = batch.examples if len(batch.examples) == size else torch.arange(size)
    mask = _mask_for(batch, size, length)
    offset = batch.mask.shape[1] - length if mask is not None and batch.mask is not None else 0
    if offset + length > MAX_POS:
        raise SiteError(f"sequences longer than {MAX_POS} positions are not supported")
    positions = torch.arange(offset, offset + length)
    tok = token_id(examples[:, None], positions[None, :]).reshape(-1)
    flat = x.reshape(size * length, units)
    if mask is None or bool(mask.all()):  # no padding: skip the [n, units] gather copy
        return Reading(flat, tok)
    keep = mask.reshape(-1)
    return Reading(flat[keep.to(x.device)], tok[keep])


def _mask_for(batch: BatchInfo, size: int, length: int) -> torch.Tensor | None:
    mask = batch.mask
    if mask is None or mask.shape[0] != size or mask.shape[1] < length:
        return None
    return mask[:, mask.shape[1] - length:]


def _gather_tokens(values: torch.Tensor, flat_index: torch.Tensor, batch: BatchInfo) -> Reading:
    """Expert-style readings: values for some of the batch's tokens, by flat index."""
    values = values.detach()
    flat_index = flat_index.detach().cpu().to(torch.int64)
    if batch.mask is not None:
        length = batch.mask.shape[1]
        keep = batch.mask.reshape(-1)[flat_index]
        values, flat_index = values[keep.to(values.device)], flat_index[keep]
    else:
        length = batch.length or 1
    rows, positions = flat_index // length, flat_index % length
    examples = batch.examples[rows.clamp(max=len(batch.examples) - 1)]
    return Reading(values, token_id(examples, positions))


def _select_units(site: Site, reading: Reading) -> Reading:
    if site.units is None:
        return reading
    _check_range(site, site.units, reading.values.shape[-1], "unit")
    return Reading(reading.values[:, list(site.units)], reading.tok)


def _check_range(site: Site, chosen: tuple[int, ...], size: int, what: str) -> None:
    if chosen and max(chosen) >= size:
        raise SiteError(f"{site.label}: {what} {max(chosen)} is out of range; {site.name} has {size} {what}s (0-{size - 1})")


# -- eager attention -------------------------------------------------------------------
@contextmanager
def eager_attention(model: Model, announce: bool = True) -> Iterator[None]:
    """Switch a Hugging Face model to eager attention (which returns probabilities), unless its
    attention function already returns them (``models.attention.PATTERN_RETURNING``)."""
    module = model.module
    config = getattr(module, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if config is None or before is None or before in PATTERN_RETURNING or not hasattr(module, "set_attn_implementation"):
        yield
        return
    if announce:
        log.warning("actscope: %s uses %s attention; switching to eager for attention-pattern sites (restored afterwards)", model.name, before)
    module.set_attn_implementation("eager")
    try:
        yield
    finally:
        module.set_attn_implementation(before)


# -- observe ---------------------------------------------------------------------------
class Observer(Tracer):
    """Streams every site into accumulators: ``SiteStats`` per unit site, ``HeadSink`` per
    attention pattern. Read them from ``.stats`` after (or during) the context."""

    def __init__(self, model: Model, sites: Any = None, *, k: int = 8, eps: Sequence[float] | None = None, pages: Any = None,
                 spatial: str = "positions") -> None:
        super().__init__(model, sites)
        self.spatial = checked_spatial(spatial)  # "max" / "mean": one value per example and unit
        self.k = k
        self.eps = tuple(eps) if eps is not None else None
        self.pages = pages  # a stats.PageConfig: also keep the unit pages' windows and samples
        self.stats: dict[str, Any] = {}
        self.tokens_seen = 0

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        if site.hook.layout == "pattern":
            self._observe_pattern(site, value)
            return
        reading = flatten(site, value, self._batch_info(), module)
        if self.spatial != "positions":
            reading = reduce_positions(reading, self.spatial)
        stats = self.stats.get(site.label)
        if stats is None:
            stats = self.stats[site.label] = self._new_site_stats(reading.values.shape[-1])
        stats.update(reading.values, reading.tok)

    def _new_site_stats(self, units: int) -> Any:
        from .stats import DEFAULT_EPS, SiteStats

        return SiteStats(units, eps=self.eps or DEFAULT_EPS, k=self.k, pages=self.pages)

    def _observe_pattern(self, site: Site, pattern: torch.Tensor) -> None:
        from .stats import HeadSink

        if site.heads is not None:
            _check_range(site, site.heads, pattern.shape[1], "head")
            pattern = pattern[:, list(site.heads)]
        batch = self._batch_info()
        query_mask = _mask_for(batch, pattern.shape[0], pattern.shape[2])
        if query_mask is None:
            query_mask = torch.ones(pattern.shape[0], pattern.shape[2], dtype=torch.bool)
        stats = self.stats.get(site.label)
        if stats is None:
            stats = self.stats[site.label] = HeadSink(pattern.shape[1])
        stats.update(pattern.detach(), query_mask)


SPATIAL = ("positions", "max", "mean")


def checked_spatial(spatial: str) -> str:
    if spatial not in SPATIAL:
        from .errors import InputError

        raise InputError(f"--spatial must be one of {', '.join(SPATIAL)}, got {spatial!r}")
    return spatial


def reduce_positions(reading: Reading, how: str) -> Reading:
    """One row per example: the max or mean over its positions (a feature map's spatial
    positions, a ViT's patches), recorded at position 0."""
    example, _ = split_token_id(reading.tok)
    examples, row = torch.unique(example, return_inverse=True)
    values = reading.values
    out = torch.zeros(len(examples), values.shape[1], dtype=values.dtype, device=values.device)
    index = row.to(values.device)[:, None].expand_as(values)
    out = out.scatter_reduce(0, index, values, reduce="amax" if how == "max" else "mean", include_self=False)
    return Reading(out, token_id(examples, 0))


@contextmanager
def observe(model: Model, sites: Any = None, *, k: int = 8, eps: Sequence[float] | None = None, pages: Any = None,
            spatial: str = "positions") -> Iterator[Observer]:
    """Observe ``sites`` of ``model`` while the block runs; statistics land in ``.stats``.
    ``pages`` (a :class:`actscope.stats.pages.PageConfig`) also keeps what unit pages show."""
    observer = Observer(model, sites, k=k, eps=eps, pages=pages, spatial=spatial)
    with observer.attached():
        yield observer


# -- capture ---------------------------------------------------------------------------
DEFAULT_CAPTURE_BYTES = 1 << 30


class Capture(Tracer):
    """Keeps each site's tensors (detached, on the CPU) up to ``max_bytes`` in all."""

    def __init__(
        self, model: Model, sites: Any = None, *, max_bytes: int = DEFAULT_CAPTURE_BYTES, flat: bool = False, announce: bool = True
    ) -> None:
        super().__init__(model, sites, announce=announce)
        self.max_bytes = max_bytes
        self.flat = flat
        self.bytes = 0
        self.tensors: dict[str, list[torch.Tensor]] = {site.label: [] for site in self.plan.sites}
        self.readings: dict[str, list[Reading]] = {site.label: [] for site in self.plan.sites}

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        if self.flat or site.hook.layout == "tokens":  # gathered tokens need their ids kept
            reading = flatten(site, value, self._batch_info(), module)
            self._charge(site, reading.values.numel() * reading.values.element_size())
            self.readings[site.label].append(Reading(reading.values.to("cpu", copy=True), reading.tok))
            return
        self._charge(site, value.numel() * value.element_size())
        self.tensors[site.label].append(value.detach().to("cpu", copy=True))  # one copy, from any device

    def _charge(self, site: Site, size: int) -> None:
        if self.bytes + size > self.max_bytes:
            raise MemoryGuardError(
                f"capturing {site.label} would keep more than {self.max_bytes / 2**20:.0f} MiB of activations; "
                "observe statistics instead (actscope.observe), select fewer sites or units, "
                "use fewer tokens, or raise max_bytes"
            )
        self.bytes += size

    def tensor(self, site: str) -> torch.Tensor:
        """All captured calls of ``site`` concatenated along the first axis."""
        if site not in self.tensors:
            raise SiteError(f"'{site}' was not captured; captured: {', '.join(self.tensors)}")
        if self.readings[site]:
            return torch.cat([r.values for r in self.readings[site]])
        return torch.cat(self.tensors[site]) if self.tensors[site] else torch.empty(0)

    def token_ids(self, site: str) -> torch.Tensor:
        """Global token ids (``example << 20 | position``) of a flat or gathered capture."""
        return torch.cat([r.tok for r in self.readings[site]]) if self.readings.get(site) else torch.empty(0, dtype=torch.int64)


@contextmanager
def capture(
    model: Model, sites: Any = None, *, max_bytes: int = DEFAULT_CAPTURE_BYTES, flat: bool = False, announce: bool = True
) -> Iterator[Capture]:
    """Keep the tensors of ``sites`` while the block runs (``flat=True``: real tokens × units)."""
    capturer = Capture(model, sites, max_bytes=max_bytes, flat=flat, announce=announce)
    with capturer.attached():
        yield capturer


# -- what a model offers -------------------------------------------------------------
@dataclass(frozen=True)
class SiteInfo:
    """One row of ``model.sites()``: a site that exists, where it hooks, and its shape."""

    name: str
    module: str
    at: str
    layout: str
    shape: tuple[str | int, ...] | None


def list_sites(model: Model, shapes: bool = True) -> list[SiteInfo]:
    """Every site of ``model`` (canonical ones, or every module when it has no adapter)."""
    if model.adapter is not None:
        plan = Plan(tuple(Site(e.name, e.path, e.hook, e.index) for e in model.catalog.values()))
    else:
        from .sites import never_called

        names = [name for name, module in model.module.named_modules() if name and not never_called(module)]
        plan = Plan(tuple(_module_site(model, name) for name in names))
    found = _discover_shapes(model, plan) if shapes else {}
    return [
        SiteInfo(s.name, s.path, s.hook.at, s.hook.layout, found.get(s.name))
        for s in plan.sites
    ]


def _module_site(model: Model, name: str) -> Site:
    entry = module_entry(model, f"module:{name}@output")
    return Site(entry.name, entry.path, entry.hook, ())


def _discover_shapes(model: Model, plan: Plan) -> dict[str, tuple[str | int, ...]]:
    """Run the model once on a tiny input and record each site's shape symbolically."""
    from .models.model import EXAMPLE_POSITIONS

    inputs = model.example_inputs()
    if inputs is None:
        return {}
    with torch.no_grad(), capture(model, plan, announce=False) as captured:
        model(**inputs)
    shapes = {}
    for site in plan.sites:
        first = captured.readings[site.label][:1] and [captured.readings[site.label][0].values]
        tensors = captured.tensors[site.label] or first
        if tensors:
            shapes[site.name] = _symbolic(tuple(tensors[0].shape), site.hook.layout, EXAMPLE_POSITIONS)
    return shapes


def _symbolic(shape: tuple[int, ...], layout: str, positions: int) -> tuple[str | int, ...]:
    names: list[str | int] = list(shape)
    if layout == "tokens" or (layout == "flat" and names and names[0] == positions):
        names[0] = "tokens"
        return tuple(names)
    if names and names[0] == 1:
        names[0] = "batch"
    for axis in range(1, len(names) - (0 if layout == "pattern" else 1)):
        if names[axis] == positions:
            names[axis] = "pos"
    return tuple(names)
