"""Data-parallel profiling and activation harvesting (issue 14), measured side by side in one run.

Run from the repository root:

    .venv/bin/python benchmarks/distributed.py            # ~3 minutes on 2 cores (1M tokens harvested: 4.1 GB written)
    .venv/bin/python benchmarks/distributed.py --quick    # ~1 minute: fewer tokens, one round

What it measures (recorded results: docs/benchmarks.md):

1. Profiling throughput on this CPU: ``actscope profile`` of the embedded MiniLM (every MLP neuron,
   6 x 1536 units, all statistics) over the same tokens, as 1 process x 2 intra-op threads and as
   2 processes x 1 thread (``torchrun --standalone --nproc_per_node 2``), each in its own fresh
   command, alternated for several rounds. Tokens/s is the run's own (its manifest: feeding,
   observing and, for 2 processes, gathering and merging the accumulators on rank 0); the whole
   command's wall time (imports, model load, torchrun's start) is shown beside it. The merge's
   share is ``merge_seconds / seconds`` of the 2-process runs. Both runs are checked equal.
2. Harvest write throughput. (a) The write path alone: ``ShardWriter`` (what ``harvest`` writes
   with) fed in-memory rows of the shape below, against the disk measured the same way as below,
   alternated for several rounds. (b) ``actscope.harvest`` end to end, of the tiny LM trained here (``zoo.tiny_lm('relu')``,
   2 layers, d_ff 256) at sites ``blocks.*.mlp.pre,blocks.*.mlp.post`` (1024 float32 = 4 KiB per
   token), 1M tokens into 16 MB shards, against the disk's own sequential write speed measured in
   the same run just before and just after (one file of the same size, 8 MiB writes, one fsync at
   the end, like ``dd conv=fsync``), and as the shards are written (16 MB files, each fsynced and
   renamed). Reported: the harvest's end-to-end bytes/s (forward passes included; shards are
   written on a thread of their own while the next one fills), its writer thread's bytes/s (its
   busy time), and how long the forward passes waited for the writer.
3. Peak memory of a harvest of 10k and of 1M tokens (same model, sites, shard size; the 1M one is
   the harvest of 2.), each in a fresh process: ``VmHWM`` reset after the model and corpus are loaded (``/proc/self/clear_refs``),
   so the peak is that of ``harvest()``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
PROFILE_TOKENS, PROFILE_QUICK = 60_000, 8_000
HARVEST_TOKENS, HARVEST_QUICK = 1_000_000, 100_000
SMALL_TOKENS = 10_000
HARVEST_SITES = "blocks.*.mlp.pre,blocks.*.mlp.post"
SHARD_MB = 16
BLOCK = 8 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child[0]](*args.child[1:])
        return
    with tempfile.TemporaryDirectory(prefix="actscope-bench-", dir=os.environ.get("BENCH_DIR")) as scratch:
        run(Path(scratch), args.quick)


def run(scratch: Path, quick: bool) -> None:
    print(machine())
    corpus = scratch / "corpus.txt"
    write_corpus(corpus, HARVEST_QUICK if quick else HARVEST_TOKENS)
    profiling(scratch, PROFILE_QUICK if quick else PROFILE_TOKENS, 1 if quick else 3)
    writing(scratch, (HARVEST_QUICK if quick else HARVEST_TOKENS) // 4, 1 if quick else 3)
    large = harvesting(scratch, corpus, HARVEST_QUICK if quick else HARVEST_TOKENS)
    memory(scratch, corpus, large)


def machine() -> str:
    import torch

    load = os.getloadavg()[0]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return (f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), shared (load average at start {load:.2f})\n"
            f"python {platform.python_version()}, torch {torch.__version__}, git {git or '?'} (+ working tree)")


def write_corpus(path: Path, tokens: int) -> None:
    """Documents of the tiny LM's synthetic language (about 33 tokens each), enough for ``tokens``."""
    from actscope.zoo.lm import generate_corpus

    docs = generate_corpus(int(tokens / 20) + 100, seed=11)
    path.write_text("\n".join(docs) + "\n")


# -- 1. profiling: 1 x 2 threads vs 2 x 1 thread ------------------------------------------
def profiling(scratch: Path, tokens: int, rounds: int) -> None:
    from actscope.data import builtin_corpus

    data = scratch / "builtin-repeated.txt"  # the built-in corpus, repeated until there are enough tokens
    documents = list(builtin_corpus().documents)
    data.write_text("\n".join(documents * (1 + tokens // 4000)) + "\n")
    base = [sys.executable, "-m", "actscope", "profile", "--data", str(data), "--sites", "blocks.*.mlp.post", "--max-tokens", str(tokens),
            "--batch-size", "16", "--no-report", "--overwrite"]
    rows: dict[str, list[dict]] = {"1 process x 2 threads": [], "2 processes x 1 thread": []}
    for index in range(rounds):
        for name in (list(rows) if index % 2 == 0 else list(rows)[::-1]):
            out = scratch / f"profile-{len(rows[name])}-{name[0]}"
            env = {**os.environ, "OMP_NUM_THREADS": "2" if name.startswith("1") else "1"}
            command = [*base, "--out", str(out)] + ([] if name.startswith("1") else ["--processes", "2"])
            start = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            wall = time.perf_counter() - start
            manifest = json.loads((out / "manifest.json").read_text())
            timings = manifest["timings"]
            rows[name].append({"tokens": manifest["data"]["tokens"], "seconds": timings["seconds"], "wall": wall,
                               "merge": timings.get("merge_seconds", 0.0), "out": out})
    same = runs_equal(rows["1 process x 2 threads"][0]["out"], rows["2 processes x 1 thread"][0]["out"])
    print(f"\n1. Profiling MiniLM (6 x 1536 MLP units, all statistics), {tokens:,} tokens of the built-in corpus (repeated), "
          f"16 x 128 batches, {rounds} round(s) alternated; medians")
    print(f"{'setup':<24} {'tokens/s':>9} {'run s':>7} {'command s':>10} {'merge s':>8} {'merge share':>11}")
    medians = {}
    for name, results in rows.items():
        rate = statistics.median(r["tokens"] / r["seconds"] for r in results)
        merge = statistics.median(r["merge"] for r in results)
        share = statistics.median(r["merge"] / r["seconds"] for r in results)
        medians[name] = rate
        print(f"{name:<24} {rate:>9,.0f} {statistics.median(r['seconds'] for r in results):>7.2f} "
              f"{statistics.median(r['wall'] for r in results):>10.2f} {merge:>8.3f} {share:>10.1%}")
    one, two = medians.values()
    print(f"ratio 2 x 1 / 1 x 2: {two / one:.2f}x tokens/s; tables and arrays equal: {same}")


def runs_equal(a: Path, b: Path) -> str:
    import numpy as np
    import torch

    import actscope

    left, right = actscope.open_run(a), actscope.open_run(b)
    worst = 0.0
    for name in left.tables:
        for column in left.to_pandas(name).columns:
            x, y = left.to_pandas(name)[column].to_numpy(), right.to_pandas(name)[column].to_numpy()
            if x.dtype.kind == "f":
                scale = np.maximum(np.abs(x), np.abs(y))
                diff = np.where(scale > 0, np.abs(x - y) / np.where(scale > 0, scale, 1), 0)
                worst = max(worst, float(np.nanmax(diff)) if len(diff) else 0.0)
            elif not (x == y).all():
                return f"no ({name}.{column} differs)"
    arrays = all(torch.equal(left.arrays[k], right.arrays[k]) for k in left.arrays)
    return f"yes (largest relative difference {worst:.1e}, in the merged means/std; arrays identical: {arrays})"


# -- 2. harvest write throughput vs the disk -------------------------------------------------
def writing(scratch: Path, tokens: int, rounds: int) -> None:
    """The harvest's write path alone (ShardWriter fed in-memory rows of the harvest's shape) against
    the disk, alternated."""
    size = tokens * (1024 * 4 + 12)
    rows: dict[str, list[float]] = {"disk, one file": [], "disk, shard-sized files": [], "harvest writer": []}
    for index in range(rounds):
        order = list(rows) if index % 2 == 0 else list(rows)[::-1]
        for name in order:
            if name == "harvest writer":
                rows[name].append(child(scratch, "writer", str(tokens), str(scratch / "writer"))["bytes_per_second"])
            elif name == "disk, one file":
                rows[name].append(disk_speed(scratch, size))
            else:
                rows[name].append(files_speed(scratch, size))
    medians = {name: statistics.median(values) for name, values in rows.items()}
    print(f"\n2a. The harvest's write path alone: ShardWriter fed {tokens:,} in-memory tokens of the harvest below "
          f"(4 x 256 float32 + ids), {size / 1e9:.2f} GB, {SHARD_MB} MB shards, against the disk; {rounds} round(s) alternated, medians")
    for name, value in medians.items():
        shown = ", ".join(f"{v / 1e6:,.0f}" for v in rows[name])
        print(f"{name:<24} {value / 1e6:>7,.0f} MB/s   (rounds: {shown})")
    writer = medians["harvest writer"]
    print(f"writer / disk one file: {writer / medians['disk, one file']:.0%}; writer / disk shard-sized files: "
          f"{writer / medians['disk, shard-sized files']:.0%} (target >= 70 %)")


def writer_child(tokens: str, out: str) -> None:
    import shutil

    import torch

    from actscope.store.activations import ShardWriter

    folder = Path(out)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    rows = 2240  # one batch of the harvest below: 64 documents of ~35 tokens
    values = {f"blocks.{layer}.mlp.{kind}": torch.randn(rows, 256, generator=generator) for layer in (0, 1) for kind in ("pre", "post")}
    doc, pos = torch.arange(rows), torch.zeros(rows, dtype=torch.int32)
    writer = ShardWriter(folder, 0, 0, SHARD_MB * 1_000_000)
    start = time.perf_counter()
    for batch in range(int(tokens) // rows):
        writer.add(batch, batch + 1, 0, values, doc, pos)
    writer.close()
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.iterdir())
    shutil.rmtree(folder)
    print(json.dumps({"bytes": size, "seconds": seconds, "bytes_per_second": size / seconds}))
def harvesting(scratch: Path, corpus: Path, tokens: int) -> dict:
    import shutil

    size = tokens * 4096
    before, files_before = disk_speed(scratch, size), files_speed(scratch, size)
    result = child(scratch, "harvest", str(corpus), str(tokens), str(scratch / "acts"))
    shutil.rmtree(scratch / "acts")
    after, files_after = disk_speed(scratch, size), files_speed(scratch, size)
    disk, files = statistics.mean([before, after]), statistics.mean([files_before, files_after])
    total = result["bytes"]
    print(f"\n2b. Harvest of the tiny LM (zoo.tiny_lm('relu')), sites {HARVEST_SITES} (1024 float32 per token), "
          f"{result['tokens']:,} tokens, {total / 1e9:.2f} GB in {result['shards']} shards of <= {SHARD_MB} MB")
    print(f"disk sequential write (one file, 8 MiB writes, fsync): {before / 1e6:,.0f} MB/s before, {after / 1e6:,.0f} MB/s after")
    print(f"disk, written as the shards are ({SHARD_MB} MB files, each fsynced and renamed): {files_before / 1e6:,.0f} MB/s before, "
          f"{files_after / 1e6:,.0f} MB/s after")
    print(f"harvest end to end (forward passes included): {result['seconds']:.1f} s, {total / result['seconds'] / 1e6:,.0f} MB/s "
          f"= {total / result['seconds'] / disk:.0%} of the disk; {result['tokens'] / result['seconds']:,.0f} tokens/s")
    print(f"harvest writer thread (its busy time): {result['write_seconds']:.1f} s, {total / result['write_seconds'] / 1e6:,.0f} MB/s "
          f"= {total / result['write_seconds'] / files:.0%} of the disk written as shards; the forward passes waited "
          f"{result['stalled']:.1f} s for it")
    return result


def files_speed(folder: Path, size: int) -> float:
    """Bytes/s writing ``size`` bytes as shard-sized files, each fsynced and renamed into place."""
    block = os.urandom(BLOCK)
    per_file = max(1, SHARD_MB * 1_000_000 // BLOCK)
    files = max(1, size // (per_file * BLOCK))
    start = time.perf_counter()
    for index in range(files):
        tmp, final = folder / f".f{index}.tmp", folder / f"f{index}.bin"
        with open(tmp, "wb") as handle:
            for _ in range(per_file):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    seconds = time.perf_counter() - start
    for index in range(files):
        (folder / f"f{index}.bin").unlink()
    return files * per_file * BLOCK / seconds


def disk_speed(folder: Path, size: int) -> float:
    """Bytes/s writing ``size`` bytes to one new file in 8 MiB writes, one fsync at the end."""
    block = os.urandom(BLOCK)
    path = folder / "disk-speed.bin"
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(max(1, size // BLOCK)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return max(1, size // BLOCK) * BLOCK / seconds


# -- 3. peak memory: 10k vs 1M tokens ----------------------------------------------------------
def memory(scratch: Path, corpus: Path, large: dict) -> None:
    results = [child(scratch, "harvest", str(corpus), str(SMALL_TOKENS), str(scratch / "small")), large]
    print(f"\n3. Peak memory of harvest() (VmHWM reset after the model and corpus were loaded), same sites, {SHARD_MB} MB shards")
    print(f"{'tokens':>9} {'GB written':>10} {'RSS loaded MiB':>14} {'peak MiB':>9} {'peak - loaded MiB':>17}")
    for r in results:
        print(f"{r['tokens']:>9,} {r['bytes'] / 1e9:>10.2f} {r['loaded'] / 2**20:>14.0f} {r['peak'] / 2**20:>9.0f} "
              f"{(r['peak'] - r['loaded']) / 2**20:>17.0f}")
    small, large = results
    print(f"peak growth from {small['tokens']:,} to {large['tokens']:,} tokens: {large['peak'] / small['peak'] - 1:+.1%} (target <= 5 %)")


def child(scratch: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], env={**os.environ, "OMP_NUM_THREADS": "2"},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def harvest_child(corpus: str, tokens: str, out: str) -> None:
    import actscope
    from actscope.data import load_corpus
    from actscope.store import activations
    from actscope.zoo import tiny_lm

    model = actscope.load(tiny_lm("relu"))
    data = load_corpus(corpus)
    writing, stalled = [0.0], [0.0]
    write, wait = activations._write_shard, activations.ShardWriter.wait

    def timed_write(*args):  # the writer thread's busy time
        start = time.perf_counter()
        record = write(*args)
        writing[0] += time.perf_counter() - start
        return record

    def timed_wait(self):  # the time the forward passes waited for the disk
        start = time.perf_counter()
        wait(self)
        stalled[0] += time.perf_counter() - start

    activations._write_shard, activations.ShardWriter.wait = timed_write, timed_wait
    loaded = rss()
    reset_peak()
    start = time.perf_counter()
    dataset = actscope.harvest(model, data, sites=HARVEST_SITES, out=out, max_tokens=int(tokens), batch_size=64, shard_mb=SHARD_MB)
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens": len(dataset), "seconds": seconds, "write_seconds": writing[0], "stalled": stalled[0], "shards": len(dataset.files),
                      "bytes": sum(f.stat().st_size for f in dataset.files), "loaded": loaded, "peak": vm_hwm()}))


def rss() -> int:
    return _status("VmRSS:")


def vm_hwm() -> int:
    return _status("VmHWM:")


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(key)).split()[1]) * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


CHILDREN = {"harvest": harvest_child, "writer": writer_child}

if __name__ == "__main__":
    main()
