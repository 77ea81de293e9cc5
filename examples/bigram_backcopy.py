"""Reproduction (e): extreme-token phenomena on the Bigram-Backcopy task.

Claims (Active-dormant attention heads; METHODS.md, "Extreme-token phenomena"): a small
transformer trained with Adam on Bigram-Backcopy develops

1. an attention sink on BOS: on non-trigger queries, where the head has nothing to do, most of
   its attention goes to BOS (the head is dormant there), while on trigger queries it is active
   (it attends elsewhere, to the token it copies);
2. a value-state drain: the BOS value vector's norm is well below the median of the others;
3. a residual-state peak: the BOS residual-stream norm is well above the median of the others.

Thresholds, fixed before looking at the figures: sink score > 0.5 on non-trigger queries and
< 0.5 on trigger queries; value ratio < 0.5; residual ratio > 2 (in some layer).

Run:  PYTHONPATH=src python examples/bigram_backcopy.py [--layers 1] [--steps N] [--seed S] [--sgd]
The model is trained once (20-45 s on one CPU thread) and cached under $ACTSCOPE_CACHE/zoo.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import actscope  # noqa: E402
from actscope.metrics import extreme_tokens  # noqa: E402
from actscope.zoo.backcopy import BackcopyConfig, read_meta, task_of, train_backcopy  # noqa: E402

EVAL_SEED = 10_000_000  # far from every training seed (seed · 1_000_003 + step)


def held_out(task, batches: int = 4, size: int = 64, length: int = 32) -> list[dict[str, torch.Tensor]]:
    return [task.inputs(size, length, seed=EVAL_SEED + i) for i in range(batches)]


def uniform_baseline(task, data) -> float:
    """Attention on BOS of a head that spreads evenly over its causal keys, on non-trigger queries."""
    shares = []
    for inputs in data:
        ids = inputs["input_ids"]
        share = 1.0 / torch.arange(1, ids.shape[1] + 1, dtype=torch.float64).expand_as(ids)  # 1 / (q + 1)
        shares.append(share[:, 1:][~task.is_trigger(ids)[:, 1:]])
    return float(torch.cat(shares).mean())


def report(path, label: str) -> dict[str, bool]:
    meta = read_meta(path)
    task = task_of(path)
    model = actscope.load(path)
    model.module.set_attn_implementation("eager")  # as trained; pattern sites need it anyway
    data = held_out(task)
    quiet = extreme_tokens(model, data, token_filter=lambda ids: ~task.is_trigger(ids))  # non-trigger queries
    busy = extreme_tokens(model, data, token_filter=task.is_trigger)  # trigger queries
    print(f"== {label}: {path.name}")
    print(f"held-out loss {meta['held_out']['loss']:.4f}, copy accuracy after triggers "
          f"{meta['held_out']['copy_accuracy']:.3f} ({meta['held_out']['copy_queries']} queries), "
          f"trained in {meta['train_seconds']:.0f} s")
    print(f"queries: {quiet.n_others} non-trigger, {busy.n_others} trigger, over {quiet.n_sequences} sequences")
    print(f"uniform-attention baseline for BOS on non-trigger queries: {uniform_baseline(task, data):.3f}")
    print("layer head  BOS-attn(non-trigger)  BOS-attn(trigger)  value-ratio")
    for layer_index, layer in enumerate(quiet.layer):
        for head in range(quiet.sink_score.shape[1]):
            print(f"{layer:5d} {head:4d}  {quiet.sink_score[layer_index, head]:21.3f}  "
                  f"{busy.sink_score[layer_index, head]:17.3f}  {quiet.value_drain[layer_index, head]:11.3f}")
    print("layer  BOS-resid-norm  median-resid-norm  residual-ratio")
    for layer_index, layer in enumerate(quiet.layer):
        print(f"{layer:5d}  {quiet.sink_resid_norm[layer_index]:14.3f}  {quiet.median_resid_norm[layer_index]:17.3f}  "
              f"{quiet.residual_peak[layer_index]:14.3f}")
    # The claims are about the dormant head(s): the head with the strongest sink on non-trigger queries.
    layer_index, head = divmod(int(quiet.sink_score.argmax()), quiet.sink_score.shape[1])
    return {
        "sink": bool(quiet.sink_score[layer_index, head] > 0.5 and busy.sink_score[layer_index, head] < 0.5),
        "drain": bool(quiet.value_drain[layer_index, head] < 0.5),
        "peak": bool(quiet.residual_peak.max() > 2.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=BackcopyConfig.steps)
    parser.add_argument("--seed", type=int, default=0, help="training seed (initial weights and batches)")
    parser.add_argument("--sgd", action="store_true", help="also train with SGD and show the contrast")
    args = parser.parse_args()

    adam = report(train_backcopy(args.layers, steps=args.steps, seed=args.seed), "Adam")
    print(f"{'PASS' if adam['sink'] else 'FAIL'}: attention sink on BOS (dormant on non-trigger queries, active on triggers)")
    print(f"{'PASS' if adam['drain'] else 'FAIL'}: value-state drain (BOS value norm < 0.5 x median)")
    print(f"{'PASS' if adam['peak'] else 'FAIL'}: residual-state peak (BOS residual norm > 2 x median)")
    if args.sgd:
        sgd = report(train_backcopy(args.layers, optimizer="sgd", steps=args.steps, seed=args.seed), "SGD")
        print(f"{'PASS' if not sgd['sink'] else 'FAIL'}: with SGD, no attention sink on BOS")


if __name__ == "__main__":
    main()
