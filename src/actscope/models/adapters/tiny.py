"""The shape every family card's tiny test model shares (2 blocks, hidden size 32, 4 heads,
vocabulary 128, 4 experts with top-2 routing for mixture-of-experts families), so tests compare
families at one size. A card's :class:`~actscope.models.adapters.base.Tiny` builds its config
from these; transformers is imported only when a config is built."""
from __future__ import annotations

from typing import Any

VOCAB = 128
HIDDEN = 32
HEADS = 4
LAYERS = 2
FFN = 64
EXPERTS = 4
TOP_K = 2
POSITIONS = 64
# A wider initialisation than the usual 0.02 keeps activations, attention patterns and
# routing decisions varied, so tests of tiny models compare non-degenerate numbers.
INIT_RANGE = 0.2


def hf_config(class_name: str, **fields: Any) -> Any:
    """``transformers.<class_name>(**fields)``."""
    import transformers

    return getattr(transformers, class_name)(**fields)


def decoder_shape(**extra: Any) -> dict[str, Any]:
    """The config fields of a Llama-style decoder at the tiny size (plus ``extra``)."""
    return dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=POSITIONS, initializer_range=INIT_RANGE, **extra,
    )


def ids(pad: int = 0) -> dict[str, int]:
    """Special token ids at the bottom of the vocabulary (``pad`` for padding)."""
    return {"pad_token_id": pad, "bos_token_id": 0, "eos_token_id": 0}
