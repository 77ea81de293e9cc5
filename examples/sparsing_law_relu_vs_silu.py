"""Reproduction (b) of the Sparsing Law claim: at CETT-PPL-1 %, a ReLU LM is far sparser than
a SiLU LM trained identically.

Paper: ReLU models reach activation ratios of ≈ 6–8 % at PPL-1 % while SiLU models stay at
≈ 38–41 %. Here: the two tiny Llama-style LMs of ``actscope.zoo`` (same seed, data, steps; only
``hidden_act`` differs), both searched with the same calibration and held-out evaluation text.

PASS when the ReLU model's CETT-PPL-1 % activation ratio is at most half of the SiLU model's
(the SiLU model needs at least twice as many active units for the same 1 % perplexity cost).

Run:  PYTHONPATH=src python examples/sparsing_law_relu_vs_silu.py
"""
from __future__ import annotations

import torch

import actscope
from actscope.metrics import CausalLMLoss, cett_sparsity
from actscope.zoo import held_out_corpus, tiny_lm

P = 0.01
MAX_RATIO = 0.5  # ReLU activation ratio / SiLU activation ratio for PASS

torch.set_num_threads(1)  # tiny models: a second thread only waits on a shared machine
docs = held_out_corpus(400)
calibration, evaluation = docs[:100], docs[200:400]


def search(activation: str):
    model = actscope.load(tiny_lm(activation))
    result = cett_sparsity(model, calibration, CausalLMLoss(evaluation), p=P)
    print(f"\n== tiny LM, {activation} (held-out evaluation: {len(evaluation)} documents) ==")
    print(f"dense activation ratio per layer: {fmt(result.dense_activation_ratio)}")
    print(f"CETT-PPL-1%: c = {result.c:.4f}, eps per layer = {', '.join(f'{e:.4g}' for e in result.eps)}")
    print(f"activation ratio per layer after thresholding: {fmt(result.activation_ratio)}")
    print(f"sparsity {result.sparsity:.2%}, exp(L_sparse - L_dense) - 1 = {result.degradation:.4%}, "
          f"{result.passes} evaluation passes (dense included), converged={result.converged}")
    table = result.sweep.to_pandas()[["method", "p", "setting", "sparsity", "degradation", "passes"]]
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"total evaluation passes (sweep and baselines included): {result.total_passes}; "
          f"calibration {result.seconds['calibration']:.1f}s, search {result.seconds['search']:.1f}s")
    return result


def fmt(values) -> str:
    return ", ".join(f"{v:.2%}" for v in values)


relu, silu = search("relu"), search("silu")
ratio = (1 - relu.sparsity) / (1 - silu.sparsity)
print("\n== verdict ==")
print(f"CETT-PPL-1% sparsity: ReLU {relu.sparsity:.2%} vs SiLU {silu.sparsity:.2%}")
print(f"activation ratio:     ReLU {1 - relu.sparsity:.2%} vs SiLU {1 - silu.sparsity:.2%} "
      f"(ReLU / SiLU = {ratio:.2f}; PASS needs <= {MAX_RATIO})")
print("PASS" if relu.sparsity > silu.sparsity and ratio <= MAX_RATIO else "FAIL")
