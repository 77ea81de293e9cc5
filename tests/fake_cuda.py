"""Pretend CUDA devices for machines without one, to catch device bugs in CPU tests.

Inside ``with fake_cuda() as mode:``, ``.to("cuda:1")``, ``device="cuda"``, ``.cuda()`` and
``module.to("cuda")`` give :class:`FakeCuda` tensors: they report ``device`` ``cuda:N`` and
compute on the CPU. What CUDA refuses is refused the same way (:class:`DeviceMismatch`): one
operation on tensors of two devices (two GPUs, or a GPU and a CPU tensor of one or more
dimensions; CPU scalars, CPU indices, copies and autograd across devices are allowed, as on
CUDA), and ``.numpy()`` of a GPU tensor. ``mode.transfers`` counts the copies from a pretend GPU
to the CPU. Everything goes through one TorchFunctionMode, ahead of PyTorch's own device guards
(which would fail on a CPU-only build); gradients are taken on the CPU tensors inside.

Not caught: CUDA's own kernels' limits (an op CUDA lacks for a dtype), synchronisation, and
speed; the ``cuda``-marked tests check those on a real GPU.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map


class DeviceMismatch(RuntimeError):
    """What CUDA raises for mixed devices ("Expected all tensors to be on the same device")."""


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on ``cuda:index``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, index: int = 0):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            device=torch.device("cuda", index), requires_grad=False,
        )

    def __init__(self, elem: torch.Tensor, index: int = 0):
        self.elem = elem
        self.index = index

    def __repr__(self) -> str:
        return f"FakeCuda({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # only reached outside the mode
        raise RuntimeError(f"{func} on a FakeCuda tensor outside fake_cuda()")


def _device(value: Any) -> torch.device | None:
    """``value`` as a device (a bare "cuda" is cuda:0), or None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (str, torch.device, int)):
        return None
    if isinstance(value, int):  # an accelerator index
        return torch.device("cuda", value)
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        return None
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


T = torch.Tensor
MOVES = {T.to, T.cuda, T.cpu}
INDEXING = {T.__getitem__, T.__setitem__, T.index_put_, T.index_put, torch.index_put}
COPIES = {T.copy_, torch.autograd.grad, T.backward}  # autograd may span devices
# Properties answered by the CPU tensor inside (autograd runs there, on the CPU).
COMPUTED = {"T", "mT", "H", "mH", "data", "real", "imag", "grad", "requires_grad", "grad_fn", "is_leaf"}
PASS = {"__get__", "_has_compatible_shallow_copy_type"}  # metadata: answered by the wrapper itself


class _Mode(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.transfers = 0  # tensors copied from a pretend GPU to the CPU

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in PASS and getattr(getattr(func, "__self__", None), "__name__", "") not in COMPUTED:
            with torch._C.DisableTorchFunction():
                return func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        fake = [t for t in flat if isinstance(t, FakeCuda)]
        cpu = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, FakeCuda) and t.dim() > 0]
        if func is T.numpy and fake:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")
        indices = sorted({t.index for t in fake})
        mixed = len(indices) > 1 or (fake and cpu)
        if mixed and func not in MOVES | INDEXING | COPIES:
            found = [f"cuda:{i}" for i in indices] + (["cpu"] if cpu else [])
            raise DeviceMismatch(
                f"Expected all tensors to be on the same device, but found at least two devices, {' and '.join(found)}! "
                f"({getattr(func, '__qualname__', func)}; CPU shapes {[tuple(t.shape) for t in cpu]})"
            )
        target = indices[0] if indices else None  # the pretend GPU of the result, None: the CPU
        if "device" in kwargs:
            device = _device(kwargs["device"])
            if device is not None:
                target = device.index if device.type == "cuda" else None
                kwargs["device"] = "cpu"
        moved = func in MOVES
        if moved:
            target, args = self._move(func, args, kwargs, target)
            func = T.to
            if target is None and fake:
                self.transfers += 1
        if func is torch.autograd.grad:  # each gradient lives where its input does
            return self._gradients(args, kwargs)
        originals = {id(t.elem): t for t in fake}
        out = func(*tree_map(_plain, args), **tree_map(_plain, kwargs))

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            if moved:
                t = _plain(t)
                return t if target is None else FakeCuda(t, target)
            if id(t) in originals:  # in-place: the same wrapper
                return originals[id(t)]
            return FakeCuda(t, target) if target is not None and not isinstance(t, FakeCuda) else t

        return tree_map(wrap, out)

    @staticmethod
    def _gradients(args, kwargs):
        call = dict(zip(("outputs", "inputs"), args), **kwargs)
        inputs = call["inputs"]
        inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        grads = torch.autograd.grad(**tree_map(_plain, call))
        return tuple(FakeCuda(g, x.index) if isinstance(x, FakeCuda) and g is not None else g for x, g in zip(inputs, grads))

    @staticmethod
    def _move(func, args, kwargs, target):
        """``.to(...)``, ``.cuda()``, ``.cpu()``: the pretend GPU of the result (None: the CPU), and
        the arguments of the same ``to`` on the CPU."""
        if func is T.cuda:
            device = _device(args[1] if len(args) > 1 else kwargs.pop("device", "cuda"))
            kwargs.pop("device", None)
            return device.index, (args[0],)
        if func is T.cpu:
            return None, (args[0],)
        rest = list(args[1:])
        for i, value in enumerate(rest):
            device = None if isinstance(value, torch.dtype) else _device(value)
            if isinstance(value, torch.Tensor):
                device, rest[i] = value.device, value.dtype
            elif device is not None:
                rest[i] = "cpu"
            if device is not None:
                target = device.index if device.type == "cuda" else None
        return target, (args[0], *rest)


def _plain(t: Any) -> Any:
    return t.elem if isinstance(t, FakeCuda) else t


@contextlib.contextmanager
def fake_cuda():
    """Within the block, ``"cuda"`` is a pretend device computed on the CPU (see the module docstring)."""
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with _Mode() as mode, torch.no_grad():
            yield mode
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
