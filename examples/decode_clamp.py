"""Reproduction (a), Decoding specialised feature neurons: clamping a neuron whose decoded tokens
are X raises the probability of X.

On the zoo's trained tiny causal LM (``actscope.zoo.tiny_lm("relu")``: Llama-shaped, 2 blocks,
d_model 64, a ReLU-gated MLP with 256 neurons per block, trained on actscope's synthetic
language):

1. profile both MLP neuron sites on 200 held-out documents (per-unit max activation, top-8
   activating examples);
2. decode every neuron (``actscope.explain.decode``, top 5 promoted tokens = X) and
   measure its agreement with its top-activating contexts (``decode_agreement``: the fraction of
   its 8 top examples whose next word is in X);
3. pick the 4 neurons with the clearest decoded tokens (highest agreement, then highest top-1
   score) and, as a random control, 4 other neurons drawn with a fixed seed;
4. for each, clamp the neuron to 3 × its max activation on the profiling data at every position
   (``actscope.edit(model, {"blocks.i.mlp.post[u]": set_value(v)})``) and compare, with and
   without the clamp,
   * P(X): the next-token probability mass on X, averaged over every real position of 100
     other held-out documents (teacher forcing);
   * freq(X): the share of X among 32 × 24 tokens sampled (temperature 1, seed 0) from
     32 three-token prompts;
   * P(C): the same probability for a control token set C (5 tokens drawn with a fixed seed
     among the non-special tokens outside X);
5. summarise over every neuron with a positive max activation: the share whose clamp raises
   P(X), and the median ratio P(X) clamped / P(X) unclamped, next to the same for C.

Run:  HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python examples/decode_clamp.py
"""
from __future__ import annotations

import time

import numpy as np
import torch

import actscope
from actscope import interventions as iv
from actscope.explain import decode, decode_agreement
from actscope.zoo.lm import encode_documents, held_out_corpus, tiny_lm

TOP = 5
CLAMP = 3.0
PICK = 4
SITES = "blocks.*.mlp.post"


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    model = actscope.load(tiny_lm("relu"))
    tokenizer = model.tokenizer
    docs = held_out_corpus(400)
    run = actscope.profile(model, docs[:200], sites=SITES, k=8)
    decoded = decode(model, SITES, top=TOP)
    agreement = decode_agreement(decoded, run).to_pandas()
    neurons = run.to_pandas("neurons")
    peak = {(s, int(u)): float(m) for s, u, m in zip(neurons.site, neurons.unit, neurons["max"])}
    batch = teacher_forcing_batch(tokenizer, docs[200:300])
    prompts = torch.tensor([row[:3] for row in encode_documents(tokenizer, docs[300:332])])  # [32, 3]
    special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    ordinary = [i for i in range(len(tokenizer)) if i not in special]

    agreement["top1"] = [decoded.score[(decoded.site == s) & (decoded.unit == u) & (decoded.rank == 0) & (decoded.direction == "promoted")][0] for s, u in zip(agreement.site, agreement.unit)]
    agreement["peak"] = [peak[(s, int(u))] for s, u in zip(agreement.site, agreement.unit)]
    live = agreement[agreement.peak > 0]
    clear = live.sort_values(["agreement", "top1"], ascending=False).head(PICK)
    rest = live.drop(clear.index)
    control = rest.sample(PICK, random_state=0)
    print(f"model: tiny-lm-relu, {model.n_layers} blocks × 256 neurons; profiled {run.manifest['data']['tokens']} tokens; "
          f"agreement (top-{TOP} decoded vs next word of the top-8 examples): mean {live.agreement.mean():.3f} over {len(live)} live neurons")
    base_probs = next_token_probs(model, batch)  # [n, vocab]
    base_samples = sample(model, prompts)
    rng = np.random.default_rng(0)
    print()
    print(f"{'neuron':<24} {'agree':>5} {'clamp':>6}  {'P(X) before → after':>22}  {'freq(X) before → after':>24}  {'P(C) before → after':>22}  X")
    rows = []
    for kind, table in (("clear", clear), ("random", control)):
        for site, unit in zip(table.site, table.unit):
            result = clamp_effect(model, decoded, site, int(unit), peak[(site, int(unit))], batch, prompts, base_probs, base_samples, ordinary, rng)
            rows.append(result)
            agree = float(table.agreement[(table.site == site) & (table.unit == unit)].iloc[0])
            print(f"{kind + ' ' + site.replace('.mlp.post', '') + f'[{unit}]':<24} {agree:>5.2f} {result['value']:>6.2f}  "
                  f"{result['p_before']:>9.4f} → {result['p_after']:<9.4f}  {result['f_before']:>10.4f} → {result['f_after']:<10.4f}  "
                  f"{result['c_before']:>9.4f} → {result['c_after']:<9.4f}  {' '.join(result['tokens'])}")
    summary(model, decoded, live, peak, batch, base_probs, ordinary)
    print(f"\ntime: {time.perf_counter() - started:.0f} s")


def teacher_forcing_batch(tokenizer, docs):
    from actscope.data import pad_right

    ids, mask = pad_right(encode_documents(tokenizer, docs), tokenizer.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def next_token_probs(model, batch) -> torch.Tensor:
    """[real positions, vocab]: the next-token distribution at every real position."""
    logits = model(**batch).logits  # [batch, pos, vocab]
    return torch.softmax(logits[batch["attention_mask"].bool()].double(), dim=-1)


@torch.no_grad()
def sample(model, prompts) -> torch.Tensor:
    torch.manual_seed(0)
    out = model.module.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0, max_new_tokens=24,
                                pad_token_id=model.tokenizer.pad_token_id, eos_token_id=None)
    return out[:, prompts.shape[1]:]  # [32, 24]


def clamp_effect(model, decoded, site, unit, peak, batch, prompts, base_probs, base_samples, ordinary, rng) -> dict:
    keep = (decoded.site == site) & (decoded.unit == unit) & (decoded.direction == "promoted")
    x_ids = decoded.token_id[keep].tolist()
    c_ids = rng.choice([i for i in ordinary if i not in x_ids], size=TOP, replace=False).tolist()
    value = CLAMP * peak
    with actscope.edit(model, {f"{site}[{unit}]": iv.set_value(value)}):
        probs = next_token_probs(model, batch)
        samples = sample(model, prompts)
    return {
        "value": value,
        "tokens": decoded.token[keep].tolist(),
        "p_before": float(base_probs[:, x_ids].sum(-1).mean()), "p_after": float(probs[:, x_ids].sum(-1).mean()),
        "c_before": float(base_probs[:, c_ids].sum(-1).mean()), "c_after": float(probs[:, c_ids].sum(-1).mean()),
        "f_before": float(np.isin(base_samples.numpy(), x_ids).mean()), "f_after": float(np.isin(samples.numpy(), x_ids).mean()),
    }


def summary(model, decoded, live, peak, batch, base_probs, ordinary) -> None:
    """Every live neuron: does its clamp raise P(X)? (teacher forcing on the same 100 documents)"""
    rng = np.random.default_rng(1)
    ratios, controls = [], []
    for site, unit in zip(live.site, live.unit):
        keep = (decoded.site == site) & (decoded.unit == unit) & (decoded.direction == "promoted")
        x_ids = decoded.token_id[keep].tolist()
        c_ids = rng.choice([i for i in ordinary if i not in x_ids], size=TOP, replace=False).tolist()
        with actscope.edit(model, {f"{site}[{int(unit)}]": iv.set_value(CLAMP * peak[(site, int(unit))])}):
            probs = next_token_probs(model, batch)
        ratios.append(float(probs[:, x_ids].sum(-1).mean() / base_probs[:, x_ids].sum(-1).mean()))
        controls.append(float(probs[:, c_ids].sum(-1).mean() / base_probs[:, c_ids].sum(-1).mean()))
    ratios, controls = np.array(ratios), np.array(controls)
    print(f"\nall {len(ratios)} live neurons, clamped to {CLAMP:g} × max one at a time (teacher forcing):")
    print(f"  P(X) rises for {np.mean(ratios > 1):.1%}; median ratio after/before {np.median(ratios):.2f} (quartiles {np.quantile(ratios, 0.25):.2f}–{np.quantile(ratios, 0.75):.2f})")
    print(f"  control sets C: P(C) rises for {np.mean(controls > 1):.1%}; median ratio {np.median(controls):.2f} (quartiles {np.quantile(controls, 0.25):.2f}–{np.quantile(controls, 0.75):.2f})")


if __name__ == "__main__":
    main()
