"""Sparse MLP decoding on the CPU against the bandwidth bound (issue 5; results: docs/benchmarks.md).

Run from the repository root:

    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/sparse_decode.py

A random-init Llama-shaped model (default hidden 1024, intermediate 4096, 24 layers, vocab
32000, fp32: 436M parameters, 1.74 GB) decodes greedily at batch 1. Side by side:

* ``dense``   — Hugging Face's own LlamaMLP;
* ``actscope``— CATS-style skip (gate computed, then up/down only for units with
  ``|silu(gate)| >= t``) on actscope's row kernels (``actscope.sparse.kernels.dot_rows`` /
  ``axpy_rows``: the compiled C path);
* ``gather``  — the same skip with the plain-PyTorch reference primitives (``index_select``
  copies the rows, then a matmul).

Thresholds: per layer, the quantile ``s`` of ``|silu(gate)|`` over a calibration prompt (CATS).
The sparsity actually reached while decoding is measured and used in the bound.

Bandwidth bound (METHODS.md, "Exploiting sparsity"): decoding reads every weight once per token,
so skipping a fraction s of the rows of matrices that are a fraction f of the bytes read gives at
most ``1 / (1 - f * s)``. f is computed from the model's shapes:

* MLP blocks: f = (up + down bytes) / (gate + up + down bytes) = 2/3 for CATS (the gate is
  always read); also shown for a fixed unit set (CoreInfer-style: gate, up and down all
  skipped, f = 1).
* end to end: f = skippable bytes / all bytes read per token (attention q/k/v/o, MLPs, the
  lm_head out-projection, one embedding row; the KV cache is < 1 % and left out).

Sections: (1) the MLP blocks alone — all layers' MLPs run back to back on one token each (1.2 GB
of weights, so every read comes from memory as in decoding, not from the 32 MB L3); (2) end-to-end
decoding, ``--new-tokens`` greedy tokens after a ``--prompt-tokens`` prompt, decode steps timed
(prefill excluded), median of ``--repeats`` after one warm-up; (3) ``--kernels``: the per-shape
choice, C kernel vs gather by token count.

``--methods cats,teal,teal-uniform,teal-mlp,core,cett``: section (2) compares the calibration
methods of ``actscope.sparse`` instead of CATS alone (dense measured once; each method's rows
through the C kernels and through the gather primitives). cats, the teals and core run at each
``--sparsities`` target; cett takes no sparsity: it is calibrated once with ``p=0.01``
(CETT-PPL-1 %) on the calibration prompt. Each method skips rows of different matrices while
decoding (``actscope.sparse.forwards``, ``actscope.sparse.projections``), so each has its own
model-level f = skippable bytes / all bytes read per token:

* cats — up and down rows of the inactive units (the gate is read in full);
* teal — TEAL as published: the input channels of every projection (q, k, v, o, gate, up, down:
  rows of each transposed weight), sparsities from the greedy search (``--teal-step``, on the
  first ``TEAL_CALIBRATION_TOKENS`` tokens of the calibration prompt: a random model's search
  is only there to give a realistic spread of sparsities over projections);
* teal-uniform — the same projections, every one at the target;
* teal-mlp — uniform over the MLP only: the input channels of gate and up, and down rows;
* core — gate, up and down rows outside the prompt's core set (fixed at prefill);
* cett — down rows only (its neuron ``act(gate)·up`` needs gate and up in full).

"measured s" is then the share of those skippable rows the decoding steps did not read, from the
sparse context's own tally (``handle.realised().read``), so ``f · s`` is the share of all bytes
per token skipped.

The bound ``1 / (1 − f·s)`` assumes both paths read memory at the same rate. The run also measures
the machine's read bandwidth (a plain sum over a 1 GB array, the same threads) and prints, per
row, the rate it read its bytes at (bytes read per token / time per token) as a share of that
bandwidth: the physical bound is 100 %. A sparse row above its model-level bound reads faster
than the dense path does, which the "of bw" column shows.

Options: ``--threads N`` (torch's and the kernel's threads; default torch's), ``--repeats``,
``--sparsities``, ``--new-tokens``, ``--prompt-tokens``, the model's shape (``--hidden``,
``--intermediate``, ``--layers``, ``--vocab``), ``--skip-mlp`` / ``--skip-decode``, ``--kernels``,
``--own-swap`` (CATS through the script's own module swap rather than ``actscope.sparse``).

Configurations are interleaved within each repeat so that load from other processes hits all of
them alike; the first output line gives the load average. The speed-up is dense time / sparse
time; "of bound" is speed-up / bound.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from actscope.sparse import kernels  # noqa: E402

IMPLS = {
    "actscope": (kernels.dot_rows, kernels.axpy_rows),
    "gather": (kernels.reference_dot_rows, kernels.reference_axpy_rows),
}


# ---- model and its byte accounting -----------------------------------------------------------

def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, vocab_size=args.vocab,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def bytes_per_token(model) -> dict[str, int]:
    """Weight bytes one decoding step reads, by kind (an embedding lookup reads one row)."""
    out = {"mlp.gate": 0, "mlp.up": 0, "mlp.down": 0, "attention": 0, "lm_head": 0, "embedding row": 0, "norms": 0}
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.endswith("embed_tokens.weight"):
            out["embedding row"] += p.shape[1] * p.element_size()
        elif "lm_head" in name:
            out["lm_head"] += size
        elif ".mlp." in name:
            out["mlp." + name.split(".mlp.")[1].split("_")[0]] += size
        elif ".self_attn." in name:
            out["attention"] += size
        else:
            out["norms"] += size
    return out


def bound(f: float, s: float) -> float:
    return 1.0 / (1.0 - f * s)


# ---- the sparse MLP (a minimal module swap) ----------------------------------------------------

class SparseLlamaMLP(nn.Module):
    """CATS on a LlamaMLP: ``down((silu(gate x) * [|silu(gate x)| >= t]) * up x)``, reading only the
    up rows and down columns of units active for some token (``index``). With ``fixed`` (a unit
    index), gate, up and down are all restricted to that set instead (CoreInfer-style)."""

    def __init__(self, mlp: nn.Module, threshold: float, impl: str, fixed: torch.Tensor | None = None):
        super().__init__()
        self.gate = mlp.gate_proj.weight.detach()                 # [units, d]
        self.up = mlp.up_proj.weight.detach()                     # [units, d]
        self.down_t = mlp.down_proj.weight.detach().T.contiguous()  # [units, d] laid out once
        self.act = mlp.act_fn
        self.threshold = threshold
        self.dot, self.axpy = IMPLS[impl]
        self.fixed = fixed
        self.kept = []                                            # active units per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])                         # [n, d]
        if self.fixed is not None:
            index = self.fixed
            h = self.act(self.dot(rows, self.gate, index)) * self.dot(rows, self.up, index)
        else:
            g = self.act(F.linear(rows, self.gate))               # [n, units]
            keep = g.abs() >= self.threshold
            index = keep.any(0).nonzero().squeeze(1)              # [k] union over tokens
            g = g[:, index]
            if rows.shape[0] > 1:
                g = g * keep[:, index]
            h = g * self.dot(rows, self.up, index)                # [n, k]
        self.kept.append(index.numel())
        return self.axpy(h, self.down_t, index).reshape(*x.shape[:-1], -1)


def calibrate_thresholds(model, prompt: torch.Tensor, sparsity: float) -> list[float]:
    """Per layer, the ``sparsity`` quantile of |silu(gate x)| over the prompt's tokens (CATS)."""
    grabbed: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o: grabbed.append(m.act_fn(m.gate_proj(a[0])).abs().flatten()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(prompt)
    for hook in hooks:
        hook.remove()
    return [torch.quantile(values.double(), sparsity).item() for values in grabbed]


class swapped:
    """Replaces every layer's MLP for the duration of a ``with`` block (the model is restored)."""

    def __init__(self, model, make):
        self.model, self.make = model, make

    def __enter__(self):
        self.saved = [layer.mlp for layer in self.model.model.layers]
        self.sparse = [self.make(i, mlp) for i, mlp in enumerate(self.saved)]
        for layer, mlp in zip(self.model.model.layers, self.sparse):
            layer.mlp = mlp
        return self.sparse

    def __exit__(self, *exc):
        for layer, mlp in zip(self.model.model.layers, self.saved):
            layer.mlp = mlp


# ---- timing ----------------------------------------------------------------------------------

def decode_seconds(model, prompt: torch.Tensor, new_tokens: int, after_prefill=None) -> tuple[float, list[int]]:
    """Greedy decoding with a KV cache: prefill (untimed), then ``new_tokens`` timed steps."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        logits = model(prompt, cache=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        produced = [token.item()]
        if after_prefill is not None:
            after_prefill()
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = model(token, cache=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            produced.append(token.item())
        return time.perf_counter() - start, produced


def mlp_inputs(model, prompt: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's MLP input for the prompt's last token ``[1, 1, d]``."""
    grabbed: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o: grabbed.append(a[0][:, -1:].clone()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(prompt)
    for hook in hooks:
        hook.remove()
    return grabbed


def mlp_blocks_seconds(mlps, inputs) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for mlp, x in zip(mlps, inputs):
            mlp(x)
        return time.perf_counter() - start


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each named run, one warm-up each, repeats interleaved across runs."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(values) for name, values in times.items()}


# ---- sections --------------------------------------------------------------------------------

def mlp_section(model, prompt, sparsities, repeats, use_api=True) -> None:
    layers = list(model.model.layers)
    inputs = mlp_inputs(model, prompt)
    dense = [layer.mlp for layer in layers]
    # the class's forward: dense even while sparsify() has swapped the instances' forward
    dense_forwards = [functools.partial(type(m).forward, m) for m in dense]
    units = layers[0].mlp.up_proj.weight.shape[0]
    mb = sum(p.numel() * 4 for m in dense for p in m.parameters()) / 1e6
    api = actscope_api() if use_api else None
    source = "actscope.sparse.sparsify" if api is not None else "the benchmark's own CATS module"
    print(f"\n== MLP blocks: {len(layers)} layers' MLPs back to back, 1 token each ({mb:.0f} MB of weights) ==")
    print(f"cats: {source}; fixed set: a random unit set of the target size, gate/up/down all skipped "
          "(CoreInfer-style decoding), the benchmark's own module")
    print(f"{'skip':>10} {'target s':>8} {'measured s':>10} {'impl':>8} {'ms':>8} {'speed-up':>8} {'bound':>6} {'of bound':>8}")
    dense_run = lambda: mlp_blocks_seconds(dense_forwards, inputs)
    for s in sparsities:
        if api is not None:
            import actscope

            wrapped = actscope.wrap(model)
            calibration = api[0](wrapped, [{"input_ids": prompt}], method="cats", sparsity=s)
            with api[1](wrapped, calibration, check_weights=False) as handle:
                runs = {"dense": dense_run}
                runs.update({impl: (lambda impl=impl: _with(primitives(impl), mlp_blocks_seconds, dense, inputs))
                             for impl in IMPLS})
                median = interleaved(runs, repeats)
                measured = 1 - statistics.mean((3 * r - 1) / 2 for r in handle.realised().read)
        else:
            thresholds = calibrate_thresholds(model, prompt, s)
            sparse = {impl: [SparseLlamaMLP(m, t, impl) for m, t in zip(dense, thresholds)] for impl in IMPLS}
            median, measured = _own_runs(dense_run, sparse, inputs, units, repeats)
        _mlp_rows("cats", s, measured, 2 / 3, median)
        fixed = [torch.randperm(units)[: round(units * (1 - s))].sort().values for _ in layers]
        sparse = {impl: [SparseLlamaMLP(m, 0.0, impl, fixed=i) for m, i in zip(dense, fixed)] for impl in IMPLS}
        median, measured = _own_runs(dense_run, sparse, inputs, units, repeats)
        _mlp_rows("fixed set", s, measured, 1.0, median)


def _with(context, function, *args):
    with context:
        return function(*args)


def _own_runs(dense_run, sparse, inputs, units, repeats):
    runs = {"dense": dense_run}
    runs.update({impl: (lambda mlps=mlps: mlp_blocks_seconds(mlps, inputs)) for impl, mlps in sparse.items()})
    median = interleaved(runs, repeats)
    mlps = sparse["actscope"]
    measured = 1 - sum(sum(m.kept) for m in mlps) / (units * sum(len(m.kept) for m in mlps))
    return median, measured


def _mlp_rows(skip, s, measured, f, median) -> None:
    b = bound(f, measured)
    print(f"{skip:>10} {s:8.2f} {measured:10.3f} {'dense':>8} {median['dense'] * 1e3:8.2f}")
    for impl in IMPLS:
        up = median["dense"] / median[impl]
        print(f"{skip:>10} {s:8.2f} {measured:10.3f} {impl:>8} {median[impl] * 1e3:8.2f} {up:8.2f} {b:6.2f} {up / b:8.0%}")


def decode_section(model, prompt, calibration_prompt, sparsities, repeats, new_tokens, use_api=True) -> None:
    volume = bytes_per_token(model)
    total = sum(volume.values())
    f = (volume["mlp.up"] + volume["mlp.down"]) / total
    parts = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in volume.items())
    print(f"\n== end-to-end greedy decoding: {new_tokens} tokens after a {prompt.shape[1]}-token prompt ==")
    print(f"bytes read per token (MB): {parts}; total {total / 1e6:.0f}")
    print(f"model-level f (CATS: up + down of every layer / all bytes) = {f:.3f}")
    runs = {"dense": lambda: decode_seconds(model, prompt, new_tokens)}
    api = actscope_api() if use_api else None
    if api is not None:
        import actscope

        print("sparse execution: actscope.sparse.calibrate(method='cats') + sparsify; gather = the same with "
              "ACTSCOPE_SPARSE_KERNEL=0 (reference primitives)")
        wrapped = actscope.wrap(model)
        for s in sparsities:
            calibration = api[0](wrapped, [{"input_ids": calibration_prompt}], method="cats", sparsity=s)
            for impl in IMPLS:
                runs[(s, impl)] = (lambda c=calibration, impl=impl:
                                   _decode_api(model, wrapped, c, impl, prompt, new_tokens))
    else:
        why = "--own-swap" if not use_api else "actscope.sparse.sparsify not available"
        print(f"sparse execution: the benchmark's own CATS module swap ({why})")
    contexts = {}
    for s in sparsities if api is None else ():
        thresholds = calibrate_thresholds(model, calibration_prompt, s)
        for impl in IMPLS:
            make = lambda i, mlp, t=thresholds, impl=impl: SparseLlamaMLP(mlp, t[i], impl)
            contexts[(s, impl)] = swapped(model, make)
            runs[(s, impl)] = lambda key=(s, impl): _decode_swapped(model, contexts[key], prompt, new_tokens)
    results = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up
        run()
    kept = {}
    for _ in range(repeats):
        for name, run in runs.items():
            out = run()
            results[name].append(out[0])
            if name != "dense":
                kept.setdefault(name, []).extend(out[2])
    median = {name: statistics.median(v) for name, v in results.items()}
    units = model.model.layers[0].mlp.up_proj.weight.shape[0]
    dense_ms = median["dense"] / new_tokens * 1e3
    print(f"{'target s':>8} {'measured s':>10} {'impl':>8} {'ms/token':>9} {'tokens/s':>8} {'speed-up':>8} {'bound':>6} {'of bound':>8}")
    print(f"{'-':>8} {'-':>10} {'dense':>8} {dense_ms:9.1f} {1e3 / dense_ms:8.2f}")
    for s in sparsities:
        for impl in IMPLS:
            name = (s, impl)
            measured = 1 - statistics.mean(kept[name]) / (1 if api is not None else units)
            ms = median[name] / new_tokens * 1e3
            up = median["dense"] / median[name]
            b = bound(f, measured)
            print(f"{s:8.2f} {measured:10.3f} {impl:>8} {ms:9.1f} {1e3 / ms:8.2f} {up:8.2f} {b:6.2f} {up / b:8.0%}")


def actscope_api():
    """``(calibrate, sparsify)`` of actscope.sparse, or None while it is not there."""
    try:
        from actscope.sparse import calibrate, sparsify
    except (ImportError, AttributeError):
        return None
    return calibrate, sparsify


class primitives:
    """Within the block, actscope's sparse execution uses the C kernel or the torch gather."""

    def __init__(self, impl: str):
        self.value = "1" if impl == "actscope" else "0"

    def __enter__(self):
        self.saved = os.environ.get("ACTSCOPE_SPARSE_KERNEL")
        os.environ["ACTSCOPE_SPARSE_KERNEL"] = self.value

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("ACTSCOPE_SPARSE_KERNEL", None)
        else:
            os.environ["ACTSCOPE_SPARSE_KERNEL"] = self.saved


def _decode_api(model, wrapped, calibration, impl, prompt, new_tokens, raw_read=False):
    """Decoding inside ``actscope.sparse.sparsify``; skipped share from the handle's tally
    (``raw_read``: the per-layer share of the MLP's weights read, for any method)."""
    _, sparsify = actscope_api()
    with primitives(impl), sparsify(wrapped, calibration, check_weights=False) as handle:
        seconds, produced = decode_seconds(model, prompt, new_tokens, after_prefill=handle.reset)
        read = handle.realised().read                              # [layers] share of MLP weights read
    if raw_read:
        return seconds, produced, list(read)
    # CATS on a gated MLP reads the gate and the active units' up and down rows: read = (1 + 2k) / 3
    kept = [(3 * r - 1) / 2 for r in read]
    return seconds, produced, kept


def _decode_swapped(model, context, prompt, new_tokens):
    with context as mlps:
        seconds, produced = decode_seconds(model, prompt, new_tokens)
    # decode steps only: the prefill call is each module's first entry
    return seconds, produced, [k for m in mlps for k in m.kept[1:]]


# ---- per-method comparison (--methods) ------------------------------------------------------

# Matrices whose rows (or, for TEAL, input columns) a decoding step can skip, and calibrate's options.
SKIPPED = {"cats": ("mlp.up", "mlp.down"), "teal": ("attention", "mlp.gate", "mlp.up", "mlp.down"),
           "teal-uniform": ("attention", "mlp.gate", "mlp.up", "mlp.down"), "teal-mlp": ("mlp.gate", "mlp.up", "mlp.down"),
           "core": ("mlp.gate", "mlp.up", "mlp.down"), "cett": ("mlp.down",)}
OPTIONS = {"cats": {"method": "cats"}, "teal": {"method": "teal"}, "teal-uniform": {"method": "teal", "allocation": "uniform"},
           "teal-mlp": {"method": "teal", "allocation": "uniform", "projections": "mlp"},
           "core": {"method": "core"}, "cett": {"method": "cett"}}
CETT_P = 0.01
TEAL_CALIBRATION_TOKENS = 32


def read_bandwidth(repeats: int = 7, size: int = 1 << 28) -> float:
    """GB/s of a plain read: the median time of ``sum`` over a 1 GB float32 array (well past any cache)."""
    data = torch.ones(size)
    data.sum()  # touch every page first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * data.element_size() / statistics.median(times) / 1e9


def method_settings(methods, sparsities) -> list[tuple[str, str, dict]]:
    """``(method, label, calibrate keywords)`` per run: a sparsity target each, cett once with p."""
    out = []
    for method in methods:
        if method == "cett":
            out.append((method, f"p={CETT_P:.0%}", {"p": CETT_P}))
        else:
            out.extend((method, f"s={s:.2f}", {"sparsity": s}) for s in sparsities)
    return out


def methods_section(model, prompt, calibration_prompt, methods, sparsities, repeats, new_tokens, teal_step) -> None:
    """End-to-end decoding, dense vs each method through actscope's kernels and the gather path."""
    import actscope
    from actscope.sparse import calibrate

    volume = bytes_per_token(model)
    total = sum(volume.values())
    mlp = sum(volume[f"mlp.{m}"] for m in ("gate", "up", "down"))
    f = {m: sum(volume[k] for k in SKIPPED[m]) / total for m in methods}
    # the bytes a method's tally ("read") is a share of: every projection of a block, or its MLP
    base = {m: (mlp + volume["attention"]) if "attention" in SKIPPED[m] else mlp for m in methods}
    bandwidth = read_bandwidth()
    print(f"\n== end-to-end greedy decoding by method: {new_tokens} tokens after a {prompt.shape[1]}-token prompt ==")
    print(f"bytes read per token: {total / 1e6:.0f} MB; read bandwidth (sum over 1 GB): {bandwidth:.1f} GB/s; "
          "model-level f (skippable bytes / all bytes) per method: "
          + ", ".join(f"{m} {f[m]:.3f} ({'+'.join(SKIPPED[m])})" for m in methods))
    print("sparse execution: actscope.sparse.calibrate(method=...) on the 128-token calibration prompt + sparsify; "
          f"teal's greedy search on its first {TEAL_CALIBRATION_TOKENS} tokens, step {teal_step}; "
          "gather = the same with ACTSCOPE_SPARSE_KERNEL=0")
    wrapped = actscope.wrap(model)
    runs, calibrated = {"dense": lambda: decode_seconds(model, prompt, new_tokens)}, {}
    for method, label, setting in method_settings(methods, sparsities):
        start = time.perf_counter()
        tokens = calibration_prompt[:, :TEAL_CALIBRATION_TOKENS] if method == "teal" else calibration_prompt
        extra = {"step": teal_step} if method == "teal" else {}
        calibration = calibrate(wrapped, [{"input_ids": tokens}], **OPTIONS[method], **setting, **extra)
        calibrated[(method, label)] = time.perf_counter() - start
        for impl in IMPLS:
            runs[(method, label, impl)] = (lambda c=calibration, impl=impl:
                                           _decode_api(model, wrapped, c, impl, prompt, new_tokens, raw_read=True))
    print("calibration seconds: " + ", ".join(f"{m} {l} {t:.1f}" for (m, l), t in calibrated.items()))
    for run in runs.values():  # warm-up
        run()
    seconds = {name: [] for name in runs}
    read = {}
    for _ in range(repeats):
        for name, run in runs.items():
            out = run()
            seconds[name].append(out[0])
            if name != "dense":
                read.setdefault(name, []).extend(out[2])
    median = {name: statistics.median(v) for name, v in seconds.items()}
    dense_ms = median["dense"] / new_tokens * 1e3
    def of_bandwidth(bytes_read: float, ms: float) -> str:
        return f"{bytes_read / (ms / 1e3) / 1e9 / bandwidth:7.0%}"

    print(f"{'method':>12} {'setting':>8} {'measured s':>10} {'f':>6} {'impl':>8} {'ms/token':>9} {'tokens/s':>8} "
          f"{'speed-up':>8} {'bound':>6} {'of bound':>8} {'of bw':>7}")
    print(f"{'-':>12} {'-':>8} {'-':>10} {'-':>6} {'dense':>8} {dense_ms:9.1f} {1e3 / dense_ms:8.2f} {'':>8} {'':>6} {'':>8} "
          f"{of_bandwidth(total, dense_ms)}")
    for name in runs:
        if name == "dense":
            continue
        method = name[0]
        skippable = f[method] * total
        # share of the tallied bytes not read → share of this method's skippable bytes not read
        measured = (1 - statistics.mean(read[name])) * base[method] / skippable
        ms = median[name] / new_tokens * 1e3
        up = median["dense"] / median[name]
        b = bound(f[method], measured)
        print(f"{method:>12} {name[1]:>8} {measured:10.3f} {f[method]:6.3f} {name[2]:>8} {ms:9.1f} {1e3 / ms:8.2f} "
              f"{up:8.2f} {b:6.2f} {up / b:8.0%} {of_bandwidth(total * (1 - f[method] * measured), ms)}")


def kernels_section(model, repeats) -> None:
    """C kernel vs gather + matmul by token count, on this model's up / down shapes at s = 0.5."""
    mlp = model.model.layers[0].mlp
    up, down_t = mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach().T.contiguous()
    units, d = up.shape
    index = torch.randperm(units)[: units // 2].sort().values
    print(f"\n== kernels: one [{units}, {d}] matrix, half its rows, by token count (ms; median of {repeats}) ==")
    print(f"{'tokens':>6} {'dot C':>8} {'dot gather':>10} {'axpy C':>8} {'axpy gather':>11}")
    saved, kernels.MAX_KERNEL_TOKENS = kernels.MAX_KERNEL_TOKENS, 1 << 30
    try:
        for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            x, h = torch.randn(n, d), torch.randn(n, index.numel())
            runs = {
                "dot C": lambda: _timed(kernels.dot_rows, x, up, index),
                "dot gather": lambda: _timed(kernels.reference_dot_rows, x, up, index),
                "axpy C": lambda: _timed(kernels.axpy_rows, h, down_t, index),
                "axpy gather": lambda: _timed(kernels.reference_axpy_rows, h, down_t, index),
            }
            m = interleaved(runs, repeats)
            print(f"{n:6d} {m['dot C'] * 1e3:8.3f} {m['dot gather'] * 1e3:10.3f} {m['axpy C'] * 1e3:8.3f} {m['axpy gather'] * 1e3:11.3f}")
    finally:
        kernels.MAX_KERNEL_TOKENS = saved


def _timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SKIPPED]
    if not methods or unknown:
        raise argparse.ArgumentTypeError(f"--methods takes a comma-separated subset of {','.join(SKIPPED)}, got {text!r}")
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-mlp", action="store_true", help="no MLP-block section")
    parser.add_argument("--skip-decode", action="store_true", help="no end-to-end section")
    parser.add_argument("--own-swap", action="store_true",
                        help="CATS with the benchmark's own module swap instead of actscope.sparse.sparsify")
    parser.add_argument("--kernels", action="store_true", help="also time the per-shape kernel choice")
    parser.add_argument("--methods", type=parse_methods, default=None,
                        help=f"comma-separated {','.join(SKIPPED)}: end-to-end section per method instead of CATS alone")
    parser.add_argument("--teal-step", type=float, default=0.02, help="teal: the block sparsity the greedy search adds per step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}, sparse kernel: {kernels.kernel_info()}")
    model = build_model(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: Llama-shaped, random init, fp32, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.layers} layers, vocab {args.vocab}: {params / 1e6:.0f}M parameters")
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_tokens), generator=generator)
    calibration = torch.randint(0, args.vocab, (1, 128), generator=generator)
    if not args.skip_mlp:
        mlp_section(model, calibration, args.sparsities, args.repeats, not args.own_swap)
    if not args.skip_decode and args.methods:
        methods_section(model, prompt, calibration, args.methods, args.sparsities, args.repeats, args.new_tokens, args.teal_step)
    elif not args.skip_decode:
        decode_section(model, prompt, calibration, args.sparsities, args.repeats, args.new_tokens, not args.own_swap)
    if args.kernels:
        kernels_section(model, args.repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average at the end: {load:.1f}")


if __name__ == "__main__":
    main()
