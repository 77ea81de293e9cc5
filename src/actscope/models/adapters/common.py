"""Readers and site-table builders shared by several families."""
from __future__ import annotations

from typing import Any

import torch

from .base import Hook, HookCall, ReadContext, Reader, read_input, read_output, read_output_item


def config_value(config: Any, *names: str) -> int:
    """The first of ``names`` that the config (or its text sub-config) defines."""
    for source in (config, getattr(config, "text_config", None)):
        for name in names:
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                return int(value)
    raise AttributeError(f"config defines none of {names}")


def n_heads(config: Any) -> int:
    return config_value(config, "num_attention_heads", "n_head", "num_heads")


def n_kv_heads(config: Any) -> int:
    try:
        return config_value(config, "num_key_value_heads")
    except AttributeError:
        return n_heads(config)


def split_heads(base: Reader, heads: Any = n_heads) -> Reader:
    """Reshape ``[batch, pos, heads·d_head]`` from ``base`` into ``[batch, pos, head, d_head]``."""

    def read(call: HookCall, ctx: ReadContext) -> torch.Tensor:
        x = base(call, ctx)
        count = heads(ctx.config)
        return x.reshape(*x.shape[:-1], count, x.shape[-1] // count)

    read.view_of = base  # a pure reshape of base's tensor: edits can write back through it
    return read


attention_weights = read_output_item(1)


def decoder_sites(
    *,
    layer: str,
    attn: str,
    mlp: str,
    q: str,
    v: str,
    o: str,
    ln_mid: str,
    up: str,
    down: str,
    embed: str,
    lm_head: str = "lm_head",
    v_read: Reader | None = None,
    pre_read: Reader | None = None,
) -> dict[str, Hook]:
    """The canonical sites of a pre-norm decoder block given its module names.

    Paths are relative to the block (``layer`` is the block template, e.g. ``layers.{i}``).
    ``up`` is the projection whose output is the pre-activation (``gate_proj`` for gated
    MLPs); ``down`` is the output projection whose *input* is the neuron. ``v_read`` and
    ``pre_read`` replace the default readers of ``attn.v`` and ``mlp.pre`` for fused
    projections (a fused qkv or gate-and-up matrix).
    """
    block = layer
    return {
        "embed": Hook(embed, "output"),
        "blocks.{i}.resid.pre": Hook(block, "input"),
        "blocks.{i}.resid.mid": Hook(f"{block}.{ln_mid}", "input"),
        "blocks.{i}.resid.post": Hook(block, "output"),
        "blocks.{i}.attn.pattern": Hook(f"{block}.{attn}", "output", attention_weights, "pattern", needs_eager=True),
        "blocks.{i}.attn.v": Hook(f"{block}.{attn}.{v}", "output", v_read or split_heads(read_output, n_kv_heads), "heads"),
        "blocks.{i}.attn.z": Hook(f"{block}.{attn}.{o}", "input", split_heads(read_input), "heads"),
        "blocks.{i}.attn.out": Hook(f"{block}.{attn}", "output"),
        "blocks.{i}.mlp.pre": Hook(f"{block}.{mlp}.{up}", "output", pre_read),
        "blocks.{i}.mlp.post": Hook(f"{block}.{mlp}.{down}", "input"),
        "blocks.{i}.mlp.out": Hook(f"{block}.{mlp}", "output"),
        "logits": Hook(lm_head, "output"),
    }


def fused_value(parts: Any, heads: Any = n_kv_heads) -> Reader:
    """Per-head values from a fused q|k|v projection laid out as consecutive blocks.

    ``parts(config)`` gives ``(query heads, key heads, value heads)``; the output's last axis
    is ``[q heads·d_head | k heads·d_head | v heads·d_head]`` (GPT-2's ``c_attn``, Phi-3's
    ``qkv_proj``). Returns ``[batch, pos, value head, d_head]``.
    """

    def read(call: HookCall, ctx: ReadContext) -> torch.Tensor:
        qkv = read_output(call, ctx)
        q, k, v = parts(ctx.config)
        d_head = qkv.shape[-1] // (q + k + v)
        values = qkv[..., (q + k) * d_head:]
        return values.reshape(*values.shape[:-1], v, d_head)

    return read


def mha_parts(config: Any) -> tuple[int, int, int]:
    """Head counts of a fused projection with as many key/value heads as query heads."""
    heads = n_heads(config)
    return heads, heads, heads


def gqa_parts(config: Any) -> tuple[int, int, int]:
    """Head counts of a fused projection with grouped key/value heads."""
    kv = n_kv_heads(config)
    return n_heads(config), kv, kv


def first_half(call: HookCall, ctx: ReadContext) -> torch.Tensor:
    """The first half of the last axis: the gate of a fused ``[gate | up]`` projection."""
    return read_output(call, ctx).chunk(2, dim=-1)[0]
