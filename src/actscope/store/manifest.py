"""The parts of a run manifest that every command fills in the same way."""
from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from actscope.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import torch

# Looked up through importlib.metadata so that asking for a version never imports the package.
_VERSIONED_PACKAGES = ("torch", "transformers", "numpy", "pyarrow", "safetensors")


def now_iso() -> str:
    """The current UTC time as ISO 8601 with seconds, e.g. ``2025-01-31T12:00:00+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    """Versions of Python, actscope and the installed libraries a run depends on."""
    versions = {"python": platform.python_version(), "actscope": _actscope_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _actscope_version() -> str:
    package = sys.modules.get("actscope")
    version = getattr(package, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("actscope")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def weight_hash(module: "torch.nn.Module") -> str:
    """sha256 hex digest over the name, dtype, shape and bytes of every parameter and buffer.

    Parameters come first, then buffers, each in the module's own order. Nothing is modified:
    tensors are copied to the CPU only when they live elsewhere. The weights hashed are the ones
    the model computes with: a parameter that accelerate offloaded (on the meta device until its
    module runs) is read from the offload, so an offloaded model hashes like the same weights in
    memory; a quantised weight (optimum-quanto, torchao, bitsandbytes) is hashed as it is
    stored: its integer data and scales.
    """
    digest = hashlib.sha256()
    for kind, named in (("param", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, tensor in named:
            if tensor.device.type == "meta":
                tensor = _offloaded(module, name, tensor)
            for part, plain in _stored_parts(tensor):
                _hash_tensor(digest, f"{kind}:{name}{part}", plain)
    return digest.hexdigest()


def _offloaded(module: "torch.nn.Module", name: str, tensor: "torch.Tensor") -> "torch.Tensor":
    """The values accelerate's offload holds for the meta tensor ``name``, or a clear refusal."""
    from actscope.models.adapters.base import offloaded

    owner_path, _, attribute = name.rpartition(".")
    found = offloaded(module.get_submodule(owner_path), attribute)
    if found is None:
        raise InputError(
            f"cannot hash the weights: {name} is on the 'meta' device and holds no values, and no accelerate "
            "offload holds it; load the model's weights (e.g. with actscope.load) before profiling it"
        )
    return found


def _stored_parts(tensor: "torch.Tensor") -> list[tuple[str, "torch.Tensor"]]:
    """``(name suffix, plain tensor)`` for what ``tensor`` stores: itself when plain, the inner
    tensors of a quantised tensor subclass (and bitsandbytes' quantisation state)."""
    import torch

    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or getattr(tensor, "is_quantized", False):
        return [("", tensor.dequantize() if getattr(tensor, "is_quantized", False) else tensor)]
    kind = type(tensor).__name__
    if kind in ("Params4bit", "Int8Params"):
        parts = [("", tensor.data)]
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            parts += [(f"#{key}", value) for key, value in sorted(state.as_dict(packed=True).items()) if isinstance(value, torch.Tensor)]
        if getattr(tensor, "SCB", None) is not None:
            parts.append(("#SCB", tensor.SCB))
        return parts
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if callable(flatten):  # a wrapper subclass (quanto, torchao): its inner tensors, and its setup
        inner, context = flatten()
        parts = [(f"#{kind}:{context!r}", torch.empty(0))]
        for key in inner:
            parts += [(f"#{key}{suffix}", plain) for suffix, plain in _stored_parts(getattr(tensor, key))]
        return parts
    return [("", tensor)]


def _hash_tensor(digest: "hashlib._Hash", name: str, tensor: "torch.Tensor") -> None:
    flat = tensor.detach().to("cpu").contiguous()
    header = f"{name}\0{flat.dtype}\0{tuple(flat.shape)}\0{flat.numel() * flat.element_size()}\0"
    digest.update(header.encode("utf-8"))
    digest.update(_as_bytes_view(flat))


def _as_bytes_view(tensor: "torch.Tensor") -> "np.ndarray":
    """The tensor's raw bytes without a copy (bfloat16 and friends go through a same-size int)."""
    import torch

    same_size_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    size = tensor.element_size()
    if size in same_size_int and not tensor.is_complex():
        tensor = tensor.view(same_size_int[size])
    return tensor.numpy().reshape(-1).view("uint8")  # [n_bytes], a view: no copy
