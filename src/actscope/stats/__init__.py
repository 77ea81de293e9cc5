"""Streaming, mergeable accumulators of activation statistics.

Each accumulator is fed ``update(x, tok=None)`` with ``x`` ``[N, U]``: the N real tokens of one
site (padding already removed by the caller), any float dtype and device; statistics are kept
in float64 where the activations are (the device of the updates) and read on the CPU, NaN/±Inf
entries are counted apart (see ``_common`` for the float32 work off the CPU and its bound). ``merge(other)`` adds another
accumulator's data in place (two halves merged equal one pass), ``state_dict()`` /
``load_state_dict(sd)`` / ``from_state_dict(sd)`` save and restore them.
"""
from actscope.stats.heads import HeadSink
from actscope.stats.histogram import AbsHistogram
from actscope.stats.moments import UnitMoments
from actscope.stats.site import SiteStats
from actscope.stats.thresholds import DEFAULT_EPS, ThresholdLadder
from actscope.stats.topk import TopExamples

__all__ = [
    "DEFAULT_EPS",
    "AbsHistogram",
    "HeadSink",
    "SiteStats",
    "ThresholdLadder",
    "TopExamples",
    "UnitMoments",
]
