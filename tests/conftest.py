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
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_state(module: torch.nn.Module) -> tuple:
    config = getattr(module, "config", None)
    return (
        hook_count(module),
        checksum(module),
        module.training,
        getattr(config, "_attn_implementation", None),
    )
