"""Neuron → vocabulary decoding (METHODS.md, "Explanation and intervention").

A neuron's output direction ``W_out[:, i]`` (the column of the MLP output projection it feeds,
``[d_model]``) is mapped through the final norm and the unembedding, and the tokens it pushes up
(promoted, highest scores) and down (suppressed, lowest scores) are read off:

    score(i, t) = W_U[t] · N(W_out[:, i])

* ``N``, the norm as a linear map *(our choice)*: a norm is not linear, but for one token it is
  ``x ↦ g ⊙ (x − centre(x)) / s(x) + b`` with a per-token scalar ``s(x) > 0``. The scalar does
  not change a neuron's ranking and the bias ``b`` is added whatever the neuron does, so both
  are left out: a LayerNorm maps ``d ↦ g ⊙ (d − mean(d))``, an RMSNorm ``d ↦ g ⊙ d`` (Gemma's
  RMSNorm scales by ``1 + g``). Pre-norm decoders apply their final norm (``norm``, ``ln_f``,
  ``final_layer_norm``; then OPT's ``project_out`` where it exists). Post-norm encoders (BERT,
  RoBERTa, MiniLM) have no final norm; there the direction passes, on the residual path, the
  neuron's own block's ``output.LayerNorm`` and both LayerNorms of every later block, so ``N``
  is the composition of those maps (the sub-layers of later blocks are ignored, as in the
  logit lens).
* ``W_U`` *(our choice)*: the output embedding (``lm_head``) when the model has one, else the
  input embedding matrix (tied embeddings; bare encoders such as MiniLM). A masked-LM head's
  transform (dense → GELU → LayerNorm, BERT's ``cls.predictions.transform``) is nonlinear and
  is skipped: only its decoder matrix (the tied embeddings) is used. Output biases are left
  out for the same reason as the norm's.

Special tokens (padding, unknown, BOS, CLS, SEP, MASK …, every id in the tokenizer's
``all_special_ids`` except EOS, which models do predict) are left out by default *(our choice)*:
a model never predicts them, so in small models their untrained unembedding rows dominate the
ranking; pass ``skip_special=False`` to keep them.

Scores are computed in bulk: one matrix product ``W_U @ N(W_out)`` per chunk of units (float64),
then top-k along the vocabulary, never a loop over units. MoE experts' neurons
(``blocks.{i}.moe.experts.{e}.post``) use that expert's slice of the fused ``down_proj``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..results import TableResult
from ..sites import Site
from ..models import Model, ModelLike

F64 = torch.float64
LinearMap = Callable[[torch.Tensor], torch.Tensor]  # [d_in, units] → [d_out, units]
SCORE_BYTES = 1 << 26  # float64 scores kept at once per chunk of units (64 MiB)


@dataclass(frozen=True, eq=False)
class DecodedNeurons(TableResult):
    """One row per (site, unit, direction, rank): a decoded token and its score.

    ``target`` says which token of a context the decoded tokens should match in
    :func:`decode_agreement`: ``"next"`` for causal LMs (a neuron at position p writes into
    the prediction of token p + 1), ``"same"`` for encoders (the prediction at position p)."""

    table_name: ClassVar[str] = "decode"

    site: np.ndarray  # [rows] object, the site name without unit selection
    layer: np.ndarray  # [rows] int64
    unit: np.ndarray  # [rows] int64
    direction: np.ndarray  # [rows] object, "promoted" or "suppressed"
    rank: np.ndarray  # [rows] int64, 0 = strongest
    token_id: np.ndarray  # [rows] int64
    token: np.ndarray  # [rows] object, tokenizer.decode([token_id]) (or the id as text)
    score: np.ndarray  # [rows] float64, W_U[t] · N(W_out[:, unit])
    target: str = "next"

    def to_table(self) -> dict[str, np.ndarray]:
        return {
            "site": self.site, "layer": self.layer, "unit": self.unit, "rank": self.rank,
            "token_id": self.token_id, "token": self.token, "score": self.score, "direction": self.direction,
        }

    def tokens(self, site: str, unit: int, direction: str = "promoted") -> list[str]:
        """The decoded tokens of one unit, strongest first."""
        keep = (self.site == site) & (self.unit == unit) & (self.direction == direction)
        order = np.argsort(self.rank[keep], kind="stable")
        return list(self.token[keep][order])


def decode(model: ModelLike, sites: str | Sequence[str] = "blocks.*.mlp.post", *, top: int = 10, skip_special: bool = True) -> DecodedNeurons:
    """The ``top`` promoted and suppressed tokens of every unit of ``sites`` (neuron sites:
    ``blocks.{i}.mlp.post``, ``moe.shared.post``, ``moe.experts.{e}.post``; unit selections
    like ``blocks.3.mlp.post[17]`` decode only those units). ``skip_special``: leave out the
    tokenizer's special tokens except EOS (see the module docstring)."""
    from ..models import as_model
    from ..sites import plan_sites

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"decode(): top must be a whole number >= 1, got {top!r}")
    model = as_model(model, None)
    unembed = unembedding(model)  # [vocab, d_model], where the scores are computed
    skipped = _special_tokens(model.tokenizer, unembed.shape[0]) if skip_special else torch.zeros(unembed.shape[0], dtype=torch.bool)
    top = min(top, int((~skipped).sum()))
    skipped = skipped.to(unembed.device)
    parts = [_decode_site(model, site, unembed, top, skipped) for site in plan_sites(model, sites).sites]
    columns = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    columns["token"] = _token_texts(model.tokenizer, columns["token_id"])
    return DecodedNeurons(**columns, target="same" if _is_encoder(model) else "next")


def _decode_site(model: Model, site: Site, unembed: torch.Tensor, top: int, skipped: torch.Tensor) -> dict[str, np.ndarray]:
    derived = getattr(site.hook.read, "decode_directions", None)  # a derived site (SAE features) says where its units write
    w_out, mapping = derived(model) if derived is not None else (neuron_directions(model, site), residual_map(model, site.layer))
    units = np.asarray(site.units if site.units is not None else range(w_out.shape[1]), dtype=np.int64)
    if units.size and units.max() >= w_out.shape[1]:
        raise InputError(f"{site.label}: unit {int(units.max())} is out of range; {site.name} has {w_out.shape[1]} units (0-{w_out.shape[1] - 1})")
    # A model split over devices keeps the layer and the unembedding apart: work on the latter's.
    chosen = w_out.index_select(1, torch.as_tensor(units, device=w_out.device)).to(unembed.device)
    directions = mapping(chosen)  # [d_model', units]
    if directions.shape[0] != unembed.shape[1]:
        raise InputError(f"{site.label}: the mapped direction has {directions.shape[0]} dimensions but the unembedding expects {unembed.shape[1]}")
    promoted, suppressed = top_tokens(unembed, directions, top, skipped)
    return _rows(site, units, promoted, suppressed, top)


def top_tokens(
    unembed: torch.Tensor, directions: torch.Tensor, top: int, skipped: torch.Tensor | None = None
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """``((scores, ids), (scores, ids))`` of the promoted and suppressed tokens, each
    ``[units, top]``, from ``unembed`` ``[vocab, d]`` and ``directions`` ``[d, units]``;
    ``skipped`` ``[vocab]`` bool marks tokens never returned."""
    skipped = torch.zeros(unembed.shape[0], dtype=torch.bool) if skipped is None else skipped
    skipped = skipped.to(unembed.device)
    chunk = max(1, SCORE_BYTES // (8 * unembed.shape[0]))
    high, low = [], []
    for start in range(0, directions.shape[1], chunk):
        scores = unembed @ directions[:, start:start + chunk]  # [vocab, chunk]
        high.append(torch.topk(scores.masked_fill(skipped[:, None], -torch.inf), top, dim=0))
        low.append(torch.topk(scores.masked_fill(skipped[:, None], torch.inf), top, dim=0, largest=False))
    join = lambda found: (torch.cat([f.values for f in found], 1).T, torch.cat([f.indices for f in found], 1).T)  # noqa: E731
    return join(high), join(low)


def _rows(site: Site, units: np.ndarray, promoted: tuple, suppressed: tuple, top: int) -> dict[str, np.ndarray]:
    count = len(units)
    per_direction = count * top
    ranks = np.tile(np.arange(top, dtype=np.int64), count)
    return {
        "site": np.array([site.name] * (2 * per_direction), dtype=object),
        "layer": np.full(2 * per_direction, -1 if site.layer is None else site.layer, dtype=np.int64),
        "unit": np.tile(np.repeat(units, top), 2),
        "direction": np.array(["promoted"] * per_direction + ["suppressed"] * per_direction, dtype=object),
        "rank": np.tile(ranks, 2),
        "token_id": torch.cat([promoted[1].reshape(-1), suppressed[1].reshape(-1)]).cpu().numpy().astype(np.int64),
        "token": np.empty(2 * per_direction, dtype=object),
        "score": torch.cat([promoted[0].reshape(-1), suppressed[0].reshape(-1)]).cpu().numpy().astype(np.float64),
    }


# -- the three matrices ----------------------------------------------------------------------
def neuron_directions(model: Model, site: Site) -> torch.Tensor:
    """``W_out`` ``[d_model, d_ff]`` (float64) of a neuron site: column i is unit i's direction."""
    from ..metrics.cett.core import output_projection

    model.require_card("decoding", "a neuron's path to the vocabulary (its output projection, the final norm, the unembedding)")
    if site.hook.layout == "tokens" and "e" in dict(site.index):
        return _expert_down(model, site)
    whole = Site(site.name, site.path, site.hook, site.index)
    try:
        return output_projection(model, whole)[0]
    except InputError as error:
        raise InputError(f"{site.label}: decoding needs an MLP neuron site (blocks.{{i}}.mlp.post); {error}") from None


def _expert_down(model: Model, site: Site) -> torch.Tensor:
    from ..models.adapters.base import dense_weight

    module = model.module.get_submodule(site.path)
    weight = dense_weight(module, "down_proj")  # offloaded or quantised: the real values
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise InputError(f"{site.label}: {site.path} has no fused down_proj [experts, hidden, d_expert] to decode")
    down = weight[dict(site.index)["e"]].detach().to(F64)
    return down.T.contiguous() if getattr(module, "is_transposed", False) else down  # [hidden, d_expert]


def unembedding(model: Model) -> torch.Tensor:
    """``W_U`` ``[vocab, d_model]`` (float64): the output embedding, else the (tied) input one;
    dequantised or read from accelerate's offload where the model keeps it so."""
    from ..models.adapters.base import dense_weight

    module = model.module
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        found = getattr(module, getter, lambda: None)()
        weight = dense_weight(found) if isinstance(found, torch.nn.Module) else None
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return weight.detach().to(F64)
    raise InputError(f"{model.name} has neither an output nor an input embedding matrix, so neurons cannot be decoded into tokens")


def residual_map(model: Model, layer: int | None) -> LinearMap:
    """``N``: the norms between block ``layer``'s MLP output and the unembedding, as one linear map."""
    from ..models.model import resolve_module

    root, readout = model.module, _readout(model)
    if readout.post_norms is not None:
        prefix = resolve_module(root, model.adapter.blocks)[0]
        names = [f"{prefix}.{layer}.{readout.post_norms[1]}"] + [
            f"{prefix}.{j}.{part}" for j in range(layer + 1, model.n_layers) for part in readout.post_norms
        ]
        maps = [norm_map(root.get_submodule(name), readout.norm_offset) for name in names]
    else:
        found = [resolve_module(root, path) for path in readout.final]
        maps = [linear_map(module, readout.norm_offset) for _, module in filter(None, found) if module is not None]

    def apply(directions: torch.Tensor) -> torch.Tensor:
        for step in maps:
            directions = step(directions)
        return directions

    return apply


def _readout(model: Model) -> Any:
    from ..models.adapters import Readout

    return model.adapter.readout if model.adapter is not None else Readout()


def linear_map(module: torch.nn.Module, norm_offset: float) -> LinearMap:
    """A module after the last block as a linear map on directions: a projection (OPT's
    ``project_out``) is its weight, anything else a norm."""
    if isinstance(module, torch.nn.Linear):
        from ..models.adapters import out_in_weight

        weight = out_in_weight(module).detach().to(F64)
        return lambda d: weight.to(d.device) @ d
    return norm_map(module, norm_offset)


def norm_map(norm: torch.nn.Module, offset: float = 0.0) -> LinearMap:
    """A norm module as the linear map on directions ``[d, units]`` described above; an
    RMSNorm scales by ``offset + weight`` (the card's ``norm_offset``: Gemma's is 1)."""
    from ..models.adapters.base import dense_weight

    weight = dense_weight(norm)  # offloaded: the values its hook would load
    gain = torch.ones(1, dtype=F64) if weight is None else weight.detach().to(F64)
    name = type(norm).__name__
    if "RMS" not in name and ("LayerNorm" in name or getattr(norm, "bias", None) is not None):
        return lambda d: gain.to(d.device)[:, None] * (d - d.mean(dim=0, keepdim=True))
    gain = offset + gain
    return lambda d: gain.to(d.device)[:, None] * d


def _is_encoder(model: Model) -> bool:
    return _readout(model).bidirectional and not getattr(model.config, "is_decoder", False)


def _special_tokens(tokenizer: Any, vocab: int) -> torch.Tensor:
    """``[vocab]`` bool: the tokenizer's special ids except EOS (none without a tokenizer)."""
    skipped = torch.zeros(vocab, dtype=torch.bool)
    ids = set(getattr(tokenizer, "all_special_ids", None) or []) - {getattr(tokenizer, "eos_token_id", None)}
    ids = [i for i in ids if isinstance(i, int) and 0 <= i < vocab]
    skipped[ids] = True
    return skipped


def _token_texts(tokenizer: Any, ids: np.ndarray) -> np.ndarray:
    if tokenizer is None:
        return np.array([str(i) for i in ids.tolist()], dtype=object)
    unique = {i: tokenizer.decode([i]) for i in set(ids.tolist())}
    return np.array([unique[i] for i in ids.tolist()], dtype=object)


# -- agreement with the top-activating contexts ------------------------------------------------
@dataclass(frozen=True, eq=False)
class DecodeAgreement(TableResult):
    """One row per decoded (site, unit): how often its top-activating contexts continue with one
    of its promoted tokens (see :func:`decode_agreement`)."""

    table_name: ClassVar[str] = "decode_agreement"

    site: np.ndarray  # [rows] object
    layer: np.ndarray  # [rows] int64
    unit: np.ndarray  # [rows] int64
    examples: np.ndarray  # [rows] int64, top-activating examples the run holds for the unit
    matches: np.ndarray  # [rows] int64, examples whose target token is a promoted token
    agreement: np.ndarray  # [rows] float64, matches / examples (NaN without examples)

    def to_table(self) -> dict[str, np.ndarray]:
        return {
            "site": self.site, "layer": self.layer, "unit": self.unit, "examples": self.examples,
            "matches": self.matches, "agreement": self.agreement,
        }


def decode_agreement(decoded: DecodedNeurons, run: Any, *, top: int | None = None, target: str | None = None) -> DecodeAgreement:
    """Agreement of each decoded unit with its top-activating examples in ``run`` *(our choice)*.

    For unit u with examples E_u (``run.examples`` rows of the same site and unit) and promoted
    tokens P_u (ranks < ``top``, default all decoded), agreement = |{e ∈ E_u : w(e) ∈ P_u}| / |E_u|
    where w(e) is the example's target word: with ``target="next"`` (causal LMs, the default for
    them) the first whitespace-separated word of its right context, with ``"same"`` (encoders)
    its activating token. Tokens and words are compared as text with surrounding whitespace and
    the word markers ``Ġ``/``▁`` removed. Exact for word-level tokenizers; with sub-word
    tokenizers only whole-word tokens can match, so it is a lower bound. Chance level is about
    |P_u| × (the frequency of a typical target word).
    """
    target = target or decoded.target
    if target not in ("next", "same"):
        raise InputError(f"decode_agreement(): target must be 'next' or 'same', got {target!r}")
    examples = run.examples.to_pydict() if hasattr(run, "examples") else run.table("examples").to_pydict()
    by_unit: dict[tuple[str, int], list[str]] = {}
    for site, unit, token, right in zip(examples["site"], examples["unit"], examples["token"], examples["right"]):
        word = _clean(token) if target == "same" else (right.split() or [""])[0]
        by_unit.setdefault((site.split("[")[0], int(unit)), []).append(_clean(word))
    return _agreement_rows(decoded, by_unit, top)


def _agreement_rows(decoded: DecodedNeurons, by_unit: dict, top: int | None) -> DecodeAgreement:
    keep = (decoded.direction == "promoted") & (decoded.rank < (top if top is not None else np.iinfo(np.int64).max))
    promoted: dict[tuple[str, int], set[str]] = {}
    layers: dict[tuple[str, int], int] = {}
    for site, layer, unit, token in zip(decoded.site[keep], decoded.layer[keep], decoded.unit[keep], decoded.token[keep]):
        promoted.setdefault((site, int(unit)), set()).add(_clean(token))
        layers[(site, int(unit))] = int(layer)
    keys = list(promoted)
    words = [by_unit.get(key, []) for key in keys]
    matches = [sum(w in (promoted[key] - {""}) for w in found) for key, found in zip(keys, words)]
    counts = np.array([len(found) for found in words], dtype=np.int64)
    return DecodeAgreement(
        site=np.array([k[0] for k in keys], dtype=object),
        layer=np.array([layers[k] for k in keys], dtype=np.int64),
        unit=np.array([k[1] for k in keys], dtype=np.int64),
        examples=counts,
        matches=np.array(matches, dtype=np.int64),
        agreement=np.where(counts > 0, np.array(matches, dtype=np.float64) / np.maximum(counts, 1), np.nan),
    )


def _clean(text: str) -> str:
    return text.strip().lstrip("Ġ▁").strip()
