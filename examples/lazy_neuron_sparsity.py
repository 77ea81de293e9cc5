"""Reproduction (a), Lazy Neuron: trained ReLU transformers fire on few of their MLP units,
and wider ones are sparser.

Tiny GPT-2-style causal LMs with a plain ReLU MLP (``FFN(x) = W_out relu(W_in x)``; d_model 32,
2 blocks, 4 heads) that differ only in MLP width (128, 256 and 512 units) are trained
identically (for each seed 0, 1, 2: the same initial-weight seed, data, batches and schedule
across widths) on actscope's synthetic language, then
profiled on held-out documents with ``actscope.metrics.activation_sparsity``:
the activation ratio is the fraction of MLP units with ``a > 0`` per token, averaged over real
tokens, per block; the model's figure pools its blocks (fired unit-token pairs over all pairs).
Pass rules, fixed before the three-seed run: every trained model fires on fewer than 20 % of
its units (also among the units that ever fire), and fewer than its untrained self; the width
trend "holds" when, for every seed, the ratio falls from each width to the next wider one, is
"direction only" when only the mean over seeds does, and "does not hold" otherwise. The
untrained models (same initial weights) show that the sparsity comes from training. The cached trained tiny LM of the zoo
(``actscope.zoo.tiny_lm("relu")``, a ReLU-gated MLP, where a unit fires when ``|a| > 0``) is
reported beside them.

Trained models are cached under ``$ACTSCOPE_CACHE/examples`` (default ``~/.cache/actscope``),
written into a temporary directory and renamed into place, so a second run only profiles.

Run:  HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python examples/lazy_neuron_sparsity.py
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import actscope
from actscope.metrics import activation_sparsity
from actscope.zoo import build_tokenizer, generate_corpus, held_out_corpus, tiny_lm
from actscope.zoo.lm import cache_root, encode_documents

WIDTHS = (128, 256, 512)
SEEDS = (0, 1, 2)
TRAIN = dict(d_model=32, n_layers=2, n_heads=4, steps=800, batch_size=32, lr=1e-2, weight_decay=0.1,
             warmup=50, max_len=48, seed=0, version=1)
HELD_OUT_DOCS = 200
CLAIM = 0.20  # "fewer than 20 % of the units fire"


# -- training (cached) --------------------------------------------------------------------
def gpt2_config(d_ff: int, tokenizer):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer), n_embd=TRAIN["d_model"], n_layer=TRAIN["n_layers"], n_head=TRAIN["n_heads"],
        n_inner=d_ff, n_positions=TRAIN["max_len"], activation_function="relu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def model_dir(d_ff: int, seed: int) -> Path:
    settings = json.dumps({**TRAIN, "seed": seed, "d_ff": d_ff}, sort_keys=True).encode()
    return cache_root() / "examples" / f"lazy-neuron-relu-{d_ff}-{hashlib.sha256(settings).hexdigest()[:10]}"


def pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def learning_rate(step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warm, steps, peak = TRAIN["warmup"], TRAIN["steps"], TRAIN["lr"]
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / (steps - warm))))


def initial_model(d_ff: int, tokenizer, seed: int):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config(d_ff, tokenizer))


def train(d_ff: int, tokenizer, seed: int, out: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's progress bar
    model = initial_model(d_ff, tokenizer, seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.98), weight_decay=TRAIN["weight_decay"])
    size = TRAIN["batch_size"]
    rows = encode_documents(tokenizer, generate_corpus(TRAIN["steps"] * size, seed=seed), TRAIN["max_len"])
    for step in range(TRAIN["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        ids, mask = pad(rows[step * size:(step + 1) * size], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train.json").write_text(json.dumps({**TRAIN, "seed": seed, "d_ff": d_ff, "final_loss": float(loss.detach())}))  # written last


def trained_model_dir(d_ff: int, tokenizer, seed: int) -> Path:
    """The cached model, trained first when missing (into a temp dir, then renamed)."""
    target = model_dir(d_ff, seed)
    if (target / "train.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        started = time.perf_counter()
        train(d_ff, tokenizer, seed, tmp)
        print(f"trained d_mlp={d_ff} seed {seed} in {time.perf_counter() - started:.0f}s -> {target}")
        os.rename(tmp, target)
    except OSError:
        if not (target / "train.json").is_file():  # not a concurrent run finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- measuring ----------------------------------------------------------------------------
def live_ratio(result) -> float:
    """The pooled ratio over the units that fire at least once (dead units left out): fired
    pairs are the same, the pairs of dead units are dropped from the denominator."""
    fired = (result.activation_ratio * result.units * result.tokens).sum()
    return float(fired / ((result.units - result.dead_units) * result.tokens).sum())


def report(name: str, result) -> tuple[float, float]:
    per_layer = ", ".join(f"block {layer}: {ratio:.3f}" for layer, ratio in zip(result.layer, result.activation_ratio))
    medians = []
    for site in result.site:
        counts = result.per_token.counts(site)  # [units + 1] tokens with m units firing
        medians.append(int(np.searchsorted(np.cumsum(counts), counts.sum() / 2)))
    ratio, live = result.overall_activation_ratio, live_ratio(result)
    print(f"{name:<34} ratio {ratio:.3f} (sparsity {1 - ratio:.3f}; {per_layer}); {int(result.units[0])} units per block, "
          f"median firing per token {medians}, dead {[int(d) for d in result.dead_units]}, ratio among live units {live:.3f}")
    return ratio, live


def spread(values) -> str:
    values = list(values)
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def width_trend(trained: dict) -> tuple[str, str]:
    """The width rule's label and figures (``trained[(width, seed)]`` ratios)."""
    falls = lambda ratios: all(a > b for a, b in zip(ratios, ratios[1:]))  # noqa: E731
    per_seed = [falls([trained[(w, seed)] for w in WIDTHS]) for seed in SEEDS]
    means = [float(np.mean([trained[(w, seed)] for seed in SEEDS])) for w in WIDTHS]
    label = "holds" if all(per_seed) else "direction only" if falls(means) else "does not hold"
    figures = (", ".join(f"d_mlp={w}: {spread(trained[(w, seed)] for seed in SEEDS)}" for w in WIDTHS)
               + f"; falls with width in {sum(per_seed)}/{len(SEEDS)} seeds")
    return label, figures


def main() -> int:
    started = time.perf_counter()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    held_out = held_out_corpus(HELD_OUT_DOCS)
    options = dict(sites="blocks.*.mlp.post", max_length=TRAIN["max_len"], batch_size=32)
    print(f"held-out: {HELD_OUT_DOCS} documents of the synthetic language; criterion a > 0; seeds {SEEDS}")
    trained, initial, live = {}, {}, {}
    for seed in SEEDS:
        for d_ff in WIDTHS:
            key = (d_ff, seed)
            untrained = actscope.wrap(initial_model(d_ff, tokenizer, seed).eval(), tokenizer=tokenizer)
            initial[key], _ = report(f"d_mlp={d_ff} seed {seed}, untrained", activation_sparsity(untrained, held_out, **options))
            model = actscope.load(trained_model_dir(d_ff, tokenizer, seed))
            trained[key], live[key] = report(f"d_mlp={d_ff} seed {seed}, trained", activation_sparsity(model, held_out, **options))
    zoo = actscope.load(tiny_lm("relu"))
    gated, _ = report("zoo tiny_lm('relu'), gated, |a|>0", activation_sparsity(zoo, held_out, criterion=0.0, sites="blocks.*.mlp.post"))

    def every(figures: dict) -> str:
        return ", ".join(f"d_mlp={w}: {spread(figures[(w, seed)] for seed in SEEDS)}" for w in WIDTHS)

    def verdict(ok: bool) -> str:
        return "holds" if ok else "does not hold"

    trend, trend_figures = width_trend(trained)
    verdicts = [
        (verdict(all(r < CLAIM for r in trained.values())), f"trained ReLU models fire on fewer than {CLAIM:.0%} of their MLP units",
         every(trained)),
        (trend, "the wider model is sparser", trend_figures),
        (verdict(all(r < CLAIM for r in live.values())), f"still fewer than {CLAIM:.0%} among the units that ever fire",
         every(live)),
        (verdict(all(trained[k] < initial[k] for k in trained)), "the sparsity comes from training (untrained models fire more)",
         every(initial) + " before training"),
        (verdict(gated < CLAIM), f"the zoo's gated ReLU tiny LM fires on fewer than {CLAIM:.0%} (|a| > 0)", f"{gated:.3f}"),
    ]
    print(f"\nover seeds {SEEDS} (mean ± sd):")
    for label, claim, figures in verdicts:
        print(f"{label.upper():<14} {claim} ({figures})")
    print(f"seconds: {time.perf_counter() - started:.1f}")
    return 0 if all(label == "holds" for label, _, _ in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
