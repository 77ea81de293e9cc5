"""Reproduction (Multifaceted feature visualisation): the facets of a unit differ from each other
more than the images within a facet do.

Model: the small CNN trained on scikit-learn digits (actscope.zoo.digits), model seeds 0-2.
Units: the ten class logits (module:9). For each, actscope.explain.visualize.facets clusters the
60 top-activating training images by their penultimate codes (module:7, 32-d, each dimension
standardised over the data) into k = 3 facets and optimises one image per facet from its
cluster's mean (64 steps, visualisation seed 0). In the same standardised code space:

* between  = mean distance between the codes of the k facet images (pairs of facets);
* within   = mean distance between the codes of two real images of the same facet (pairs within
             each cluster, averaged over the clusters);
* baseline = mean distance between k images optimised for the same unit from the same start (the
             mean of all 60 top images) with k different seeds: how much images differ without facets.

Run: PYTHONPATH=src python examples/vision_facets.py
"""
from __future__ import annotations

import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

import actscope
from actscope.drawing.charts import bars
from actscope.explain.visualize import Target, VisConfig, codes_of, facets, visualize
from actscope.zoo.digits import DigitsConfig, digit_images, load_digits_cnn

SEEDS = (0, 1, 2)
K, TOP, STEPS = 3, 60, 64
# Pass rule, fixed before the recorded run:
#   holds          — for every model seed, between > within for at least 8 of the 10 units;
#   direction only — between > within on the mean over units for every seed, but fewer units;
#   does not hold  — otherwise.
RULE = "between > within for >= 8 of 10 class units, for every seed"


def mean_pairwise(codes: np.ndarray) -> float:
    return float(np.mean([np.linalg.norm(codes[i] - codes[j]) for i, j in combinations(range(len(codes)), 2)]))


def main() -> int:
    torch.set_num_threads(1)
    images = digit_images()
    summary = []
    for seed in SEEDS:
        model = actscope.wrap(load_digits_cnn(DigitsConfig(seed=seed)))
        data_codes = codes_of(model, "module:7@output", images.normalised()).double().numpy()
        mu, sd = data_codes.mean(0), data_codes.std(0) + 1e-9
        code = lambda pixels: (codes_of(model, "module:7@output", pixels).double().numpy() - mu) / sd  # noqa: E731
        rows = []
        for unit in range(10):
            target = Target("module:9@output", "channel", unit)
            found = facets(model, target, images, k=K, top=TOP, code_site="module:7@output", config=VisConfig(steps=STEPS))
            between = mean_pairwise(code(torch.stack([v.image for v in found.images])))
            within = np.mean([mean_pairwise(code(images.normalised(torch.as_tensor(m)))) for m in found.members if len(m) > 1])
            start = images.pixels[np.concatenate(found.members)].mean(0)
            plain = [visualize(model, target, shape=(1, 8, 8), config=VisConfig(steps=STEPS, seed=s), start=start).image for s in range(K)]
            baseline = mean_pairwise(code(torch.stack(plain)))
            rows.append((between, within, baseline))
            print(f"seed {seed} unit {unit}: between {between:.3f}  within {within:.3f}  baseline {baseline:.3f}", flush=True)
        rows = np.array(rows)
        wins = int((rows[:, 0] > rows[:, 1]).sum())
        summary.append((seed, wins, *rows.mean(0)))
        print(f"seed {seed}: between > within for {wins}/10 units; means between {rows[:, 0].mean():.3f} "
              f"within {rows[:, 1].mean():.3f} baseline {rows[:, 2].mean():.3f}", flush=True)
    table = np.array([s[2:] for s in summary])
    for name, column in zip(("between", "within", "baseline"), table.T):
        print(f"{name:>8}: {column.mean():.3f} ± {column.std(ddof=1):.3f} (mean over units; mean ± sd over {len(SEEDS)} seeds)")
    every = all(s[1] >= 8 for s in summary)
    on_mean = all(s[2] > s[3] for s in summary)
    verdict = "holds" if every else "direction only" if on_mean else "does not hold"
    print(f"rule: {RULE}\nverdict: {verdict}")
    svg = bars("facets", [f"seed {s[0]}" for s in summary],
               {"between facets": [s[2] for s in summary], "within a facet": [s[3] for s in summary],
                "same start, other seeds": [s[4] for s in summary]},
               title="Mean distance in standardised penultimate codes (mean over the 10 class units)")
    out = Path(__file__).resolve().parents[1] / "docs" / "reproductions" / "vision-facets.svg"
    out.write_text(svg, encoding="utf-8")
    print(f"figure: {out.relative_to(out.parents[2])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
