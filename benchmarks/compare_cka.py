"""Layer × layer linear CKA of two 12-layer models (issue 19): time and peak memory on this CPU.

Run from the repository root:

    .venv/bin/python benchmarks/compare_cka.py            # ~8 minutes on 2 cores
    .venv/bin/python benchmarks/compare_cka.py --quick    # ~2 minutes: 4k tokens

Two random-init GPT-2-small-shaped models (12 layers, d_model 768, d_ff 3072, vocabulary 50257,
two seeds), built from a ``GPT2Config`` (no download), fed the same random token ids: 20 batches
of 8 × 128 = 20,480 tokens. ``actscope.metrics.compare_representations(a, b, data,
"blocks.*.resid.post")`` computes the 12 × 12 matrix (144 pairs of 768-unit sites) in one pass,
streamed: per pair ``Xᵀ Y`` and the unbiased estimator's row-norm sums, per site ``Xᵀ X``, all
float64 (``precision="float32"``: each batch multiplied in float32, added into float64).

Each configuration runs in a fresh process, which reports:

* seconds for the comparison (model building excluded), and for the forward passes alone (the
  same two models over the same batches, the same hooks, no sums) measured in the same process
  just before, so ``CKA sums = total − forward``;
* peak resident memory of the comparison: ``VmHWM`` from /proc/self/status, reset after the
  models are built (``clear_refs``), minus the resident memory at that point;
* what capturing every activation in memory instead would take (tokens × Σ units × 4 bytes);
* the largest difference from the float64 run (float32 row), and for the --check run the
  largest difference from ``actscope.metrics.cka`` on captured activations of the first 2,048 tokens.

The 5k-token row shows that the sums' memory does not grow with the number of tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
SITES = "blocks.*.resid.post"


def models(layers: int = 12, width: int = 768):
    import torch
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=layers, n_embd=width, n_head=12, n_inner=4 * width, n_positions=256)
    built = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        built.append(GPT2Model(config).eval())
    return built


def batches(tokens: int, vocab: int = 50257) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(0)
    count = max(1, tokens // 1024)
    return [{"input_ids": torch.randint(0, vocab, (8, 128), generator=generator)} for _ in range(count)]


def vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("VmHWM:")).split()[1]) * 1024


def rss() -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS:")).split()[1]) * 1024


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(tokens: int, precision: str, check: bool, layers: int = 12, width: int = 768) -> dict:
    """One row of the table (``layers`` and ``width`` smaller only for the test suite's smoke run)."""
    import numpy as np
    import torch

    import actscope
    from actscope.metrics import cka, compare_representations
    from actscope.metrics.representations import paired_rows
    from actscope.sites import plan_sites

    first, second = (actscope.wrap(m) for m in models(layers, width))
    data = batches(tokens)
    plan_a, plan_b = plan_sites(first, SITES), plan_sites(second, SITES)
    started = time.perf_counter()
    rows = sum(len(next(iter(a.ids.values()))) for a, _ in paired_rows(first, plan_a, second, plan_b, data))
    forward = time.perf_counter() - started
    loaded, reset = rss(), reset_peak()
    started = time.perf_counter()
    result = compare_representations(first, second, data, SITES, precision=precision)
    total = time.perf_counter() - started
    found = {"tokens": rows, "precision": precision, "seconds": total, "forward": forward, "passes": result.passes,
             "peak_extra": vm_hwm() - loaded, "reset": reset, "values": result.values.tolist(),
             "capture_bytes": rows * width * layers * 2 * 4, "threads": torch.get_num_threads()}
    if check:
        small = data[:2]
        with torch.no_grad(), actscope.capture(first, SITES, flat=True) as a, actscope.capture(second, SITES, flat=True) as b:
            for batch in small:
                first(**batch)
                second(**batch)
        direct = np.array([[cka(a.tensor(s), b.tensor(t)) for t in plan_b.names] for s in plan_a.names])
        streamed = compare_representations(first, second, small, SITES).values
        found["check"] = float(np.abs(direct - streamed).max())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.child[2] == "check")))
        return
    import torch

    tokens = 4_096 if args.quick else 20_480
    print(f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average at start "
          f"{os.getloadavg()[0]:.2f}; python {platform.python_version()}, torch {torch.__version__}")
    print(f"two random-init GPT-2-small-shaped models (12 layers, 768 / 3072), sites {SITES} (12 x 768 units each), "
          "batches of 8 x 128 random tokens; each row in a fresh process")
    runs = [(tokens, "float64", "check"), (tokens, "float32", "-"), (max(1024, tokens // 4), "float64", "-")]
    results = []
    for count, precision, check in runs:
        out = subprocess.run([sys.executable, __file__, "--child", str(count), precision, check], capture_output=True, text=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        if out.returncode:
            sys.exit(out.stderr)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  done: {r['tokens']} tokens {precision} in {r['seconds']:.0f} s (load average {os.getloadavg()[0]:.2f})", file=sys.stderr)
    import numpy as np

    reference = np.array(results[0]["values"])
    print(f"\n{'tokens':>7} {'precision':>9} {'passes':>6} {'total s':>8} {'forward s':>9} {'CKA sums s':>10} "
          f"{'tokens/s':>8} {'peak MiB':>8} {'capture would keep':>18} {'max |Δ| vs float64':>18}")
    for r in results:
        delta = float(np.abs(np.array(r["values"]) - reference).max()) if r["tokens"] == results[0]["tokens"] else float("nan")
        print(f"{r['tokens']:>7} {r['precision']:>9} {r['passes']:>6} {r['seconds']:>8.1f} {r['forward']:>9.1f} "
              f"{r['seconds'] - r['forward']:>10.1f} {r['tokens'] / r['seconds']:>8.0f} {r['peak_extra'] / MiB:>8.0f} "
              f"{r['capture_bytes'] / MiB:>15.0f} MiB {delta:>18.1e}")
    print(f"\nstreamed vs actscope.metrics.cka on captured activations (first 2,048 tokens): max |Δ| {results[0]['check']:.1e}")
    diagonal = np.diag(reference)
    print(f"CKA of layer i with layer i of the other seed: {diagonal.min():.3f}..{diagonal.max():.3f}; "
          f"layer 0 of A with layers 0..11 of B: {' '.join(f'{v:.2f}' for v in reference[0])}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}; peak reset via clear_refs: {all(r['reset'] for r in results)}")


if __name__ == "__main__":
    main()
