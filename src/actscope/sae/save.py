"""Writing an SAE in the SAELens layout: ``cfg.json`` + ``sae_weights.safetensors``, one folder,
written atomically; an existing folder is replaced only with ``overwrite`` and only when it is an
SAE actscope wrote (its ``cfg.json`` says so and it holds nothing else).

The config is SAELens ≥ 6's (``architecture``, ``d_in``, ``d_sae``, ``dtype``,
``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``k`` for top-k,
and ``metadata`` with ``hook_name``), so ``SAE.load_from_disk`` reads it; ``metadata.actscope``
marks it as actscope's and keeps the site and the training settings.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import RunDirError
from .core import SAE
from .files import CFG, WEIGHTS

FORMAT = "actscope-sae"
FORMAT_VERSION = 1
SAELENS_FORMAT = "6.0.0"  # the config generation written (SAELens reads it as its own ≥ 6 format)
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def save_sae(sae: SAE, out: str | os.PathLike, *, overwrite: bool = False, hook_name: str | None = None,
             model_name: str | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``sae`` to the folder ``out`` in the SAELens layout and return the path.

    ``hook_name``: what ``metadata.hook_name`` says (default: the SAE's own; pass the
    TransformerLens name for SAELens users); ``extra``: more to keep under ``metadata.actscope``.
    """
    from safetensors.torch import save_file

    from ..store.files import atomic_directory, check_writable

    target = Path(out)
    check_target(target, overwrite)
    check_writable(target)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    config = sae_config(sae, hook_name=hook_name, model_name=model_name, extra=extra)
    with atomic_directory(target, size_hint=sum(t.numel() * t.element_size() for t in tensors.values())) as folder:
        save_file(tensors, str(folder / WEIGHTS), metadata={"generator": "actscope", "format": FORMAT})
        (folder / CFG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return target


def sae_config(sae: SAE, *, hook_name: str | None = None, model_name: str | None = None,
               extra: Mapping[str, Any] | None = None) -> dict:
    """The ``cfg.json`` of ``sae`` (see the module docstring)."""
    architecture = sae.architecture if not sae.transcoder else {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}[sae.architecture]
    if sae.transcoder and sae.W_skip is not None:
        architecture = "skip_transcoder"
    site = sae.site or hook_name or sae.hook_name
    config: dict[str, Any] = {
        "architecture": architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": DTYPE_NAMES.get(sae.dtype, "float32"),
        "device": "cpu", "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input and not sae.transcoder),
        "normalize_activations": sae.normalize_activations,
        "reshape_activations": "hook_z" if (hook_name or sae.hook_name or "").endswith(("hook_z", "attn.z")) else "none",
    }
    if sae.architecture == "topk":
        config.update(k=int(sae.k), rescale_acts_by_decoder_norm=bool(sae.rescale_acts_by_decoder_norm))
    if sae.transcoder:
        config["d_out"] = sae.d_out
    metadata: dict[str, Any] = {"sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": None,
                                "hook_name": hook_name or sae.hook_name or site, "model_name": model_name,
                                "actscope_site": site}
    if sae.transcoder:
        metadata.update(hook_name_out=sae.hook_name_out or sae.out_site, actscope_site_out=sae.out_site or sae.hook_name_out)
    from ..store.manifest import library_versions

    version = library_versions()["actscope"]
    metadata["actscope"] = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": version, **dict(extra or {})}
    config["metadata"] = metadata
    return config


def is_own(folder: Path) -> bool:
    """Whether ``folder`` holds an SAE actscope wrote, and nothing else."""
    try:
        config = json.loads((folder / CFG).read_text(encoding="utf-8"))
        entries = {p.name for p in folder.iterdir()}
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    mark = (config.get("metadata") or {}).get("actscope") if isinstance(config, dict) else None
    return isinstance(mark, dict) and mark.get("format") == FORMAT and entries <= {CFG, WEIGHTS}


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse, before any work, a folder ``save_sae`` must not replace."""
    if not target.exists():
        return
    if not target.is_dir():
        raise RunDirError(f"cannot write the SAE to {target}: it is a file; choose another --out (an SAE is a folder)")
    if not any(target.iterdir()):
        return
    if not is_own(target):
        raise RunDirError(f"cannot write the SAE to {target}: it exists and is not an SAE actscope wrote (or holds other files), so "
                          "nothing in it is replaced even with --overwrite; choose another --out")
    if not overwrite:
        raise RunDirError(f"{target} already holds an SAE; pass --overwrite (overwrite=True) to replace it, or choose another --out")
