"""BERT-shaped encoders: BERT, RoBERTa, XLM-RoBERTa, MiniLM (all-MiniLM-L6-v2 is a ``bert`` model).

Post-norm blocks: ``intermediate.dense`` → GELU → ``output.dense`` (+ residual, LayerNorm).
The neuron is the input of ``output.dense``; ``mlp.out`` is that layer's output before the
residual add; ``resid.mid`` is the attention sub-block's normalised output (the stream the
MLP reads, since the norm sits on the stream in a post-norm model). ``embed`` is the output
of ``embeddings`` (word + position + type embeddings, normalised). ``logits`` exist on the
masked-LM heads (``cls.predictions`` for BERT, ``lm_head`` for RoBERTa).
"""
from .base import Adapter, Hook, Readout, Tiny, read_input, read_output
from .common import attention_weights, n_heads, split_heads
from .tiny import FFN, HEADS, HIDDEN, INIT_RANGE, LAYERS, POSITIONS, VOCAB, hf_config

BLOCK = "encoder.layer.{i}"

BERT_SITES = {
    "embed": Hook("embeddings", "output"),
    "blocks.{i}.resid.pre": Hook(BLOCK, "input"),
    "blocks.{i}.resid.mid": Hook(f"{BLOCK}.attention.output", "output"),
    "blocks.{i}.resid.post": Hook(BLOCK, "output"),
    "blocks.{i}.attn.pattern": Hook(f"{BLOCK}.attention.self", "output", attention_weights, "pattern", needs_eager=True),
    "blocks.{i}.attn.v": Hook(f"{BLOCK}.attention.self.value", "output", split_heads(read_output, n_heads), "heads"),
    "blocks.{i}.attn.z": Hook(f"{BLOCK}.attention.output.dense", "input", split_heads(read_input), "heads"),
    "blocks.{i}.attn.out": Hook(f"{BLOCK}.attention.output.dense", "output"),
    "blocks.{i}.mlp.pre": Hook(f"{BLOCK}.intermediate.dense", "output"),
    "blocks.{i}.mlp.post": Hook(f"{BLOCK}.output.dense", "input"),
    "blocks.{i}.mlp.out": Hook(f"{BLOCK}.output.dense", "output"),
}

# The MLP's container is the block (intermediate.dense and output.dense are its grandchildren),
# so BERT offers no sparse execution: no mlp part.
READOUT = Readout(post_norms=("attention.output.LayerNorm", "output.LayerNorm"), bidirectional=True)
SHAPE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
             num_attention_heads=HEADS, max_position_embeddings=POSITIONS, initializer_range=INIT_RANGE)

ADAPTERS = [
    Adapter("bert", ("bert",), "encoder.layer", {**BERT_SITES, "logits": Hook("cls.predictions", "output")}, readout=READOUT,
            tiny=Tiny(lambda: hf_config("BertConfig", **SHAPE, pad_token_id=0), "BertModel")),
    # RoBERTa counts positions from pad_token_id + 1 and its ids 0-2 are special.
    Adapter("roberta", ("roberta", "xlm-roberta"), "encoder.layer", {**BERT_SITES, "logits": Hook("lm_head", "output")},
            readout=READOUT, tiny=Tiny(lambda: hf_config("RobertaConfig", **SHAPE, pad_token_id=1, bos_token_id=0, eos_token_id=2),
                                       "RobertaModel", first_token=3)),
]
