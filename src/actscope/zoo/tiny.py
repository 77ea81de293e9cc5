"""Tiny random-init models of every supported family, built from configs (no network).

``TINY_CONFIGS`` maps a family name to a function returning a small Hugging Face config
(2 blocks, hidden size 32–64, 4 heads, vocabulary 128, 4 experts with top-2 routing for MoE
families); :func:`tiny_model` builds the model class for it with a fixed seed, in eval mode,
together with a small example input. They exist for tests: their weights mean nothing.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

VOCAB = 128
HIDDEN = 32
HEADS = 4
LAYERS = 2
FFN = 64
EXPERTS = 4
TOP_K = 2
BATCH, POSITIONS = 2, 6
# A wider initialisation than the usual 0.02 keeps activations, attention patterns and
# routing decisions varied, so tests of tiny models compare non-degenerate numbers.
INIT_RANGE = 0.2


def _decoder_shape(**extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
        initializer_range=INIT_RANGE,
        **extra,
    )


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
        initializer_range=INIT_RANGE, bos_token_id=0, eos_token_id=0,
    )


def _gpt_neox() -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**_decoder_shape(bos_token_id=0, eos_token_id=0))


def _opt() -> Any:
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=64, init_std=INIT_RANGE,
        pad_token_id=1, bos_token_id=0, eos_token_id=0,
    )


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_decoder_shape(num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0))


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(**_decoder_shape(num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0))


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**_decoder_shape(num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0))


def _qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_decoder_shape(num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=0, eos_token_id=0))


def _gemma() -> Any:
    from transformers import GemmaConfig

    return GemmaConfig(**_decoder_shape(num_key_value_heads=2, head_dim=HIDDEN // HEADS))


def _gemma2() -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(
        **_decoder_shape(num_key_value_heads=2, head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=4)
    )


def _phi3() -> Any:
    from transformers import Phi3Config

    return Phi3Config(
        **_decoder_shape(num_key_value_heads=2, original_max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    )


def _bert() -> Any:
    from transformers import BertConfig

    return BertConfig(**_encoder_shape(), pad_token_id=0)


def _roberta() -> Any:
    from transformers import RobertaConfig

    # RoBERTa counts positions from pad_token_id + 1, so it needs two spare position slots.
    return RobertaConfig(**_encoder_shape(), pad_token_id=1, bos_token_id=0, eos_token_id=2)


def _encoder_shape() -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=64, initializer_range=INIT_RANGE,
    )


def _vit() -> Any:
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=32, patch_size=8, num_channels=3, initializer_range=INIT_RANGE,
    )


def _mixtral() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        **_decoder_shape(num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0)
    )


def _qwen2_moe() -> Any:
    from transformers import Qwen2MoeConfig

    # Block 1 is a dense MLP (mlp_only_layers), as some Qwen MoE checkpoints mix the two.
    return Qwen2MoeConfig(
        **_decoder_shape(num_key_value_heads=2, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                         moe_intermediate_size=48, shared_expert_intermediate_size=FFN, mlp_only_layers=[1],
                         pad_token_id=0, bos_token_id=0, eos_token_id=0)
    )


def _olmoe() -> Any:
    from transformers import OlmoeConfig

    return OlmoeConfig(
        **_decoder_shape(num_key_value_heads=HEADS, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0)
    )


TINY_CONFIGS: dict[str, Callable[[], Any]] = {
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "bert": _bert,
    "roberta": _roberta,
    "vit": _vit,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "olmoe": _olmoe,
}

FAMILIES: tuple[str, ...] = tuple(TINY_CONFIGS)

# The model class per family: causal LMs for decoders, bare encoders otherwise.
MODEL_CLASSES: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "opt": "OPTForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "vit": "ViTModel",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}

# First token id of the example inputs: RoBERTa's ids 0-2 are special (1 is padding).
FIRST_TOKEN = {"roberta": 3}


def tiny_config(family: str) -> Any:
    """The tiny config of ``family`` (one of :data:`FAMILIES`)."""
    if family not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for family '{family}'; known: {', '.join(FAMILIES)}")
    return TINY_CONFIGS[family]()


def tiny_model(family: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A random-init model of ``family`` (eval mode, seeded) and a small example input."""
    import transformers

    config = tiny_config(family)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[family])(config)
    model.eval()
    return model, example_inputs(family, config, seed)


def example_inputs(family: str, config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments for one forward call: ``[2, 6]`` token ids, or two 32×32 images."""
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        size = config.image_size
        return {"pixel_values": torch.randn(BATCH, config.num_channels, size, size, generator=generator)}
    low = FIRST_TOKEN.get(family, 0)
    ids = torch.randint(low, config.vocab_size, (BATCH, POSITIONS), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


__all__ = ["FAMILIES", "TINY_CONFIGS", "example_inputs", "tiny_config", "tiny_model"]
