"""Reproduction (a), Lazy Neuron: trained ReLU transformers fire on few of their MLP units,
and wider ones are sparser.

Two tiny GPT-2-style causal LMs with a plain ReLU MLP (``FFN(x) = W_out relu(W_in x)``;
d_model 32, 2 blocks, 4 heads) that differ only in MLP width (128 and 512 units) are trained
identically (same seed, data, batches and schedule) on actscope's synthetic language, then
profiled on held-out documents with ``actscope.metrics.activation_sparsity``:
the activation ratio is the fraction of MLP units with ``a > 0`` per token, averaged over real
tokens, per block; the model's figure pools its blocks (fired unit-token pairs over all pairs).
The paper's claim holds here when both trained models fire on fewer than 20 % of their units
and the wider model fires on a smaller share. The untrained models (same initial weights) show
that the sparsity comes from training. The cached trained tiny LM of the zoo
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

WIDTHS = (128, 512)
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


def model_dir(d_ff: int) -> Path:
    settings = json.dumps({**TRAIN, "d_ff": d_ff}, sort_keys=True).encode()
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


def initial_model(d_ff: int, tokenizer):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(TRAIN["seed"])
    return GPT2LMHeadModel(gpt2_config(d_ff, tokenizer))


def train(d_ff: int, tokenizer, out: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's progress bar
    model = initial_model(d_ff, tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.98), weight_decay=TRAIN["weight_decay"])
    size = TRAIN["batch_size"]
    rows = encode_documents(tokenizer, generate_corpus(TRAIN["steps"] * size, seed=TRAIN["seed"]), TRAIN["max_len"])
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
    (out / "train.json").write_text(json.dumps({**TRAIN, "d_ff": d_ff, "final_loss": float(loss.detach())}))  # written last


def trained_model_dir(d_ff: int, tokenizer) -> Path:
    """The cached model, trained first when missing (into a temp dir, then renamed)."""
    target = model_dir(d_ff)
    if (target / "train.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        started = time.perf_counter()
        train(d_ff, tokenizer, tmp)
        print(f"trained d_mlp={d_ff} in {time.perf_counter() - started:.0f}s -> {target}")
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


def main() -> int:
    started = time.perf_counter()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    held_out = held_out_corpus(HELD_OUT_DOCS)
    options = dict(sites="blocks.*.mlp.post", max_length=TRAIN["max_len"], batch_size=32)
    print(f"held-out: {HELD_OUT_DOCS} documents of the synthetic language; criterion a > 0")
    trained, initial, live = {}, {}, {}
    for d_ff in WIDTHS:
        untrained = actscope.wrap(initial_model(d_ff, tokenizer).eval(), tokenizer=tokenizer)
        initial[d_ff], _ = report(f"ReLU GPT-2 d_mlp={d_ff}, untrained", activation_sparsity(untrained, held_out, **options))
        model = actscope.load(trained_model_dir(d_ff, tokenizer))
        trained[d_ff], live[d_ff] = report(f"ReLU GPT-2 d_mlp={d_ff}, trained", activation_sparsity(model, held_out, **options))
    zoo = actscope.load(tiny_lm("relu"))
    gated, _ = report("zoo tiny_lm('relu'), gated, |a|>0", activation_sparsity(zoo, held_out, criterion=0.0, sites="blocks.*.mlp.post"))

    narrow, wide = WIDTHS
    verdicts = [
        (all(trained[w] < CLAIM for w in WIDTHS), f"trained ReLU models fire on fewer than {CLAIM:.0%} of their MLP units",
         ", ".join(f"d_mlp={w}: {trained[w]:.3f}" for w in WIDTHS)),
        (trained[wide] < trained[narrow], "the wider model is sparser", f"{trained[wide]:.3f} vs {trained[narrow]:.3f}"),
        (all(live[w] < CLAIM for w in WIDTHS), f"still fewer than {CLAIM:.0%} among the units that ever fire (not just dead units)",
         ", ".join(f"d_mlp={w}: {live[w]:.3f}" for w in WIDTHS)),
        (all(trained[w] < initial[w] for w in WIDTHS), "the sparsity comes from training (untrained models fire more)",
         ", ".join(f"d_mlp={w}: {initial[w]:.3f} -> {trained[w]:.3f}" for w in WIDTHS)),
        (gated < CLAIM, f"the zoo's gated ReLU tiny LM fires on fewer than {CLAIM:.0%} (|a| > 0)", f"{gated:.3f}"),
    ]
    print()
    for ok, claim, figures in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}: {claim} ({figures})")
    print(f"seconds: {time.perf_counter() - started:.1f}")
    return 0 if all(ok for ok, _, _ in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
