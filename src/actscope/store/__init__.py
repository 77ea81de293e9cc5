"""Run directory read/write: manifest.json, Parquet tables, safetensors arrays, resumable state;
and files bound to one model's weights (:mod:`actscope.store.bound`).

pyarrow, pandas, safetensors and torch are imported only when a run is written or read.
"""
from actscope.store.bound import Bound, WeightBound, check_bound_to, read_bound, save_bound
from actscope.store.manifest import library_versions, now_iso, weight_hash
from actscope.store.reader import RunData, read_run
from actscope.store.writer import check_target, write_run

__all__ = ["check_target", "write_run", "read_run", "RunData", "weight_hash", "library_versions", "now_iso",
           "Bound", "WeightBound", "save_bound", "read_bound", "check_bound_to"]
