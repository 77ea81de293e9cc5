"""Shared fixtures: the embedded MiniLM (loaded once) and hook/parameter bookkeeping."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

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


def logits(module: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """One no-grad forward: the logits, or the last hidden state of a model without a head."""
    with torch.no_grad():
        out = module(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def llama():
    """A random-init tiny Llama and its inputs (one per test module)."""
    from actscope.zoo.tiny import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="module")
def bert():
    """A random-init tiny BERT and its inputs (one per test module)."""
    from actscope.zoo.tiny import tiny_model

    return tiny_model("bert")


def clean_and_corrupted(family: str = "gpt2") -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny model, its clean input ids ``[2, 6]`` and a corrupted copy differing only at position 2."""
    from actscope.zoo.tiny import tiny_model

    module, inputs = tiny_model(family)
    clean = inputs["input_ids"]  # [2, 6]
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 11) % module.config.vocab_size
    return module, clean, corrupted


def pre_hooked_logits(module: torch.nn.Module, ids: torch.Tensor, hooks=()) -> torch.Tensor:
    """No-grad logits with raw PyTorch pre-hooks: ``hooks`` are (submodule, function replacing its first input)."""
    handles = [m.register_forward_pre_hook(lambda mod, args, f=f: (f(args[0]),) + args[1:]) for m, f in hooks]
    try:
        with torch.no_grad():
            return module(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()


def first_input_of(module: torch.nn.Module, target: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What ``target`` receives as its first input in a no-grad forward of ``ids`` (a copy)."""
    seen = []
    handle = target.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            module(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LABELS = {"holds", "direction only", "does not hold"}  # the labels a reproduction may print


def example_script(name: str, folder: Path = EXAMPLES):
    """``examples/NAME.py`` (or ``folder/NAME.py``, e.g. a benchmark) imported as a module: the
    reproductions and benchmarks are scripts, not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through playwright, for the report's browser tests (which skip, saying how
    to install it, where there is no chromium or no playwright)."""
    import shutil

    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=shutil.which("chromium") or shutil.which("chromium-browser"))
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests (request it, or mark a module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): the models under test are tiny, and on a
    shared two-core machine a second thread mostly waits. The caller's setting comes back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
