"""Sparsing Law (b) at a scale where it says something: ReLU vs SiLU LMs trained on real English.

Paper: at CETT-PPL-1 %, ReLU models keep ≈ 6–8 % of their MLP units active, SiLU models
≈ 38–41 %. The tiny zoo LMs (``sparsing_law_relu_vs_silu.py``) are > 96 % sparse whatever their
activation, so there the gap says little. Here: the doc LMs of ``actscope.zoo.doc_lm`` (4 layers ×
256 wide × 1024 gated-MLP units, 4096-token BPE, ~1.6 M training tokens of Python/numpy/torch
docstrings; ReLU and SiLU of one seed start from the same weights and see the same batches), seeds
1, 2, 3; each model is trained once (about 10 minutes on one core) and cached.

CETT-PPL-1 %: ``actscope.metrics.cett_sparsity`` on held-out texts (never trained on): calibration
= held-out texts 0–199, evaluation = held-out texts 200–599 (each truncated to 128 tokens), one
shared CETT target bisected until exp(L_sparse − L_dense) − 1 reaches 1 % (p = 1 % only: no
sweep, no Top-k / FAT-ε baselines, which would triple the passes). Activation ratio = share of
(real token, unit) activations of the four MLPs left non-zero, 1 − sparsity.

Pass rule (fixed before any of these models was trained):
  * informative: SiLU's activation ratio at PPL-1 % is at least 20 % on every seed (the SiLU
    model is far from saturated sparsity); otherwise the label is "uninformative";
  * holds: on every seed, ReLU's activation ratio ≤ 0.5 × SiLU's;
  * direction only: ReLU's ratio below SiLU's on every seed, the factor 0.5 missed on some seed;
  * does not hold: otherwise.

Run:  PYTHONPATH=src python examples/sparsing_law_scale.py            (trains what is not cached)
      PYTHONPATH=src python examples/sparsing_law_scale.py --train-only --activations relu
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

PAPER = {"relu": (0.06, 0.08), "silu": (0.38, 0.41)}  # activation ratio at PPL-1 %
P = 0.01
INFORMATIVE = 0.20  # SiLU ratio at least this on every seed
HOLDS = 0.5  # ReLU ratio / SiLU ratio at most this on every seed
SEEDS = (1, 2, 3)
CALIBRATION, EVALUATION = slice(0, 200), slice(200, 600)


def measure(path, calibration_texts, evaluation_texts, **search) -> dict:
    """CETT-PPL-1 % of the model at ``path``: activation ratios, degradation, passes."""
    import actscope
    from actscope.metrics import CausalLMLoss, cett_sparsity

    model = actscope.load(path)
    result = cett_sparsity(model, calibration_texts, CausalLMLoss(evaluation_texts), p=P, **search)
    return {"ratio": 1 - result.sparsity, "per_layer": list(result.activation_ratio),
            "dense": list(result.dense_activation_ratio), "c": result.c, "degradation": result.degradation,
            "passes": result.passes, "converged": result.converged, "result": result}


def verdict(relu: list[float], silu: list[float]) -> str:
    """The label of the pass rule above, from the per-seed activation ratios."""
    if min(silu) < INFORMATIVE:
        return "uninformative"
    if all(r <= HOLDS * s for r, s in zip(relu, silu)):
        return "holds"
    if all(r < s for r, s in zip(relu, silu)):
        return "direction only"
    return "does not hold"


def _pct(values) -> str:
    return ", ".join(f"{v:.2%}" for v in values)


def _spread(values) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2%} ± {sd:.2%}"


def main() -> None:
    from actscope.zoo.doc_lm import DocLMConfig, doc_corpus, doc_lm
    from actscope.zoo.cache import read_meta

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--activations", nargs="+", default=["relu", "silu"], choices=["relu", "silu"])
    parser.add_argument("--train-only", action="store_true", help="train (or find) the models and stop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, held_out, _ = doc_corpus(DocLMConfig())
    ratios: dict[str, list[float]] = {a: [] for a in args.activations}
    for seed in args.seeds:
        for activation in args.activations:
            clock = time.perf_counter()
            path = doc_lm(activation, seed)
            meta = read_meta(path)
            print(f"\n== {activation}, seed {seed}: {path.name} (trained in {meta['train_seconds']:.0f} s, "
                  f"final train loss {meta['loss_log'][-1][1]:.3f}, held-out loss {meta['held_out']['held_out_loss']:.3f})")
            if args.train_only:
                continue
            m = measure(path, held_out[CALIBRATION], held_out[EVALUATION], sweep=(), baselines=False)
            ratios[activation].append(m["ratio"])
            print(f"dense activation ratio per layer: {_pct(m['dense'])}")
            print(f"CETT-PPL-1%: c = {m['c']:.4f}, degradation {m['degradation']:.4%}, {m['passes']} passes, "
                  f"converged={m['converged']}")
            print(f"activation ratio per layer: {_pct(m['per_layer'])}; all layers {m['ratio']:.2%} "
                  f"({time.perf_counter() - clock:.0f} s)")
    if args.train_only or len(ratios) < 2:
        return
    relu, silu = ratios["relu"], ratios["silu"]
    print("\n== activation ratio at CETT-PPL-1 % (mean ± sd over seeds", ", ".join(map(str, args.seeds)), ")")
    print(f"{'':6} {'per seed':>26} {'mean ± sd':>18} {'paper':>10}")
    for name, values in (("ReLU", relu), ("SiLU", silu)):
        lo, hi = PAPER[name.lower()]
        print(f"{name:6} {_pct(values):>26} {_spread(values):>18} {lo:.0%}–{hi:.0%}")
    print(f"ReLU / SiLU per seed: {', '.join(f'{r / s:.2f}' for r, s in zip(relu, silu))} "
          f"(holds needs <= {HOLDS} on every seed; paper ≈ 0.15–0.21)")
    print(f"SiLU informative (>= {INFORMATIVE:.0%} on every seed): {min(silu) >= INFORMATIVE}")
    print(f"label: {verdict(relu, silu)}")


if __name__ == "__main__":
    main()
