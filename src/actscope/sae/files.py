"""SAEs on disk: reading the SAELens layout (and plain safetensors with a JSON), writing it.

SAELens layout: a folder with ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in,
d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``; ``threshold [d_sae]``
for JumpReLU; transcoders decode to ``d_out``, skip transcoders add ``W_skip [d_out, d_in]``).
Both config generations are read: SAELens ≥ 6 (``architecture``, ``metadata.hook_name``) and
the older flat one (``hook_point``/``hook_name``, ``activation_fn_str``/``activation_fn`` with
``activation_fn_kwargs.k`` for top-k, a boolean ``normalize_activations``), converted the way
SAELens's own ``handle_pre_6_0_config`` does. A plain ``NAME.safetensors`` takes its config from
``NAME.json`` beside it (the same keys; ``d_in``/``d_sae`` may be left out).

``normalize_activations``: ``none``, ``constant_norm_rescale`` and ``layer_norm`` are computed
per token (:mod:`.core`). ``expected_average_only_in`` is a constant factor SAELens estimates in
training and folds into the weights when it saves the final SAE (``W_enc · s``, ``W_dec / s``,
``b_dec / s``; the config then says ``none``); a checkpoint saved before that keeps the factor in
``activation_scaler.json`` beside it, and it is folded here the same way. Without that file the
factor is unknown (SAELens itself then runs the SAE unscaled, with a warning), so it is refused.

Only safetensors are read (no pickle, no code); a file that does not match is an
:class:`~actscope.errors.InputError` naming the missing or mis-shaped tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import InputError
from .core import ARCHITECTURES, NORMALISATIONS, SAE

CFG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRANSCODERS = {"transcoder": "standard", "jumprelu_transcoder": "jumprelu", "skip_transcoder": "standard"}
SUPPORTED = (*ARCHITECTURES, *TRANSCODERS)


def load_sae(path: str | os.PathLike, *, site: str | None = None, name: str | None = None,
             dtype: torch.dtype | str | None = None) -> SAE:
    """Read an SAE or transcoder from ``path``: a SAELens folder (``cfg.json`` +
    ``sae_weights.safetensors``) or a ``.safetensors`` file with a ``.json`` of the same name.

    ``site`` overrides where it reads (an actscope site; the config's hook name otherwise),
    ``name`` tells several SAEs on one site apart (its features become ``SITE.sae_NAME``),
    ``dtype`` overrides the config's (SAELens computes in the config's dtype, default float32).
    Attach it to a model with :func:`actscope.sae.attach`, or pass it to ``profile(sae=...)``.
    """
    weights, config_path = _files(Path(path))
    config = _config(config_path)
    tensors = _tensors(weights)
    chosen = _dtype(dtype if dtype is not None else config.get("dtype", "float32"), config_path)
    return build(tensors, config, source=str(path), site=site, name=name, dtype=chosen, scaler=weights.parent / SCALER)


def build(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, source: str, site: str | None = None,
          name: str | None = None, dtype: torch.dtype = torch.float32, scaler: Path | None = None) -> SAE:
    """An :class:`SAE` from its tensors and (SAELens) config, every shape checked."""
    config = normalised_config(config, source)
    architecture = config["architecture"]
    transcoder = architecture in TRANSCODERS
    d_in, d_sae = _sizes(tensors, config, source)
    d_out = int(config.get("d_out") or d_in) if transcoder else d_in
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if architecture in ("jumprelu", "jumprelu_transcoder"):
        expected["threshold"] = (d_sae,)
    if architecture == "skip_transcoder":
        expected["W_skip"] = (d_out, d_in)
    _check_shapes(tensors, expected, architecture, source)
    cast = {key: tensors[key].to(dtype) for key in expected}
    if transcoder and config["apply_b_dec_to_input"]:
        raise InputError(f"{source}: apply_b_dec_to_input is true, but a transcoder's b_dec [d_out] cannot be subtracted "
                         "from its input (SAELens refuses it too); set it to false in the config")
    cast = _folded_scale(cast, config, source, scaler)
    return SAE(
        cast["W_enc"], cast["b_enc"], cast["W_dec"], cast["b_dec"], architecture=TRANSCODERS.get(architecture, architecture),
        threshold=cast.get("threshold"), k=config.get("k"), apply_b_dec_to_input=bool(config["apply_b_dec_to_input"]),
        normalize_activations=config["normalize_activations"], rescale_acts_by_decoder_norm=bool(config.get("rescale_acts_by_decoder_norm")),
        W_skip=cast.get("W_skip"), transcoder=transcoder, hook_name=config.get("hook_name"), hook_name_out=config.get("hook_name_out"),
        site=site or config.get("actscope_site"), out_site=config.get("actscope_site_out"), name=name, path=source, config=dict(config),
    )


# -- the files --------------------------------------------------------------------------------
def _files(path: Path) -> tuple[Path, Path]:
    """(weights, config) of an SAE at ``path``."""
    if path.is_dir():
        weights = path / WEIGHTS
        if not weights.is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            if len(found) != 1:
                listed = ", ".join(found) or "none"
                raise InputError(f"{path} has no {WEIGHTS} (the SAELens layout: {CFG} + {WEIGHTS}); .safetensors files there: {listed}")
            weights = path / found[0]
        config = path / CFG if (path / CFG).is_file() else weights.with_suffix(".json")
    elif path.is_file():
        if path.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):
            raise InputError(f"{path} is a pickle-based file, which actscope does not load (it can run code); convert it to "
                             "safetensors (safetensors.torch.save_file) with a cfg.json, the SAELens layout")
        weights, config = path, path.with_suffix(".json")
        if not config.is_file() and (path.parent / CFG).is_file():
            config = path.parent / CFG
    else:
        raise InputError(f"there is no SAE at {path}: no such file or folder; give a SAELens folder ({CFG} + {WEIGHTS})")
    if not config.is_file():
        raise InputError(f"{weights} has no config beside it: expected {config} (SAELens' {CFG}: d_in, d_sae, hook_name, architecture)")
    return weights, config


def _config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{path} is not valid JSON ({error}); an SAE config is a JSON object with d_in, d_sae, hook_name, architecture") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} holds a JSON {type(config).__name__}, not an object with d_in, d_sae, hook_name, architecture")
    return config


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path} is not a readable safetensors file ({error}); the SAE's weights must be safetensors") from None


def _dtype(value: Any, source: Path) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    text = str(value).removeprefix("torch.")
    if text not in DTYPES:
        raise InputError(f"{source}: dtype {value!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[text]


# -- the config -------------------------------------------------------------------------------
def normalised_config(raw: Mapping[str, Any], source: str) -> dict:
    """The config in one shape: SAELens ≥ 6 fields at the top level (metadata merged in), the
    older generation converted as SAELens does, and every unsupported setting refused."""
    config = {**dict(raw.get("metadata") or {}), **{k: v for k, v in raw.items() if k != "metadata"}}
    renamed = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
    config = {renamed.get(k, k): v for k, v in config.items()}
    kwargs = config.get("activation_fn_kwargs") or {}
    if "architecture" not in config:
        config["architecture"] = "topk" if config.get("activation_fn") == "topk" else "standard"
    if config["architecture"] == "topk" and config.get("k") is None and isinstance(kwargs, dict):
        config["k"] = kwargs.get("k")
    normalize = config.get("normalize_activations")
    config["normalize_activations"] = ("expected_average_only_in" if normalize is True else "none") if normalize in (None, True, False) else normalize
    config.setdefault("apply_b_dec_to_input", config["architecture"] not in TRANSCODERS)
    _refuse_unsupported(config, source)
    return config


def _refuse_unsupported(config: dict, source: str) -> None:
    architecture = config["architecture"]
    if architecture not in SUPPORTED:
        raise InputError(f"{source}: architecture {architecture!r} is not supported; actscope reads {', '.join(SUPPORTED)}")
    activation = config.get("activation_fn")
    if activation not in (None, "relu", "topk") and architecture not in ("topk",):
        raise InputError(f"{source}: activation_fn {activation!r} is not supported (relu, topk)")
    if architecture == "topk" and (isinstance(config.get("k"), bool) or not isinstance(config.get("k"), int) or config["k"] < 1):
        raise InputError(f"{source}: a top-k SAE needs k (a whole number ≥ 1) in its config, got {config.get('k')!r}")
    normalize = config["normalize_activations"]
    if normalize not in (*NORMALISATIONS, "expected_average_only_in"):
        raise InputError(f"{source}: normalize_activations {normalize!r} is not one of none, constant_norm_rescale, layer_norm, "
                         "expected_average_only_in")
    if config.get("hook_head_index") is not None:
        raise InputError(f"{source}: the SAE reads one attention head (hook_head_index {config['hook_head_index']}), which actscope "
                         "does not support; SAEs on attn.hook_z must read all heads concatenated")
    if config.get("finetuning_scaling_factor"):
        raise InputError(f"{source}: finetuning_scaling_factor (SAELens < 6 fine-tuning) is not supported; fold the factor into W_dec")


def _sizes(tensors: Mapping[str, torch.Tensor], config: dict, source: str) -> tuple[int, int]:
    if "W_enc" not in tensors:
        raise InputError(_missing("W_enc", config["architecture"], tensors, source))
    shape = tuple(tensors["W_enc"].shape)
    if len(shape) != 2:
        raise InputError(f"{source}: W_enc has shape {list(shape)}; it must be [d_in, d_sae] (2-D)")
    d_in, d_sae = (int(config.get(key) or size) for key, size in zip(("d_in", "d_sae"), shape))
    return d_in, d_sae


def _check_shapes(tensors: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]], architecture: str, source: str) -> None:
    out = "d_out" if architecture in TRANSCODERS else "d_in"
    names = {"W_enc": "[d_in, d_sae]", "b_enc": "[d_sae]", "W_dec": f"[d_sae, {out}]", "b_dec": f"[{out}]", "threshold": "[d_sae]",
             "W_skip": "[d_out, d_in]"}
    for key, shape in expected.items():
        if key not in tensors:
            raise InputError(_missing(key, architecture, tensors, source))
        got = tuple(tensors[key].shape)
        if got != shape:
            raise InputError(f"{source}: {key} has shape {list(got)} but must be {names[key]} = {list(shape)} for this "
                             f"{architecture} SAE (from W_enc and the config); the file does not match its config")
        if not tensors[key].is_floating_point():
            raise InputError(f"{source}: {key} holds {tensors[key].dtype} values; SAE weights are floating point")
        if not bool(torch.isfinite(tensors[key]).all()):
            raise InputError(f"{source}: {key} holds NaN or infinite values; the SAE's weights are damaged")


def _missing(key: str, architecture: str, tensors: Mapping[str, torch.Tensor], source: str) -> str:
    have = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items()) or "none"
    return (f"{source}: the tensor {key} is missing; a {architecture} SAE needs W_enc [d_in, d_sae], b_enc [d_sae], "
            f"W_dec [d_sae, d_in], b_dec [d_in]{', threshold [d_sae]' if 'jumprelu' in architecture else ''} "
            f"(tensors in the file: {have})")


def _folded_scale(tensors: dict[str, torch.Tensor], config: dict, source: str, scaler: Path | None) -> dict[str, torch.Tensor]:
    """``expected_average_only_in``: fold the factor SAELens saved beside a checkpoint, as SAELens does."""
    if config["normalize_activations"] != "expected_average_only_in":
        return tensors
    factor = _scaling_factor(scaler) if scaler is not None else None
    if factor is None:
        raise InputError(f"{source}: normalize_activations is expected_average_only_in but the scaling factor is not saved beside "
                         f"it ({SCALER}); SAELens folds it into the weights when training ends. Fold it (W_enc·s, W_dec/s, "
                         "b_dec/s) and set normalize_activations to none, or put the factor in activation_scaler.json")
    config["normalize_activations"] = "none"
    config["folded_scaling_factor"] = factor
    return {**tensors, "W_enc": tensors["W_enc"] * factor, "W_dec": tensors["W_dec"] / factor, "b_dec": tensors["b_dec"] / factor}


def _scaling_factor(path: Path) -> float | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("scaling_factor")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        raise InputError(f"{path} is not a JSON object with a scaling_factor") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"{path}: scaling_factor must be a positive number, got {value!r}")
    return float(value)


def split_spec(spec: str | os.PathLike) -> tuple[Path, str | None, str | None]:
    """``(path, site, name)`` of a command-line SAE: ``DIR``, ``DIR@SITE``, ``NAME=DIR`` or
    ``NAME=DIR@SITE``. An existing path is always a path (a folder may contain ``@`` or ``=``);
    otherwise ``NAME=`` is letters, digits and underscores, and ``@`` splits at the first
    position where the part before it exists."""
    text = os.fspath(spec)
    name = None
    head, eq, rest = text.partition("=")
    if eq and not Path(text).exists() and head and all(c.isalnum() or c == "_" for c in head):
        name, text = head, rest
    if Path(text).exists():
        return Path(text), None, name
    for at in (i for i, c in enumerate(text) if c == "@"):
        if Path(text[:at]).exists():
            return Path(text[:at]), text[at + 1:] or None, name
    return Path(text), None, name


def load_spec(spec: str | os.PathLike) -> SAE:
    """The SAE a command line names (see :func:`split_spec`)."""
    path, site, name = split_spec(spec)
    return load_sae(path, site=site, name=name)
