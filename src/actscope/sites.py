"""Site selection: the grammar, parsed once into a frozen plan before any forward pass.

Grammar (items separated by commas outside brackets, or given as a list):

* canonical names with globs and ranges: ``blocks.*.mlp.post``, ``blocks.0-5.attn.pattern``
* a unit or head selection: ``blocks.3.mlp.post[17,42]``, ``blocks.3.mlp.post[0:128]``,
  ``blocks.3.attn.pattern[head=5]``, ``blocks.3.attn.z[head=1,3]``
* any module of any model: ``module:encoder.layer.0.intermediate@output`` (or ``@input``)
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .errors import SiteError
from .models.adapters.base import Hook, read_input, read_output
from .models.model import SiteEntry

if TYPE_CHECKING:
    import torch

    from .models.model import Model

DEFAULT_SELECTION = "blocks.*.mlp.post"
ITEM = re.compile(r"^(?P<base>[^\[\]]+?)\s*(?:\[(?P<select>[^\[\]]*)\])?$")
RANGE = re.compile(r"^(\d+)-(\d+)$")


@dataclass(frozen=True)
class Site:
    """One observed site: its canonical name, the module it hooks and what it keeps."""

    name: str
    path: str
    hook: Hook
    index: tuple[tuple[str, int], ...] = ()
    units: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    @property
    def layer(self) -> int | None:
        return dict(self.index).get("i")

    @property
    def label(self) -> str:
        """The name with its selection, as the user would write it."""
        if self.heads is not None:
            return f"{self.name}[head={','.join(map(str, self.heads))}]"
        if self.units is not None:
            return f"{self.name}[{','.join(map(str, self.units))}]"
        return self.name


@dataclass(frozen=True)
class Plan:
    """The frozen, validated list of sites one run observes."""

    sites: tuple[Site, ...]

    @property
    def needs_eager(self) -> bool:
        return any(site.hook.needs_eager for site in self.sites)

    @property
    def names(self) -> list[str]:
        return [site.label for site in self.sites]

    def to_json(self) -> list[dict]:
        return [
            {"site": s.label, "module": s.path, "at": s.hook.at, "layout": s.hook.layout, "layer": s.layer}
            for s in self.sites
        ]


def plan_sites(model: "Model", selection: "str | Sequence[str] | Plan | None" = None) -> Plan:
    """Parse and validate a selection against ``model``; raise SiteError with suggestions. A
    :class:`Plan` (already parsed and validated) passes through: parse once at the edge."""
    if isinstance(selection, Plan):
        return selection
    items = split_items(selection if selection is not None else _default_selection(model))
    if not items:
        raise SiteError("the site selection is empty; pass e.g. --sites 'blocks.*.mlp.post'")
    sites: dict[str, Site] = {}
    for item in items:
        for site in _parse_item(model, item):
            sites.setdefault(site.label, site)
    return Plan(tuple(sites.values()))


def split_items(selection: str | Sequence[str]) -> list[str]:
    """Split on commas that are not inside brackets."""
    texts = [selection] if isinstance(selection, str) else list(selection)
    items: list[str] = []
    for text in texts:
        depth, current = 0, ""
        for char in text:
            depth += {"[": 1, "]": -1}.get(char, 0)
            if char == "," and depth == 0:
                items.append(current.strip())
                current = ""
            else:
                current += char
        items.append(current.strip())
    return [item for item in items if item]


def _default_selection(model: "Model") -> str:
    if model.adapter is None:
        raise SiteError(
            f"{model.name} has no adapter table, so there is no default site; pass module sites, "
            "e.g. --sites 'module:layers.0@output' (run `actscope sites` to list modules)"
        )
    return DEFAULT_SELECTION


def _parse_item(model: "Model", item: str) -> list[Site]:
    match = ITEM.match(item)
    if match is None:
        raise SiteError(f"cannot parse site '{item}'; write e.g. blocks.3.mlp.post[17,42] or module:PATH@output")
    base, select = match.group("base").strip(), match.group("select")
    if base in model.catalog:  # an exact name, also of a site added to the model (SAE features, e.g. on a module site)
        entries = [model.catalog[base]]
    else:
        entries = _module_entries(model, base) if base.startswith("module:") else _match_canonical(model, base)
    return [_with_selection(entry, select, item) for entry in entries]


def _module_entries(model: "Model", base: str) -> list[SiteEntry]:
    """One module site, or every module a path with ``*`` or ``low-high`` segments matches
    (``module:model.layers.*.mlp.fc2@input``), in module order; containers that never run are
    left out of a pattern's matches."""
    path, _, side = base[len("module:"):].partition("@")
    parts = path.split(".")
    if not any(part == "*" or RANGE.match(part) for part in parts):
        return [module_entry(model, base)]
    side = _checked_side(base, side)
    modules = [(name, module) for name, module in model.module.named_modules() if name]
    matched = [(name, module) for name, module in modules if _matches(parts, name.split("."))]
    found = [name for name, module in matched if not never_called(module)]
    if matched and not found:
        raise SiteError(f"'{path}' matches only containers {model.name} never calls ({type(matched[0][1]).__name__} "
                        f"{matched[0][0]}, …), so hooks on them never fire; add a level, e.g. module:{path}.*@{side}")
    if not found:
        generic = sorted({re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name) for name, _ in modules})
        raise SiteError(f"no module of {model.name} matches '{path}'.{_suggest(path, generic)} "
                        "Run `actscope sites` to list modules.")
    return [_module_site(name, side) for name in found]


def _checked_side(base: str, side: str) -> str:
    """``@input`` or ``@output`` (the default when none is written)."""
    side = side or "output"
    if side not in ("input", "output"):
        raise SiteError(f"'{base}': the side must be @input or @output, got @{side}")
    return side


def _module_site(path: str, side: str) -> SiteEntry:
    hook = Hook(path, side, read_input if side == "input" else read_output, "auto")  # type: ignore[arg-type]
    return SiteEntry(f"module:{path}@{side}", path, hook, ())


def module_entry(model: "Model", base: str) -> SiteEntry:
    path, _, side = base[len("module:"):].partition("@")
    side = _checked_side(base, side)
    names = [name for name, _ in model.module.named_modules() if name]
    if path not in names and not (path == "" and side):
        hint = _suggest(path, names)
        raise SiteError(f"{model.name} has no module '{path}'.{hint} Run `actscope sites` to list modules.")
    if path and never_called(model.module.get_submodule(path)):
        container = model.module.get_submodule(path)
        entries = [f"module:{path}.{name}@{side}" for name, _ in list(container.named_children())[:2]]
        raise SiteError(
            f"'{base}': {type(container).__name__} '{path}' is a container the model never calls (it has no forward), "
            f"so a hook on it never fires; observe its entries instead, e.g. {', '.join(entries) or 'one of its modules'}"
        )
    return _module_site(path, side)


def never_called(module: torch.nn.Module) -> bool:
    """A module without a ``forward`` of its own (``nn.ModuleList``, ``nn.ModuleDict``): a container
    its parent indexes into, never calls, so no hook on it ever fires."""
    return getattr(type(module).forward, "__name__", "") == "_forward_unimplemented"


def _match_canonical(model: "Model", pattern: str) -> list[SiteEntry]:
    if model.adapter is None and not model.catalog:
        raise SiteError(
            f"'{pattern}' is a canonical site name, but {model.name} has no adapter table; "
            "use module sites instead, e.g. module:PATH@output (run `actscope sites` to list modules)"
        )
    parts = pattern.split(".")
    _check_ranges(model, parts, pattern)
    found = [entry for name, entry in model.catalog.items() if _matches(parts, name.split("."))]
    if not found:
        raise SiteError(_unknown_site_message(model, pattern))
    return found


def _check_ranges(model: "Model", parts: list[str], pattern: str) -> None:
    """A range must lie within what the model has: ``blocks.0-9`` on a 2-block model is a
    mistake to report, not a selection to shrink silently."""
    for position, part in enumerate(parts):
        bounds = RANGE.match(part)
        if bounds is None:
            continue
        low, high = int(bounds[1]), int(bounds[2])
        open_parts = parts[:position] + ["*"] + parts[position + 1:]
        names = [name.split(".") for name in model.catalog]
        have = sorted({int(n[position]) for n in names if _matches(open_parts, n) and n[position].isdigit()})
        what = {"blocks": "blocks", "experts": "experts"}.get(parts[position - 1] if position else "", "indices")
        if low > high:
            raise SiteError(f"'{pattern}': the range {part} is empty; write it low-high, e.g. {high}-{low}")
        if have and high > have[-1]:
            raise SiteError(f"'{pattern}': the range {part} goes beyond the model: {model.name} has {len(have)} {what} "
                            f"({have[0]}-{have[-1]}); use e.g. {have[0]}-{have[-1]} or *")


def _matches(pattern: list[str], name: list[str]) -> bool:
    if len(pattern) != len(name):
        return False
    return all(_segment_matches(p, n) for p, n in zip(pattern, name))


def _segment_matches(pattern: str, segment: str) -> bool:
    if pattern == "*" or pattern == segment:
        return True
    bounds = RANGE.match(pattern)
    return bool(bounds and segment.isdigit() and int(bounds[1]) <= int(segment) <= int(bounds[2]))


def _unknown_site_message(model: "Model", pattern: str) -> str:
    names = list(model.catalog)
    generic = sorted({re.sub(r"\.\d+\.", ".*.", name) for name in names})
    hint = _suggest(pattern, names + generic)
    layers = f" ({model.n_layers} blocks: 0-{model.n_layers - 1})" if model.n_layers else ""
    if re.search(r"\.(sae|transcoder)(_\w+)?$", pattern.split("[")[0]):  # the features of an SAE not attached
        hint += (" SAE features are a site once their SAE is attached: --sae DIR on the command line, "
                 "actscope.sae.attach(model, actscope.load_sae(DIR)) in Python.")
    command = f"actscope sites {_command_model(model.source)}".rstrip()
    return f"unknown site '{pattern}' for {model.name}{layers}.{hint} Run `{command}` to list them."


def _command_model(source: str | None) -> str:
    """The MODEL argument that loads ``source`` again: a directory as it is (quoted for a shell),
    a hub snapshot ``org/name@commit`` as ``org/name --revision commit``."""
    import shlex
    from pathlib import Path

    if not source:
        return ""
    repo, at, revision = source.rpartition("@")
    if at and repo and not Path(source).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        return f"{shlex.quote(repo)} --revision {shlex.quote(revision)}"
    return shlex.quote(source)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _with_selection(entry: SiteEntry, select: str | None, item: str) -> Site:
    site = Site(entry.name, entry.path, entry.hook, entry.index)
    if select is None or not select.strip():
        return site
    key, eq, value = select.partition("=")
    if eq and key.strip() == "head":
        if entry.hook.layout not in ("pattern", "heads"):
            raise SiteError(f"'{item}': [head=…] applies to attention sites (attn.pattern, attn.v, attn.z)")
        return Site(site.name, site.path, site.hook, site.index, heads=_indices(value, item))
    if eq:
        raise SiteError(f"'{item}': unknown selector '{key.strip()}'; use [17,42], [0:128] or [head=5]")
    if entry.hook.layout == "pattern":
        raise SiteError(f"'{item}': select heads of a pattern with [head=…]")
    return Site(site.name, site.path, site.hook, site.index, units=_indices(select, item))


def _indices(text: str, item: str) -> tuple[int, ...]:
    values: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        start, colon, stop = part.partition(":")
        try:
            values.extend(range(int(start), int(stop)) if colon else [int(part)])
        except ValueError:
            raise SiteError(f"'{item}': '{part}' is not an index or a start:stop range") from None
    if not values or min(values) < 0:
        raise SiteError(f"'{item}': indices must be non-negative integers")
    return tuple(sorted(set(values)))
