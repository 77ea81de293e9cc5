"""The prepared GPU check (issue 13): actscope's Triton kernels on one CUDA GPU, side by side.

Run from the repository root, on a machine with one NVIDIA GPU, a CUDA build of torch and triton:

    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/gpu_check.py
    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/gpu_check.py --quick   # fewer batches and tokens

Sized to finish well within 8 minutes on one H100-class GPU (an estimate from the work it does:
it has not been run on a GPU yet); each section prints its own duration.

Without a CUDA GPU it says so and exits with status 2 (``--cpu-dry-run`` runs the same code paths
on a tiny model on the CPU, to test the script; its timings mean nothing). Recorded results and
what they mean: docs/benchmarks.md, "GPU check".

The model: a random-init Llama shape of about 1B parameters in bf16 (hidden 2048, intermediate
8192, 16 layers, 32 heads, 8 KV heads, vocab 32000 untied: 1.10B; ``--vocab 128256 --tie`` is
Llama-3.2-1B's shape, whose 0.26B-parameter unembedding is a fifth of the bytes read per token and
lowers every bandwidth bound below). Sections, each timed side by side in one run:

1. **Bandwidth**: a plain read of a 2 GiB array (``sum``) and a copy, CUDA events, median of 10.
   The read rate is the "measured bandwidth" the bounds below use.
2. **Profiling overhead** of ``actscope.observe(model, "blocks.*.mlp.post")`` (every statistic:
   moments, the firing ladder, the |a| histogram, per-token counts, top-8) against the bare
   forward, ``--batch`` x ``--seq`` random tokens per batch, each batch through every method in
   an order rotating by one per batch (each observing method on its own copy of the model, its
   context open over the stream), wall time after ``torch.cuda.synchronize``. Methods: bare,
   actscope with the Triton statistics kernel, actscope with the torch fallback
   (``ACTSCOPE_TRITON=0``). Overhead = median over batches of (time / bare time on that batch),
   p25..p75 beside it; tokens/s. Target (Triton): <= 10 %. The two observers' statistics are
   compared at the end (counts exactly, moments to 1e-5 relative).
3. **Decoding**, batch 1, greedy, ``--new-tokens`` after a ``--prompt-tokens`` prompt, bf16:
   dense Hugging Face against TEAL-style sparsity at each of ``--sparsities``:
   * ``teal-7``: every linear layer of every block (q, k, v, o, gate, up, down) zeroes its input
     entries with ``|x| <= t`` (t per projection: the sparsity quantile of |x| on a 256-token
     calibration prompt: TEAL's uniform variant), through ``actscope.sparse.kernels.
     threshold_axpy_rows`` (the Triton kernel: thresholding fused, only the weight rows of active
     input channels read, no host synchronisation) on weights laid out transposed once;
   * ``sparsify``: ``actscope.sparse.calibrate(method="teal")`` + ``sparsify`` as shipped: the
     MLP only (attention projections are a later issue), through ``dot_rows``/``axpy_rows``;
   * eager (the Python loop Hugging Face users run) and, where the forward can be captured, one
     CUDA graph per decoding step (``StaticCache``; greedy argmax inside the graph), which takes
     the launch overhead out and leaves the memory traffic the bound is about.
   Per row: measured sparsity s (share of the skippable weight bytes not read, from a separate
   counting pass), f (skippable bytes / all bytes read per token), the bound ``1 / (1 - f·s)``,
   speed-up, its share of the bound, and the physical bound (bytes read per token / measured
   bandwidth) with the share of the bandwidth each path reaches. Targets (TEAL's published
   figures): >= 1.5x at 40 % and >= 1.8x at 50 %.
4. **Kernels**: the row kernels against torch's gather + GEMM by token count (the choice of
   ``kernels.MAX_TRITON_TOKENS``), and ``threshold_axpy_rows`` against ``F.linear`` at s = 0.5.

Options: ``--quick``, the model's shape (``--hidden --intermediate --layers --heads --kv-heads
--vocab --tie``), ``--batch --seq --batches``, ``--prompt-tokens --new-tokens --repeats
--sparsities``, ``--skip-profile --skip-decode --skip-kernels``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

SITES = "blocks.*.mlp.post"
EPS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
K = 8
TARGET_OVERHEAD = 0.10
TARGET_SPEEDUP = {0.4: 1.5, 0.5: 1.8}
DRY_RUN = False  # --cpu-dry-run: no verdicts (its timings mean nothing)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Without a CUDA GPU the check exits with status 2.")
    parser.add_argument("--quick", action="store_true", help="fewer batches, tokens and repeats")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tie", action="store_true", help="tie the unembedding to the embedding (Llama-3.2-1B)")
    parser.add_argument("--batch", type=int, default=8, help="profiling: sequences per batch")
    parser.add_argument("--seq", type=int, default=1024, help="profiling: tokens per sequence")
    parser.add_argument("--batches", type=int, default=16, help="profiling: timed batches (plus one warm-up)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="decoding: timed runs of each configuration")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.4, 0.5])
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="testing aid: run every section's code on a tiny model on the CPU (no GPU figures)")
    args = parser.parse_args(argv)
    for s in args.sparsities:
        if not 0 < s < 1:
            parser.error(f"--sparsities takes values in (0, 1), got {s}")
    if args.quick:
        args.batches, args.new_tokens, args.repeats = min(args.batches, 6), min(args.new_tokens, 48), min(args.repeats, 3)
    if args.cpu_dry_run:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab = 64, 128, 2, 4, 2, 256
        args.batch, args.seq, args.batches, args.prompt_tokens, args.new_tokens, args.repeats = 2, 32, 2, 8, 4, 1
    return args


def require_cuda(args: argparse.Namespace) -> torch.device:
    """The GPU, or a message and exit status 2."""
    if args.cpu_dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA {built}). Run it on a machine with an NVIDIA GPU and a CUDA build "
              "of torch (make test TORCH=... TORCH_INDEX=https://download.pytorch.org/whl/cu12x), or pass "
              "--cpu-dry-run to test the script itself.", file=sys.stderr)
        raise SystemExit(2)
    return torch.device("cuda", torch.cuda.current_device())


# ---- timing --------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(device: torch.device, run: Callable[[], Any]) -> float:
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def event_ms(device: torch.device, run: Callable[[], Any], iters: int = 20) -> float:
    """Median ms of ``run`` (after a warm-up), CUDA events around each call (wall time on the CPU)."""
    run()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(wall(device, run) * 1e3)
    return statistics.median(times)


def spread(values: list[float]) -> str:
    """median (p25..p75)."""
    if len(values) < 2:
        return f"{values[0]:.3g}" if values else "-"
    q = statistics.quantiles(values, n=4)
    return f"{statistics.median(values):.3g} ({q[0]:.3g}..{q[2]:.3g})"


# ---- the model -----------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(4096, args.seq, args.prompt_tokens + args.new_tokens + 64),
        tie_word_embeddings=args.tie,
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def bytes_per_token(model: nn.Module) -> dict[str, int]:
    """Weight bytes one decoding step reads, by kind (an embedding lookup reads one row)."""
    out = {"attention": 0, "mlp": 0, "lm_head": 0, "embedding row": 0, "norms": 0}
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        size = p.numel() * p.element_size()
        if name.endswith("embed_tokens.weight"):
            out["embedding row"] += p.shape[1] * p.element_size()
        elif "lm_head" in name:
            out["lm_head"] += size  # a tied unembedding is still read in full
        elif id(p) in seen:
            continue
        elif ".mlp." in name:
            out["mlp"] += size
        elif ".self_attn." in name:
            out["attention"] += size
        else:
            out["norms"] += size
        seen.add(id(p))
    return out


def bound(f: float, s: float) -> float:
    return 1.0 / (1.0 - f * s)


# ---- 1. bandwidth --------------------------------------------------------------------------------

def bandwidth_section(device: torch.device, dry: bool) -> float:
    n = (1 << 20) if dry else (1 << 29)  # float32: 2 GiB on the GPU
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    gib = x.numel() * 4 / 2**30
    read_ms = event_ms(device, lambda: x.sum(), iters=10)
    copy_ms = event_ms(device, lambda: y.copy_(x), iters=10)
    read = x.numel() * 4 / (read_ms / 1e3) / 1e9
    copied = 2 * x.numel() * 4 / (copy_ms / 1e3) / 1e9
    print(f"\n== 1. bandwidth: {gib:.2f} GiB float32 array ==")
    print(f"read (sum): {read:.0f} GB/s; copy (read + write): {copied:.0f} GB/s. The bounds below use the read rate.")
    return read  # the 4 GiB go with the function's frame


# ---- 2. profiling overhead -----------------------------------------------------------------------

@contextmanager
def env(name: str, value: str | None):
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class Counting:
    """Counts the SiteStats updates the Triton kernel took (the rest took another path)."""

    def __init__(self) -> None:
        from actscope.stats import triton_stats

        self.module, self.real, self.taken = triton_stats, triton_stats.update_site, 0
        triton_stats.update_site = self

    def __call__(self, *args, **kwargs):
        done = self.real(*args, **kwargs)
        self.taken += bool(done)
        return done

    def close(self) -> None:
        self.module.update_site = self.real


class Method:
    def __init__(self, name: str, module: nn.Module, triton: str | None, observe: bool):
        import actscope

        self.name, self.module, self.triton, self.times = name, module, triton, []
        self.context = actscope.observe(actscope.wrap(module), SITES, k=K, eps=EPS) if observe else None
        self.observer = self.context.__enter__() if observe else None

    def step(self, batch: dict) -> None:
        with env("ACTSCOPE_TRITON", self.triton), torch.no_grad():
            self.module(**batch)

    def close(self) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)


def profile_section(model: nn.Module, args: argparse.Namespace, device: torch.device) -> None:
    from actscope.stats import triton_stats

    g = torch.Generator(device=device).manual_seed(1)
    batches = [{"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g, device=device)}
               for _ in range(args.batches + 1)]
    precision = triton_stats.moments_precision(device) if device.type == "cuda" else "-"
    print(f"\n== 2. profiling overhead: observe('{SITES}'), all statistics (k={K}, eps={EPS}), "
          f"{args.batch} x {args.seq} tokens per batch, {args.batches} timed batches ==")
    print(f"Triton available: {triton_stats.available()}; moments precision on this GPU: {precision}")
    counter = Counting()
    methods = [Method("bare forward", model, None, observe=False),
               Method("actscope, Triton kernel", copy.deepcopy(model), None, observe=True),
               Method("actscope, torch fallback", copy.deepcopy(model), "0", observe=True)]
    try:
        for m in methods:  # warm-up: the Triton kernel compiles here
            start = time.perf_counter()
            wall(device, lambda m=m: m.step(batches[0]))
            print(f"  warm-up {m.name}: {time.perf_counter() - start:.1f} s")
        updates_before = counter.taken
        for j, batch in enumerate(batches[1:]):
            shift = j % len(methods)
            for m in methods[shift:] + methods[:shift]:
                m.times.append(wall(device, lambda m=m, batch=batch: m.step(batch)))
        triton_updates = counter.taken - updates_before
        report_overhead(methods, args.batch * args.seq)
        print(f"Triton kernel took {triton_updates} of {args.batches * args.layers} site updates of its method"
              + (f"; it failed: {triton_stats._failed[0][:200]}" if triton_stats._failed else ""))
        compare_observers(methods[1].observer, methods[2].observer)
    finally:
        counter.close()
        for m in methods:
            m.close()
        del methods
        if device.type == "cuda":
            torch.cuda.empty_cache()


def report_overhead(methods: list[Method], tokens: int) -> None:
    bare = methods[0].times
    print(f"{'method':<28} {'ms/batch':>9} {'tokens/s':>10} {'overhead median (p25..p75)':>28} {'target':>8}")
    for m in methods:
        ms = statistics.median(m.times) * 1e3
        if m is methods[0]:
            print(f"{m.name:<28} {ms:9.1f} {tokens / ms * 1e3:10.0f}")
            continue
        ratios = [a / b - 1 for a, b in zip(m.times, bare)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        over = statistics.median(ratios)
        verdict = ("met" if over <= TARGET_OVERHEAD else "missed") if "Triton" in m.name and not DRY_RUN else ""
        text = f"{over:+.1%} ({q[0]:+.1%}..{q[2]:+.1%})"
        print(f"{m.name:<28} {ms:9.1f} {tokens / ms * 1e3:10.0f} {text:>28} {verdict:>8}")
    print(f"target: <= {TARGET_OVERHEAD:.0%} with the Triton kernel")


def compare_observers(a: Any, b: Any) -> None:
    """The Triton and torch observers saw the same batches: their statistics must agree."""
    problems = []
    for label, sa in a.stats.items():
        sb = b.stats[label]
        for part in ("ladder", "hist"):
            da, db = getattr(sa, part).state_dict(), getattr(sb, part).state_dict()
            for key, value in db.items():
                same = torch.equal(da[key].cpu(), value.cpu()) if isinstance(value, torch.Tensor) else da[key] == value
                if not same:
                    problems.append(f"{label} {part}.{key}")
        for key in ("mean", "var"):
            va, vb = getattr(sa.moments, key).cpu(), getattr(sb.moments, key).cpu()
            scale = vb.abs().clamp(min=1e-30)
            if not bool((((va - vb).abs() <= 1e-5 * scale) | (va.isnan() & vb.isnan())).all()):
                problems.append(f"{label} moments.{key}")
        if not torch.equal(sa.top.values.cpu(), sb.top.values.cpu()):
            problems.append(f"{label} top.values")
    print("Triton and torch statistics agree (counts exactly, moments to 1e-5, top-k values exactly)"
          if not problems else f"Triton and torch statistics DIFFER: {', '.join(problems[:8])}")


# ---- 3. decoding ---------------------------------------------------------------------------------

class TealLinear(nn.Module):
    """A block's linear layer with TEAL's input threshold: ``where(|x| > t, x, 0) @ W.T (+ b)``
    through ``kernels.threshold_axpy_rows`` on the weight laid out transposed once."""

    def __init__(self, linear: nn.Linear, threshold: torch.Tensor):
        super().__init__()
        self.w_t = linear.weight.detach().T.contiguous()  # [d_in, d_out]
        self.bias = linear.bias
        self.threshold = threshold.to(device=self.w_t.device, dtype=torch.float32)
        self.counting, self.active, self.seen = False, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from actscope.sparse import kernels

        rows = x.reshape(-1, x.shape[-1])
        if self.counting:  # a separate, untimed pass: input channels read (union over tokens)
            self.active += int((rows.abs() > self.threshold).any(0).sum())
            self.seen += rows.shape[1]
        y = kernels.threshold_axpy_rows(rows, self.w_t, self.threshold)
        y = y + self.bias if self.bias is not None else y
        return y.reshape(*x.shape[:-1], y.shape[-1])


def teal_thresholds(model: nn.Module, prompt: torch.Tensor, sparsity: float) -> dict[str, torch.Tensor]:
    """Per block projection, the ``sparsity`` quantile of |its input| over the prompt's tokens."""
    grabbed: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith(PROJECTIONS) and ".layers." in name:
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: grabbed.__setitem__(name, args[0].detach().abs().float().flatten())))
    try:
        with torch.no_grad():
            model(prompt)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.quantile(values[: 1 << 24], sparsity) for name, values in grabbed.items()}


@contextmanager
def teal_swap(model: nn.Module, thresholds: dict[str, torch.Tensor]):
    """Every block projection replaced by its TealLinear while the block runs (restored after)."""
    saved = {}
    for name, t in thresholds.items():
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        saved[name] = (parent, child, getattr(parent, child))
        setattr(parent, child, TealLinear(saved[name][2], t))
    try:
        yield [getattr(parent, child) for parent, child, _ in saved.values()]
    finally:
        for parent, child, linear in saved.values():
            setattr(parent, child, linear)


def eager_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device,
                 after_prefill: Callable[[], None] | None = None) -> float:
    """Seconds for ``new_tokens`` greedy steps with a DynamicCache (the prefill untimed)."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        token = model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        if after_prefill is not None:
            after_prefill()
        sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        sync(device)
        return time.perf_counter() - start


class GraphDecoder:
    """One CUDA graph per decoding step: the forward on a StaticCache and the greedy argmax,
    replayed ``new_tokens`` times; the cache's position counters (device tensors, which the graph
    reads and advances) are rewound before each run."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, new_tokens: int):
        from transformers import StaticCache

        self.cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens + 16)
        with torch.no_grad():
            logits = model(prompt, cache=self.cache, use_cache=True).logits
            self.token = logits[:, -1:].argmax(-1).clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up before the capture (Triton compiles here)
                for _ in range(2):
                    self.token.copy_(model(self.token, cache=self.cache, use_cache=True).logits[:, -1:].argmax(-1))
            torch.cuda.current_stream().wait_stream(stream)
            self.start = [layer.cumulative_length.clone() for layer in self.cache.layers]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.token.copy_(model(self.token, cache=self.cache, use_cache=True).logits[:, -1:].argmax(-1))
        self.new_tokens = new_tokens
        self.keep: Any = None  # modules whose buffers the graph reads, kept alive with it

    def seconds(self, device: torch.device) -> float:
        for layer, start in zip(self.cache.layers, self.start):
            layer.cumulative_length.copy_(start)
        return wall(device, lambda: [self.graph.replay() for _ in range(self.new_tokens)])


def decode_section(model: nn.Module, args: argparse.Namespace, device: torch.device, bandwidth: float) -> None:
    import actscope
    from actscope.sparse import calibrate

    volume = bytes_per_token(model)
    total = sum(volume.values())
    f = {"teal-7": (volume["attention"] + volume["mlp"]) / total, "sparsify": volume["mlp"] / total}
    g = torch.Generator(device=device).manual_seed(2)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_tokens), generator=g, device=device)
    calibration = torch.randint(0, args.vocab, (1, 256), generator=g, device=device)
    print(f"\n== 3. decoding, batch 1: {args.new_tokens} greedy tokens after a {args.prompt_tokens}-token prompt ==")
    print("bytes read per token (MB): " + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in volume.items())
          + f"; total {total / 1e6:.0f}; physical bound at {bandwidth:.0f} GB/s: {total / bandwidth / 1e6:.3f} ms/token")
    print(f"f (skippable / all bytes): teal-7 {f['teal-7']:.3f} (q k v o gate up down), "
          f"sparsify {f['sparsify']:.3f} (the MLP); bound 1 / (1 - f s)")
    wrapped = actscope.wrap(model)
    runs: dict[tuple, Callable[[], float]] = {("dense", "eager", 0.0): lambda: eager_decode(model, prompt, args.new_tokens, device)}
    measured: dict[tuple, float] = {}
    graphs: dict[tuple, Any] = {}
    skipped: list[str] = []
    try_graph(graphs, skipped, ("dense", "graph", 0.0), model, prompt, args, device, None)
    for s in args.sparsities:
        thresholds = teal_thresholds(model, calibration, s)
        measured[("teal-7", s)] = teal_sparsity(model, thresholds, prompt, device)
        runs[("teal-7", "eager", s)] = lambda t=thresholds: _swapped(model, t, lambda: eager_decode(model, prompt, args.new_tokens, device))
        try_graph(graphs, skipped, ("teal-7", "graph", s), model, prompt, args, device, thresholds)
        try:
            cal = calibrate(wrapped, [{"input_ids": calibration}], method="teal", sparsity=s)
        except Exception as error:  # noqa: BLE001 - say why and go on with the other rows
            skipped.append(f"sparsify s={s}: calibrate failed: {type(error).__name__}: {error}"[:300])
            continue
        measured[("sparsify", s)] = sparsify_sparsity(model, wrapped, cal, prompt, device)
        runs[("sparsify", "eager", s)] = lambda c=cal: _sparsified(model, wrapped, c, prompt, args.new_tokens, device)
    for key, decoder in graphs.items():
        runs[key] = lambda d=decoder: d.seconds(device)
    times = interleave(runs, args.repeats)
    report_decode(times, measured, f, total, bandwidth, args.new_tokens)
    for line in skipped:
        print(f"  not measured: {line}")


def try_graph(graphs: dict, skipped: list, key: tuple, model, prompt, args, device, thresholds) -> None:
    """A GraphDecoder for ``key`` (dense, or captured through the TEAL swap), or the reason why not."""
    if device.type != "cuda":
        skipped.append(f"{key[0]} graph: CUDA graphs need a GPU")
        return
    try:
        if thresholds is None:
            graphs[key] = GraphDecoder(model, prompt, args.new_tokens)
            return
        with teal_swap(model, thresholds) as layers:
            decoder = GraphDecoder(model, prompt, args.new_tokens)
        decoder.keep = layers  # the graph replays their kernels on their weights, whatever the model holds now
        graphs[key] = decoder
    except Exception as error:  # noqa: BLE001 - capture fails on a forward that synchronises
        skipped.append(f"{key[0]} s={key[2]} CUDA graph: {type(error).__name__}: {error}"[:300])


def _swapped(model, thresholds, run):
    with teal_swap(model, thresholds):
        return run()


def _sparsified(model, wrapped, cal, prompt, new_tokens, device):
    from actscope.sparse import sparsify

    with sparsify(wrapped, cal, check_weights=False) as handle:
        return eager_decode(model, prompt, new_tokens, device, after_prefill=handle.reset)


def teal_sparsity(model, thresholds, prompt, device) -> float:
    """Share of the block projections' bytes not read over a few decoding steps (untimed)."""
    with teal_swap(model, thresholds) as layers:
        for layer in layers:
            layer.counting = True
        eager_decode(model, prompt, 8, device)
        read = sum(m.active / max(m.seen, 1) * m.w_t.numel() for m in layers)
        return 1 - read / sum(m.w_t.numel() for m in layers)


def sparsify_sparsity(model, wrapped, cal, prompt, device) -> float:
    """Share of the MLP's bytes not read while decoding, from sparsify's own tally (untimed)."""
    from actscope.sparse import sparsify

    with sparsify(wrapped, cal, check_weights=False) as handle:
        eager_decode(model, prompt, 8, device, after_prefill=handle.reset)
        read = handle.realised().read  # [layers] share of the MLP's weights read
    return 1 - float(sum(read)) / len(read)


def interleave(runs: dict, repeats: int) -> dict:
    """Seconds of each run, one warm-up each, then ``repeats`` rounds in a rotating order."""
    for run in runs.values():
        run()
    times = {key: [] for key in runs}
    keys = list(runs)
    for r in range(repeats):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            times[key].append(runs[key]())
    return times


def report_decode(times, measured, f, total, bandwidth, new_tokens) -> None:
    print(f"{'path':<9} {'mode':<6} {'target s':>8} {'measured s':>10} {'ms/token (p25..p75)':>24} {'tokens/s':>8} "
          f"{'speed-up':>8} {'bound':>6} {'of bound':>8} {'GB/s':>6} {'of bw':>6} {'target':>7}")
    for (path, mode, s), values in times.items():
        per_token = [v / new_tokens * 1e3 for v in values]
        dense = times.get(("dense", mode, 0.0))
        ms = statistics.median(per_token)
        if path == "dense" or dense is None:
            s_read, up, b, verdict = 0.0, None, None, ""
        else:
            s_read = measured[(path, s)]
            up = statistics.median(dense) / statistics.median(values)
            b = bound(f[path], s_read)
            goal = TARGET_SPEEDUP.get(round(s, 2))
            verdict = "" if goal is None or path != "teal-7" or DRY_RUN else ("met" if up >= goal else "missed")
        read_bytes = total * (1 - (f[path] * s_read if path != "dense" else 0.0))
        rate = read_bytes / (ms / 1e3) / 1e9
        cells = [f"{path:<9}", f"{mode:<6}", f"{s:8.2f}" if s else f"{'-':>8}",
                 f"{s_read:10.3f}" if path != "dense" else f"{'-':>10}", f"{spread(per_token):>24}", f"{1e3 / ms:8.1f}",
                 f"{up:8.2f}" if up else f"{'-':>8}", f"{b:6.2f}" if b else f"{'-':>6}",
                 f"{up / b:8.0%}" if up and b else f"{'-':>8}", f"{rate:6.0f}", f"{rate / bandwidth:6.0%}", f"{verdict:>7}"]
        print(" ".join(cells))
    print("targets (teal-7, TEAL's published figures): " + ", ".join(f">= {v}x at s = {k}" for k, v in TARGET_SPEEDUP.items())
          + "; speed-ups compare each path with dense in the same mode")


# ---- 4. kernels ----------------------------------------------------------------------------------

def kernels_section(model: nn.Module, device: torch.device) -> None:
    from actscope.sparse import kernels

    mlp = model.model.layers[0].mlp
    up, down_t = mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach().T.contiguous()
    units, d = up.shape
    index = torch.randperm(units, device=device)[: units // 2].sort().values
    from actscope.sparse import triton_rows

    kernel = "Triton" if device.type == "cuda" and triton_rows.enabled() else "C or torch (no GPU/Triton)"
    print(f"\n== 4. kernels: one [{units}, {d}] matrix ({up.dtype}), half its rows, by token count (ms, median of 20) ==")
    print(f"kernel = actscope.sparse.kernels' dispatch, here {kernel}; gather = index_select + matmul (the reference)")
    print(f"{'tokens':>6} {'dot kernel':>10} {'dot gather':>10} {'axpy kernel':>11} {'axpy gather':>11}")
    saved, kernels.MAX_TRITON_TOKENS = kernels.MAX_TRITON_TOKENS, 64
    try:
        for n in (1, 2, 4, 8, 16, 32, 64):
            x = torch.randn(n, d, device=device, dtype=up.dtype)
            h = torch.randn(n, index.numel(), device=device, dtype=up.dtype)
            row = [event_ms(device, lambda: kernels.dot_rows(x, up, index)),
                   event_ms(device, lambda: kernels.reference_dot_rows(x, up, index)),
                   event_ms(device, lambda: kernels.axpy_rows(h, down_t, index)),
                   event_ms(device, lambda: kernels.reference_axpy_rows(h, down_t, index))]
            print(f"{n:6d} {row[0]:10.4f} {row[1]:10.4f} {row[2]:11.4f} {row[3]:11.4f}")
    finally:
        kernels.MAX_TRITON_TOKENS = saved
    w = mlp.down_proj.weight.detach()  # [d, units]
    w_t = w.T.contiguous()
    x = torch.randn(1, units, device=device, dtype=w.dtype)
    t = x.float().abs().median()
    dense = event_ms(device, lambda: F.linear(x, w))
    sparse = event_ms(device, lambda: kernels.threshold_axpy_rows(x, w_t, t))
    error = (kernels.threshold_axpy_rows(x, w_t, t).float() - kernels.reference_threshold_axpy_rows(x, w_t, t).float()).abs().max()
    gb = w.numel() * w.element_size() / 1e9
    print(f"threshold_axpy_rows, 1 token, s = 0.5 of [{units}] inputs: {sparse:.4f} ms against F.linear {dense:.4f} ms "
          f"({dense / sparse:.2f}x, bound 2.00x; dense reads {gb / (dense / 1e3):.0f} GB/s); max |difference| "
          f"from the reference {float(error):.3g}")


# ---- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    global DRY_RUN
    args = parse_args(argv)
    device = require_cuda(args)
    DRY_RUN = args.cpu_dry_run
    import actscope  # noqa: F401 - fail here, not mid-run, if the package is not importable

    try:
        import triton
        triton_version = triton.__version__
    except Exception as error:  # noqa: BLE001
        triton_version = f"not importable ({type(error).__name__}): the Triton rows fall back to torch"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: no GPU figures)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {triton_version}; "
          f"load average {load:.1f}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.0f} GiB")
    model = build_model(args, device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: Llama shape, random init, {next(model.parameters()).dtype}, hidden {args.hidden}, intermediate "
          f"{args.intermediate}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}"
          f"{' tied' if args.tie else ''}: {params / 1e9:.2f}B parameters")
    failed = []
    bandwidth = run_section("bandwidth", failed, lambda: bandwidth_section(device, args.cpu_dry_run)) or float("nan")
    if not args.skip_profile:
        run_section("profiling overhead", failed, lambda: profile_section(model, args, device))
    if not args.skip_decode:
        run_section("decoding", failed, lambda: decode_section(model, args, device, bandwidth))
    if not args.skip_kernels:
        run_section("kernels", failed, lambda: kernels_section(model, device))
    print(f"\ndone; sections that failed: {', '.join(failed)}" if failed else "\ndone")
    return 1 if failed else 0


def run_section(name: str, failed: list[str], run: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    try:
        out = run()
    except Exception:  # noqa: BLE001 - one failing section must not hide the others
        failed.append(name)
        print(f"\n!! section '{name}' failed:\n{traceback.format_exc(limit=6)}")
        return None
    print(f"({name}: {time.perf_counter() - start:.0f} s)")
    return out


if __name__ == "__main__":
    sys.exit(main())
