"""Corpora and token batches: what actscope feeds a model.

``import actscope.data`` stays light; pyarrow, datasets, transformers and torch load only
when a reader or a batch needs them.
"""
from actscope.data.batching import Batch, context_text, pad_id, pad_right, token_batches, token_pieces
from actscope.data.corpus import Corpus, builtin_corpus, load_corpus

__all__ = ["Corpus", "load_corpus", "builtin_corpus", "Batch", "token_batches", "context_text", "token_pieces", "pad_id", "pad_right"]
