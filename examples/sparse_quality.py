"""Quality of calibrated sparse MLP execution on the tiny causal LMs trained here.

For the ReLU and the SiLU tiny LM (``actscope.zoo.tiny_lm``): calibrate CETT-PPL-1 %, then CATS,
TEAL and CoreInfer at target sparsities 0.4, 0.5, 0.7, 0.9 and at the sparsity CETT reached, and
print the dense and sparse perplexity of each on held-out text, measured with the sparse
kernels running (``actscope.sparse.evaluate``). TEAL runs in three variants: as published
(greedy allocation over every projection of each block, attention ones included: the default),
uniform over every projection, and uniform over the MLP's projections only.

Data (all from ``held_out_corpus(800)``, a seed no training run uses): documents 0–99
calibrate; 100–399 are the CETT search's objective data; 400–799 are the evaluation, seen by
no calibration. Claim checked: CETT-PPL-1 % raises held-out perplexity by at most 1.2 %.

Speed per row: greedy decoding at batch 1 (one torch thread), dense and inside ``sparsify`` with
that row's calibration, interleaved: the first ``PROMPT_TOKENS`` tokens of each of held-out
documents 400–402 as prompts (prefill untimed, inside the context so that CoreInfer picks its
core sets), then ``NEW_TOKENS`` timed cached steps; one warm-up round, then the median of
``TIMING_REPEATS`` rounds × 3 prompts. ``speed_up`` = dense ms/token / sparse ms/token. These
models are 64 wide with 256 MLP units: their weights fit in cache and each step is dominated by
per-call overhead, so this column says what sparsity costs or gains *on them*; the bandwidth
gains are measured on a 468M Llama shape by ``benchmarks/sparse_decode.py --methods``.

    PYTHONPATH=src python examples/sparse_quality.py
"""
from __future__ import annotations

import statistics
import time

import torch

import actscope
from actscope.sparse import calibrate, evaluate, sparsify
from actscope.zoo.lm import held_out_corpus, tiny_lm

TARGETS = (0.4, 0.5, 0.7, 0.9)
METHODS = {  # name: calibrate's options besides the sparsity
    "cats": {"method": "cats"},
    "teal": {"method": "teal"},  # greedy, every projection
    "teal uniform all": {"method": "teal", "allocation": "uniform"},
    "teal uniform mlp": {"method": "teal", "allocation": "uniform", "projections": "mlp"},
    "core": {"method": "core"},
}
CLAIM = 0.012
PROMPT_TOKENS = 8
NEW_TOKENS = 24
TIMING_REPEATS = 3


def decode_seconds(module: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Greedy decoding with a KV cache: prefill untimed, then ``new_tokens`` timed steps."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        token = module(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)  # [1, 1]
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = module(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return time.perf_counter() - start


def timing_prompts(model) -> list[torch.Tensor]:
    """Batch-1 prompts ``[1, PROMPT_TOKENS]`` from held-out documents 400-402."""
    docs = held_out_corpus(800)[400:403]
    return [model.tokenizer(doc, return_tensors="pt")["input_ids"][:, :PROMPT_TOKENS] for doc in docs]


def decode_speed(model, calibration, prompts) -> dict[str, float]:
    """Median ms/token dense and sparse (interleaved per prompt, first round a warm-up)."""
    dense, sparse = [], []
    for round_ in range(TIMING_REPEATS + 1):
        for ids in prompts:
            d = decode_seconds(model.module, ids, NEW_TOKENS)
            with sparsify(model, calibration):
                s = decode_seconds(model.module, ids, NEW_TOKENS)
            if round_:
                dense.append(d)
                sparse.append(s)
    dense_ms = statistics.median(dense) / NEW_TOKENS * 1e3
    sparse_ms = statistics.median(sparse) / NEW_TOKENS * 1e3
    return {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "speed_up": dense_ms / sparse_ms}


def rows_for(activation: str) -> tuple[list[dict], float]:
    model = actscope.load(tiny_lm(activation))
    docs = held_out_corpus(800)
    calibration, search, held_out = docs[:100], docs[100:400], docs[400:]
    prompts = timing_prompts(model)
    cett = calibrate(model, calibration, method="cett", p=0.01, eval_data=search)
    reports = [evaluate(model, cett, held_out)]
    speeds = [decode_speed(model, cett, prompts)]
    reached = round(float(reports[0].realised_sparsity), 3)
    for options in METHODS.values():
        for target in (*TARGETS, reached):
            cal = calibrate(model, calibration, sparsity=target, **options)
            reports.append(evaluate(model, cal, held_out))
            speeds.append(decode_speed(model, cal, prompts))
    rows = [{**r.to_pandas().iloc[0].to_dict(), **speed} for r, speed in zip(reports, speeds)]
    return rows, reports[0].increase


def main() -> None:
    import pandas as pd

    torch.set_num_threads(1)
    pd.set_option("display.width", 200)
    verdicts = []
    for activation in ("relu", "silu"):
        start = time.perf_counter()
        rows, cett_increase = rows_for(activation)
        frame = pd.DataFrame(rows)[["method", "setting", "scored", "tokens", "expected_sparsity", "realised_sparsity",
                                    "weight_skipped", "dense_ppl", "sparse_ppl", "ppl_increase",
                                    "dense_ms", "sparse_ms", "speed_up"]]
        print(f"== tiny LM, {activation}: held-out documents 400-799; decoding ms/token at batch 1, "
              f"{PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens ({time.perf_counter() - start:.0f} s) ==")
        print(frame.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        verdicts.append((activation, cett_increase))
    for activation, increase in verdicts:
        status = "PASS" if increase <= CLAIM else "FAIL"
        print(f"{status}: {activation} CETT-PPL-1% held-out perplexity increase {100 * increase:.3f}% (claim: <= 1.2%)")


if __name__ == "__main__":
    main()
