"""Per-head attention-sink statistics from attention probabilities."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from actscope.errors import InputError
from actscope.stats._common import (
    F64,
    I64,
    check_n_units,
    check_other,
    check_state,
    check_state_config,
    column_sum,
    compute_device,
    gathered,
    place,
    safe_ratio,
    state_header,
    state_tensor,
    work_dtype,
)


class HeadSink:
    """Attention-sink statistics per head, averaged over real queries (METHODS.md,
    "Extreme-token phenomena").

    Per head ``h``, over every real query ``q``:

    * ``first_token_attention``: mean of ``p[h, q, 0]``, the attention on the first key
      position (the usual sink; a head is dormant when most of its mass goes there);
    * ``mean_max_attention``: mean of ``max_k p[h, q, k]``;
    * ``mean_entropy``: mean of ``-sum_k p log p`` (natural log, ``0 log 0 = 0``).

    ``count`` ``[H]`` is the number of (query, head) rows used; a row holding NaN/±Inf is left
    out and counted in ``nonfinite`` ``[H]``. All means are NaN where ``count == 0``.

    Unlike the unit accumulators, ``update(pattern, query_mask)`` takes the attention
    probabilities ``pattern`` ``[B, H, Q, K]`` and a bool ``query_mask`` ``[B, Q]`` marking real
    queries (padded keys are expected to carry probability 0 already). The sums stay on the
    device of the updates (float32 work and :func:`~actscope.stats._common.column_sum` off the
    CPU, as for the unit statistics); the results are CPU tensors.
    """

    KIND = "actscope.stats.HeadSink"
    _SETUP = ("n_heads",)  # what must match for a merge
    _STATE = ("_count", "_nonfinite", "_sums")  # tensors, on one device

    def __init__(self, n_heads: int):
        self.n_heads = check_n_units(
            n_heads, "HeadSink", name="n_heads", hint="n_heads=pattern.shape[1]"
        )
        self._count = torch.zeros(self.n_heads, dtype=I64)  # [H]
        self._nonfinite = torch.zeros(self.n_heads, dtype=I64)  # [H]
        self._sums = torch.zeros(3, self.n_heads, dtype=F64)  # [first, max, entropy] x [H]

    # -- streaming -------------------------------------------------------------------------
    def update(self, pattern: Tensor, query_mask: Tensor) -> None:
        """Add attention probabilities ``pattern`` ``[B, H, Q, K]`` on real queries
        ``query_mask`` ``[B, Q]`` (bool)."""
        self._check_input(pattern, query_mask)
        device = compute_device(pattern)
        mask = query_mask.detach().to(device)
        rows = pattern.detach().to(device).transpose(1, 2)[mask]  # [Nq, H, K] real queries
        if rows.shape[0] == 0:
            return
        place(self, self._STATE, device)
        sums = _row_sums(rows.to(work_dtype(rows)))  # [4, H]: first, max, entropy, rows used
        count = sums[3].to(I64)
        self._sums += sums[:3]
        self._count += count
        self._nonfinite += rows.shape[0] - count

    def _check_input(self, pattern: Any, query_mask: Any) -> None:
        if not isinstance(pattern, Tensor) or pattern.ndim != 4 or not pattern.is_floating_point():
            got = (
                f"{pattern.dtype} {tuple(pattern.shape)}"
                if isinstance(pattern, Tensor)
                else type(pattern).__name__
            )
            raise InputError(
                "HeadSink.update: pattern must be a floating tensor [batch, head, query, key] "
                f"of attention probabilities, got {got}."
            )
        b, h, q, k = pattern.shape
        if h != self.n_heads:
            raise InputError(
                f"HeadSink.update: this accumulator was built for {self.n_heads} heads but "
                f"pattern has {h} (shape {tuple(pattern.shape)}); build one per attention "
                "layer with n_heads=pattern.shape[1]."
            )
        if k == 0:
            raise InputError(
                f"HeadSink.update: pattern has no key positions (shape {tuple(pattern.shape)})."
            )
        if (
            not isinstance(query_mask, Tensor)
            or query_mask.dtype != torch.bool
            or tuple(query_mask.shape) != (b, q)
        ):
            got = (
                f"{query_mask.dtype} {tuple(query_mask.shape)}"
                if isinstance(query_mask, Tensor)
                else type(query_mask).__name__
            )
            raise InputError(
                f"HeadSink.update: query_mask must be a bool tensor [batch, query] = [{b}, {q}] "
                f"marking real queries, got {got}; e.g. attention_mask.bool()."
            )

    def merge(self, other: HeadSink) -> HeadSink:
        """Add ``other``'s data (in place; same n_heads required); returns self."""
        check_other(self, other, self._SETUP)
        device = self._count.device
        self._count += other._count.to(device)
        self._nonfinite += other._nonfinite.to(device)
        self._sums += other._sums.to(device)
        return self

    # -- results ---------------------------------------------------------------------------
    @property
    def count(self) -> Tensor:
        """``[H]`` int64: (query, head) rows averaged over."""
        return gathered(self._count)

    @property
    def nonfinite(self) -> Tensor:
        """``[H]`` int64: rows left out because they held NaN/±Inf."""
        return gathered(self._nonfinite)

    @property
    def first_token_attention(self) -> Tensor:
        """``[H]`` float64: mean attention on key position 0 (NaN where count == 0)."""
        return safe_ratio(self._sums[0], self._count).cpu()

    @property
    def mean_max_attention(self) -> Tensor:
        """``[H]`` float64: mean over queries of the largest attention probability."""
        return safe_ratio(self._sums[1], self._count).cpu()

    @property
    def mean_entropy(self) -> Tensor:
        """``[H]`` float64: mean over queries of the attention entropy, in nats."""
        return safe_ratio(self._sums[2], self._count).cpu()

    # -- persistence -----------------------------------------------------------------------
    _STATE_KEYS = ("n_heads", "count", "nonfinite", "first_sum", "max_sum", "entropy_sum")

    def state_dict(self) -> dict[str, Any]:
        """Plain CPU tensors and ints; ``from_state_dict`` rebuilds an equal accumulator."""
        return {
            **state_header(self.KIND),
            "n_heads": self.n_heads,
            "count": gathered(self._count),
            "nonfinite": gathered(self._nonfinite),
            "first_sum": gathered(self._sums[0]),
            "max_sum": gathered(self._sums[1]),
            "entropy_sum": gathered(self._sums[2]),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Replace this accumulator's state by ``sd`` (same n_heads required)."""
        check_state(sd, self.KIND, self._STATE_KEYS)
        check_state_config(sd, self.KIND, n_heads=self.n_heads)
        shape = (self.n_heads,)
        self._count = state_tensor(sd, "count", I64, shape, self.KIND)
        self._nonfinite = state_tensor(sd, "nonfinite", I64, shape, self.KIND)
        sums = [state_tensor(sd, f"{n}_sum", F64, shape, self.KIND) for n in _SUM_NAMES]
        self._sums = torch.stack(sums)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> HeadSink:
        """A new accumulator holding the state ``sd``."""
        check_state(sd, cls.KIND, cls._STATE_KEYS)
        acc = cls(sd["n_heads"])
        acc.load_state_dict(sd)
        return acc

    def __repr__(self) -> str:
        return f"HeadSink(n_heads={self.n_heads}, queries={int(self._count.max())})"


_SUM_NAMES = ("first", "max", "entropy")


def _row_sums(p: Tensor) -> Tensor:
    """Sums over the query rows ``p`` ``[Nq, H, K]`` (float64, or float32 off the CPU) of
    first-key attention, max attention and entropy, plus the number of rows used, as a
    ``[4, H]`` float64 tensor on ``p``'s device."""
    finite = torch.isfinite(p).all(-1)  # [Nq, H]
    if bool(finite.all()):
        count = torch.full((p.shape[1],), p.shape[0], dtype=F64, device=p.device)
    else:
        p = torch.where(finite.unsqueeze(-1), p, 0.0)  # a zero row adds 0 to every sum
        count = finite.sum(0).to(F64)
    entropy = -torch.special.xlogy(p, p).sum(-1)  # [Nq, H]; xlogy gives 0 log 0 = 0
    per_row = torch.stack([p[..., 0], p.amax(-1), entropy], dim=-1)  # [Nq, H, 3]
    sums = column_sum(per_row.reshape(p.shape[0], -1)).view(p.shape[1], 3).T  # [3, H] float64
    return torch.cat([sums, count.unsqueeze(0)])
