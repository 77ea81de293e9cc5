"""Per unit, the k largest activations seen and the tokens they came from."""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor

from actscope.errors import InputError
from actscope.stats._common import (
    F64,
    I64,
    Batch,
    check_n_units,
    check_other,
    check_state,
    check_state_config,
    gathered,
    place,
    prepare,
    state_header,
    state_tensor,
)


class TopExamples:
    """The top-activating examples of each unit: its ``k`` largest finite activations and the
    global token ids where they occurred (METHODS.md: check a neuron's decoded meaning against
    its top-activating contexts).

    ``values`` ``[U, k]`` float64, sorted descending per unit, ``-inf`` where fewer than ``k``
    finite values were seen; ``tok`` ``[U, k]`` int64, ``-1`` on that padding. Equal values are
    ordered by smaller token id. Which of several tokens tied at the k-th value is kept may
    depend on how the data was chunked; the kept *values* never do.

    ``update(x, tok)``: ``x`` is ``[N, U]`` (real tokens only), ``tok`` ``[N]`` int64 is
    required. The state stays on the device of the updates; the results are CPU tensors.
    """

    KIND = "actscope.stats.TopExamples"
    _SETUP = ("n_units", "k")  # what must match for a merge
    _STATE = ("_values", "_tok")  # tensors, on one device

    def __init__(self, n_units: int, k: int = 8):
        self.n_units = check_n_units(n_units, "TopExamples")
        self.k = _check_k(k)
        self._values = torch.full((self.n_units, self.k), -math.inf, dtype=F64)  # [U, k]
        self._tok = torch.full((self.n_units, self.k), -1, dtype=I64)  # [U, k]

    # -- streaming -------------------------------------------------------------------------
    def update(self, x: Tensor, tok: Tensor | None = None) -> None:
        """Add the real tokens ``x`` ``[N, U]`` whose global token ids are ``tok`` ``[N]``."""
        batch = prepare(x, tok, self.n_units, "TopExamples", need_tok=True)
        if batch is not None:
            self._update_batch(batch)

    def _update_batch(self, batch: Batch) -> None:
        if batch.tok is None:
            raise InputError(
                "TopExamples.update: tok is required; pass an int64 tensor [N] of global "
                "token ids of the rows of x."
            )
        place(self, self._STATE, batch.device)
        x = batch.x if batch.finite is None else torch.where(batch.finite, batch.x, -math.inf)
        self._update_values(x, batch.tok)

    def _update_values(self, x: Tensor, tok: Tensor, batch_max: Tensor | None = None) -> None:
        """Add ``x`` ``[N, U]`` (any float dtype holding the values exactly, on the state's
        device; non-finite entries already -inf).

        Only units whose batch maximum beats their current k-th best can change; after the
        first few batches those are few, so the top-k runs on their columns alone.
        ``batch_max`` (``[U]``, the per-unit maximum of ``x``) saves a pass when known.
        """
        kth = self._values[:, -1]  # [U] what a newcomer must beat; -inf until k were seen
        peak = x.amax(0) if batch_max is None else batch_max
        units = (peak.to(F64) > kth).nonzero().squeeze(1)  # [C]
        if units.numel() == 0:
            return
        columns = x.index_select(1, units)  # [N, C]
        values, rows = torch.topk(columns, min(self.k, x.shape[0]), dim=0, sorted=False)  # [k', C]
        toks = tok.index_select(0, rows.reshape(-1)).view(rows.shape)  # [k', C]
        self._keep_best(values.T.to(F64), toks.T, units)

    def _kernel_state(self, tok: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(values, tokens, tok)`` for the fused kernel, which updates the first two in place:
        this accumulator's own contiguous CPU tensors (never a caller's), and ``tok`` as int64."""
        place(self, self._STATE, torch.device("cpu"))
        if not (self._values.is_contiguous() and self._tok.is_contiguous()):
            self._values, self._tok = self._values.contiguous(), self._tok.contiguous()
        return self._values, self._tok, tok.to("cpu", torch.int64).contiguous()

    def merge(self, other: TopExamples) -> TopExamples:
        """Add ``other``'s examples (in place; same n_units and k required); returns self."""
        check_other(self, other, self._SETUP)
        device = self._values.device
        self._keep_best(other._values.to(device), other._tok.to(device))
        return self

    def _keep_best(self, values: Tensor, toks: Tensor, units: Tensor | None = None) -> None:
        """Keep the k best of the current state and the candidates ``[C, m]`` of ``units``
        (all units when None)."""
        if units is not None:
            # index_select/index_copy_, not x[units]: advanced indexing takes a slow parallel
            # path on the CPU (tens of ms for a [U, k] table).
            best_values, best_toks = self._values, self._tok
            self._values, self._tok = best_values.index_select(0, units), best_toks.index_select(0, units)
            self._keep_best(values, toks)
            self._values = best_values.index_copy(0, units, self._values)
            self._tok = best_toks.index_copy(0, units, self._tok)
            return
        values = torch.cat([self._values, values], dim=1)  # [U, k + m]
        toks = torch.cat([self._tok, toks], dim=1)
        # Two stable sorts: by token id, then by value descending, so ties are ordered by token.
        order = torch.argsort(toks, dim=1, stable=True)
        values, toks = values.gather(1, order), toks.gather(1, order)
        order = torch.argsort(values, dim=1, descending=True, stable=True)[:, : self.k]
        values, toks = values.gather(1, order), toks.gather(1, order)
        # -inf entries are padding, or non-finite inputs masked to -inf: neither is an example.
        self._tok = torch.where(values == -math.inf, -1, toks)
        self._values = values

    # -- results ---------------------------------------------------------------------------
    @property
    def values(self) -> Tensor:
        """``[U, k]`` float64, descending per unit, ``-inf`` padding."""
        return gathered(self._values)

    @property
    def tok(self) -> Tensor:
        """``[U, k]`` int64 global token ids of ``values``, ``-1`` padding."""
        return gathered(self._tok)

    def to_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Flat arrays ``(unit, rank, value, tok)`` of every real example, padding left out.

        ``unit``, ``rank`` and ``tok`` are int64, ``value`` float64; rows are ordered by unit,
        then rank (0 = largest). One row per example, ready for a table.
        """
        values, toks = self.values, self.tok  # gathered to the CPU
        real = toks >= 0  # [U, k]
        unit = torch.arange(self.n_units).unsqueeze(1).expand(-1, self.k)
        rank = torch.arange(self.k).unsqueeze(0).expand(self.n_units, -1)
        return unit[real].numpy(), rank[real].numpy(), values[real].numpy(), toks[real].numpy()

    # -- persistence -----------------------------------------------------------------------
    _STATE_KEYS = ("n_units", "k", "values", "tok")

    def state_dict(self) -> dict[str, Any]:
        """Plain CPU tensors and ints; ``from_state_dict`` rebuilds an equal accumulator."""
        return {
            **state_header(self.KIND),
            "n_units": self.n_units,
            "k": self.k,
            "values": gathered(self._values),
            "tok": gathered(self._tok),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Replace this accumulator's state by ``sd`` (same n_units and k required)."""
        check_state(sd, self.KIND, self._STATE_KEYS)
        check_state_config(sd, self.KIND, n_units=self.n_units, k=self.k)
        shape = (self.n_units, self.k)
        self._values = state_tensor(sd, "values", F64, shape, self.KIND)
        self._tok = state_tensor(sd, "tok", I64, shape, self.KIND)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> TopExamples:
        """A new accumulator holding the state ``sd``."""
        check_state(sd, cls.KIND, cls._STATE_KEYS)
        acc = cls(sd["n_units"], k=sd["k"])
        acc.load_state_dict(sd)
        return acc

    def __repr__(self) -> str:
        return f"TopExamples(n_units={self.n_units}, k={self.k})"


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise InputError(
            f"TopExamples: k must be an int >= 1 (examples kept per unit), got {k!r}."
        )
    return int(k)
