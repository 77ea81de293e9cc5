"""Where an SAE reads: its config's hook name (TransformerLens style) → an actscope site.

SAELens names a reading point the way TransformerLens does (``blocks.3.hook_resid_post``,
``blocks.3.attn.hook_z``, …). :data:`TL_HOOKS` maps each to the canonical site with the same
meaning in a pre-norm block (``x + f(norm(x))``: GPT-2, Llama, Gemma, OPT, ViT, …), whose card
offers it; :data:`POST_NORM` corrects the few that differ in a post-norm block
(``norm(x + f(x))``, BERT/RoBERTa/MiniLM, TransformerLens's ``BertBlock``), where the stream
points between sub-blocks are the un-normalised sums, which no actscope site reads. Which table
applies is read from the family's card (a readout with ``post_norms`` is post-norm), never from a
family name. A name that is already an actscope site (``blocks.3.resid.post``, or
``module:PATH@output``) is taken as it is.

Left out on purpose: ``hook_embed``/``hook_pos_embed`` (TransformerLens splits the token and
position embeddings; ``blocks.0.hook_resid_pre`` is their sum, the ``embed`` site),
``ln*.hook_normalized`` and ``ln*.hook_scale`` (TransformerLens's norm *before* its weight, which
it folds into the next layer; a Hugging Face model's norm output includes the weight), and
``attn.hook_pattern`` (not a vector per token).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from ..models import Model

# TransformerLens hook name (after "blocks.{i}.") → actscope site (after "blocks.{i}.").
TL_HOOKS: dict[str, str] = {
    "hook_resid_pre": "resid.pre",
    "hook_resid_mid": "resid.mid",
    "hook_resid_post": "resid.post",
    "hook_mlp_in": "resid.mid",  # what the MLP's norm reads, after attention (use_hook_mlp_in)
    "hook_attn_out": "attn.out",
    "hook_mlp_out": "mlp.out",
    "attn.hook_z": "attn.z",
    "attn.hook_v": "attn.v",
    "mlp.hook_pre": "mlp.pre",
    "mlp.hook_post": "mlp.post",
}

# Post-norm blocks: the stream after a sub-block's residual add, before its norm, has no site
# (None); TransformerLens's normalised block output is actscope's resid.post.
POST_NORM: dict[str, str | None] = {
    "hook_resid_mid": None,
    "hook_mlp_in": None,
    "hook_resid_post": None,
    "hook_normalized_resid_post": "resid.post",
}

TL_NAME = re.compile(r"^blocks\.(?P<i>\d+)\.(?P<hook>.+)$")


def table_for(model: "Model") -> dict[str, str | None]:
    """The hook-name table that applies to ``model``'s family (see the module docstring)."""
    return table_for_card(model.adapter)


def table_for_card(card: Any) -> dict[str, str | None]:
    """The hook-name table of a family card (None: a card-less model, pre-norm assumed)."""
    post_norm = card is not None and card.readout.post_norms is not None
    return {**TL_HOOKS, **POST_NORM} if post_norm else dict(TL_HOOKS)


def is_tl_name(name: str) -> bool:
    match = TL_NAME.match(name)
    return bool(match) and match["hook"] in {**TL_HOOKS, **POST_NORM}


def site_for_hook(model: "Model", hook_name: str, what: str = "the SAE") -> str:
    """The actscope site ``hook_name`` names on ``model``; an InputError naming the fix when the
    model has no such site."""
    name = hook_name.strip()
    match = TL_NAME.match(name)
    if match is None or match["hook"] not in {**TL_HOOKS, **POST_NORM}:
        return name  # an actscope site name: checked where it is planned
    table = table_for(model)
    target = table.get(match["hook"])
    family = model.family or "this model"
    if target is None:
        raise InputError(
            f"{what} reads '{hook_name}', which has no actscope site in {family} ({_reason(match['hook'], model)}); "
            "name the site yourself: DIR@SITE on the command line (e.g. --sae DIR@blocks.3.resid.post), site= in Python"
        )
    site = f"blocks.{match['i']}.{target}"
    if site not in model.catalog:
        have = sorted({n.split(".", 2)[2] for n in model.catalog if n.startswith("blocks.")})
        raise InputError(
            f"{what} reads '{hook_name}' = actscope's {site}, which {model.name} ({family}, {model.n_layers} blocks) does not "
            f"have; its block sites are {', '.join(have)}. Name the site yourself: DIR@SITE (site= in Python)"
        )
    return site


def _reason(hook: str, model: "Model") -> str:
    if hook in POST_NORM and hook not in ("hook_normalized_resid_post",):
        return "a post-norm block's un-normalised sum, which no module outputs"
    return "TransformerLens's post-norm block output; this family is pre-norm, use hook_resid_post"


def hook_for_site(model: "Model", site: str) -> str:
    """The TransformerLens hook name of an actscope site on ``model`` (what a saved SAE's
    ``hook_name`` says), or the site itself when no hook name means it."""
    return hook_for_card(model.adapter, site)


def hook_for_family(family: str | None, site: str) -> str:
    """:func:`hook_for_site` for a model known by its family name alone (e.g. from a harvested
    dataset's manifest); the site itself for a family without a card."""
    from ..models.adapters import cards

    card = next((c for c in cards() if c.family == family), None)
    return hook_for_card(card, site) if card is not None else site


def hook_for_card(card: Any, site: str) -> str:
    match = re.match(r"^blocks\.(\d+)\.(.+)$", site)
    if match is None:
        return site
    table = table_for_card(card)
    for hook, target in table.items():
        if target == match[2] and hook != "hook_mlp_in":
            return f"blocks.{match[1]}.{hook}"
    return site
