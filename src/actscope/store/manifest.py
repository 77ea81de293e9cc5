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
    tensors are copied to the CPU only when they live elsewhere.
    """
    digest = hashlib.sha256()
    for kind, named in (("param", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, tensor in named:
            _hash_tensor(digest, f"{kind}:{name}", tensor)
    return digest.hexdigest()


def _hash_tensor(digest: "hashlib._Hash", name: str, tensor: "torch.Tensor") -> None:
    if tensor.device.type == "meta":
        raise InputError(
            f"cannot hash the weights: {name} is on the 'meta' device and holds no values; "
            "load the model's weights (e.g. with actscope.load) before profiling it"
        )
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
