"""Temporal sparsity and CoreInfer's core neurons on the embedded MiniLM, with checks fixed
before looking.

A. Temporal vs activation sparsity (Delta Activation Layer) over 2000 tokens of the built-in
   corpus, per MLP layer.
B. CoreInfer's two claims about sentence-wise core neurons (METHODS.md, "Core neurons"), for
   every MLP layer of MiniLM (6) and 12 paraphrase pairs on 12 topics (24 sentences, 528
   unrelated ordered pairs), at β = 0.2 and 0.4 (α = 0.4):

   * *similarity*: sentences with the same meaning share more of their core set. Score per
     layer: the AUC of the overlap ``|A ∩ B| / |B|`` between a paraphrase pair (both orders)
     against an unrelated pair: the probability that a random paraphrase pair overlaps more
     than a random unrelated one (ties count ½). **Rule**: the claim holds at a layer when
     AUC ≥ 0.8; overall "holds" when it holds at every layer, "direction only" when AUC > 0.5
     at every layer but ≥ 0.8 not everywhere, "does not hold" otherwise.
   * *stability*: the core set of a sentence's first tokens converges to the whole sentence's.
     Score per layer: the mean overlap with the full core set at prefixes of 1, 2, 4 and 8
     tokens (texts longer than the prefix). **Rule**: holds at a layer when the curve rises at
     every step and reaches ≥ 0.8 at 8 tokens; the same three labels over layers.

   These rules and the sentence list were written before the run whose output
   docs/reproductions/core_temporal.md records. MiniLM is deterministic: no seeds; the spread
   reported is over layers and pairs.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python examples/core_temporal.py
"""
from __future__ import annotations

import numpy as np

import actscope
from actscope.metrics import core_neurons, temporal_sparsity

PAIRS = [
    ("The doctor examined the patient carefully.", "The physician checked the sick man thoroughly."),
    ("A cat was sleeping on the sofa.", "A kitten dozed on the couch."),
    ("Stock prices dropped sharply today.", "Shares fell steeply this afternoon."),
    ("He drove his car to work.", "He commuted to the office by automobile."),
    ("It is raining heavily outside.", "There is a downpour out there."),
    ("The children played football in the park.", "Kids were kicking a ball around on the green."),
    ("She baked a chocolate cake for the party.", "For the celebration she made a cocoa sponge in the oven."),
    ("The train to Paris was delayed by an hour.", "Our rail service to the French capital ran sixty minutes late."),
    ("The old bridge collapsed during the storm.", "In the gale the ancient span fell down."),
    ("My laptop battery died in the middle of the meeting.", "Halfway through the call my notebook computer ran out of power."),
    ("The orchestra played a symphony by Beethoven.", "The musicians performed one of Beethoven's symphonies."),
    ("Farmers harvested the wheat before the frost.", "The grain was brought in by the growers ahead of the cold snap."),
]
ALPHA, BETAS, PREFIXES = 0.4, (0.2, 0.4), (1, 2, 4, 8)
AUC_HOLDS = 0.8
STABLE_AT_8 = 0.8


def auc(positive: list[float], negative: list[float]) -> float:
    """P(a positive score > a negative one), ties counting ½."""
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def overall(per_layer: list[bool], direction: list[bool]) -> str:
    return "holds" if all(per_layer) else "direction only" if all(direction) else "does not hold"


def part_a(model) -> None:
    ts = temporal_sparsity(model, None, sites="blocks.*.mlp.post", max_tokens=2000)
    t = ts.to_pandas()
    print("A. temporal vs activation sparsity, builtin corpus, 2000 tokens")
    print(t[t.eps.isin([0.01, 0.1])][["site", "pairs", "eps", "temporal_sparsity", "activation_sparsity",
                                       "mean_abs_delta"]].to_string(index=False))


def part_b(model, beta: float) -> dict[str, str]:
    texts = [x for pair in PAIRS for x in pair]
    result = core_neurons(model, texts, site="blocks.*.mlp.post", alpha=ALPHA, beta=beta, prefixes=PREFIXES)
    print(f"\nB. core sets, alpha={ALPHA} beta={beta}: {len(PAIRS)} paraphrase pairs, {len(texts)} sentences")
    print(f"{'site':<18} {'paraphrase overlap':>22} {'unrelated overlap':>22} {'AUC':>6}  {'stability 1/2/4/8 tokens':>26}")
    similar, similar_direction, stable, stable_direction = [], [], [], []
    curve = result.stability().to_pandas()
    curve = curve[curve.prefix_tokens < curve.tokens]
    for site in result.sites:
        m = result.similarity_matrix(site)
        para = [m[2 * i, 2 * i + 1] for i in range(len(PAIRS))] + [m[2 * i + 1, 2 * i] for i in range(len(PAIRS))]
        other = [m[i, j] for i in range(len(texts)) for j in range(len(texts)) if i // 2 != j // 2]
        score = auc(para, other)
        means = curve[curve.site == site].groupby("prefix_tokens").overlap.mean()
        rising = bool(np.all(np.diff(means.to_numpy()) > 0))
        similar.append(score >= AUC_HOLDS)
        similar_direction.append(score > 0.5)
        stable.append(rising and float(means.loc[8]) >= STABLE_AT_8)
        stable_direction.append(rising)
        print(f"{site:<18} {np.mean(para):>10.3f} ± {np.std(para, ddof=1):.3f} (min {min(para):.2f})"
              f" {np.mean(other):>8.3f} ± {np.std(other, ddof=1):.3f} (max {max(other):.2f}) {score:>6.3f}  "
              + " / ".join(f"{v:.3f}" for v in means.to_numpy()))
    verdicts = {"similarity": overall(similar, similar_direction), "stability": overall(stable, stable_direction)}
    where = [site for site, ok in zip(result.sites, similar) if ok]
    print(f"similarity (AUC >= {AUC_HOLDS} at every layer): {verdicts['similarity'].upper()}; holds at {where or 'no layer'}")
    where = [site for site, ok in zip(result.sites, stable) if ok]
    print(f"stability (rising, >= {STABLE_AT_8} at 8 tokens at every layer): {verdicts['stability'].upper()}; holds at {where or 'no layer'}")
    return verdicts


def main() -> dict[float, dict[str, str]]:
    model = actscope.load()
    part_a(model)
    return {beta: part_b(model, beta) for beta in BETAS}


if __name__ == "__main__":
    main()
