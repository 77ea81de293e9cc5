"""Reproduction: simpler features take up more of a representation ("Learned feature representations
are biased by complexity, learning order, position, and more", Lampinen, Chan & Hermann 2024): an
MLP that outputs three features of its binary input, one linear and two nonlinear, learns all three
perfectly, yet the penultimate layer's variance is mostly the simple one's.

Setup: inputs are 16 random bits (4096 distinct inputs of the 2^16: 3072 for training, 1024 held
out). Three binary features, each of its own bits: easy = majority of bits 0-2 (linearly
separable), medium = XOR of bits 3-4, hard = parity of bits 5-8. MLP 16 → 128 → 64 → 3 (ReLU), one
logit per feature, binary cross-entropy on all three; full-batch Adam, lr 1e-3, 1500 steps. Seeds
1, 2, 3. Settings chosen on one trial run with seed 100 (not counted).

Measured with ``actscope.train.feature_variance_tracker(model, x_test, features,
"module:3@output", every=50)`` (the penultimate ReLU) into the ``training_steps`` table, with each
feature's test accuracy passed to ``cb.step``; at the end ``actscope.metrics.feature_variance``
with its linear (logistic regression) and nonlinear (one-hidden-layer MLP) probes, on the
penultimate layer and, for reference, on the input bits themselves.

PASS RULE (fixed before the run), on every seed, at the end of training:
(a) every feature's test accuracy ≥ 0.99;  (b) VE(easy) ≥ 3 × VE(hard);
(c) VE(easy) > VE(medium) > VE(hard);  (d) every feature's linear-probe accuracy ≥ 0.99 on the
penultimate layer (held-out quarter of the test inputs).
Label: "holds" if (a)-(d); "direction only" if (a) holds and VE(easy) > VE(hard) on every seed;
"does not hold" otherwise. Reported without a rule: the step at which each feature first reaches
0.99 test accuracy (learning order), and VE at the step the hard feature is learned.

    PYTHONPATH=src python examples/complexity_bias.py          # ~30 s on 2 shared cores
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from actscope.drawing.charts import lines
from actscope.metrics import feature_variance
from actscope.train import StepLog, feature_variance_tracker, write_steps

BITS, INPUTS, TRAIN, LR, STEPS, EVERY = 16, 4096, 3072, 1e-3, 1500, 50
FEATURES = ("easy", "medium", "hard")
SITE = "module:3@output"  # the penultimate layer, after its ReLU
SEEDS = (1, 2, 3)
FIGURES = Path("docs/reproductions/figures")
RUN = Path(os.environ.get("ACTSCOPE_CACHE", Path.home() / ".cache" / "actscope")) / "examples" / "complexity-bias-run"


def task(seed: int, bits: int = BITS, inputs: int = INPUTS, train: int = TRAIN) -> dict:
    """Distinct random bit vectors and the three features (each of its own bits)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(2 ** bits, generator=g)[:inputs]
    x = ((ids[:, None] >> torch.arange(bits)) & 1).float()  # [inputs, bits]
    y = torch.stack([x[:, 0:3].sum(1) >= 2, x[:, 3:5].sum(1) % 2 == 1, x[:, 5:9].sum(1) % 2 == 1], 1).float()  # [inputs, 3]
    return {"x_train": x[:train], "y_train": y[:train], "x_test": x[train:], "y_test": y[train:]}


def network(seed: int, bits: int = BITS, width: int = 128) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(bits, width), torch.nn.ReLU(), torch.nn.Linear(width, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, len(FEATURES)))


def features_of(y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: y[:, i].long() for i, name in enumerate(FEATURES)}


def accuracies(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        right = ((model(x) > 0).float() == y).float().mean(0)
    return {f"test_acc_{name}": float(right[i]) for i, name in enumerate(FEATURES)}


def train_watched(data: dict, model: torch.nn.Module, steps: int, every: int, log: StepLog, lr: float = LR) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with feature_variance_tracker(model, data["x_test"], features_of(data["y_test"]), SITE, every=every, log=log) as cb:
        for step in range(steps + 1):  # cb.step() before each update: step s is the model after s updates
            cb.step(**(accuracies(model, data["x_test"], data["y_test"]) if step % every == 0 else {}))
            if step == steps:
                break
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(data["x_train"]), data["y_train"])
            opt.zero_grad()
            loss.backward()
            opt.step()


def curves(log: StepLog) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{metric or "variance_explained:feature": (steps, values)}``."""
    table = log.to_pandas()
    table = table[table.metric != "loss"]
    table = table.assign(metric=np.where(table.metric == "variance_explained", "variance_explained:" + table.site, table.metric))
    wide = table.pivot_table(index="step", columns="metric", values="value")
    return {name: (wide.index.to_numpy(), wide[name].to_numpy()) for name in wide.columns}


def learned_at(c: dict, name: str, level: float = 0.99) -> int:
    steps, values = c[f"test_acc_{name}"]
    hits = np.nonzero(values >= level)[0]
    return int(steps[hits[0]]) if len(hits) else 10 ** 9


def value_at(c: dict, name: str, step: int) -> float:
    steps, values = c[f"variance_explained:{name}"]
    return float(values[list(steps).index(step)])


def final(data: dict, model: torch.nn.Module, seed: int) -> dict:
    """End-of-training accuracies and feature_variance (with probes) of the penultimate layer and of the input."""
    features = features_of(data["y_test"])
    hidden = feature_variance(model, features, data["x_test"], SITE, seed=seed)
    given = feature_variance(data["x_test"], features, seed=seed)
    return {"acc": accuracies(model, data["x_test"], data["y_test"]), "hidden": hidden, "input": given}


def describe(seed: int, c: dict, end: dict, clock: float) -> str:
    h, i = end["hidden"], end["input"]
    ve = "  ".join(f"{n} {h.of(n):.3f}" for n in FEATURES)
    acc = " / ".join(f"{end['acc'][f'test_acc_{n}']:.3f}" for n in FEATURES)
    hard_step = learned_at(c, "hard")
    at_hard = " / ".join(f"{value_at(c, n, hard_step):.3f}" for n in FEATURES) if hard_step < 10 ** 9 else "n/a"
    probes = "; ".join(f"{n}: linear {h.of(n, column='linear_probe'):.3f}, MLP {h.of(n, column='nonlinear_probe'):.3f} "
                       f"(input: {i.of(n, column='linear_probe'):.3f}, {i.of(n, column='nonlinear_probe'):.3f})" for n in FEATURES)
    return (f"seed {seed}: test acc easy/medium/hard {acc}; learned (>= 0.99) at steps "
            f"{' / '.join(str(learned_at(c, n)) for n in FEATURES)}\n"
            f"  variance explained, penultimate layer: {ve}  (ratio easy/hard {h.of('easy') / h.of('hard'):.1f})\n"
            f"  same at init: {' / '.join(f'{value_at(c, n, 0):.3f}' for n in FEATURES)}; "
            f"at step {hard_step} (hard learned): {at_hard}; of the input bits: {' / '.join(f'{i.of(n):.3f}' for n in FEATURES)}\n"
            f"  probe accuracy (held out): {probes}  ({time.perf_counter() - clock:.0f}s)")


def verdict(ends: dict) -> tuple[str, list[tuple[str, bool]]]:
    def every(check) -> bool:
        return all(check(ends[s]) for s in SEEDS)

    def ve(end, name):
        return end["hidden"].of(name)

    a = every(lambda e: min(e["acc"].values()) >= 0.99)
    b = every(lambda e: ve(e, "easy") >= 3 * ve(e, "hard"))
    c = every(lambda e: ve(e, "easy") > ve(e, "medium") > ve(e, "hard"))
    d = every(lambda e: min(e["hidden"].of(n, column="linear_probe") for n in FEATURES) >= 0.99)
    checks = [("(a) every feature's test accuracy >= 0.99", a), ("(b) VE(easy) >= 3 x VE(hard)", b),
              ("(c) VE(easy) > VE(medium) > VE(hard)", c), ("(d) every feature linearly decodable (probe >= 0.99)", d)]
    label = "holds" if a and b and c and d else ("direction only" if a and every(lambda e: ve(e, "easy") > ve(e, "hard")) else "does not hold")
    return label, checks


def figure(logs: dict) -> None:
    series = {}
    for metric, label in [(f"variance_explained:{n}", f"variance explained: {n}") for n in FEATURES] + \
                         [(f"test_acc_{n}", f"test accuracy: {n}") for n in FEATURES]:
        runs = [curves(logs[seed])[metric] for seed in SEEDS]
        series[label] = (runs[0][0].tolist(), np.mean([values for _, values in runs], axis=0).tolist())
    svg = lines("complexity-bias", series, title=f"penultimate layer, share of variance per feature (mean of seeds {', '.join(map(str, SEEDS))})",
                x_label="step", y_label="value")
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / "complexity-bias.svg").write_text(svg, encoding="utf-8")


def main() -> int:
    torch.set_num_threads(1)
    clock = time.perf_counter()
    logs, ends = {}, {}
    for seed in SEEDS:
        data, model = task(seed), network(seed)
        logs[seed] = StepLog()
        train_watched(data, model, STEPS, EVERY, logs[seed])
        ends[seed] = final(data, model, seed)
        print(describe(seed, curves(logs[seed]), ends[seed], clock), flush=True)

    def spread(name: str) -> str:
        v = np.array([ends[s]["hidden"].of(name) for s in SEEDS])
        return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"

    ratios = np.array([ends[s]["hidden"].of("easy") / ends[s]["hidden"].of("hard") for s in SEEDS])
    print(f"\nvariance explained at the end (mean ± sd over seeds {SEEDS}): easy {spread('easy')}, medium {spread('medium')}, "
          f"hard {spread('hard')}; ratio easy/hard {ratios.mean():.1f} ± {ratios.std(ddof=1):.1f}")
    label, checks = verdict(ends)
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {name} on every seed")
    print(f"label: {label} ({time.perf_counter() - clock:.0f}s)")
    figure(logs)
    write_steps(RUN, logs[SEEDS[0]], config={"example": "complexity_bias", "seed": SEEDS[0], "steps": STEPS})
    print(f"training_steps of seed {SEEDS[0]} written to {RUN} (actscope report {RUN})")
    return 0 if label == "holds" else 1


if __name__ == "__main__":
    sys.exit(main())
