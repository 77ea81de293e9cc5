"""Outlier channels: per channel max |a| over median |a|, and excess kurtosis (METHODS.md,
"Outliers and memory"). A few channels whose largest values are hundreds of times their typical
value are what breaks low-bit activation quantisation: one scale per tensor must cover them.

Everything is streamed, one batch at a time, over the real tokens of each site (padding is
dropped by :func:`actscope.trace.flatten`, the foundation's flattening):

* ``max_abs``: exact.
* ``kurtosis``: exact (to float64 rounding). Central moments up to the 4th are computed per
  batch in float64 and merged with Pébay's pairwise formulas; the value is Fisher's *excess*
  kurtosis of the population, ``m4 / m2**2 - 3`` with ``m_k`` the k-th central moment over n,
  i.e. ``scipy.stats.kurtosis(a, fisher=True, bias=True)``; 0 for a Gaussian. It is of the
  signed activation ``a``, not of ``|a|``. NaN when a channel has no spread (``m2 == 0``).
* ``median_abs``: within a bounded relative error *(our choice: an exact median would need
  every value)*. Each channel keeps a histogram of ``|a|`` on log-spaced bins
  ``lo · 10**(j / bins_per_decade)``, plus exact-zero, underflow (``0 < |a| < lo``) and overflow
  (``|a| >= hi``) slots. The median (numpy's: the mean of the two middle order statistics for an
  even count) is estimated as the mean of the geometric centres of the bins holding the two
  middle values. When both lie in ``[lo, hi)``, ``median_abs / true median`` is within
  ``10 ** (±1 / (2 · bins_per_decade))``: ±2.33 % at the default 50 bins per decade, ±1.16 % at
  100 (:func:`median_relative_error`). ``median_lo`` / ``median_hi`` always bracket the true median
  (an underflowing middle value reads as ``lo``, an overflowing one as ``hi``; the bracket then
  widens to ``[0, lo]`` or ``[hi, max_abs]``). Memory: ``channels × (n_bins + 3)`` int64 per site.
* ``ratio = max_abs / median_abs`` (``inf`` when the median is exactly 0).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from ..errors import DataError, InputError
from ..sites import Site
from ..trace import Tracer, flatten
from ..results import TableResult
from ..models import Model, ModelLike

F64 = torch.float64
DEFAULT_SITES = "blocks.*.resid.post"
DEFAULT_THRESHOLD = 20.0


# -- the per-channel accumulator -----------------------------------------------------------
class ChannelOutlierStats:
    """Streaming per-channel max |a|, central moments (to the 4th) and a log histogram of |a|.

    ``update(x)`` takes ``x`` ``[N, C]``: the N real tokens of one site, C channels. NaN/±Inf
    entries are counted in ``nonfinite`` and left out of every statistic.
    """

    def __init__(self, channels: int, lo: float = 1e-6, hi: float = 1e6, bins_per_decade: int = 50):
        self.channels = channels
        self.lo, self.hi, self.bins_per_decade = _check_bins(lo, hi, bins_per_decade)
        self.n_bins = round(bins_per_decade * math.log10(hi / lo))
        steps = torch.arange(self.n_bins + 1, dtype=F64) / bins_per_decade
        self.edges = torch.pow(10.0, math.log10(lo) + steps)  # [n_bins + 1]
        self.edges[0], self.edges[-1] = lo, hi
        self.rows = 0
        self.count = torch.zeros(channels, dtype=torch.int64)  # [C] finite values seen
        self.nonfinite = torch.zeros(channels, dtype=torch.int64)
        self.mean = torch.zeros(channels, dtype=F64)
        self.m2 = torch.zeros(channels, dtype=F64)  # sums of powers of deviations from the mean
        self.m3 = torch.zeros(channels, dtype=F64)
        self.m4 = torch.zeros(channels, dtype=F64)
        self.max_abs = torch.zeros(channels, dtype=F64)
        # slots: 0 = exactly zero, 1 = underflow, 2 … n_bins + 1 = bins, n_bins + 2 = overflow
        self.hist = torch.zeros(channels, self.n_bins + 3, dtype=torch.int64)  # [C, slots]

    def update(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.channels or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(
                f"ChannelOutlierStats.update: x must be a floating tensor [N, {self.channels}] (real tokens × channels), "
                f"got {got}; flatten batch and positions and drop padding first"
            )
        x = x.detach().to("cpu", F64)  # [N, C]
        if x.shape[0] == 0:
            return
        self.rows += x.shape[0]
        finite = None  # [N, C] bool, built only when some entry is NaN/±Inf (their sum is not finite)
        if not bool(torch.isfinite(x.sum(0)).all()):
            finite = torch.isfinite(x)
            self.nonfinite += (~finite).sum(0)
            x = torch.where(finite, x, 0.0)
        self._merge_moments(*_batch_moments(x, finite))
        magnitude = x.abs()  # [N, C]
        self.max_abs = torch.maximum(self.max_abs, magnitude.max(0).values)
        self._add_to_histogram(magnitude, finite)

    def _merge_moments(self, n_b: torch.Tensor, mean_b, m2_b, m3_b, m4_b) -> None:
        """Pébay (2008) pairwise update of (n, mean, M2, M3, M4): exact up to rounding."""
        n_a = self.count.to(F64)
        nb = n_b.to(F64)
        n = (n_a + nb).clamp(min=1)
        delta = mean_b - self.mean
        m2_a, m3_a = self.m2, self.m3
        self.m4 = (self.m4 + m4_b + delta**4 * n_a * nb * (n_a**2 - n_a * nb + nb**2) / n**3
                   + 6 * delta**2 * (n_a**2 * m2_b + nb**2 * m2_a) / n**2 + 4 * delta * (n_a * m3_b - nb * m3_a) / n)
        self.m3 = m3_a + m3_b + delta**3 * n_a * nb * (n_a - nb) / n**2 + 3 * delta * (n_a * m2_b - nb * m2_a) / n
        self.m2 = m2_a + m2_b + delta**2 * n_a * nb / n
        self.mean = self.mean + delta * nb / n
        self.count += n_b

    def _add_to_histogram(self, magnitude: torch.Tensor, finite: torch.Tensor | None) -> None:
        # bucketize against the float64 edges is exact at the edges: a value is never one bin off.
        slot = torch.bucketize(magnitude, self.edges, right=True) + 1  # [N, C]: 1 underflow … overflow
        slot = torch.where(magnitude == 0, 0, slot)
        width = self.n_bins + 3
        flat = torch.arange(self.channels) * width + slot  # [N, C] index of (channel, slot)
        flat = flat.reshape(-1) if finite is None else flat[finite]
        self.hist += torch.bincount(flat, minlength=self.channels * width).view(self.channels, width)

    # -- read-outs -------------------------------------------------------------------------
    def kurtosis(self) -> torch.Tensor:
        """Fisher excess kurtosis per channel, population moments; NaN without spread."""
        n = self.count.to(F64)
        spread = self.m2 > 0
        value = n * self.m4 / torch.where(spread, self.m2, 1.0) ** 2 - 3.0
        return torch.where(spread, value, math.nan)

    def median(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(estimate, lower bound, upper bound) of the median of |a| per channel."""
        cumulative = self.hist.cumsum(1)  # [C, slots]
        n = self.count
        low_slot = (cumulative <= ((n - 1) // 2)[:, None]).sum(1)  # slot of the lower middle value
        high_slot = (cumulative <= (n // 2)[:, None]).sum(1)  # slot of the upper middle value
        lower, upper, centre = self._slot_bounds()
        estimate = (centre[low_slot] + centre[high_slot]) / 2
        top = upper[high_slot]
        top = torch.where(high_slot == self.n_bins + 2, self.max_abs, top)  # overflow: up to the max
        empty = n == 0
        return (torch.where(empty, math.nan, estimate), torch.where(empty, math.nan, lower[low_slot]),
                torch.where(empty, math.nan, top))

    def _slot_bounds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per slot: lower edge, upper edge and representative value ([slots] each)."""
        edges = self.edges
        zero = torch.zeros(1, dtype=F64)
        lo, hi = edges[:1], edges[-1:]
        lower = torch.cat([zero, zero, edges[:-1], hi])
        upper = torch.cat([zero, lo, edges[1:], torch.full((1,), math.inf, dtype=F64)])
        centre = torch.cat([zero, lo, (edges[:-1] * edges[1:]).sqrt(), hi])
        return lower, upper, centre


def _batch_moments(x: torch.Tensor, finite: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Count, mean and sums of 2nd-4th powers of deviations of one batch's finite values
    (``x`` holds 0 where ``finite`` is False)."""
    n = torch.full((x.shape[1],), x.shape[0], dtype=torch.int64) if finite is None else finite.sum(0)  # [C]
    mean = x.sum(0) / n.clamp(min=1)
    deviation = x - mean  # [N, C]
    if finite is not None:
        deviation = torch.where(finite, deviation, 0.0)
    square = deviation * deviation
    return n, mean, square.sum(0), (square * deviation).sum(0), (square * square).sum(0)


def median_relative_error(bins_per_decade: int) -> float:
    """The largest relative error of ``median_abs`` when the middle values lie in [lo, hi)."""
    return 10 ** (1 / (2 * bins_per_decade)) - 1


def _check_bins(lo: Any, hi: Any, bins_per_decade: Any) -> tuple[float, float, int]:
    reals = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (lo, hi))
    if not reals or not 0 < lo < hi or not math.isfinite(hi):
        raise InputError(f"outlier_channels: need 0 < lo < hi (finite), got lo={lo!r}, hi={hi!r}; the defaults are lo=1e-6, hi=1e6")
    if isinstance(bins_per_decade, bool) or not isinstance(bins_per_decade, numbers.Integral) or bins_per_decade < 1:
        raise InputError(f"outlier_channels: bins_per_decade must be a whole number >= 1, got {bins_per_decade!r}; e.g. 50")
    exact = bins_per_decade * math.log10(hi / lo)
    if abs(exact - round(exact)) > 1e-6:
        raise InputError(
            f"outlier_channels: lo={lo!r} to hi={hi!r} is {exact:.3f} bins at bins_per_decade={bins_per_decade}, "
            "not a whole number; choose hi = lo * 10 ** (n / bins_per_decade)"
        )
    return float(lo), float(hi), int(bins_per_decade)


class _ChannelTracer(Tracer):
    """Feeds every site's real-token rows into its own :class:`ChannelOutlierStats`."""

    def __init__(self, model: Model, sites: Any, bins: tuple[float, float, int]) -> None:
        super().__init__(model, sites)
        self.bins = bins
        self.stats: dict[str, ChannelOutlierStats] = {}
        for site in self.plan.sites:
            if site.hook.layout == "pattern":
                raise InputError(
                    f"outlier_channels: {site.label} holds attention probabilities, which have no channels; "
                    "choose unit sites such as blocks.*.resid.post or blocks.*.mlp.post"
                )

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        reading = flatten(site, value, self._batch_info(), module)  # [n real tokens, channels]
        stats = self.stats.get(site.label)
        if stats is None:
            stats = self.stats[site.label] = ChannelOutlierStats(reading.values.shape[-1], *self.bins)
        stats.update(reading.values)


# -- the result ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class OutlierChannels(TableResult):
    """One row per (site, channel): max |a|, median |a| (with its bracket), their ratio,
    Fisher excess kurtosis, mean, std. ``summary()`` gives one row per site."""

    table_name: ClassVar[str] = "outlier_channels"
    columns: Mapping[str, np.ndarray]
    threshold: float
    bins_per_decade: int

    def to_table(self) -> dict[str, np.ndarray]:
        return {name: column.copy() for name, column in self.columns.items()}

    @property
    def median_relative_error(self) -> float:
        return median_relative_error(self.bins_per_decade)

    def summary(self, threshold: float | None = None) -> "OutlierSummary":
        """Per site: channels whose ratio exceeds ``threshold`` (default: the one given)."""
        return OutlierSummary(_site_rows(self.columns, self.threshold if threshold is None else _check_threshold(threshold)))


@dataclass(frozen=True, eq=False)
class OutlierSummary(TableResult):
    """One row per site: channels, tokens, outlier channels (ratio > threshold), the largest
    ratio and kurtosis with their channels, and the median kurtosis."""

    table_name: ClassVar[str] = "outlier_sites"
    columns: Mapping[str, np.ndarray]

    def to_table(self) -> dict[str, np.ndarray]:
        return {name: column.copy() for name, column in self.columns.items()}


def _channel_rows(site: Site, stats: ChannelOutlierStats) -> dict[str, np.ndarray]:
    median, median_lo, median_hi = (t.numpy() for t in stats.median())
    max_abs = stats.max_abs.numpy().copy()
    max_abs[stats.count.numpy() == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):  # median 0 → inf, empty → nan
        ratio = max_abs / median
    count = stats.count.numpy()
    std = np.sqrt(stats.m2.numpy() / np.maximum(count, 1))
    channels = len(count)
    return {
        "site": np.array([site.label] * channels, dtype=object),
        "layer": np.full(channels, -1 if site.layer is None else site.layer, dtype=np.int64),
        "channel": np.asarray(site.units, dtype=np.int64) if site.units else np.arange(channels, dtype=np.int64),
        "count": count.copy(),
        "max_abs": max_abs,
        "median_abs": median,
        "median_lo": median_lo,
        "median_hi": median_hi,
        "ratio": ratio,
        "kurtosis": stats.kurtosis().numpy(),
        "mean": np.where(count > 0, stats.mean.numpy(), np.nan),
        "std": np.where(count > 0, std, np.nan),
        "nonfinite": stats.nonfinite.numpy().copy(),
    }


def _site_rows(columns: Mapping[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    rows: list[dict[str, Any]] = []
    sites = columns["site"]
    for label in dict.fromkeys(sites.tolist()):
        pick = sites == label
        ratio, kurtosis, channel = columns["ratio"][pick], columns["kurtosis"][pick], columns["channel"][pick]
        rows.append({
            "site": label,
            "layer": int(columns["layer"][pick][0]),
            "channels": int(pick.sum()),
            "tokens": int((columns["count"][pick] + columns["nonfinite"][pick]).max()),  # every row: one or the other
            "threshold": threshold,
            "outlier_channels": int((ratio > threshold).sum()),
            **_largest("ratio", ratio, channel),
            **_largest("kurtosis", kurtosis, channel),
            "median_kurtosis": float(np.median(kurtosis[~np.isnan(kurtosis)])) if (~np.isnan(kurtosis)).any() else math.nan,
        })
    return {key: np.array([row[key] for row in rows], dtype=object if key == "site" else None) for key in rows[0]} if rows else {}


def _largest(name: str, values: np.ndarray, channel: np.ndarray) -> dict[str, Any]:
    known = ~np.isnan(values)
    if not known.any():
        return {f"max_{name}": math.nan, f"max_{name}_channel": -1}
    best = int(np.argmax(np.where(known, values, -np.inf)))
    return {f"max_{name}": float(values[best]), f"max_{name}_channel": int(channel[best])}


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold > 0:
        raise InputError(f"outlier_channels: threshold must be a positive number (a max/median ratio), got {threshold!r}; e.g. 20")
    return float(threshold)


# -- the entry point -----------------------------------------------------------------------------
def outlier_channels(
    model: ModelLike,
    data: Any,
    sites: str | Sequence[str] = DEFAULT_SITES,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    lo: float = 1e-6,
    hi: float = 1e6,
    bins_per_decade: int = 50,
    batch_size: int = 8,
    max_length: int = 128,
    max_tokens: int | None = None,
) -> OutlierChannels:
    """Per (site, channel) max |a|, median |a|, their ratio and excess kurtosis over ``data``.

    ``model``: an :class:`actscope.Model`, any ``nn.Module`` or a model directory. ``data``:
    strings (the model's tokenizer), a text source, or model-input dicts; padding is excluded.
    ``sites``: unit sites (default ``blocks.*.resid.post``; ``module:PATH@output`` for any
    model, whose channels are axis 1 of feature maps). ``threshold``: the ratio above which
    ``summary()`` counts a channel as an outlier. ``lo``/``hi``/``bins_per_decade``: the |a|
    histogram behind the median (see the module docstring for its error bound).
    """
    threshold = _check_threshold(threshold)
    bins = _check_bins(lo, hi, bins_per_decade)
    from ..feeding import feed
    from ..models import as_model

    tracer = _ChannelTracer(as_model(model), sites, bins)
    feed(tracer, data, batch_size=batch_size, max_length=max_length, max_tokens=max_tokens)
    parts = [_channel_rows(site, tracer.stats[site.label]) for site in tracer.plan.sites if site.label in tracer.stats]
    if not parts:
        raise DataError(f"outlier_channels: no site was reached by the forward passes ({', '.join(tracer.plan.names)})")
    columns = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return OutlierChannels(columns, threshold, bins[2])


__all__ = ["ChannelOutlierStats", "OutlierChannels", "OutlierSummary", "median_relative_error", "outlier_channels"]
