"""A word-level Hugging Face tokenizer for the synthetic language of :mod:`actscope.zoo.synthetic`.

One token per word (words are separated by whitespace), four special tokens, and a
post-processor that puts ``<bos>`` in front of every encoded sequence. The result is a
:class:`transformers.PreTrainedTokenizerFast` that saves with ``save_pretrained`` and reloads with
``AutoTokenizer.from_pretrained`` without network access.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from actscope.zoo.synthetic import vocabulary

__all__ = ["SPECIAL_TOKENS", "BOS", "EOS", "PAD", "UNK", "build_tokenizer", "build_raw_tokenizer", "build_bpe_tokenizer"]

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)  # ids 0, 1, 2, 3
MODEL_MAX_LENGTH = 128


def build_raw_tokenizer() -> Tokenizer:
    """The :class:`tokenizers.Tokenizer` (WordLevel, whitespace split, ``<bos>`` template)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split on whitespace only: every word and punctuation mark of the language is written
    # between spaces, so this keeps "«" or ")." exactly as written.
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id, eos_id = vocab[BOS], vocab[EOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {EOS} {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id), (EOS, eos_id)],
    )
    # WordLevel has no decoder of its own; join the words with single spaces.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tok


def build_tokenizer():
    """A :class:`transformers.PreTrainedTokenizerFast` over the synthetic vocabulary.

    ``<bos>``/``<eos>``/``<pad>``/``<unk>`` are set as the bos/eos/pad/unk tokens, padding is on
    the right, ``model_max_length`` is 128, and every encoded sequence starts with ``<bos>``.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_raw_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_bpe_tokenizer(texts, vocab_size: int):
    """A byte-level BPE :class:`transformers.PreTrainedTokenizerFast` learned from ``texts``, with
    the same four special tokens (ids 0–3), ``<bos>`` in front of every encoded sequence, padding
    on the right and ``model_max_length`` 128. Every string encodes (bytes need no ``<unk>``)."""
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {EOS} {BOS}:1 $B:1", special_tokens=[(BOS, bos_id), (EOS, eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   model_max_length=MODEL_MAX_LENGTH, padding_side="right",
                                   clean_up_tokenization_spaces=False)
