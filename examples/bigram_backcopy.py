"""Reproduction (e): extreme-token phenomena on the Bigram-Backcopy task, and the two mitigations.

Claims (Active-dormant attention heads; METHODS.md, "Extreme-token phenomena"): a small
transformer trained with Adam on Bigram-Backcopy develops

1. an attention sink on BOS: on non-trigger queries, where the head has nothing to do, most of
   its attention goes to BOS (the head is dormant there), while on trigger queries it is active
   (it attends elsewhere, to the token it copies);
2. a value-state drain: the BOS value vector's norm is well below the median of the others;
3. a residual-state peak: the BOS residual-stream norm is well above the median of the others.

The mitigations act on different parts: ReLU attention (instead of softmax) removes the sink and
the drain; SGD (instead of Adam) removes the residual-state peak, not necessarily the sink.

Pass rules, fixed before the runs (RULES below). The sink is measured as the BOS share of a
query's attention mass (``w[BOS] / Σ_k w[k]``; for softmax that is the attention probability,
ReLU attention's weights do not sum to 1), for the head with the largest share on non-trigger
queries:
* Adam: share > 0.5 on non-trigger and < 0.5 on trigger queries; value ratio < 0.5; residual
  ratio > 2 in some layer.
* ReLU attention removes the sink: share on non-trigger queries < 2 × the uniform baseline (the
  share of a head that spreads evenly over its causal keys); and the drain: value ratio >= 0.5.
* SGD removes the peak: residual ratio < 2 in every layer.
* Each mitigation also requires a copy accuracy after triggers >= 0.9 (the model solved the
  task: a model that learned nothing has no sink either).
A claim "holds" when it passes for every seed, is "direction only" when it fails for some seed
but the mean moves from Adam's value in the claimed direction, and "does not hold" otherwise.

Run:  PYTHONPATH=src python examples/bigram_backcopy.py [--layers 1] [--steps N] [--seeds 0,1,2]
      [--variants adam,relu,sgd]
Each model is trained once (20-45 s on one CPU thread) and cached under $ACTSCOPE_CACHE/zoo.
"""
from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import actscope  # noqa: E402
from actscope.metrics import extreme_tokens  # noqa: E402
from actscope.zoo.backcopy import BackcopyConfig, load_backcopy, read_meta, task_of, train_backcopy  # noqa: E402

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


VARIANTS = {"adam": {}, "relu": {"activation": "relu"}, "sgd": {"optimizer": "sgd"}}
RULES = {  # claim: (variant, description, test of that variant's figures, measure, direction vs Adam)
    "sink": ("adam", "attention sink on BOS (share > 0.5 non-trigger, < 0.5 trigger)",
             lambda f: f["share"] > 0.5 and f["share_trigger"] < 0.5, "share", +1),
    "drain": ("adam", "value-state drain (BOS value norm < 0.5 x median)", lambda f: f["value_ratio"] < 0.5, "value_ratio", -1),
    "peak": ("adam", "residual-state peak (BOS residual norm > 2 x median)", lambda f: f["residual_ratio"] > 2.0,
             "residual_ratio", +1),
    "relu removes the sink": ("relu", "ReLU attention: BOS share < 2 x uniform baseline",
                              lambda f: f["share"] < 2 * f["uniform"] and f["copy_accuracy"] >= 0.9, "share", -1),
    "relu removes the drain": ("relu", "ReLU attention: value ratio >= 0.5", lambda f: f["value_ratio"] >= 0.5 and f["copy_accuracy"] >= 0.9,
                               "value_ratio", +1),
    "sgd removes the peak": ("sgd", "SGD: residual ratio < 2 in every layer", lambda f: f["residual_ratio"] < 2.0 and f["copy_accuracy"] >= 0.9,
                             "residual_ratio", -1),
}


def bos_share(model, data, task) -> tuple[torch.Tensor, torch.Tensor]:
    """``[layers, heads]`` mean BOS share of the attention mass on non-trigger and on trigger
    queries (BOS's own query left out; a query with no mass at all counts as share 0)."""
    sites = [f"blocks.{i}.attn.pattern" for i in range(model.n_layers)]
    sums = {"quiet": 0, "busy": 0}
    counts = {"quiet": 0, "busy": 0}
    for inputs in data:
        with torch.no_grad(), actscope.capture(model, sites, announce=False) as captured:
            model(**inputs)
        pattern = torch.stack([captured.tensor(site).double() for site in sites])  # [L, B, H, Q, K]
        mass = pattern.sum(-1)
        share = torch.where(mass > 0, pattern[..., 0] / mass.clamp(min=1e-300), torch.zeros_like(mass))  # [L, B, H, Q]
        trigger = task.is_trigger(inputs["input_ids"])  # [B, Q]
        trigger[:, 0] = False
        quiet = ~task.is_trigger(inputs["input_ids"])
        quiet[:, 0] = False
        for name, queries in (("quiet", quiet), ("busy", trigger)):
            sums[name] = sums[name] + (share * queries[None, :, None, :]).sum((1, 3))
            counts[name] += int(queries.sum())
    return sums["quiet"] / counts["quiet"], sums["busy"] / max(counts["busy"], 1)


def report(path, label: str) -> dict[str, float]:
    meta = read_meta(path)
    task = task_of(path)
    model = load_backcopy(path)  # with the attention it was trained with
    data = held_out(task)
    quiet = extreme_tokens(model, data, token_filter=lambda ids: ~task.is_trigger(ids))  # non-trigger queries
    share, share_trigger = bos_share(model, data, task)
    uniform = uniform_baseline(task, data)
    print(f"== {label}: {path.name}")
    print(f"held-out loss {meta['held_out']['loss']:.4f}, copy accuracy after triggers "
          f"{meta['held_out']['copy_accuracy']:.3f} ({meta['held_out']['copy_queries']} queries), "
          f"trained in {meta['train_seconds']:.0f} s")
    print(f"uniform-attention baseline for BOS on non-trigger queries: {uniform:.3f}")
    print("layer head  BOS-share(non-trigger)  BOS-share(trigger)  value-ratio")
    for layer_index, layer in enumerate(quiet.layer):
        for head in range(share.shape[1]):
            print(f"{layer:5d} {head:4d}  {share[layer_index, head]:22.3f}  {share_trigger[layer_index, head]:18.3f}  "
                  f"{quiet.value_drain[layer_index, head]:11.3f}")
    print("layer  BOS-resid-norm  median-resid-norm  residual-ratio")
    for layer_index, layer in enumerate(quiet.layer):
        print(f"{layer:5d}  {quiet.sink_resid_norm[layer_index]:14.3f}  {quiet.median_resid_norm[layer_index]:17.3f}  "
              f"{quiet.residual_peak[layer_index]:14.3f}")
    # The claims are about the dormant head(s): the head with the largest BOS share on non-trigger queries.
    layer_index, head = divmod(int(share.argmax()), share.shape[1])
    return {"share": float(share[layer_index, head]), "share_trigger": float(share_trigger[layer_index, head]),
            "value_ratio": float(quiet.value_drain[layer_index, head]), "residual_ratio": float(quiet.residual_peak.max()),
            "uniform": uniform, "copy_accuracy": float(meta["held_out"]["copy_accuracy"]), "loss": float(meta["held_out"]["loss"])}


def label(claim: str, figures: dict[str, list[dict[str, float]]]) -> tuple[str, int, int]:
    variant, _, test, measure, direction = RULES[claim]
    runs = figures[variant]
    passed = sum(bool(test(f)) for f in runs)
    if passed == len(runs):
        return "holds", passed, len(runs)
    if variant != "adam" and "adam" in figures:
        moved = statistics.mean(f[measure] for f in runs) - statistics.mean(f[measure] for f in figures["adam"])
        if moved * direction > 0:
            return "direction only", passed, len(runs)
    return "does not hold", passed, len(runs)


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv: list[str] | None = None) -> dict[str, str]:
    """Run, print, and return ``{claim: label}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=BackcopyConfig.steps)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (initial weights and batches)")
    parser.add_argument("--variants", default="adam,relu,sgd", help=f"any of {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    figures: dict[str, list[dict[str, float]]] = {}
    for variant in variants:
        for seed in seeds:
            path = train_backcopy(args.layers, steps=args.steps, seed=seed, **VARIANTS[variant])
            figures.setdefault(variant, []).append(report(path, f"{variant}, seed {seed}"))
    print(f"\n== summary over seeds {seeds} (mean ± sd)")
    print(f"{'variant':<8} {'BOS-share':>15} {'trigger share':>15} {'value-ratio':>15} {'residual-ratio':>15} {'copy acc.':>15}")
    for variant, runs in figures.items():
        print(f"{variant:<8} " + " ".join(f"{spread([f[k] for f in runs]):>15}"
                                          for k in ("share", "share_trigger", "value_ratio", "residual_ratio", "copy_accuracy")))
    verdicts = {}
    for claim, (variant, description, *_) in RULES.items():
        if variant in figures:
            verdicts[claim], passed, total = label(claim, figures)
            print(f"{verdicts[claim].upper():<14} {description} ({passed}/{total} seeds)")
    return verdicts


if __name__ == "__main__":
    main()
