"""Which input pixels a position of a feature map sees: the receptive field of a conv stack.

:func:`receptive_field` runs one forward pass, records every convolution and pooling layer in the
order they run with their input and output grids, and composes them: a layer extends the field
of the grid it reads, and where two branches reach one grid (a residual block's shortcut and its
main path) the larger field is kept, the union of the two. Each layer with
kernel k, stride s, padding p and dilation d maps the field (size r, jump j, offset o) to
``r + (d·(k−1))·j``, ``j·s``, ``o + p·j``. Position i of the result covers input pixels
``i·j − o … i·j − o + r − 1`` on each axis (:meth:`Field.box`, clipped to the image).
A ViT's position is its patch (:func:`patch_box`; position 0, the CLS token, sees the whole image).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError

_GEOMETRY = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class Field:
    """The receptive field of a feature map: ``size``, ``jump`` and ``offset`` per axis (y, x),
    and the map's grid ``(H', W')``."""

    size: tuple[int, int]
    jump: tuple[int, int]
    offset: tuple[int, int]
    grid: tuple[int, int]

    def box(self, position: int, image: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` (ends exclusive) of flattened position ``position`` (``y·W' + x``)."""
        y, x = divmod(int(position), self.grid[1])
        y0 = y * self.jump[0] - self.offset[0]
        x0 = x * self.jump[1] - self.offset[1]
        return (max(0, y0), max(0, x0), min(image[0], y0 + self.size[0]), min(image[1], x0 + self.size[1]))


def receptive_field(module: nn.Module, target: nn.Module, example: torch.Tensor, key: str, at: str = "output") -> Field:
    """The field of ``target``'s output (``at="input"``: its input) in ``module`` fed
    ``{key: example}`` ([1, C, H, W])."""
    from ..hooks import hooks

    order: list[tuple[nn.Module, tuple, tuple]] = []
    target_grid: list[tuple[int, int]] = []

    def record(mod: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(mod, _GEOMETRY) and args and torch.is_tensor(args[0]) and torch.is_tensor(output):
            order.append((mod, tuple(args[0].shape[2:]), tuple(output.shape[2:])))
        seen = output if at == "output" else (args[0] if args else None)
        if mod is target and torch.is_tensor(seen) and seen.dim() == 4 and not target_grid:
            target_grid.append(tuple(seen.shape[2:]))

    with torch.no_grad(), hooks(module) as registry:
        for child in {m for m in module.modules() if isinstance(m, _GEOMETRY)} | {target}:
            registry.after(child, record, name="receptive field")
        module(**{key: example})
    if not target_grid:
        raise InputError("the site's tensor is not a feature map [batch, channels, H, W], so it has no receptive field")
    return _compose(order, tuple(example.shape[2:]), target, target_grid[0], at)


def _compose(order: list, image: tuple[int, int], target: nn.Module, grid: tuple[int, int], at: str = "output") -> Field:
    """The largest field reaching each grid, layer by layer in the order they ran: a layer extends
    the field of the grid it reads; where branches meet (a residual sum) the larger field wins, as
    the union of the branches' fields is the larger one."""
    best: dict[tuple, tuple[list[int], list[int], list[int]]] = {tuple(image): ([1, 1], [1, 1], [0, 0])}
    for mod, before, after in order:
        if mod is target and at == "input":
            break
        if len(before) == 2 and before in best:
            size, jump, offset = (list(v) for v in best[before])
            kernel, stride, padding, dilation = (_pair(getattr(mod, name, 1)) for name in ("kernel_size", "stride", "padding", "dilation"))
            for a in range(2):
                size[a] += dilation[a] * (kernel[a] - 1) * jump[a]
                offset[a] += padding[a] * jump[a]
                jump[a] *= stride[a]
            if after not in best or best[after][0] < size:
                best[after] = (size, jump, offset)
        if mod is target:
            break
    if tuple(grid) not in best:
        raise InputError(f"cannot follow the conv stack to this site (its grid {grid} is reached by no chain of convolutions "
                         "and pooling from the image); its receptive field is unknown")
    size, jump, offset = best[tuple(grid)]
    return Field(tuple(size), tuple(jump), tuple(offset), tuple(grid))


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, str):  # padding="same" / "valid" is only used with stride 1
        return (0, 0)
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def patch_box(position: int, image: tuple[int, int], patch: int, cls_tokens: int = 1) -> tuple[int, int, int, int]:
    """A ViT position's box: the whole image for the CLS token(s), else its patch."""
    if position < cls_tokens:
        return (0, 0, image[0], image[1])
    row, col = divmod(position - cls_tokens, image[1] // patch)
    return (row * patch, col * patch, min(image[0], (row + 1) * patch), min(image[1], (col + 1) * patch))
