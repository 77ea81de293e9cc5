"""Cost of the CETT-PPL-p% search: evaluation passes and wall time (results: docs/benchmarks.md).

Run from the repository root:

    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/cett_search.py

Two models:

1. the trained ReLU tiny LM of ``actscope.zoo`` (2 layers × 256 gated-MLP units), causal-LM
   perplexity on 200 held-out documents, the full sweep p ∈ {0.5, 1, 2, 5} % with the Top-k
   and FAT-ε baselines;
2. the embedded MiniLM (all-MiniLM-L6-v2, 6 layers × 1536 GELU units), embedding fidelity
   (1 − mean cosine to the dense sentence embeddings) at p = 1 %, with both baselines.

For each it prints the calibration time (the one recording pass) beside a plain forward pass
over the same calibration data, the passes and time of the search for p (dense reference
included), all passes of the call, the mean time of one evaluation pass, and what brute force
would have needed for the same curves: one edited calibration forward per grid ε per layer.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import actscope  # noqa: E402
from actscope.data import builtin_corpus  # noqa: E402
from actscope.metrics import CausalLMLoss, EmbeddingFidelity, cett_sparsity  # noqa: E402
from actscope.zoo import held_out_corpus, tiny_lm  # noqa: E402


def plain_pass_seconds(model, data) -> float:
    """Wall time of one forward pass over ``data`` without any hook (batches as the search)."""
    from actscope.feeding import input_batches

    batches = list(input_batches(model, data, batch_size=16))  # cett_sparsity's default
    start = time.perf_counter()
    with torch.no_grad():
        for inputs in batches:
            model(**inputs)
    return time.perf_counter() - start


def report(name: str, result, seconds: float, evaluation_docs: int, plain: float) -> None:
    search_passes = result.passes - 1
    per_pass = result.seconds["search"] / max(result.total_passes - 1, 1)
    layers, points = result.curves.grid.shape
    print(f"\n== {name} ==")
    print(f"calibration: {result.curves.tokens} tokens, one recording pass, {result.seconds['calibration']:.2f} s "
          f"({layers} layers x {points} grid points); a plain forward over the same data: {plain:.2f} s "
          f"({result.seconds['calibration'] / plain:.1f}x)")
    print(f"search for p = {result.p:.0%}: {result.passes} evaluation passes over {evaluation_docs} documents "
          f"(1 dense + {search_passes} bisection steps, budget 12), converged={result.converged}")
    print(f"all evaluation passes of the call: {result.total_passes}; search time {result.seconds['search']:.2f} s, "
          f"{per_pass:.3f} s per pass; total wall time {seconds:.2f} s")
    print(f"brute force for the same curves: {layers * points} edited calibration forwards (one per grid eps per layer)")
    print(f"CETT-PPL-{result.p:.0%}: c = {result.c:.4f}, sparsity {result.sparsity:.2%}, degradation {result.degradation:.4%}")
    table = result.sweep.to_pandas()[["method", "p", "setting", "sparsity", "degradation", "passes"]]
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))


def tiny(args) -> None:
    docs = held_out_corpus(400)
    model = actscope.load(tiny_lm("relu"))
    start = time.perf_counter()
    result = cett_sparsity(model, docs[:100], CausalLMLoss(docs[200:400]), p=0.01)
    seconds = time.perf_counter() - start
    name = "tiny LM (ReLU), causal-LM perplexity, sweep 0.5/1/2/5 % + Top-k + FAT-eps"
    report(name, result, seconds, 200, plain_pass_seconds(model, docs[:100]))


def minilm(args) -> None:
    docs = list(builtin_corpus().documents)
    model = actscope.load()
    start = time.perf_counter()
    evaluation = docs[args.calibration:args.calibration + args.evaluation]
    result = cett_sparsity(model, docs[:args.calibration], EmbeddingFidelity(evaluation), p=0.01, sweep=())
    seconds = time.perf_counter() - start
    name = "MiniLM (all-MiniLM-L6-v2), embedding fidelity, p = 1 % + Top-k + FAT-eps"
    report(name, result, seconds, len(evaluation), plain_pass_seconds(model, docs[:args.calibration]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on a shared machine)")
    parser.add_argument("--calibration", type=int, default=64, help="MiniLM calibration documents (built-in corpus)")
    parser.add_argument("--evaluation", type=int, default=128, help="MiniLM evaluation documents (built-in corpus)")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    tiny(args)
    if not args.skip_minilm:
        minilm(args)


if __name__ == "__main__":
    main()
