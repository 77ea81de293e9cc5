"""Shared fixtures: the embedded MiniLM (loaded once) and hook/parameter bookkeeping."""
from __future__ import annotations

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(scope="session")
def minilm():
    import actscope

    return actscope.load()


def hook_count(module: torch.nn.Module) -> int:
    """Every forward hook and pre-hook registered anywhere in ``module``."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


def checksum(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # 0-dim buffers too
    return digest.hexdigest()


def model_state(module: torch.nn.Module) -> tuple:
    config = getattr(module, "config", None)
    return (
        hook_count(module),
        checksum(module),
        module.training,
        getattr(config, "_attn_implementation", None),
    )


def word_tokenizer(tokens: list[str], *, bos: str | None = None, **special_tokens: str):
    """A word-level tokenizer over ``tokens`` (ids in list order, whitespace split); ``bos``
    is put in front of every text when given. ``special_tokens``: pad_token=…, unk_token=…"""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=special_tokens.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
        special_tokens["bos_token"] = bos
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
