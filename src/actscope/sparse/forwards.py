"""The sparse MLP of one block, per method, built only on ``dot_rows`` and ``axpy_rows``.

Rows: the MLP input flattened to ``x [n, d]``. A batch reads the *union* of its rows' active
units (or input channels) and masks each row to its own, so every row gets what the dense MLP
with the same thresholds gives it (to float rounding: sums run over fewer terms). A unit whose
activation is exactly 0 is skipped too, which changes no sum.

Each call also returns a :class:`Tally`: per row, the share of skippable activations that were
inactive and the share of the MLP's weights that row did not need; per call, the share of the
MLP's weights the kernels read (the union's rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import kernels
from .calls import CallTracker, choose_cores
from .families import MlpBlock
from .layout import Weights


@dataclass(frozen=True)
class Tally:
    sparsity: torch.Tensor  # [n] per row
    weight_skipped: torch.Tensor  # [n] per row
    read: float  # share of the MLP's weights read by this call


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Columns of ``mask [n, m]`` active in any row: int64 ``[k]``."""
    return mask.any(0).nonzero().flatten()


def _active(values: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``|values| ≥ limit`` and not exactly 0 (a 0 changes no sum): bool, same shape."""
    keep = values.abs() >= limit
    return keep if bool((limit > 0).all()) else keep & (values != 0)


def _masked(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Each row's own units of the union (one row: the union is its own set, nothing to mask)."""
    return h if h.shape[0] == 1 else torch.where(keep, h, 0)


def _select(h: torch.Tensor, w_t: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``h [n, k] @ w_t[index] (+ bias)`` → ``[n, d_out]``; an empty index reads nothing."""
    if index.numel() == 0:
        out = h.new_zeros(h.shape[0], w_t.shape[1])
    else:
        out = kernels.axpy_rows(h, w_t, index)
    return out + bias if bias is not None else out


def _thresholded(x: torch.Tensor, w_t: torch.Tensor, threshold: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``where(|x| > threshold, x, 0) @ w_t (+ bias)``, the channels each row kept ``[n]`` and
    the rows of ``w_t`` read (their union): TEAL's input-sparse product, in one C call where
    :func:`kernels.fused_threshold_axpy` applies, else through the union index built here."""
    fused = kernels.fused_threshold_axpy(x, w_t, threshold)
    if fused is None:
        keep = x.abs() > threshold
        index = _nonzero(keep)
        return _select(_masked(x[:, index], keep[:, index]), w_t, index, bias), keep.sum(1), index.numel()
    out, kept, read = fused
    return (out + bias if bias is not None else out), kept, read


def _dot(x: torch.Tensor, w: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [n, d] @ w[index].T (+ bias[index])`` → ``[n, k]``."""
    out = kernels.dot_rows(x, w, index) if index.numel() else x.new_zeros(x.shape[0], 0)
    return out + bias[index] if bias is not None else out


class SparseMlp:
    """The replacement forward of one block (method chosen at construction)."""

    def __init__(self, block: MlpBlock, weights: Weights, method: str, thresholds: dict[str, torch.Tensor],
                 settings: dict, tracker: CallTracker, cores: dict[int, torch.Tensor],
                 record: Callable[[int, Tally, int], None], act: Callable | None = None) -> None:
        self.block, self.w, self.t = block, weights, thresholds
        self.act, self.gated, self.units = act or block.act, block.spec.gated, block.units
        self.settings, self.tracker, self.cores, self.record = settings, tracker, cores, record
        self.method = {"cats": self._cats, "teal": self._teal, "cett": self._cett, "core": self._core}[method]

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [n, d]
        with torch.no_grad():
            y, tally = self.method(rows)
        self.record(self.block.layer, tally, rows.shape[0])
        return y.reshape(*x.shape[:-1], y.shape[-1])

    # -- the dense parts -------------------------------------------------------------------
    def _neurons(self, x: torch.Tensor) -> torch.Tensor:
        """``a [n, U]`` computed densely (CETT needs every unit's value to decide)."""
        w = self.w
        if self.gated:
            return self.act(F.linear(x, w.gate, w.gate_bias)) * F.linear(x, w.up, w.up_bias)
        return self.act(F.linear(x, w.up, w.up_bias))

    def _down_share(self, inactive: torch.Tensor, up_too: bool) -> torch.Tensor:
        """Share of the MLP's weights skipped per row when ``inactive [n]`` units skip their
        down row and, with ``up_too``, their up row (gated MLPs: the gate is read in full)."""
        matrices = 3 if self.gated else 2
        skipped = 2 if up_too and self.gated else 1
        return inactive / self.units * skipped / matrices

    # -- methods ----------------------------------------------------------------------------
    def _cats(self, x: torch.Tensor) -> tuple[torch.Tensor, Tally]:
        w = self.w
        a = self.act(F.linear(x, w.gate, w.gate_bias) if self.gated else F.linear(x, w.up, w.up_bias))  # [n, U]
        keep = _active(a, self.t["act"])
        index = _nonzero(keep)
        h = a[:, index] * _dot(x, w.up, index, w.up_bias) if self.gated else a[:, index]  # [n, k]
        y = _select(_masked(h, keep[:, index]), w.down_t, index, w.down_bias)
        inactive = (~keep).sum(1).double()
        k = index.numel() / self.units
        read = (1 + 2 * k) / 3 if self.gated else (1 + k) / 2
        # Gated: a skipped unit's up and down rows; plain: only its down row.
        return y, Tally(inactive / self.units, self._down_share(inactive, up_too=self.gated), read)

    def _cett(self, x: torch.Tensor) -> tuple[torch.Tensor, Tally]:
        a = self._neurons(x)  # [n, U]
        keep = _active(a, self.t["neuron"])
        index = _nonzero(keep)
        y = _select(_masked(a[:, index], keep[:, index]), self.w.down_t, index, self.w.down_bias)
        inactive = (~keep).sum(1).double()
        k = index.numel() / self.units
        read = (2 + k) / 3 if self.gated else (1 + k) / 2
        return y, Tally(inactive / self.units, self._down_share(inactive, False), read)

    def _teal(self, x: torch.Tensor) -> tuple[torch.Tensor, Tally]:
        w = self.w
        pre, kept_in, read_in = _thresholded(x, w.first_t, self.t["in"], w.first_bias)
        a = self.act(pre[:, :self.units]) * pre[:, self.units:] if self.gated else self.act(pre)  # [n, U]
        y, kept, read_down = _thresholded(a, w.down_t, self.t["down"], w.down_bias)
        s_in = 1 - kept_in.double() / x.shape[1]
        s_down = 1 - kept.double() / self.units
        inputs = 2 if self.gated else 1
        share = (inputs * s_in + s_down) / (inputs + 1)
        read = (inputs * read_in / x.shape[1] + read_down / self.units) / (inputs + 1)
        return y, Tally(share, share, read)

    def _core(self, x: torch.Tensor) -> tuple[torch.Tensor, Tally]:
        info = self.tracker.current
        if info is None or info.prefill:
            return self._core_prefill(x, info)
        rows = info.rows(x.shape[0])
        cores = self.cores.get(self.block.layer)
        if rows is None or cores is None or cores.shape[0] != info.batch:
            from ..errors import InputError

            raise InputError(
                "CORE decoding needs the prompt's prefill inside the same sparsify() context, with the same batch size "
                f"(layer {self.block.layer}: {'no prefill seen' if cores is None else f'{cores.shape[0]} prompts'}, call batch {info.batch})"
            )
        examples = rows[0].to(x.device)
        keep_all = cores[examples]  # [n, U]
        index = _nonzero(keep_all)
        w = self.w
        if self.gated:
            a = self.act(_dot(x, w.gate, index, w.gate_bias)) * _dot(x, w.up, index, w.up_bias)  # [n, k]
        else:
            a = self.act(_dot(x, w.up, index, w.up_bias))
        y = _select(_masked(a, keep_all[:, index]), w.down_t, index, w.down_bias)
        share = (~keep_all).sum(1).double() / self.units
        return y, Tally(share, share, index.numel() / self.units)

    def _core_prefill(self, x: torch.Tensor, info: Any) -> tuple[torch.Tensor, Tally]:
        """Dense, as CoreInfer's prefill; the neurons choose each prompt's core set."""
        a = self._neurons(x)  # [n, U]
        self.cores[self.block.layer] = choose_cores(a, info, self.settings["alpha"], self.settings["beta"])
        y = a @ self.w.down_t
        y = y + self.w.down_bias if self.w.down_bias is not None else y
        zero = torch.zeros(x.shape[0], dtype=torch.float64)
        return y, Tally(zero, zero, 1.0)
