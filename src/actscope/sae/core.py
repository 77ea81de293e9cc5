"""A sparse autoencoder (or transcoder) as SAELens computes it: ``encode``, ``decode`` and the
linear part of decoding that edits add to a site (``decode_delta``).

For an input ``x`` ``[..., d_in]`` (attention heads already concatenated, as SAELens's
``hook_z`` reshaping does) in the SAE's dtype:

* normalisation in (``normalize_activations``): ``"none"``; ``"constant_norm_rescale"``
  ``x · √d_in / ‖x‖`` per token; ``"layer_norm"`` ``(x − μ) / (σ + 1e-5)`` per token (σ the
  unbiased standard deviation, as ``torch.std``). ``"expected_average_only_in"`` is folded into
  the weights when the SAE is loaded (see :mod:`.files`), so it never reaches here;
* ``sae_in = x − b_dec`` when ``apply_b_dec_to_input`` (never for transcoders);
* ``pre = sae_in @ W_enc + b_enc`` (top-k with ``rescale_acts_by_decoder_norm``: ``· ‖W_dec[j]‖``);
* activation: ``standard`` ReLU; ``jumprelu`` ``ReLU(pre) · [pre > threshold]``; ``topk`` the
  ``k`` largest ``pre`` per token, ReLU'd, the rest 0;
* ``decode(f) = f @ W_dec + b_dec`` (top-k rescaled: ``f / ‖W_dec[j]‖`` first), then the
  normalisation undone with the input's own statistics (``/ coeff``, or ``· σ + μ``); a
  transcoder's output is not un-normalised (SAELens), and a skip transcoder adds ``x @ W_skipᵀ``.

The reconstruction error of a token is ``x − decode(encode(x))``. An edit that changes the
features from ``f`` to ``f'`` replaces ``x`` by ``decode(f') + (x − decode(f))``, computed as
``x + decode_delta(f' − f, x)``: the delta is linear in ``f' − f``, so an edit that changes no
feature adds exactly zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

ARCHITECTURES = ("standard", "jumprelu", "topk")
NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True, eq=False)
class SAE:
    """One sparse autoencoder's weights and settings (see the module docstring).

    ``hook_name`` is where it reads, as its config says (a TransformerLens hook name or an
    actscope site), ``site`` an explicit actscope site overriding it; transcoders write at
    ``hook_name_out`` (``out_site``). ``name`` tells several SAEs on one site apart in site names.
    """

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_out]
    b_dec: torch.Tensor  # [d_out]
    architecture: str = "standard"
    threshold: torch.Tensor | None = None  # [d_sae], jumprelu
    k: int | None = None  # topk
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    W_skip: torch.Tensor | None = None  # [d_out, d_in], skip transcoders
    transcoder: bool = False
    hook_name: str | None = None
    hook_name_out: str | None = None
    site: str | None = None
    out_site: str | None = None
    name: str | None = None
    path: str | None = None
    config: dict = field(default_factory=dict)  # the config as read (cfg.json)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def kind(self) -> str:
        return "transcoder" if self.transcoder else "sae"

    def __repr__(self) -> str:
        where = self.site or self.hook_name or "?"
        out = f" → {self.out_site or self.hook_name_out}" if self.transcoder else ""
        return f"SAE({self.architecture}{' transcoder' if self.transcoder else ''}, d_in={self.d_in}, d_sae={self.d_sae}, at {where}{out})"

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SAE":
        """A copy with every tensor on ``device`` and/or in ``dtype``."""
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        return replace(self, W_enc=move(self.W_enc), b_enc=move(self.b_enc), W_dec=move(self.W_dec), b_dec=move(self.b_dec),
                       threshold=move(self.threshold), W_skip=move(self.W_skip))

    # -- the computation ----------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` of ``x`` ``[..., d_in]`` (in the SAE's dtype)."""
        return self.activate(self.pre_activation(x))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_sae]``: the encoder's output before the activation function."""
        sae_in = self._normalised(x.to(self.dtype))
        if self.apply_b_dec_to_input and not self.transcoder:
            sae_in = sae_in - self.b_dec
        pre = sae_in @ self.W_enc + self.b_enc
        return pre * self.decoder_norms() if self.rescale_acts_by_decoder_norm else pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if self.architecture == "topk":
            k = min(int(self.k), pre.shape[-1])
            top = torch.topk(pre, k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def decode(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[..., d_out]`` of features ``f``; ``x`` is the input they were
        encoded from (its normalisation statistics, and a skip transcoder's skip path)."""
        out = self._linear(f) + self.b_dec
        if not self.transcoder:
            out = self._denormalised(out, x.to(self.dtype), shift=True)
        elif self.W_skip is not None:
            out = out + x.to(self.dtype) @ self.W_skip.T
        return out

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x), x)

    def decode_delta(self, df: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``decode(f + df) − decode(f)`` for features of input ``x``: linear in ``df``, exactly
        zero where ``df`` is."""
        out = self._linear(df)
        return out if self.transcoder else self._denormalised(out, x.to(self.dtype), shift=False)

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=-1)  # [d_sae]

    def _linear(self, f: torch.Tensor) -> torch.Tensor:
        f = f.to(self.dtype)
        if self.rescale_acts_by_decoder_norm:
            f = f / self.decoder_norms()
        return f @ self.W_dec

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize_activations == "constant_norm_rescale":
            return x * (self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True))
        if self.normalize_activations == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            return centred / (centred.std(dim=-1, keepdim=True) + LAYER_NORM_EPS)
        return x

    def _denormalised(self, out: torch.Tensor, x: torch.Tensor, *, shift: bool) -> torch.Tensor:
        """Undo the input normalisation on a reconstruction (``shift``) or on a difference of two."""
        if self.normalize_activations == "constant_norm_rescale":
            return out / (self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True))
        if self.normalize_activations == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            scaled = out * (x - mean).std(dim=-1, keepdim=True)
            return scaled + mean if shift else scaled
        return out

    def fingerprint(self) -> str:
        """sha256 over the settings and every tensor's bytes: the same SAE, the same text."""
        import hashlib

        digest = hashlib.sha256(repr((self.architecture, self.k, self.apply_b_dec_to_input, self.normalize_activations,
                                      self.rescale_acts_by_decoder_norm, self.transcoder)).encode())
        for tensor in (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold, self.W_skip):
            if tensor is not None:
                digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def on(self, device: torch.device) -> "SAE":
        """This SAE with its tensors on ``device`` (a cached copy; itself when already there)."""
        if self.W_enc.device == device:
            return self
        cache: dict[Any, SAE] = self.__dict__.setdefault("_copies", {})
        if device not in cache:
            cache[device] = self.to(device)
        return cache[device]
