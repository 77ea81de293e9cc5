"""Micro-benchmark of the one-pass statistics kernel (src/actscope/stats/_fused.c).

Builds the kernel source several ways and times each on the same batch (GELU of a standard
normal, float32), single thread, in CPU time (time.process_time, so that other processes on a
shared machine matter less), the builds interleaved round by round:

=============  ===============================================================================
``before``     ``-DACTSCOPE_TABLE_SLOTS -DACTSCOPE_SINGLE_COUNTS``: slots from two dependent
               table lookups (gathers), one increment per value; the kernel before the window
``tables``     ``-DACTSCOPE_TABLE_SLOTS``: table slots, pair counters (CPUs without AVX-512,
               and windows that do not fit)
``window-1``   ``-DACTSCOPE_SINGLE_COUNTS``: AVX-512 register-window slots, one increment per
               value
``after``      the shipped build: window slots and pair counters
``no-hist``    ``-DACTSCOPE_NO_HISTOGRAM``: everything but the |a| histogram
``portable``   ``-mno-avx512f``: the whole kernel as built on a CPU without AVX-512
=============  ===============================================================================

All but ``no-hist`` must count the same slots (checked before timing). The histogram's cost is
a build's time minus ``no-hist``'s. Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/stats_kernel.py [--rounds 101]
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from actscope.stats import DEFAULT_EPS, AbsHistogram, fused

NATIVE = ["-O3", "-march=native"]
BUILDS = {
    "before": [*NATIVE, "-DACTSCOPE_TABLE_SLOTS", "-DACTSCOPE_SINGLE_COUNTS"],
    "tables": [*NATIVE, "-DACTSCOPE_TABLE_SLOTS"],
    "window-1": [*NATIVE, "-DACTSCOPE_SINGLE_COUNTS"],
    "after": NATIVE,
    "no-hist": [*NATIVE, "-DACTSCOPE_NO_HISTOGRAM"],
    "portable": [*NATIVE, "-mno-avx512f"],
}


def build(folder: Path, name: str, flags: list[str]) -> ctypes.CDLL:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    target = folder / f"{name}.so"
    with resources.as_file(resources.files("actscope.stats").joinpath(fused.SOURCE)) as source:
        subprocess.run([compiler, *flags, "-fPIC", "-shared", "-o", str(target), str(source), "-lm"], check=True)
    return ctypes.CDLL(str(target))


def kernel_call(x: torch.Tensor, hist: AbsHistogram, k: int) -> Callable[[ctypes.CDLL], torch.Tensor]:
    """A function running one build's kernel on ``x`` [N, U] (fresh outputs, as site_partials
    prepares them, on one thread); it returns the histogram slots."""
    n, u = x.shape
    edges = tuple(hist._edges.tolist())
    slot_of_key, key_shift, next_slot_at = fused.slot_tables(edges)
    window, key_lo = fused.slot_window(edges)
    eps_f = fused.float_thresholds(DEFAULT_EPS)
    shift = fused._shift(x)
    # a top-k state as after a few batches (few values beat it); the kernel updates it in place
    top_values = x.topk(k, dim=0).values.T.contiguous().double()  # [U, k] descending
    top_tokens = torch.arange(u * k, dtype=torch.int64).view(u, k)
    tok = torch.arange(n, dtype=torch.int64) + u * k  # later tokens than the kept ones
    criteria = 1 + len(DEFAULT_EPS)
    p = fused._ptr

    def call(lib: ctypes.CDLL) -> torch.Tensor:
        i64, f64 = torch.int64, torch.float64
        out = [torch.zeros(u, dtype=i64), torch.zeros(u, dtype=i64)]  # count, nonfinite
        out += [torch.zeros(u, dtype=f64) for _ in range(4)]  # sum, sumsq, min, max
        out += [torch.zeros(criteria, u, dtype=i64), torch.zeros(criteria, u + 1, dtype=i64)]
        out += [torch.zeros(len(next_slot_at), dtype=i64)]  # slots
        values, tokens = top_values.clone(), top_tokens.clone()
        status = lib.actscope_site_partials(
            p(x), ctypes.c_int64(n), ctypes.c_int64(u), p(eps_f), ctypes.c_int32(len(DEFAULT_EPS)),
            p(slot_of_key), ctypes.c_int32(key_shift), p(next_slot_at), ctypes.c_int32(len(next_slot_at)),
            p(window if len(window) else slot_of_key), ctypes.c_int32(key_lo), ctypes.c_int32(len(window)),
            p(shift), ctypes.c_int32(1), ctypes.c_int32(k), p(values), p(tokens), p(tok), *map(p, out),
        )
        if status != 0:
            raise RuntimeError(f"kernel status {status}")
        return out[-1]

    return call


def time_builds(libs: dict[str, ctypes.CDLL], call: Callable, rounds: int, values: int) -> dict[str, list[float]]:
    """ns/value of each build, ``rounds`` times, the builds interleaved within each round."""
    times: dict[str, list[float]] = {name: [] for name in libs}
    for _ in range(rounds):
        for name, lib in libs.items():
            start = time.process_time()
            call(lib)
            times[name].append((time.process_time() - start) / values * 1e9)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--units", type=int, default=1536)
    parser.add_argument("--rounds", type=int, default=101, help="timed calls per build; the median is reported")
    parser.add_argument("--bins-per-decade", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(args.rows, args.units)).contiguous()  # [N, U] float32
    hist = AbsHistogram(bins_per_decade=args.bins_per_decade)
    window, _ = fused.slot_window(tuple(hist._edges.tolist()))
    call = kernel_call(x, hist, k=8)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {name: build(Path(tmp), name, flags) for name, flags in BUILDS.items()}
        reference = call(libs["before"])
        for name, lib in libs.items():
            if name != "no-hist" and not torch.equal(call(lib), reference):
                raise SystemExit(f"{name}: histogram slots differ from the 'before' build")
        times = time_builds(libs, call, args.rounds, x.numel())
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(f"batch {args.rows} x {args.units} GELU(randn) float32, {len(DEFAULT_EPS)} eps, top-8, 1 thread, "
          f"{args.rounds} rounds; bins_per_decade={args.bins_per_decade}, {hist.n_bins + 4} slots, "
          f"register window {len(window)} keys{'' if len(window) else ' (unused: tables)'}; "
          f"window build has AVX-512: {bool(libs['after'].actscope_window_slots())}")
    print(f"{'build':<10}{'median ns/value':>17}{'best ns/value':>15}{'histogram ns/value':>20}")
    for name in libs:
        hist_cost = "" if name in ("no-hist", "portable") else f"{median[name] - median['no-hist']:.3f}"
        print(f"{name:<10}{median[name]:>17.3f}{min(times[name]):>15.3f}{hist_cost:>20}")
    before, after, no_hist = median["before"], median["after"], median["no-hist"]
    print(f"after vs before: kernel {(before - after) / before:.1%} shorter ({before:.3f} -> {after:.3f} ns/value); "
          f"histogram {before - no_hist:.3f} -> {after - no_hist:.3f} ns/value")


if __name__ == "__main__":
    main()
