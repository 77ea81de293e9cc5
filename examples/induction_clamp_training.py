"""Reproduction: ablating layer 0's attention through training removes or delays induction heads.

METHODS.md "Clamping through training": hold chosen activations fixed (or ablated) at every
training step to see which sub-circuits a phenomenon needs. Induction heads in a 2-layer
attention-only model need a layer-0 head that moves the previous token's identity forward
(K-composition); with layer 0's heads ablated no induction head can form, and while they are
ablated formation waits.

Here: the induction-heads reproduction's model and training (``actscope.zoo.induction``: 2 layers ×
4 heads, d_model 64, repeats ``BOS r r`` with |r| drawn from 4-16 each step, Adam lr 1e-3, batch
32), STEPS steps, seeds 0-2. Arms: ``control``; ``ablated`` — ``actscope.train.held_edit(model,
{"blocks.0.attn.z": zero()})`` for the whole run (every layer-0 head's output zeroed before
``o_proj``); ``released`` — the same edit held for the first RELEASE steps, then removed. Every
100 steps: copy accuracy on the second repeat (256 held-out sequences, |r| = 16; chance 1/63) and the
largest induction-head score of the layer-1 heads (``actscope.explain.induction_scores``), both
measured on the model as it trains (with the edit while it is held).

PASS RULE (fixed before the run), on every seed:
  (removed) ``ablated`` ends with copy accuracy < 0.2 and layer-1 induction score < 0.3, while
            ``control`` ends with copy accuracy > 0.8;
  (delayed) the first checkpoint with copy accuracy ≥ 0.5 comes later for ``released`` than for
            ``control`` (and it does come, within STEPS).

Run:  PYTHONPATH=src python examples/induction_clamp_training.py   (about 1.5 minutes on 2 CPU cores)
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import actscope
from actscope.drawing.charts import lines
from actscope.explain import induction_scores
from actscope.interventions import zero
from actscope.train import held_edit
from actscope.zoo.induction import InductionConfig, _attention_parameters, _llama, copy_metrics, sequences

SEEDS = tuple(int(s) for s in os.environ.get("SEEDS", "0,1,2").split(","))
STEPS, RELEASE, EVAL_EVERY = int(os.environ.get("STEPS", 1200)), int(os.environ.get("RELEASE", 400)), 100
FIGURES = Path("docs/reproductions/figures")


def measure(model, cfg) -> tuple[float, float]:
    model.eval()
    held = sequences(cfg, 256, seed=424_242)
    with torch.no_grad():
        accuracy = copy_metrics(model(input_ids=held).logits, held, cfg.seq_len)["copy_accuracy"]
    scores = induction_scores(actscope.wrap(model), seq_len=cfg.seq_len, batch=8, seed=7).scores  # [layers, heads]
    model.train()
    return accuracy, float(np.max(scores[1]))


def run(arm: str, seed: int):
    cfg = replace(InductionConfig(), seed=seed, steps=STEPS)
    model = _llama(cfg)
    model.train()
    optimizer = torch.optim.Adam(_attention_parameters(model), lr=cfg.lr)
    lengths = torch.randint(cfg.min_seq_len, cfg.seq_len + 1, (STEPS,), generator=torch.Generator().manual_seed(seed))
    clamp = held_edit(actscope.wrap(model), {"blocks.0.attn.z": zero()}) if arm != "control" else None
    trace = []
    if clamp:
        clamp.start()
    try:
        for step in range(STEPS):
            if arm == "released" and step == RELEASE:
                clamp.close()
            ids = sequences(cfg, cfg.batch_size, seed=seed * 1_000_003 + step + 1, seq_len=int(lengths[step]))
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if clamp and clamp.active:
                clamp.step()
            if (step + 1) % EVAL_EVERY == 0:
                trace.append((step + 1, *measure(model, cfg)))
    finally:
        if clamp:
            clamp.close()
    return trace


def formed(trace) -> int | None:
    return next((step for step, accuracy, _ in trace if accuracy >= 0.5), None)


def main() -> int:
    torch.set_num_threads(1)
    clock = time.perf_counter()
    results = {}
    for seed in SEEDS:
        for arm in ("control", "ablated", "released"):
            trace = results[(arm, seed)] = run(arm, seed)
            print(f"seed {seed} {arm:8s}: final copy accuracy {trace[-1][1]:.3f}, layer-1 induction score {trace[-1][2]:.3f}, "
                  f"copy accuracy >= 0.5 from step {formed(trace)} ({time.perf_counter() - clock:.0f}s)", flush=True)
    draw(results)
    removed = delayed = True
    for seed in SEEDS:
        c, a, r = (results[(arm, seed)] for arm in ("control", "ablated", "released"))
        removed &= a[-1][1] < 0.2 and a[-1][2] < 0.3 and c[-1][1] > 0.8
        delayed &= formed(r) is not None and formed(c) is not None and formed(r) > formed(c)
    for arm in ("control", "ablated", "released"):
        finals = np.array([results[(arm, s)][-1][1:] for s in SEEDS])
        steps = [formed(results[(arm, s)]) for s in SEEDS]
        sd = finals.std(axis=0, ddof=1) if len(SEEDS) > 1 else np.zeros(2)
        print(f"{arm:8s}: final copy accuracy {finals[:, 0].mean():.3f} ± {sd[0]:.3f}, induction score "
              f"{finals[:, 1].mean():.3f} ± {sd[1]:.3f}; formed at steps {steps}")
    print(f"(removed) {removed}; (delayed) {delayed}")
    print(f"{'PASS' if removed and delayed else 'FAIL'} ({time.perf_counter() - clock:.0f}s)")
    return 0 if removed and delayed else 1


def draw(results) -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    for j, (name, label) in enumerate((("copy-accuracy", "copy accuracy on the second repeat"),
                                       ("induction-score", "largest layer-1 induction-head score"))):
        series = {f"{arm} seed {seed}": ([t[0] for t in trace], [t[1 + j] for t in trace]) for (arm, seed), trace in results.items()}
        svg = lines(f"induction-clamp-{name}", series, title=f"{label} (layer 0 ablated: whole run / until step {RELEASE})",
                    x_label="step", y_label=name)
        (FIGURES / f"induction-clamp-{name}.svg").write_text(svg, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
