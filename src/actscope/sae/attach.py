"""An SAE's features as a site of the model: ``attach(model, sae)`` → ``'blocks.3.resid.post.sae'``.

The feature site hooks the same module, on the same side, as the site the SAE reads (its *base*);
its reader reads the base tensor (heads concatenated for ``attn.z``, as SAELens does) and encodes
it, so the tracer, the statistics, top examples, ``edit``, activation and attribution patching
take it like any other site. Its reader also says how to write an edited view back
(``write_back``): the base tensor ``x`` becomes ``x + decode_delta(f' − f)``, i.e.
``decode(f') + (x − decode(f))`` — the edit keeps the SAE's reconstruction error, and when no
feature changed the module's own tensor is handed on untouched (bit-identical outputs). A
transcoder's features are read at one site and written at another (``write_to``, ``delta``):
``edit`` adds ``decode(f') − decode(f)`` to the written site's tensor ``y``, i.e. ``y`` becomes
``decode(f') + (y − decode(f))``, again untouched when nothing changed. And it
says where each feature writes (``decode_directions``), for :func:`actscope.explain.decode`.

Naming: ``BASE.sae`` (``BASE.transcoder`` for a transcoder, at the site it reads); an SAE given a
``name`` is ``BASE.sae_NAME``, which is how two SAEs on one site are told apart.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, SiteError
from ..models.adapters.base import Hook, HookCall, ReadContext, read_input, read_output
from ..models.model import SiteEntry
from .core import SAE
from .hooknames import site_for_hook

if TYPE_CHECKING:
    from ..models import Model
    from ..sites import Site

NAME = re.compile(r"^[A-Za-z0-9_]+$")
PLAIN = (None, read_input, read_output)
READABLE = ("units", "flat", "heads", "auto")


def attach(model: "Model", sae: SAE, *, site: str | None = None, check: bool = True) -> str:
    """Add ``sae``'s features to ``model``'s sites and return the new site's name.

    ``site`` overrides where the SAE reads (else ``sae.site``, else its config's hook name
    mapped by :mod:`.hooknames`). ``check``: run one tiny forward pass to compare the base
    site's width with the SAE's ``d_in`` now, rather than at the first real batch. Attaching
    the same SAE again returns the same name; another SAE under a taken name is refused.
    """
    from ..models import Model

    if not isinstance(model, Model):
        raise InputError("attach(): give an actscope Model (actscope.load(...) or actscope.wrap(module)), which keeps the new site")
    base = base_site(model, sae, site)
    name = feature_site_name(base, sae)
    existing = model.catalog.get(name)
    if existing is not None:
        if getattr(existing.hook.read, "sae", None) is sae:
            return name
        raise SiteError(f"two SAEs would both be '{name}' on {model.name}; name them apart: NAME=DIR on the command line "
                        f"(e.g. --sae wide=DIR), load_sae(..., name='wide') in Python, which gives '{base.name}.{sae.kind}_wide'")
    writes = out_site(model, sae, base) if sae.transcoder else base
    if check:
        _check_width(model, base, sae.d_in, "reads")
        if sae.transcoder:
            _check_width(model, writes, sae.d_out, "writes")
    hook = Hook(base.path, base.hook.at, feature_reader(sae, base, writes), "flat" if base.hook.layout == "flat" else "units")
    model.add_site(SiteEntry(name, base.path, hook, base.index))
    return name


def feature_site_name(base: "Site", sae: SAE) -> str:
    if sae.name is not None and not NAME.match(sae.name):
        raise InputError(f"SAE name {sae.name!r}: use letters, digits and underscores only (it becomes part of a site name)")
    return f"{base.name}.{sae.kind}" + (f"_{sae.name}" if sae.name else "")


def base_site(model: "Model", sae: SAE, site: str | None = None) -> "Site":
    """The one whole site ``sae`` reads on ``model``."""
    chosen = site or sae.site or (site_for_hook(model, sae.hook_name, _what(sae)) if sae.hook_name else None)
    if not chosen:
        raise InputError(f"{_what(sae)} names no hook_name in its config; say where it reads: DIR@SITE on the command line, "
                         "site= in Python (e.g. 'blocks.3.resid.post')")
    return _one_site(model, chosen, sae, "reads")


def out_site(model: "Model", sae: SAE, base: "Site") -> "Site":
    chosen = sae.out_site or (site_for_hook(model, sae.hook_name_out, _what(sae)) if sae.hook_name_out else None)
    if not chosen:
        raise InputError(f"{_what(sae)} is a transcoder whose config names no hook_name_out (where it writes); add it to its config")
    return _one_site(model, chosen, sae, "writes")


def _one_site(model: "Model", name: str, sae: SAE, verb: str) -> "Site":
    from ..sites import plan_sites

    sites = plan_sites(model, name).sites
    if len(sites) != 1 or sites[0].units is not None or sites[0].heads is not None:
        raise InputError(f"{_what(sae)} {verb} '{name}', which is {len(sites)} sites or a selection; give one whole site, e.g. blocks.3.resid.post")
    site = sites[0]
    if site.hook.layout not in READABLE or getattr(site.hook.read, "sae", None) is not None:
        raise InputError(f"{_what(sae)} {verb} {site.name}, whose tensor ({site.hook.layout}) has no vector per token; "
                         "an SAE reads a residual, MLP or attention-output site")
    return site


def _what(sae: SAE) -> str:
    return f"the {sae.kind} at {sae.path}" if sae.path else f"the {sae.kind}"


def _check_width(model: "Model", site: "Site", width: int, verb: str) -> None:
    """One tiny forward pass: ``site``'s vector per token must have ``width`` entries."""
    from ..sites import Plan
    from ..trace import capture

    inputs = model.example_inputs()
    if inputs is None:
        return
    with torch.no_grad(), capture(model, Plan((site,)), announce=False, flat=True) as captured:
        model(**inputs)
    values = captured.tensor(site.label)
    if values.numel() and values.shape[-1] != width:
        raise InputError(f"the SAE {verb} {width} dimensions per token, but {site.name} of {model.name} has {values.shape[-1]}; "
                         "it was trained on another model or site (check its hook_name, or pass DIR@SITE)")


# -- the reader ---------------------------------------------------------------------------------
def as_vectors(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A base site's tensor with one vector per token on the last axis (heads concatenated)."""
    return x.reshape(*x.shape[:-2], -1) if layout == "heads" else x


def feature_reader(sae: SAE, base: "Site", writes: "Site") -> Any:
    """The reader of the feature site (see the module docstring)."""
    base_read = base.hook.reader()
    layout = base.hook.layout

    def read(call: HookCall, ctx: ReadContext) -> torch.Tensor | None:
        x = base_read(call, ctx)
        if x is None:
            return None
        x = as_vectors(x, layout)
        if x.shape[-1] != sae.d_in:
            raise InputError(f"the SAE reads {sae.d_in} dimensions per token but {base.name} has {x.shape[-1]}; it was trained "
                             "on another model or site (check its hook_name, or pass DIR@SITE)")
        return sae.on(x.device).encode(x)

    def write_back(call: HookCall, ctx: ReadContext, tensor: torch.Tensor, features: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        if edited is features or (not edited.requires_grad and torch.equal(edited, features)):
            return tensor  # no feature changed: the module's own tensor, untouched
        x = as_vectors(base_read(call, ctx), layout)
        delta = sae.on(x.device).decode_delta(edited - features, x)
        return tensor + delta.to(tensor.dtype).reshape(tensor.shape)

    def decode_directions(model: "Model") -> tuple[torch.Tensor, Any]:
        from .directions import feature_directions

        return feature_directions(model, sae, writes)

    def delta(call: HookCall, ctx: ReadContext, features: torch.Tensor, edited: torch.Tensor) -> torch.Tensor | None:
        """A transcoder's change to the site it writes: ``decode(f') − decode(f)``, None if no feature changed."""
        if edited is features or (not edited.requires_grad and torch.equal(edited, features)):
            return None
        x = as_vectors(base_read(call, ctx), layout)
        return sae.on(x.device).decode_delta(edited - features, x)

    read.sae, read.base, read.writes = sae, base, writes
    read.decode_directions = decode_directions
    reason = _not_editable(sae, writes)
    if reason is not None:
        read.read_only = reason
    elif sae.transcoder:  # read here, written at its output site: edit adds decode(f') − decode(f) there
        read.write_to, read.delta = writes, delta
    else:
        read.write_back = write_back
    return read


def _not_editable(sae: SAE, written: "Site") -> str | None:
    """Why edited features cannot be written to the site the SAE reconstructs, or None."""
    read = written.hook.read
    if read not in PLAIN and getattr(read, "view_of", None) not in PLAIN[1:]:
        verb = "writes" if sae.transcoder else "reads"
        return f"its {sae.kind} {verb} {written.name}, which is computed from its module's tensor, so edited features cannot be written back"
    return None
