"""Quality of calibrated sparse MLP execution on the tiny causal LMs trained here.

For the ReLU and the SiLU tiny LM (``actscope.zoo.tiny_lm``): calibrate CETT-PPL-1 %, then CATS,
TEAL and CoreInfer at target sparsities 0.5, 0.7, 0.9 and at the sparsity CETT reached, and
print the dense and sparse perplexity of each on held-out text, measured with the sparse
kernels running (``actscope.sparse.evaluate``).

Data (all from ``held_out_corpus(800)``, a seed no training run uses): documents 0–99
calibrate; 100–399 are the CETT search's objective data; 400–799 are the evaluation, seen by
no calibration. Claim checked: CETT-PPL-1 % raises held-out perplexity by at most 1.2 %.

    PYTHONPATH=src python examples/sparse_quality.py
"""
from __future__ import annotations

import time

import torch

import actscope
from actscope.sparse import calibrate, evaluate
from actscope.zoo.lm import held_out_corpus, tiny_lm

TARGETS = (0.5, 0.7, 0.9)
CLAIM = 0.012


def rows_for(activation: str) -> tuple[list[dict], float]:
    model = actscope.load(tiny_lm(activation))
    docs = held_out_corpus(800)
    calibration, search, held_out = docs[:100], docs[100:400], docs[400:]
    cett = calibrate(model, calibration, method="cett", p=0.01, eval_data=search)
    reports = [evaluate(model, cett, held_out)]
    reached = round(float(reports[0].realised_sparsity), 3)
    for method in ("cats", "teal", "core"):
        for target in (*TARGETS, reached):
            cal = calibrate(model, calibration, method=method, sparsity=target)
            reports.append(evaluate(model, cal, held_out))
    return [r.to_pandas().iloc[0].to_dict() for r in reports], reports[0].increase


def main() -> None:
    import pandas as pd

    torch.set_num_threads(1)
    pd.set_option("display.width", 200)
    verdicts = []
    for activation in ("relu", "silu"):
        start = time.perf_counter()
        rows, cett_increase = rows_for(activation)
        frame = pd.DataFrame(rows)[["method", "setting", "scored", "tokens", "expected_sparsity", "realised_sparsity",
                                    "weight_skipped", "dense_ppl", "sparse_ppl", "ppl_increase"]]
        print(f"== tiny LM, {activation}: held-out documents 400-799 ({time.perf_counter() - start:.0f} s) ==")
        print(frame.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        verdicts.append((activation, cett_increase))
    for activation, increase in verdicts:
        status = "PASS" if increase <= CLAIM else "FAIL"
        print(f"{status}: {activation} CETT-PPL-1% held-out perplexity increase {100 * increase:.3f}% (claim: <= 1.2%)")


if __name__ == "__main__":
    main()
