"""Reproduction (direction): SeND training steadies the EigenScore across training.

Paper (Hallucination Detox / SeND, METHODS.md "Sensitive neurons"): dropping the sensitive
neurons (those whose representation of fixed inputs swings most across checkpoints) for a while,
re-identified periodically, reduces the variance of the hallucination proxy (EigenScore) over
training and lowers it, at about equal loss.

Here: the zoo's ReLU tiny Llama (2 blocks), continued for STEPS AdamW steps (lr 2e-3, batch 32)
on fresh synthetic-language documents, seeds 1-3. Arms: ``control`` and ``send``
(``actscope.train.send``: the paper's site, the penultimate block's output
``blocks.0.resid.post`` at the second-to-last token of 16 held-out probe documents; a snapshot
every 10 steps, the last 5 used; top 10 % dropped for 25 steps, re-identified every 50).
Every 50 steps: the mean EigenScore (exact, K = 10 sampled answers of 16 tokens, last block's
``resid.post`` mean-pooled; ``actscope.metrics.eigenscore``) over 8 prompts, and the held-out loss
(100 documents). Same sampling seeds in both arms.

PASS RULE (fixed before the run; direction only): on at least 2 of the 3 seeds, the variance of
the mean EigenScore over the checkpoints (steps 50 … STEPS) is lower with SeND than without, AND on
every seed SeND's final held-out loss is within 1 % perplexity of the control's.

Run:  PYTHONPATH=src python examples/send_training.py   (about 2-3 minutes on 2 CPU cores)
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import actscope
from actscope.data import pad_right
from actscope.drawing.charts import lines
from actscope.metrics.eigenscore import eigenscore
from actscope.train import send
from actscope.zoo import held_out_corpus, tiny_lm
from actscope.zoo.lm import corpus_loss, encode_documents
from actscope.zoo.synthetic import generate_corpus

SEEDS = tuple(int(s) for s in os.environ.get("SEEDS", "1,2,3").split(","))
STEPS, BATCH, LR, EVAL_EVERY = int(os.environ.get("STEPS", 300)), 32, 2e-3, 50
FIGURES = Path("docs/reproductions/figures")


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_lm("relu")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def proxy(model, tokenizer, prompts) -> float:
    wrapped = actscope.wrap(model, tokenizer=tokenizer)
    model.eval()
    scores = [eigenscore(wrapped, prompt, k=10, max_new_tokens=16, seed=j).exact for j, prompt in enumerate(prompts)]
    model.train()
    return float(np.mean(scores))


def run(arm: str, seed: int, probe, prompts, held):
    model, tokenizer = load()
    rows = encode_documents(tokenizer, generate_corpus(BATCH * STEPS, seed=300 + seed))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    wrapped = actscope.wrap(model, tokenizer=tokenizer)
    callback = send(wrapped, probe, every=50, window=25, snapshot_every=10, history=5, top=0.1) if arm == "send" else None
    trace = []
    model.train()
    if callback:
        callback.start()
    try:
        for step in range(STEPS):
            ids, mask = pad_right(rng.sample(rows, BATCH), tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if callback:
                callback.step(loss=loss)
            if (step + 1) % EVAL_EVERY == 0:
                trace.append((step + 1, proxy(model, tokenizer, prompts), corpus_loss(model, tokenizer, held)))
    finally:
        if callback:
            callback.close()
    return trace


def main() -> int:
    torch.set_num_threads(1)
    clock = time.perf_counter()
    docs = held_out_corpus(300)
    held, probe = docs[:100], docs[100:116]
    prompts = [" ".join(d.split()[:2]) for d in docs[200:208]]
    results = {}
    for seed in SEEDS:
        for arm in ("control", "send"):
            results[(arm, seed)] = run(arm, seed, probe, prompts, held)
            es = [e for _, e, _ in results[(arm, seed)]]
            print(f"seed {seed} {arm:7s}: EigenScore per checkpoint {', '.join(f'{e:.3f}' for e in es)}; variance {np.var(es):.5f}; "
                  f"final held-out loss {results[(arm, seed)][-1][2]:.4f} ({time.perf_counter() - clock:.0f}s)", flush=True)
    draw(results)
    lower, ppl_ok = 0, True
    print("\nseed  var(control)  var(send)  final ES control/send   ppl ratio send/control")
    for seed in SEEDS:
        c, s = (np.array(results[(arm, seed)]) for arm in ("control", "send"))
        ratio = math.exp(s[-1, 2] - c[-1, 2])
        lower += int(np.var(s[:, 1]) < np.var(c[:, 1]))
        ppl_ok &= ratio <= 1.01
        print(f"{seed:4d}  {np.var(c[:, 1]):.5f}       {np.var(s[:, 1]):.5f}    {c[-1, 1]:.3f} / {s[-1, 1]:.3f}          {ratio:.4f}")
    var_c = [np.var(np.array(results[("control", s)])[:, 1]) for s in SEEDS]
    var_s = [np.var(np.array(results[("send", s)])[:, 1]) for s in SEEDS]
    print(f"variance over checkpoints (mean ± sd over seeds): control {np.mean(var_c):.5f} ± {np.std(var_c, ddof=1):.5f}, "
          f"send {np.mean(var_s):.5f} ± {np.std(var_s, ddof=1):.5f}")
    ok = lower >= 2 and ppl_ok
    print(f"SeND variance lower on {lower}/{len(SEEDS)} seeds (needs >= 2); final perplexity within 1 %: {ppl_ok}")
    print(f"{'PASS' if ok else 'FAIL'} ({time.perf_counter() - clock:.0f}s)")
    return 0 if ok else 1


def draw(results) -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    series = {f"{arm} seed {seed}": ([t for t, _, _ in trace], [e for _, e, _ in trace]) for (arm, seed), trace in results.items()}
    svg = lines("send-eigenscore", series, title="mean EigenScore (8 prompts, K = 10) during training", x_label="step", y_label="EigenScore")
    (FIGURES / "send-eigenscore.svg").write_text(svg, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
