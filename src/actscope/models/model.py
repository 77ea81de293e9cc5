"""The Model wrapper: a module, its tokenizer, and the table of sites it offers."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import torch

from .adapters import Adapter, Hook, Router, card_for, resolve_module  # resolve_module: re-exported here too

# Upper bound of the ``{e}`` placeholder when an adapter counts experts.
PLACEHOLDERS = ("i", "e")


@dataclass(frozen=True)
class SiteEntry:
    """One concrete canonical site of a model: where it hooks and which indices it has."""

    name: str
    path: str
    hook: Hook
    index: tuple[tuple[str, int], ...]

    @property
    def layer(self) -> int | None:
        return dict(self.index).get("i")


class Model:
    """A PyTorch module with what actscope needs to observe it.

    Build it with :func:`actscope.load` (a Hugging Face directory) or :func:`actscope.wrap`
    (any ``nn.Module``). Calling it calls the module.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        source: str | None = None,
        example_inputs: Mapping[str, Any] | None = None,
    ) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.name = name or type(module).__name__
        self.source = source
        self.config = getattr(module, "config", None)
        self.adapter: Adapter | None = card_for(module)  # by model_type, else by layout (models/adapters/layouts.py)
        self._example_inputs = dict(example_inputs) if example_inputs is not None else None
        self._derived: dict[str, SiteEntry] = {}  # sites computed from another site (SAE features): add_site

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        family = self.adapter.family if self.adapter else "no adapter (module: sites only)"
        return f"Model({self.name!r}, family={family}, layers={self.n_layers})"

    @property
    def family(self) -> str | None:
        return self.adapter.family if self.adapter else None

    @property
    def device(self) -> torch.device:
        """Where a forward call's inputs go: the device of the first parameter; for a model
        accelerate dispatched whose first parameter is offloaded (on the meta device), the device
        its modules run on, from accelerate's hooks, which move activations on from there."""
        device = next((tensor.device for tensor in self.module.parameters()), torch.device("cpu"))
        if device.type != "meta":
            return device
        for module in self.module.modules():
            hook = getattr(module, "_hf_hook", None)
            for candidate in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
                found = getattr(candidate, "execution_device", None)
                if found is not None:
                    return torch.device(found)
        return torch.device("cpu")

    @cached_property
    def n_layers(self) -> int | None:
        if self.adapter is None:
            return None
        found = resolve_module(self.module, self.adapter.blocks)
        return len(found[1]) if found else None

    @cached_property
    def n_experts(self) -> int:
        if self.adapter is None:
            return 0
        return int(self.adapter.experts(self.config))

    def router(self, caller: str) -> Router:
        """The card's mixture-of-experts routing rule; an InputError naming the families that
        have one when this model is not a mixture of experts actscope knows."""
        if self.adapter is None or self.adapter.router is None:
            from ..errors import InputError
            from .adapters import cards

            raise InputError(
                f"{caller}: {self.name} (family {self.family or 'unknown'}) is not a supported mixture-of-experts model; "
                f"supported: {', '.join(c.family for c in cards() if c.router is not None)}"
            )
        return self.adapter.router

    def require_card(self, caller: str, needs: str) -> None:
        """An InputError for ``caller``, which reads the canonical sites ``needs`` that only a family
        card gives, when this model has none (neither its own nor a matched layout's): module sites
        cannot stand in for them, so the message says so rather than suggest them."""
        if self.adapter is not None:
            return
        from ..errors import InputError
        from .adapters import cards

        model_type = getattr(self.config, "model_type", None)
        kind = f"model type '{model_type}'" if model_type else type(self.module).__name__
        raise InputError(
            f"{caller} reads {needs}, which only a family card gives; {self.name} ({kind}) has no card and its modules "
            f"match no carded family's layout, so it offers module sites only. Families with a card: "
            f"{', '.join(card.family for card in cards())}"
        )

    def require_generator(self, caller: str) -> None:
        """An InputError for ``caller`` when the module cannot ``generate`` text (an encoder, a
        model without a language-model head)."""
        if not callable(getattr(self.module, "generate", None)) or not getattr(self.module, "can_generate", lambda: False)():
            from ..errors import InputError

            raise InputError(f"{self.name} ({type(self.module).__name__}) does not generate text; {caller} needs a causal LM "
                             "(e.g. actscope.zoo.tiny_lm('relu')) or an encoder-decoder with its language-model head")

    def continuation(self, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
        """The new tokens in ``generate``'s ``sequences`` ``[batch, length]``: those after the
        prompt for a decoder; an encoder-decoder returns its decoder's tokens alone, so those after
        its start token."""
        if getattr(self.config, "is_encoder_decoder", False):
            return sequences[:, 1:]
        return sequences[:, prompt_length:]

    @property
    def catalog(self) -> dict[str, SiteEntry]:
        """Every canonical site this model offers, in a stable order, then the sites added with
        :meth:`add_site` (e.g. an attached SAE's features)."""
        if not self._derived:
            return self._card_catalog
        ordered = sorted(self._derived.items(), key=lambda kv: [(0, p, "") if isinstance(p, int) else (1, 0, p) for p in _natural_key(kv[0])])
        return {**self._card_catalog, **dict(ordered)}

    def add_site(self, entry: SiteEntry) -> None:
        """Offer ``entry``, a site computed from another one's tensor (its hook's reader does the
        computing; ``actscope.sae.attach`` adds an SAE's features this way), under its name,
        everywhere a site is taken. A name the model already has is refused."""
        if entry.name in self.catalog and self.catalog[entry.name] is not entry:
            from ..errors import SiteError

            raise SiteError(f"{self.name} already has a site named '{entry.name}'; give the new one another name")
        self._derived[entry.name] = entry

    @cached_property
    def _card_catalog(self) -> dict[str, SiteEntry]:
        if self.adapter is None:
            return {}
        entries: dict[str, SiteEntry] = {}
        for template, hook in self.adapter.sites.items():
            for index in self._expand(template + hook.path):
                found = resolve_module(self.module, hook.path.format(**index))
                if found is None:
                    continue
                name = template.format(**index)
                entries[name] = SiteEntry(name, found[0], hook, tuple(sorted(index.items())))
        return dict(sorted(entries.items(), key=lambda kv: _natural_key(kv[0])))

    def _expand(self, text: str) -> list[dict[str, int]]:
        ranges = {"i": range(self.n_layers or 0), "e": range(self.n_experts)}
        combos: list[dict[str, int]] = [{}]
        for key in PLACEHOLDERS:
            if "{" + key + "}" in text:
                combos = [dict(c, **{key: v}) for c in combos for v in ranges[key]]
        return combos

    def sites(self, shapes: bool = True) -> list:
        """The sites this model offers (name, hooked module, side, layout, shape)."""
        from ..trace import list_sites  # the one allowed upward import: a convenience of the wrapper

        return list_sites(self, shapes=shapes)

    @property
    def takes_images(self) -> bool:
        """A vision model: inputs are pixels, not tokens. Its config has an image size and channels,
        or (a CNN such as ResNet or ConvNeXt, whose config has no image size) the Hugging Face model
        names ``pixel_values`` as its main input."""
        if getattr(self.module, "main_input_name", None) == "pixel_values" and hasattr(self.config, "num_channels"):
            return True
        return hasattr(self.config, "image_size") and hasattr(self.config, "num_channels")

    def example_inputs(self) -> dict[str, Any] | None:
        """A tiny input for discovering site shapes (batch 1, a few positions)."""
        if self._example_inputs is not None:
            return self._example_inputs
        config = self.config
        if config is None:
            return None
        if self.takes_images:
            size = getattr(config, "image_size", None) or EXAMPLE_IMAGE_SIZE
            size = (size, size) if isinstance(size, int) else tuple(size)
            return {"pixel_values": torch.zeros(1, config.num_channels, *size, device=self.device)}
        vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 2)
        ids = torch.arange(EXAMPLE_POSITIONS, device=self.device).remainder(max(vocab, 1)).unsqueeze(0)
        return self.with_decoder_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def with_decoder_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` for an encoder-decoder model (T5, BART …, ``config.is_encoder_decoder``)
        given only encoder token ids: the decoder reads the same text, shifted right behind the
        config's ``decoder_start_token_id`` (teacher forcing, what BART does by itself and T5
        refuses to), so decoder position p sees token p − 1 and its mask is the encoder's. Any other
        model, or inputs that already say what the decoder reads, are returned as they are."""
        config = self.config
        ids = inputs.get("input_ids")
        if (not getattr(config, "is_encoder_decoder", False) or not isinstance(ids, torch.Tensor) or ids.dim() != 2
                or any(key in inputs for key in ("decoder_input_ids", "decoder_inputs_embeds", "labels"))):
            return inputs
        start = getattr(config, "decoder_start_token_id", None)
        start = getattr(config, "pad_token_id", None) if start is None else start
        if start is None:
            return inputs  # nothing to start the decoder with: the model's own forward says what it needs
        decoder = torch.cat([torch.full_like(ids[:, :1], int(start)), ids[:, :-1]], dim=1)  # [batch, pos]
        mask = inputs.get("attention_mask")
        extra = {"decoder_attention_mask": mask} if isinstance(mask, torch.Tensor) else {}
        return {**inputs, "decoder_input_ids": decoder, **extra}


EXAMPLE_POSITIONS = 7
EXAMPLE_IMAGE_SIZE = 224  # a vision model whose config gives no image size (a CNN takes any size): the usual one


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.replace("[", ".").split(".")]
