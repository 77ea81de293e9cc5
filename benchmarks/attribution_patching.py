"""Cost of attribution patching over every head and unit of a GPT-2-small-shaped model
(results: docs/benchmarks.md, "Attribution patching").

Run from the repository root:

    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/attribution_patching.py

Model: ``GPT2LMHeadModel(GPT2Config())`` with random weights (12 layers, 12 heads, d_model 768,
3072 MLP units per layer), eval mode. Inputs: ``--batch`` random sequences of ``--positions``
tokens; the corrupted copy differs at one position. Metric: logit difference of two tokens at
the last position. Components: every site (24), head (144) and unit (36,864) of
``blocks.*.attn.z`` and ``blocks.*.mlp.post``.

Prints: the model passes attribution patching made (counted with a hook on the model, and a
backward hook on the logits); its wall time in units of one forward+backward pass (a forward,
and a backward to the input embeddings: activation gradients only, as attribution patching
takes them); the time of the same number of exact-patching passes (one patched forward each);
what exact patching of every component would need (one forward per component, extrapolated
from the measured per-pass time); and exact patching of the heads of ``--exact-heads``
(default: blocks 0 and 11), measured, with its correlation to the attribution estimates.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from actscope.explain import attribution_patching, compare_effects  # noqa: E402
from actscope.explain import activation_patching, logit_difference  # noqa: E402


def gpt2_small(seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config()).eval()


def best_of(repeats: int, run) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def forward_backward_seconds(model, ids, metric, repeats: int) -> float:
    """One plain forward of the metric and one backward to the input embeddings: gradients
    with respect to every layer's activations, none for the weights (what attribution needs)."""
    embeds = model.transformer.wte(ids).detach().requires_grad_(True)

    def run():
        loss = metric(model(inputs_embeds=embeds).logits, {})
        torch.autograd.grad(loss, [embeds])

    return best_of(repeats, run)[0]


class PassCounter:
    """Counts forward calls of the model and backward calls through its output."""

    def __init__(self, model):
        self.forwards = self.backwards = 0
        self.handle = model.register_forward_hook(self._forward)

    def _forward(self, module, args, output):
        self.forwards += 1
        if output.logits.requires_grad:
            output.logits.register_hook(self._backward)

    def _backward(self, grad):
        self.backwards += 1

    def close(self):
        self.handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact-heads", default="blocks.0.attn.z,blocks.11.attn.z",
                        help="sites whose heads are also patched exactly (blocks.*.attn.z: all 144, ~150 forwards)")
    args = parser.parse_args()
    model = gpt2_small(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    clean = torch.randint(0, model.config.vocab_size, (args.batch, args.positions), generator=generator)
    corrupted = clean.clone()
    corrupted[:, args.positions // 2] = (clean[:, args.positions // 2] + 1) % model.config.vocab_size
    metric = logit_difference(11, 13)
    sites = "blocks.*.attn.z,blocks.*.mlp.post"
    print(f"GPT-2-small shape (random init): {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{model.config.n_layer} layers x {model.config.n_head} heads, d_model {model.config.n_embd}; "
          f"batch {args.batch} x {args.positions} positions; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")

    counter = PassCounter(model)
    try:
        attribution = attribution_patching(model, clean, corrupted, metric, sites=sites, per=("site", "head", "unit"))
    finally:
        counter.close()
    kinds = {per: len(attribution.only(per)) for per in ("site", "head", "unit")}
    print(f"components estimated: {len(attribution)} ({kinds['site']} sites, {kinds['head']} heads, {kinds['unit']} units)")
    print(f"passes counted on the model: {counter.forwards} forward, {counter.backwards} backward "
          f"(reported: {attribution.forward_passes} forward, {attribution.backward_passes} backward) "
          f"= 1 forward+backward + 1 forward")

    t_attr, _ = best_of(args.repeats, lambda: attribution_patching(model, clean, corrupted, metric, sites=sites, per=("site", "head", "unit")))
    t_fb = forward_backward_seconds(model, clean, metric, args.repeats)
    print(f"attribution patching: {t_attr:.3f} s (best of {args.repeats}); one plain forward+backward: {t_fb:.3f} s "
          f"-> {t_attr / t_fb:.2f} forward+backward passes")

    # Exact patching with the same number of model passes (3 forwards: clean, corrupted, one patch).
    t_same, _ = best_of(args.repeats, lambda: activation_patching(model, clean, corrupted, metric, sites="blocks.0.attn.z[head=0]", per="site"))
    per_pass = t_same / 3
    total = len(attribution) + 2
    print(f"exact patching, the same 3 passes (one component): {t_same:.3f} s ({per_pass:.3f} s per forward)")
    print(f"exact patching of all {len(attribution)} components: {total} forwards, about {total * per_pass:.0f} s "
          f"(extrapolated) = {total * per_pass / t_attr:.0f}x attribution patching")

    started = time.perf_counter()
    exact_heads = activation_patching(model, clean, corrupted, metric, sites=args.exact_heads, per="head")
    t_heads = time.perf_counter() - started
    agreement = compare_effects(attribution, exact_heads, per="head")
    print(f"exact patching of the heads of {args.exact_heads}, measured: {exact_heads.forward_passes} forwards, {t_heads:.1f} s; "
          f"attribution vs exact per head: Pearson {agreement.pearson:.3f}, Spearman {agreement.spearman:.3f} (n={agreement.n})")
    verdict = "PASS" if counter.forwards + counter.backwards <= 3 and counter.backwards == 1 and t_attr / t_fb < 3 else "FAIL"
    print(f"{verdict}: every head and unit from under 3 forward+backward passes")


if __name__ == "__main__":
    main()
