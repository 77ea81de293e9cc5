"""Reproduction: outliers with opposing signals ("Outliers with Opposing Signals Have an Outsized
Effect on Neural Network Optimization"): a paired group of training examples that share a
consistent, large-magnitude feature pointing to different labels in the two groups have losses
that oscillate in opposition (one group's loss rises as the other's falls), and the large swings
come with spikes of the overall training loss; the groups can be found from per-example loss
trajectories alone, and what sets them apart is the planted feature.

Data: scikit-learn's 8×8 digits (pixels / 16), 1000 training images, all 10 classes. The
opposing signal: on 25 images of class 3 and 25 of class 8 (the planted groups) the 28 border
pixels are set to PATCH × (1 + 0.05 · N(0, 1)), PATCH = 6 (the digits' pixels are ≤ 1 and their
border is nearly always blank): the same large feature, half of its images labelled 3, half 8.
Network: MLP 64 → 128 → 128 → 10, ReLU (depth 3). Full-batch gradient descent (plain SGD, no
momentum) on the cross-entropy, lr 0.5, 1000 steps. Control: the same run (same images, same
initialisation) without the border feature. Seeds 1, 2, 3 (subset, groups and initialisation).

Measurement: ``actscope.train.loss_trajectories`` records every training example's loss after
every step (``max_points`` above the step count, so no step is dropped: the oscillation has a
period of two steps, which keeping every other point would hide). On the steps after the first
BURN = 200 (the initial descent dominates the loss changes before that):
``actscope.metrics.opposing_groups(losses, top=50)`` (50 = the planted count) splits the 50 most
swinging examples in two; overlap = share of those 50 that are planted and sit in the group matched
to their class (0.05 by chance); ``separating_feature`` ranks the pixels by how they set the two
recovered groups together apart from the other examples; ``spike_coincidence`` finds the steps
where the mean training loss rises above 2 × its median over the 20 steps before, and the lift of
the gap between the groups' mean losses at those steps.

PASS RULE (fixed before the final run; settings chosen on exploratory runs with seeds 100, 101, 102 and, earlier, on seed 1,
see the page), on every seed: (a) overlap ≥ 0.8; (b) opposition score ≥ 0.6; (c) the top separating
pixel is a border pixel; (d) the training loss spikes at least 3 times and the group gap's lift at
the spikes is ≥ 1.5; (e) the control run (no border feature) spikes at most a tenth as often, and
its 50 most swinging examples overlap the planted indices ≤ 0.3. Reported without a rule: the
control's opposition score, the groups' share of the spikes' rise, and the sd of the recovered
examples' step-to-step loss changes in both runs.

    PYTHONPATH=src python examples/opposing_signals.py          # ~30 s on 2 shared cores
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from actscope.drawing.charts import lines
from actscope.metrics import SpikeCoincidence, opposing_groups, separating_feature, spike_coincidence
from actscope.train import loss_trajectories

N, PER_GROUP, CLASSES, PATCH, WIDTH, LR, STEPS, BURN = 1000, 25, (3, 8), 6.0, 128, 0.5, 1000, 200
SPIKE_FACTOR, SPIKE_WINDOW = 2.0, 20
SEEDS = (1, 2, 3)
FIGURES = Path("docs/reproductions/figures")


def border() -> torch.Tensor:
    """[64] bool: the 28 border pixels of an 8×8 image."""
    ring = torch.zeros(8, 8, dtype=torch.bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    return ring.flatten()


def digits_data(seed: int, n: int = N, per_group: int = PER_GROUP, patch: float = PATCH) -> dict:
    """n digits; ``per_group`` images of each of CLASSES get the border feature (none if patch is 0)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(digits.target), generator=g)[:n]
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)[chosen]
    y = torch.tensor(digits.target, dtype=torch.int64)[chosen]
    groups = [torch.nonzero(y == c).flatten()[:per_group] for c in CLASSES]
    planted = torch.cat(groups)
    if patch:
        jitter = 1.0 + 0.05 * torch.randn(len(planted), 1, generator=g)
        x[planted[:, None], border().nonzero().flatten()[None]] = patch * jitter
    return {"x": x, "y": y, "groups": [grp.numpy() for grp in groups]}


def network(seed: int, width: int = WIDTH) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 10))


def train(net: torch.nn.Module, data: dict, steps: int = STEPS, lr: float = LR) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch gradient descent; every example's loss after every step: (steps [T], losses [T, n])."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    with loss_trajectories(net, data["x"], data["y"], max_points=steps + 1) as cb:
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(net(data["x"]), data["y"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            cb.step(loss=loss)
    return cb.losses()


def overlap(found, groups: list[np.ndarray]) -> float:
    """Share of the recovered examples that are planted and in the group matched to their class."""
    a, b = set(found.group_a.tolist()), set(found.group_b.tolist())
    p, q = set(groups[0].tolist()), set(groups[1].tolist())
    return max(len(a & p) + len(b & q), len(a & q) + len(b & p)) / max(len(a) + len(b), 1)


def analyse(data: dict, losses: np.ndarray, burn: int = BURN, top: int = 2 * PER_GROUP) -> dict:
    window = losses[burn:]
    found = opposing_groups(window, top=top)
    both = np.concatenate([found.group_a, found.group_b])
    order, _ = separating_feature(data["x"].numpy(), both, np.setdiff1d(np.arange(len(data["x"])), both))
    if len(found.group_a) and len(found.group_b):
        spikes = spike_coincidence(window, found.group_a, found.group_b, factor=SPIKE_FACTOR, window=SPIKE_WINDOW)
    else:  # the most swinging examples all move together: no opposing pair, no gap to measure
        spikes = SpikeCoincidence(spikes=np.zeros(0, dtype=np.int64), gap=np.zeros(0), lift=float("nan"), share=float("nan"))
    return {"overlap": overlap(found, data["groups"]), "score": found.score, "sizes": (len(found.group_a), len(found.group_b)),
            "top_pixel": int(order[0]), "border_top": bool(border()[int(order[0])]), "spikes": len(spikes.spikes),
            "lift": spikes.lift, "share": spikes.share, "swing": float(np.sqrt(found.swing[both].mean())), "found": found}


def main() -> int:
    torch.set_num_threads(1)
    seeds = tuple(int(s) for s in sys.argv[1].split(",")) if len(sys.argv) > 1 else SEEDS
    clock = time.perf_counter()
    got, ctrl, curves = {}, {}, {}
    for seed in seeds:
        data, plain = digits_data(seed), digits_data(seed, patch=0.0)
        steps, losses = train(network(seed), data)
        _, plain_losses = train(network(seed), plain)
        r, c = got[seed], ctrl[seed] = analyse(data, losses), analyse(plain, plain_losses)
        curves[seed] = (steps, losses, data["groups"])
        print(f"seed {seed}: groups {r['sizes']}, overlap with planted {r['overlap']:.2f}, opposition score {r['score']:.3f}, "
              f"top separating pixel {r['top_pixel']} ({'border' if r['border_top'] else 'not border'}); "
              f"loss spikes {r['spikes']}, gap lift at spikes {r['lift']:.2f}, groups' share of the spikes' rise {r['share']:.2f}; "
              f"sd of their loss changes {r['swing']:.3f}; final loss {losses[-1].mean():.4f} | control: overlap {c['overlap']:.2f}, "
              f"score {c['score']:.3f}, spikes {c['spikes']}, sd of loss changes {c['swing']:.4f}, "
              f"final loss {plain_losses[-1].mean():.4f}", flush=True)

    def spread(found, name):
        v = np.array([found[s][name] for s in seeds], dtype=np.float64)
        return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    print(f"\nmean ± sd over seeds {seeds}: overlap {spread(got, 'overlap')}, score {spread(got, 'score')}, spikes {spread(got, 'spikes')}, "
          f"lift {spread(got, 'lift')}, share {spread(got, 'share')}, sd of loss changes {spread(got, 'swing')}; "
          f"control: overlap {spread(ctrl, 'overlap')}, score {spread(ctrl, 'score')}, spikes {spread(ctrl, 'spikes')}, "
          f"sd of loss changes {spread(ctrl, 'swing')}")
    checks = {
        "(a) overlap with the planted groups >= 0.8": all(got[s]["overlap"] >= 0.8 for s in seeds),
        "(b) opposition score >= 0.6": all(got[s]["score"] >= 0.6 for s in seeds),
        "(c) top separating pixel is a border pixel": all(got[s]["border_top"] for s in seeds),
        "(d) >= 3 loss spikes, gap lift at spikes >= 1.5": all(got[s]["spikes"] >= 3 and got[s]["lift"] >= 1.5 for s in seeds),
        "(e) control: spikes <= a tenth, overlap <= 0.3": all(10 * ctrl[s]["spikes"] <= got[s]["spikes"] and ctrl[s]["overlap"] <= 0.3 for s in seeds),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name} on every seed")
    print(f"{'PASS' if all(checks.values()) else 'FAIL'} ({time.perf_counter() - clock:.0f}s)")
    if seeds == SEEDS:
        FIGURES.mkdir(parents=True, exist_ok=True)
        (FIGURES / "opposing-signals.svg").write_text(figure(*curves[seeds[0]], seeds[0]), encoding="utf-8")
    return 0 if all(checks.values()) else 1


def figure(steps: np.ndarray, losses: np.ndarray, groups: list[np.ndarray], seed: int, lo: int = 700, hi: int = 760) -> str:
    """The two planted groups' mean losses and the mean training loss over steps lo..hi of one seed."""
    keep = slice(lo, hi + 1)
    series = {f"planted class {c} group (mean loss)": (steps[keep].tolist(), losses[keep][:, g].mean(axis=1).tolist())
              for c, g in zip(CLASSES, groups)}
    series["all training examples (mean loss × 10)"] = (steps[keep].tolist(), (10 * losses[keep].mean(axis=1)).tolist())
    return lines("opposing-signals", series, title=f"Opposing signals: digits with a bright border, labelled 3 or 8 (seed {seed}, steps {lo}-{hi})",
                 x_label="gradient step", y_label="loss")


if __name__ == "__main__":
    sys.exit(main())
