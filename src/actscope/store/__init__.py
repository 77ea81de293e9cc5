"""Run directory read/write: manifest.json, Parquet tables, safetensors arrays, resumable state.

pyarrow, pandas, safetensors and torch are imported only when a run is written or read.
"""
from actscope.store.manifest import library_versions, now_iso, weight_hash
from actscope.store.reader import RunData, read_run
from actscope.store.writer import check_target, write_run

__all__ = ["check_target", "write_run", "read_run", "RunData", "weight_hash", "library_versions", "now_iso"]
