"""Turn a corpus into padded token batches, and show tokens in their context.

torch is imported only when batches are built, so importing this module stays cheap.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from actscope.data.corpus import Corpus
from actscope.errors import DataError

if TYPE_CHECKING:
    from torch import Tensor

_SANE_MODEL_MAX_LENGTH = 1_000_000


@dataclass(frozen=True, eq=False)
class Batch:
    """One right-padded batch of token ids.

    ``input_ids`` and ``attention_mask`` are int64 ``[B, T]`` (mask 1 = real token);
    ``doc_ids`` is int64 ``[B]`` indexing the corpus; ``n_tokens`` counts real tokens.
    """

    input_ids: Tensor
    attention_mask: Tensor
    doc_ids: Tensor
    n_tokens: int

    def model_inputs(self) -> dict[str, Tensor]:
        """The keyword arguments for a Hugging Face model's forward call."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def token_batches(
    corpus: Corpus,
    tokenizer: Any,
    batch_size: int = 8,
    max_length: int = 128,
    max_tokens: int | None = None,
) -> Iterator[Batch]:
    """Yield right-padded batches of the corpus's documents, in corpus order.

    Each document is tokenized with the tokenizer's default special tokens and truncated to
    ``max_length`` (also capped by a sane ``tokenizer.model_max_length``). Documents are
    tokenized lazily, one batch at a time. With ``max_tokens`` the stream stops after exactly
    ``min(max_tokens, available)`` real tokens; the last document used may be cut short.
    The tokenizer is never modified; without a pad token, padding uses the EOS id (or 0).
    Documents that tokenize to nothing are skipped. Options are checked on call, before
    the first batch is requested.
    """
    _check_count(batch_size, "--batch-size")
    _check_count(max_length, "--max-length")
    if max_tokens is not None:
        _check_count(max_tokens, "--max-tokens")
    _check_corpus(corpus)
    limit = effective_max_length(tokenizer, max_length)
    encoded = _encoded_documents(corpus, tokenizer, limit, batch_size)
    if max_tokens is not None:
        encoded = _within_budget(encoded, max_tokens)
    return _batches(encoded, batch_size, pad_id(tokenizer))


def context_text(
    tokenizer: Any,
    corpus: Corpus,
    doc_id: int,
    pos: int,
    window: int = 8,
    max_length: int = 128,
) -> tuple[str, str, str]:
    """(left context, token, right context) around token ``pos`` of document ``doc_id``.

    Uses the same tokenization and truncation as :func:`token_batches` with the same
    ``max_length``, so ``pos`` is a column of a batch row. Each part is decoded separately
    with ``window`` tokens on each side (special tokens are kept).
    """
    _check_corpus(corpus)
    _check_count(max_length, "max_length")
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise DataError(f"window must be a whole number of at least 0, got {window!r}.")
    if not _is_index(doc_id, len(corpus)):
        raise DataError(
            f"doc_id {doc_id!r} is out of range for corpus {corpus.name!r} with "
            f"{len(corpus)} documents; use 0 to {len(corpus) - 1}."
        )
    ids = _document_ids(tokenizer, corpus.documents[doc_id], effective_max_length(tokenizer, max_length))
    if not _is_index(pos, len(ids)):
        raise DataError(
            f"Token position {pos!r} is out of range for document {doc_id}, which has "
            f"{len(ids)} tokens at max_length {max_length}; use 0 to {len(ids) - 1}."
        )
    left = ids[max(0, pos - window):pos]
    right = ids[pos + 1:pos + 1 + window]
    parts = tokenizer.decode(left), tokenizer.decode([ids[pos]]), tokenizer.decode(right)
    text = corpus.documents[doc_id]
    if REPLACEMENT in "".join(parts) and REPLACEMENT not in text and getattr(tokenizer, "is_fast", False):
        # a byte-level tokenizer cut a character between tokens: show the document's own characters
        pieces = _pieces(tokenizer, text, ids, effective_max_length(tokenizer, max_length))
        parts = "".join(pieces[max(0, pos - window):pos]), pieces[pos], "".join(pieces[pos + 1:pos + 1 + window])
    return parts


REPLACEMENT = "\ufffd"  # what decoding part of a character's bytes gives


def token_pieces(tokenizer: Any, corpus: Corpus, doc_id: int, max_length: int = 128) -> list[str]:
    """The text of each token of document ``doc_id`` as fed (same truncation as
    :func:`token_batches`): with a fast tokenizer the document's own characters from the end of
    the previous token to the end of this one, so the pieces read as the text does (spaces
    included); special tokens, and every token with a slow tokenizer, as ``decode([id])``."""
    _check_corpus(corpus)
    limit = effective_max_length(tokenizer, max_length)
    ids = _document_ids(tokenizer, corpus.documents[doc_id], limit)
    if not getattr(tokenizer, "is_fast", False):
        return [tokenizer.decode([i]) for i in ids]
    return _pieces(tokenizer, corpus.documents[doc_id], ids, limit)


def _pieces(tokenizer: Any, text: str, ids: list[int], limit: int) -> list[str]:
    """Each token's characters of ``text`` (a fast tokenizer's offsets): from the end of what the
    tokens before it showed to the end of its own span, so gaps (spaces) go with the next token and
    a character whose bytes two tokens share (byte-level BPE) is shown once, with the first;
    special tokens (no span) as ``decode([id])``."""
    spans = tokenizer(text, truncation=True, max_length=limit, return_offsets_mapping=True)["offset_mapping"][: len(ids)]
    pieces, end = [], 0
    for (start, stop), token in zip(spans, ids):
        if stop <= start:  # a special token: no characters of its own
            pieces.append(tokenizer.decode([token]))
            continue
        pieces.append(text[end:stop] if stop > end else "")
        end = max(end, stop)
    return pieces + [tokenizer.decode([i]) for i in ids[len(pieces):]]


def effective_max_length(tokenizer: Any, max_length: int) -> int:
    """``max_length`` capped by the tokenizer's ``model_max_length`` when that is sane."""
    model_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_limit, int) and 0 < model_limit < _SANE_MODEL_MAX_LENGTH:
        return min(max_length, model_limit)
    return max_length


# ---------------------------------------------------------------- helpers


def _check_count(value: Any, option: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{option} must be a whole number, got {value!r}.")
    if value < 1:
        raise DataError(f"{option} must be at least 1, got {value}.")


def _check_corpus(corpus: Any) -> None:
    if not isinstance(corpus, Corpus):
        raise DataError(
            f"Expected a Corpus, got a {type(corpus).__name__}; build one with load_corpus(...)."
        )


def _is_index(value: Any, size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    # Slicing enforces the limit even when the tokenizer cannot truncate that far
    # (e.g. max_length smaller than its number of special tokens).
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [list(ids)[:max_length] for ids in encoded]


@functools.lru_cache(maxsize=4096)
def _document_ids(tokenizer: Any, document: str, max_length: int) -> tuple[int, ...]:
    return tuple(_encode(tokenizer, [document], max_length)[0])


def _encoded_documents(
    corpus: Corpus, tokenizer: Any, max_length: int, chunk: int
) -> Iterator[tuple[int, list[int]]]:
    for start in range(0, len(corpus), chunk):
        texts = list(corpus.documents[start:start + chunk])
        for offset, ids in enumerate(_encode(tokenizer, texts, max_length)):
            if ids:
                yield start + offset, ids


def _within_budget(
    encoded: Iterator[tuple[int, list[int]]], max_tokens: int
) -> Iterator[tuple[int, list[int]]]:
    remaining = max_tokens
    for doc_id, ids in encoded:
        ids = ids[:remaining]
        remaining -= len(ids)
        yield doc_id, ids
        if remaining == 0:
            return


def _batches(
    encoded: Iterator[tuple[int, list[int]]], batch_size: int, pad: int
) -> Iterator[Batch]:
    while rows := list(itertools.islice(encoded, batch_size)):
        yield _make_batch(rows, pad)


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else the end-of-sequence token, else 0 (the mask
    marks padding either way, and the tokenizer is never changed)."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return candidate
    return 0


def pad_right(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Token-id rows → right-padded ``input_ids`` and ``attention_mask`` ``[rows, width]``."""
    import torch

    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def _make_batch(rows: list[tuple[int, list[int]]], pad: int) -> Batch:
    import torch

    input_ids, attention_mask = pad_right([ids for _, ids in rows], pad)
    doc_ids = torch.tensor([doc_id for doc_id, _ in rows], dtype=torch.int64)
    return Batch(input_ids, attention_mask, doc_ids, n_tokens=int(attention_mask.sum()))
