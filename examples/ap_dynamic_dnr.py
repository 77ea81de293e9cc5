"""Reproduction (d), AP: the more a network is pruned, the lower its dynamic dead neuron rate.

A ReLU MLP (64 → 256 → 256 → 10) is trained on scikit-learn's digits. Copies of it are then
magnitude-pruned (``torch.nn.utils.prune.l1_unstructured``, layer-wise, every Linear weight)

* one-shot, at several levels, each copy fine-tuned with the same batches, and
* iteratively (each round prunes 20 % of the remaining weights, then fine-tunes),

while ``actscope.train.DeadNeuronTracker`` records the dynamic DNR: per step, the fraction of
(unit, example) pairs whose ReLU output is zero, pooled over both hidden layers; the figure per
pruning level is the mean of the per-epoch means (per batch, averaged per epoch — our choice).
AP's observation holds when the DNR falls as pruning rises: we call it reproduced when the rank
correlation between pruning level and DNR is negative and the most pruned network's DNR is
below the dense one's (whether the fall is strictly monotone is printed too).

Last, one AP step (``actscope.train.ap_prune_step``: a further 20 % of the remaining weights,
the negative ones that changed least during fine-tuning) on top of the heaviest one-shot
pruning, against pruning the same share by magnitude: the AP step should leave fewer dead
units during the next fine-tuning.

The whole experiment runs twice: on standardised pixels (zero mean, unit variance per pixel,
the usual preprocessing) and on raw pixels scaled to [0, 1] (all inputs non-negative).

Run:  HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python examples/ap_dynamic_dnr.py
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch.nn.utils import prune

import actscope.train as act_train

LEVELS = (0.0, 0.5, 0.8, 0.9, 0.95)
HIDDEN = 256
PRETRAIN_EPOCHS = 20
FINETUNE_EPOCHS = 5
BATCH = 64
LR = 1e-3
AP_FRACTION = 0.2  # the AP step prunes this share of the weights that remain
IMP_RATE, IMP_ROUNDS, IMP_EPOCHS = 0.2, 12, 3  # 12 rounds: 1 - 0.8**12 = 93 % pruned
SCALINGS = ("standardised", "raw [0, 1]")


def digits(scaling: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed stratified 75 / 25 split; pixels standardised (train statistics) or / 16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=0, stratify=data.target
    )
    if scaling == "standardised":
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    else:
        x_train, x_test = x_train / 16.0, x_test / 16.0
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def relu_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, 10),
    )


def batches(n: int, epochs: int, seed: int) -> list[list[torch.Tensor]]:
    """The same shuffled mini-batches for every model (per epoch, a list of index tensors)."""
    generator = torch.Generator().manual_seed(seed)
    return [list(torch.randperm(n, generator=generator).split(BATCH)) for _ in range(epochs)]


def fit(model, x, y, schedule, tracker=None) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for epoch in schedule:
        for index in epoch:
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if tracker is not None:
                tracker.step()
        if tracker is not None:
            tracker.epoch_end()


def finetune_tracked(model, x, y, schedule) -> dict[str, float]:
    """Fine-tune while tracking the dynamic DNR; per site, the mean of the per-epoch means."""
    with act_train.DeadNeuronTracker(model) as dnr:  # every nn.ReLU output
        fit(model, x, y, schedule, tracker=dnr)
    epochs = dnr.result().per_epoch().to_pandas()
    return epochs.groupby("site", sort=False)["dnr"].mean().to_dict()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def magnitude_prune(model, amount: float) -> None:
    if amount > 0:
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                prune.l1_unstructured(layer, "weight", amount=amount)


def weight_sparsity(model) -> float:
    weights = [layer.weight for layer in model if isinstance(layer, torch.nn.Linear)]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def copy_pruned(model):
    """deepcopy of a pruned model that has been trained: a no-grad forward first recomputes
    ``weight`` (= weight_orig × mask) without an autograd graph, which deepcopy refuses."""
    with torch.no_grad():
        model(torch.zeros(1, 64))
    return copy.deepcopy(model)


# -- the three experiments ----------------------------------------------------------------
def one_shot(base, x, y, x_test, y_test) -> list[float]:
    schedule = batches(len(x), FINETUNE_EPOCHS, seed=2)
    print(f"one-shot pruning, then {FINETUNE_EPOCHS} tracked epochs x {len(schedule[0])} steps")
    print(f"{'pruned':>7} {'weights=0':>9} {'DNR layer1':>10} {'DNR layer2':>10} {'DNR all':>8} {'test acc':>8}")
    rates = []
    for level in LEVELS:
        model = copy.deepcopy(base)
        magnitude_prune(model, level)
        dnr = finetune_tracked(model, x, y, schedule)
        rates.append(dnr["all"])
        print(f"{level:7.2f} {weight_sparsity(model):9.3f} {dnr['module:1@output']:10.4f} {dnr['module:3@output']:10.4f} "
              f"{dnr['all']:8.4f} {accuracy(model, x_test, y_test):8.3f}")
    return rates


def iterative(base, x, y, x_test, y_test) -> tuple[list[float], list[float]]:
    """Each round prunes IMP_RATE of the remaining weights of every layer, then fine-tunes."""
    model = copy.deepcopy(base)
    print(f"iterative pruning, {IMP_RATE:g} of the remaining weights per round, {IMP_EPOCHS} tracked epochs each")
    print(f"{'round':>5} {'weights=0':>9} {'DNR all':>8} {'test acc':>8}")
    levels, rates = [], []
    for round_ in range(IMP_ROUNDS + 1):
        if round_:
            magnitude_prune(model, IMP_RATE)
        rates.append(finetune_tracked(model, x, y, batches(len(x), IMP_EPOCHS, seed=10 + round_))["all"])
        levels.append(weight_sparsity(model))
        print(f"{round_:5d} {levels[-1]:9.3f} {rates[-1]:8.4f} {accuracy(model, x_test, y_test):8.3f}")
    return levels, rates


def ap_round(base, x, y) -> tuple[float, float]:
    """(DNR after an AP step, DNR after magnitude-pruning the same share) on top of the
    heaviest one-shot pruning, each during the next fine-tuning."""
    schedule = batches(len(x), FINETUNE_EPOCHS, seed=2)
    heavy = copy.deepcopy(base)
    magnitude_prune(heavy, LEVELS[-1])
    before = act_train.snapshot_weights(heavy)
    fit(heavy, x, y, schedule)
    plain = copy_pruned(heavy)
    act_train.ap_prune_step(heavy, before, AP_FRACTION)  # negative weights that changed least
    magnitude_prune(plain, AP_FRACTION)  # the same extra share, smallest magnitude
    ap_dnr = finetune_tracked(heavy, x, y, schedule)["all"]
    plain_dnr = finetune_tracked(plain, x, y, schedule)["all"]
    print(f"AP round after pruning {LEVELS[-1]:g}: a further {AP_FRACTION:g} of the remaining weights "
          f"(weights=0: {weight_sparsity(heavy):.3f}); DNR during the next fine-tuning {ap_dnr:.4f} with the "
          f"AP step, {plain_dnr:.4f} when the same share is pruned by magnitude")
    return ap_dnr, plain_dnr


# -- verdicts -----------------------------------------------------------------------------
def falls(levels, rates) -> tuple[bool, str]:
    from scipy.stats import spearmanr

    rho = float(spearmanr(levels, rates).statistic)
    strict = bool(np.all(np.diff(rates) < 0))
    figures = (f"Spearman rho {rho:+.2f}, DNR {rates[0]:.4f} dense -> {rates[-1]:.4f} at {levels[-1]:.3f} pruned, "
               f"strictly monotone: {'yes' if strict else 'no'}")
    return rho < 0 and rates[-1] < rates[0], figures


def experiment(scaling: str) -> list[tuple[bool, str, str]]:
    print(f"\n=== digits, {scaling} pixels ===")
    x, y, x_test, y_test = digits(scaling)
    base = relu_mlp()
    fit(base, x, y, batches(len(x), PRETRAIN_EPOCHS, seed=1))
    print(f"dense model: test accuracy {accuracy(base, x_test, y_test):.3f}")
    shot = one_shot(base, x, y, x_test, y_test)
    levels, rates = iterative(base, x, y, x_test, y_test)
    ap_dnr, plain_dnr = ap_round(base, x, y)
    return [
        (*falls(list(LEVELS), shot), f"{scaling}: one-shot pruning lowers the dynamic DNR"),
        (*falls(levels, rates), f"{scaling}: iterative pruning lowers the dynamic DNR"),
        (ap_dnr < plain_dnr, f"{ap_dnr:.4f} vs {plain_dnr:.4f}", f"{scaling}: the AP step leaves a lower DNR than magnitude pruning"),
    ]


def main() -> int:
    started = time.perf_counter()
    torch.set_num_threads(1)
    verdicts = [v for scaling in SCALINGS for v in experiment(scaling)]
    print()
    for ok, figures, claim in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}: {claim} ({figures})")
    print(f"seconds: {time.perf_counter() - started:.1f}")
    return 0 if all(ok for ok, _, _ in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
