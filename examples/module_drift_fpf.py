"""Reproduction: module drift between tasks, and fine-tuning only the most-drifted modules
reduces forgetting (FPF, "Does continual learning equally forget all parameters?").

A small MLP (shared trunk fc1 64→128, fc2 128→128, fc3 128→64, ReLU; one 5-way head per task)
is trained on task A (digits 0–4 of scikit-learn's 8×8 digits), then fine-tuned on task B
(digits 5–9, its own head), with checkpoints after 5, 10 and 20 epochs of B.
``actscope.metrics.module_drift`` measures, across the four checkpoints, each shared module's
weight change and representation change (1 − linear CKA of its outputs on the test images of
both tasks, each checkpoint against the one before). Then, from the task-A checkpoint, task B
is learnt three ways for the same 20 epochs:

* full fine-tuning (every module; the last checkpoint above);
* FPF: ``actscope.train.freeze_for_finetuning(model, drift, top=1, also=["heads.b"])`` — only
  the most-drifted shared module (by representation drift summed over the steps) and the new
  head are trained, the least-drifted modules frozen;
* control: only the least-drifted shared module and the new head.

Forgetting = task-A test accuracy after task A minus after task B (head A is never trained on B;
it forgets only through the shared trunk).

Pass rule (fixed before the recorded run): "holds" if, for every seed, FPF forgets less than full
fine-tuning and its task-B accuracy is at most 5 points below full fine-tuning's; "direction only"
if FPF forgets less on average over seeds but some seed breaks one of the two conditions; "does
not hold" otherwise. The control is reported, not judged.

Trade-off (added after the first run of this script, which gave "direction only"; the pass rule
and the runs it judges are unchanged): the same fine-tuning with k = 0, 1, 2, 3 shared modules
trainable, taken most-drifted first or least-drifted first (k = 1: FPF and the control; k = 3:
full fine-tuning). Reported and drawn, not judged.

Run:  PYTHONPATH=src python examples/module_drift_fpf.py [--seeds 5] [--figures DIR]
(about ten seconds on 2 cores; ``--quick`` for a seconds-long smoke run; ``--figures`` writes the
SVG figures there). Needs scikit-learn (its digits are bundled, no download).
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from actscope.drawing.charts import bars, lines, standalone
from actscope.metrics import module_drift
from actscope.train import freeze_except, freeze_for_finetuning

SHARED = ["fc1", "fc2", "fc3"]
B_CHECKPOINTS = (5, 10, 20)  # epochs of task B after which a checkpoint is kept
EPOCHS_A = 30
MAX_B_DROP = 0.05


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 128), torch.nn.Linear(128, 64)
        self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(64, 5), "b": torch.nn.Linear(64, 5)})

    def forward(self, x: torch.Tensor, task: str = "a") -> torch.Tensor:
        h = torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x))))))
        return self.heads[task](h)


def tasks(seed: int) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0 - 0.5).astype(np.float32)
    found = {}
    for name, low in (("a", 0), ("b", 5)):
        keep = (digits.target >= low) & (digits.target < low + 5)
        x_train, x_test, y_train, y_test = train_test_split(x[keep], digits.target[keep] - low, test_size=0.3,
                                                            random_state=seed, stratify=digits.target[keep])
        found[name] = tuple(torch.tensor(v) for v in (x_train, y_train, x_test, y_test))
    return found


def train(model: Net, task: str, data: dict, epochs: int, seed: int, parameters=None, keep_after=()) -> list[Net]:
    x, y = data[task][0], data[task][1]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(parameters if parameters is not None else model.parameters(), lr=1e-3)
    kept = []
    model.train()
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(x), generator=generator).split(32):
            loss = torch.nn.functional.cross_entropy(model(x[batch], task), y[batch].long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch in keep_after:
            kept.append(copy.deepcopy(model).eval())
    model.eval()
    return kept


def accuracy(model: Net, task: str, data: dict) -> float:
    with torch.no_grad():
        return float((model(data[task][2], task).argmax(-1) == data[task][3]).float().mean())


def one_seed(seed: int, epochs_a: int, b_checkpoints: tuple[int, ...]) -> dict:
    data = tasks(seed)
    torch.manual_seed(seed)
    after_a = Net()
    train(after_a, "a", data, epochs_a, seed)
    full = copy.deepcopy(after_a)
    checkpoints = [copy.deepcopy(after_a), *train(full, "b", data, b_checkpoints[-1], seed + 100, keep_after=b_checkpoints)]
    probe = [{"x": torch.cat([data["a"][2], data["b"][2]])}]  # both tasks' test images
    drift = module_drift(checkpoints, probe, SHARED)
    chosen = {}
    ranking = drift.ranking()
    for name, make in (("fpf", lambda m: freeze_for_finetuning(m, drift, top=1, also=["heads.b"])),
                       ("control", lambda m: freeze_except(m, [ranking[-1], "heads.b"])),
                       ("most 0", lambda m: freeze_except(m, ["heads.b"])),
                       ("most 2", lambda m: freeze_except(m, [*ranking[:2], "heads.b"])),
                       ("least 2", lambda m: freeze_except(m, [*ranking[-2:], "heads.b"]))):
        model = copy.deepcopy(after_a)
        frozen = make(model)
        train(model, "b", data, b_checkpoints[-1], seed + 100, parameters=frozen.parameters())
        frozen.restore()
        chosen[name] = (model, frozen.trainable)
    base = accuracy(after_a, "a", data)
    row = {"seed": seed, "acc_a_after_a": base, "ranking": drift.ranking(), "weight_ranking": drift.ranking(by="weight"),
           "drift": drift.representation_drift.sum(axis=0), "weight": drift.weight_change.sum(axis=0),
           "drift_steps": drift.representation_drift, "weight_steps": drift.weight_change}
    for name, model in (("full", full), *((key, found[0]) for key, found in chosen.items())):
        row[name] = {"forgetting": base - accuracy(model, "a", data), "acc_b": accuracy(model, "b", data)}
    row["fpf"]["trained"], row["control"]["trained"] = chosen["fpf"][1], chosen["control"][1]
    return row


def verdict(rows: list[dict]) -> str:
    fewer = [r["fpf"]["forgetting"] < r["full"]["forgetting"] for r in rows]
    close = [r["fpf"]["acc_b"] >= r["full"]["acc_b"] - MAX_B_DROP for r in rows]
    if all(fewer) and all(close):
        return "holds"
    mean_fewer = np.mean([r["fpf"]["forgetting"] for r in rows]) < np.mean([r["full"]["forgetting"] for r in rows])
    return "direction only" if mean_fewer else "does not hold"


def report(rows: list[dict], epochs_a: int, b_checkpoints: tuple[int, ...]) -> None:
    print(f"MLP 64-128-128-64, a head per task; task A {epochs_a} epochs, task B checkpoints after {b_checkpoints} epochs; Adam 1e-3")
    print(f"\ndrift of the shared modules, summed over the {len(b_checkpoints)} checkpoint steps (1 − CKA | relative weight change)")
    print("  seed  " + "  ".join(f"{m:>17}" for m in SHARED) + "   ranking (representation)  ranking (weight)")
    for r in rows:
        cells = "  ".join(f"{d:7.3f} | {w:7.3f}" for d, w in zip(r["drift"], r["weight"]))
        print(f"  {r['seed']:>4}  {cells}   {' > '.join(r['ranking']):<24}  {' > '.join(r['weight_ranking'])}")
    print("\nforgetting of task A (accuracy points lost) and task-B accuracy")
    print("  seed  acc A after A |  full: forget  acc B |  FPF (trained): forget  acc B |  control (trained): forget  acc B")
    for r in rows:
        print(f"  {r['seed']:>4}      {r['acc_a_after_a']:.3f}    |  {r['full']['forgetting']:+.3f}  {r['full']['acc_b']:.3f} |"
              f"  ({', '.join(r['fpf']['trained'])}) {r['fpf']['forgetting']:+.3f}  {r['fpf']['acc_b']:.3f} |"
              f"  ({', '.join(r['control']['trained'])}) {r['control']['forgetting']:+.3f}  {r['control']['acc_b']:.3f}")
    print("\nmean ± sd over seeds [min..max]")
    for name in ("full", "fpf", "control"):
        forget = np.array([r[name]["forgetting"] for r in rows])
        acc_b = np.array([r[name]["acc_b"] for r in rows])
        print(f"  {name:>8}: forgetting {spread(forget)} [{forget.min():+.3f}..{forget.max():+.3f}], "
              f"acc B {spread(acc_b)} [{acc_b.min():.3f}..{acc_b.max():.3f}]")
    drift = np.array([r["drift"] for r in rows])
    print("  drift (1 − CKA, summed over steps): " + ", ".join(f"{m} {spread(drift[:, k])}" for k, m in enumerate(SHARED)))
    print("\ntrade-off (not judged): k shared modules trainable (+ head B), mean ± sd over seeds")
    print("      k   most-drifted first: forget   acc B        least-drifted first: forget   acc B")
    for k in range(len(SHARED) + 1):
        cells = []
        for order in ("most", "least"):
            name = trade_name(order, k)
            forget, acc_b = (np.array([r[name][key] for r in rows]) for key in ("forgetting", "acc_b"))
            cells.append(f"{spread(forget):>15}  {spread(acc_b):>13}")
        print(f"  {k:>5}   {cells[0]}        {cells[1]}")
    print(f"\nFPF forgets less than full fine-tuning in {sum(r['fpf']['forgetting'] < r['full']['forgetting'] for r in rows)}/{len(rows)} seeds; "
          f"task-B accuracy within {MAX_B_DROP:.0%} of full in {sum(r['fpf']['acc_b'] >= r['full']['acc_b'] - MAX_B_DROP for r in rows)}/{len(rows)}")
    print(f"claim: {verdict(rows)}")


def spread(values: np.ndarray) -> str:
    """``mean ± sd`` (sample sd, ddof 1) over seeds."""
    values = np.asarray(values, dtype=float)
    sd = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{values.mean():+.3f} ± {sd:.3f}"


def trade_name(order: str, k: int) -> str:
    """The run that trained ``k`` shared modules, ``order`` (most / least) drifted first."""
    if k == len(SHARED):
        return "full"
    if k == 0:
        return "most 0"
    if k == 1:
        return "fpf" if order == "most" else "control"
    return f"{order} {k}"


def figures(rows: list[dict], b_checkpoints: tuple[int, ...], folder: Path) -> list[Path]:
    """Three SVG figures (means over seeds): drift per module and step, forgetting and task-B
    accuracy of the three fine-tunings, and the trade-off over k."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = [f"{a}→{b}" for a, b in zip((0, *b_checkpoints[:-1]), b_checkpoints)]
    x = list(range(1, len(steps) + 1))
    drift = np.mean([r["drift_steps"] for r in rows], axis=0)  # [steps, modules]
    weight = np.mean([r["weight_steps"] for r in rows], axis=0)
    charts = {
        "module-drift-steps.svg": lines(
            "drift", {**{f"{m} 1 − CKA": (x, drift[:, k].tolist()) for k, m in enumerate(SHARED)},
                      **{f"{m} weight": (x, weight[:, k].tolist()) for k, m in enumerate(SHARED)}},
            title=f"drift per checkpoint step (epochs of task B: {', '.join(steps)}), mean of {len(rows)} seeds",
            x_label="checkpoint step", y_label="1 − CKA / relative weight change"),
        "module-drift-forgetting.svg": bars(
            "forgetting", ["full fine-tuning", "FPF (most drifted + head)", "control (least drifted + head)"],
            {"forgetting of task A": [float(np.mean([r[n]["forgetting"] for r in rows])) for n in ("full", "fpf", "control")],
             "task-B accuracy": [float(np.mean([r[n]["acc_b"] for r in rows])) for n in ("full", "fpf", "control")]},
            title=f"forgetting and task-B accuracy, mean of {len(rows)} seeds", top=1.0),
        "module-drift-tradeoff.svg": lines(
            "tradeoff", {f"{what}, {order}-drifted first": (list(range(len(SHARED) + 1)),
                                                             [float(np.mean([r[trade_name(order, k)][key] for r in rows]))
                                                              for k in range(len(SHARED) + 1)])
                         for key, what in (("forgetting", "forgetting"), ("acc_b", "acc B")) for order in ("most", "least")},
            title=f"k shared modules trainable (+ head B), mean of {len(rows)} seeds", x_label="k", y_label="share of the test set"),
    }
    written = []
    for name, svg in charts.items():
        (folder / name).write_text(standalone(svg), encoding="utf-8")
        written.append(folder / name)
    return written


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 seeds, few epochs: a smoke run, not a result")
    parser.add_argument("--figures", type=Path, default=None, help="folder to write the SVG figures into")
    args = parser.parse_args(argv)
    seeds, epochs_a, b_checkpoints = (2, 2, (1, 2)) if args.quick else (args.seeds, EPOCHS_A, B_CHECKPOINTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest
    started = time.perf_counter()
    try:
        rows = [one_seed(seed, epochs_a, b_checkpoints) for seed in range(seeds)]
    finally:
        torch.set_num_threads(threads)
    report(rows, epochs_a, b_checkpoints)
    if args.figures is not None:
        print("figures: " + ", ".join(str(p) for p in figures(rows, b_checkpoints, args.figures)))
    print(f"\n{time.perf_counter() - started:.0f} s")
    return verdict(rows)


if __name__ == "__main__":
    main()
