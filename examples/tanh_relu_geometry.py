"""Reproduction: task structure and nonlinearity (Alleman, Lindsey & Fusi): tanh networks learn
hidden representations that mirror the structure of the targets, ReLU networks keep more of the
structure of the inputs.

One-hidden-layer networks (width 100, tanh or ReLU, PyTorch's default initialisation, full-batch
SGD, lr 0.1, binary cross-entropy, 3000 steps) are trained here on two families of tasks, each
with a parameter for how well the input geometry already matches the target geometry:

* A, "mixed geometry": 16 conditions with 2 binary targets (each of the 4 label pairs on 4
  conditions); condition c's input is ``α · (y_c A) + (1 − α) · r_c`` in 100 dimensions (A a
  random embedding of the targets, r_c a random vector), scaled to a common norm, 5 noisy
  samples each (noise 0.05). α = 0.2, 0.5, 0.8.
* B, "factor salience": 8 conditions = 3 binary latent factors, embedded along orthonormal
  input directions with salience 2, 1 and 0.5 (50 dimensions, 10 samples each, noise 0.1); the
  one target is the most, the middle or the least salient factor.

Measure, on the hidden layer's response to the condition means (``actscope.capture`` of the
activation module, ``actscope.metrics.cka``): the *target-alignment index*
``CKA(H, targets) − CKA(H, inputs)`` — positive when the hidden geometry is closer to the
targets' than to the inputs'. RSA (Spearman between Euclidean-distance RDMs; a one-dimensional
target has no correlation distance) gives a second reading, ``RSA(H, targets) − RSA(H, inputs)``.

Pass rule (fixed before the recorded run, per family, over the levels where the input does not
already match the target — A: α = 0.2 and 0.5; B: the middle and least salient factor):
"holds" if tanh's index exceeds ReLU's for every seed at every such level; "direction only"
if tanh's mean over seeds exceeds ReLU's at every such level but some seed does not; "does not
hold" otherwise.

Run:  PYTHONPATH=src python examples/tanh_relu_geometry.py [--seeds 5] [--steps 3000] [--figures DIR]
(about 1–2 minutes on 2 cores; ``--quick`` for a seconds-long smoke run; ``--figures`` writes the
SVG figures there). Spread: mean ± sd (ddof 1) over seeds, and min..max.
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import actscope
from actscope.drawing.charts import bars, standalone
from actscope.metrics import cka, rsa

WIDTH = 100
LR = 0.1
LEVELS_A = (0.2, 0.5, 0.8)
LEVELS_B = ("most", "middle", "least")
TESTED = {"A": (0.2, 0.5), "B": ("middle", "least")}  # levels where input and target geometry differ


def task_a(seed: int, alpha: float, conditions: int = 16, dims: int = 100, per: int = 5, noise: float = 0.05):
    rng = np.random.default_rng(seed)
    labels = np.array(list(itertools.product([-1.0, 1.0], repeat=2)))
    y = labels[np.arange(conditions) % len(labels)]  # [conditions, 2]
    embedding = rng.normal(size=(2, dims)) / np.sqrt(2)
    means = alpha * (y @ embedding) + (1 - alpha) * rng.normal(size=(conditions, dims))
    means = means / np.linalg.norm(means, axis=1, keepdims=True) * np.sqrt(dims) / 3
    return _samples(rng, means, y, per, noise)


def task_b(seed: int, target: str, dims: int = 50, per: int = 10, noise: float = 0.1):
    rng = np.random.default_rng(seed)
    salience = np.array([2.0, 1.0, 0.5])
    z = np.array(list(itertools.product([-1.0, 1.0], repeat=3)))  # [8, 3]
    directions = np.linalg.qr(rng.normal(size=(dims, 3)))[0].T  # [3, dims], orthonormal
    means = (z * salience) @ directions
    return _samples(rng, means, z[:, [LEVELS_B.index(target)]], per, noise)


def _samples(rng, means, y, per, noise):
    x = np.repeat(means, per, axis=0) + rng.normal(size=(len(means) * per, means.shape[1])) * noise
    return (torch.tensor(x, dtype=torch.float32), torch.tensor(np.repeat(y, per, axis=0) > 0, dtype=torch.float32),
            torch.tensor(means, dtype=torch.float32), y)


def train(activation: str, seed: int, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], WIDTH), {"tanh": torch.nn.Tanh(), "relu": torch.nn.ReLU()}[activation],
                              torch.nn.Linear(WIDTH, y.shape[1]))
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.final_loss = float(loss.detach())
    return net


def hidden(net: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), actscope.capture(net, "module:1@output") as captured:  # the activation's output
        net(inputs)
    return captured.tensor("module:1@output")


def measure(net: torch.nn.Module, means: torch.Tensor, targets: np.ndarray) -> dict[str, float]:
    h = hidden(net, means)
    return {"cka_target": cka(h, targets), "cka_input": cka(h, means),
            "index": cka(h, targets) - cka(h, means),
            "rsa_index": rsa(h, targets, "euclidean") - rsa(h, means, "euclidean"),
            "loss": net.final_loss}


def run(seeds: int, steps: int) -> dict:
    results = {}
    for family, levels, make in (("A", LEVELS_A, task_a), ("B", LEVELS_B, task_b)):
        for level in levels:
            for activation in ("tanh", "relu"):
                rows = []
                for seed in range(seeds):
                    x, y, means, targets = make(seed, level)
                    rows.append(measure(train(activation, seed, x, y, steps), means, targets))
                results[(family, level, activation)] = rows
    return results


def verdict(results: dict, family: str, seeds: int) -> str:
    every, means = True, True
    for level in TESTED[family]:
        tanh = np.array([r["index"] for r in results[(family, level, "tanh")]])
        relu = np.array([r["index"] for r in results[(family, level, "relu")]])
        every &= bool(np.all(tanh > relu))
        means &= bool(tanh.mean() > relu.mean())
    return "holds" if every else ("direction only" if means else "does not hold")


def report(results: dict, seeds: int, steps: int) -> None:
    print(f"one hidden layer, width {WIDTH}, SGD lr {LR}, BCE, {steps} steps, seeds 0..{seeds - 1}")
    print("index = CKA(H, targets) − CKA(H, inputs) on the condition means; mean ± sd [min..max] over seeds")
    for family, levels, what in (("A", LEVELS_A, "α"), ("B", LEVELS_B, "target")):
        print(f"\nfamily {family} ({'mixed geometry' if family == 'A' else 'factor salience'})")
        print(f"  {what:>7}  act   index mean ± sd [min..max]          CKA(H,targets)  CKA(H,inputs)  RSA index   final loss   tanh>relu seeds")
        for level in levels:
            tanh_index = np.array([r["index"] for r in results[(family, level, "tanh")]])
            relu_index = np.array([r["index"] for r in results[(family, level, "relu")]])
            for activation in ("tanh", "relu"):
                rows = results[(family, level, activation)]
                index = np.array([r["index"] for r in rows])
                wins = f"{int((tanh_index > relu_index).sum())}/{len(index)}" if activation == "tanh" else ""
                sd = index.std(ddof=1) if len(index) > 1 else float("nan")
                print(f"  {level!s:>7}  {activation}  {index.mean():+.3f} ± {sd:.3f} [{index.min():+.3f}..{index.max():+.3f}]"
                      f"   {np.mean([r['cka_target'] for r in rows]):.3f}           {np.mean([r['cka_input'] for r in rows]):.3f}"
                      f"        {np.mean([r['rsa_index'] for r in rows]):+.3f}     {max(r['loss'] for r in rows):.1e}      {wins}")
        print(f"  family {family}: {verdict(results, family, seeds)} (tested levels: {', '.join(map(str, TESTED[family]))})")


def figures(results: dict, seeds: int, folder: Path) -> list[Path]:
    """Two SVG figures (means over seeds): the target-alignment index per task level, and its two
    parts, CKA(H, targets) and CKA(H, inputs)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = [("A", level) for level in LEVELS_A] + [("B", level) for level in LEVELS_B]
    labels = [f"A: α = {level}" if family == "A" else f"B: target = {level} salient" for family, level in keys]

    def mean(family: str, level: Any, activation: str, what: str) -> float:
        return float(np.mean([r[what] for r in results[(family, level, activation)]]))

    charts = {
        "tanh-relu-index.svg": bars(
            "index", labels, {activation: [mean(f, level, activation, "index") for f, level in keys] for activation in ("tanh", "relu")},
            title=f"target-alignment index CKA(H, targets) − CKA(H, inputs), mean of {seeds} seeds", top=1.0),
        "tanh-relu-parts.svg": bars(
            "parts", labels, {f"{activation}·{part}": [mean(f, level, activation, f"cka_{part[:-1]}") for f, level in keys]
                              for activation in ("tanh", "relu") for part in ("targets", "inputs")},
            title=f"the index's two parts, CKA(H, targets) and CKA(H, inputs), mean of {seeds} seeds", top=1.0),
    }
    written = []
    for name, svg in charts.items():
        (folder / name).write_text(standalone(svg), encoding="utf-8")
        written.append(folder / name)
    return written


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 200 steps: a smoke run, not a result")
    parser.add_argument("--figures", type=Path, default=None, help="folder to write the SVG figures into")
    args = parser.parse_args(argv)
    seeds, steps = (2, 200) if args.quick else (args.seeds, args.steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest and keeps the runs reproducible
    started = time.perf_counter()
    try:
        results = run(seeds, steps)
    finally:
        torch.set_num_threads(threads)
    report(results, seeds, steps)
    if args.figures is not None:
        print("figures: " + ", ".join(str(p) for p in figures(results, seeds, args.figures)))
    print(f"\n{time.perf_counter() - started:.0f} s")
    return {family: verdict(results, family, seeds) for family in TESTED}


if __name__ == "__main__":
    main()
