"""Profiling overhead of actscope, side by side with a bare forward and with peer tools.

Run from the repository root:

    .venv/bin/python benchmarks/profile_overhead.py --quick     # ~1 minute on 2 idle cores, actscope only
    .venv/bin/python benchmarks/profile_overhead.py             # full run, ~5 minutes idle (far longer when shared)
    .venv-bench/bin/python benchmarks/profile_overhead.py       # adds TransformerLens and nnsight

What it measures (recorded results: docs/benchmarks.md):

1. Throughput. Two models: the embedded MiniLM (BERT, 6 x 1536 MLP units), fed the built-in
   corpus packed into full 128-token rows (a new shuffle of its documents for every few
   batches, so the activations keep changing), and a GPT-2-small-shaped ``GPT2LMHeadModel``
   (``GPT2Config()`` defaults, random init, seed 0; 12 x 3072 units) fed random token ids.
   Batches are 8 x 128 = 1024 real tokens. Every method keeps its state over the whole stream
   (actscope holds one ``observe`` context open, as a user would), and each batch goes through
   every method before the next batch, in an order that rotates by one per batch. A method's
   overhead is the median over batches of (its time / its bare forward's time on that batch):
   the two passes of a pair ran seconds apart, so they share the machine's load. Methods that
   hook a model get their own copy of it (nnsight replaces module forwards, and hooks left
   open would otherwise slow the bare forward).
2. Peak memory of ``actscope.profile`` over 10k and over 200k tokens of MiniLM, each in a fresh
   subprocess: the kernel's resident-set high-water mark, which sees torch's native
   allocations (tracemalloc does not). It is read as ``VmHWM`` from /proc/self/status, reset
   after the model is loaded (``clear_refs``), so the peak is that of ``profile()``;
   ``getrusage(RUSAGE_SELF).ru_maxrss`` is printed too but is no use here: Linux carries the
   parent's high-water mark over fork + exec, so it reports the benchmark process's peak.
3. When actscope's overhead is above the 15 % target: a cProfile breakdown of two observed
   batches (top entries under actscope/ by cumulative time, and the functions outside
   actscope that actscope code calls, by own time).

Peers, when importable (else skipped with the reason): TransformerLens ``HookedTransformer``
(``run_with_hooks`` on ``blocks.{i}.mlp.hook_post``) and nnsight (``NNsight(model).trace``
saving the input of every ``mlp.c_proj``, statistics computed afterwards). Both compute the
same statistics with the float64 torch code a user would write (:class:`NaiveStats`); a
hand-written ``register_forward_pre_hook`` with that code is the "no library" reference.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import actscope  # noqa: E402
from actscope.sites import plan_sites  # noqa: E402
from actscope.stats.pages import PageConfig  # noqa: E402

SITES = "blocks.*.mlp.post"
EPS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
K = 8
TARGET_OVERHEAD = 0.15
TARGET_MEMORY_GROWTH = 0.05
SEQ = 128
BATCH = 8
MiB = 2**20


# --------------------------------------------------------------------------- data and models


def packed_rows(tokenizer: Any, n_rows: int, seed: int = 0) -> list[str]:
    """``n_rows`` texts of at least SEQ tokens each, made of built-in corpus documents.

    Each pass over the corpus uses a new (seeded) order of its documents, so rows beyond the
    first pass put documents in new contexts instead of repeating earlier rows.
    """
    from actscope.data import builtin_corpus

    docs = builtin_corpus().documents
    lengths = [len(ids) for ids in tokenizer(list(docs), add_special_tokens=False)["input_ids"]]
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rows: list[str] = []
    while len(rows) < n_rows:
        rng.shuffle(order)
        parts, count = [], 0
        for i in order:
            parts.append(docs[i])
            count += lengths[i]
            if count >= SEQ:
                rows.append(" ".join(parts))
                parts, count = [], 0
                if len(rows) == n_rows:
                    break
    return rows


def minilm_batches(tokenizer: Any, n_batches: int) -> list[dict[str, torch.Tensor]]:
    rows = packed_rows(tokenizer, n_batches * BATCH)
    enc = tokenizer(rows, truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")
    batches = [{k: v[i:i + BATCH].clone() for k, v in enc.items()} for i in range(0, len(rows), BATCH)]
    assert all(int(b["attention_mask"].sum()) == BATCH * SEQ for b in batches), "packed rows must be full"
    return batches


def gpt2_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval()


def gpt2_batches(n_batches: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ones = torch.ones(BATCH, SEQ, dtype=torch.int64)
    return [{"input_ids": torch.randint(0, vocab, (BATCH, SEQ), generator=g), "attention_mask": ones.clone()} for _ in range(n_batches)]


# --------------------------------------------------------------------------- the user's statistics


class NaiveStats:
    """The per-unit statistics actscope keeps, written as a user would, in float64 torch ops:
    count, mean, variance (from sum and sum of squares), min, max, frac > 0, frac |a| > eps
    for the 5 thresholds, and the top-k values per unit with their token index."""

    def __init__(self, units: int, k: int = K, eps: tuple[float, ...] = EPS):
        f64 = torch.float64
        self.units, self.k, self.eps = units, k, eps
        self.n = 0
        self.sum = torch.zeros(units, dtype=f64)
        self.sumsq = torch.zeros(units, dtype=f64)
        self.min = torch.full((units,), float("inf"), dtype=f64)
        self.max = torch.full((units,), float("-inf"), dtype=f64)
        self.pos = torch.zeros(units, dtype=torch.int64)
        self.gt = torch.zeros(len(eps), units, dtype=torch.int64)
        self.top_v = torch.full((k, units), float("-inf"), dtype=f64)
        self.top_i = torch.full((k, units), -1, dtype=torch.int64)

    def update(self, act: torch.Tensor) -> None:
        x = act.detach().reshape(-1, self.units).double()
        ids = torch.arange(self.n, self.n + x.shape[0])
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        self.min = torch.minimum(self.min, x.amin(0))
        self.max = torch.maximum(self.max, x.amax(0))
        self.pos += (x > 0).sum(0)
        a = x.abs()
        for j, e in enumerate(self.eps):
            self.gt[j] += (a > e).sum(0)
        values = torch.cat([self.top_v, x])
        index = torch.cat([self.top_i, ids[:, None].expand(-1, self.units)])
        self.top_v, rows = values.topk(self.k, dim=0)
        self.top_i = index.gather(0, rows)

    def result(self) -> dict[str, torch.Tensor]:
        mean = self.sum / self.n
        return {
            "mean": mean, "var": self.sumsq / self.n - mean * mean, "min": self.min, "max": self.max,
            "frac_pos": self.pos.double() / self.n, "frac_abs_gt": self.gt.double() / self.n, "top": self.top_v.T,
        }


def actscope_result(stats: Any) -> dict[str, torch.Tensor]:
    m, ladder = stats.moments, stats.ladder
    return {
        "mean": m.mean, "var": m.var, "min": m.min, "max": m.max,
        "frac_pos": ladder.frac_pos, "frac_abs_gt": ladder.frac_abs_gt, "top": stats.top.values,
    }


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """Max abs difference per statistic (relative to the largest |value| for the moments)."""
    parts = []
    for key in a:
        x, y = a[key].double(), b[key].double()
        scale = 1.0 if key.startswith("frac") else max(float(x.abs().max()), 1e-12)
        parts.append(f"{key} {float((x - y).abs().max()) / scale:.0e}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- methods


class Method:
    """One way of running the stream: ``step(batch)`` per batch, state kept across batches."""

    baseline: str | None = None

    def __init__(self, name: str, baseline: str | None = None):
        self.name, self.baseline = name, baseline
        self.times: list[float] = []

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def layer0(self) -> dict[str, torch.Tensor] | None:
        return None

    def close(self) -> None:
        pass


class Bare(Method):
    def __init__(self, name: str, module: Callable):
        super().__init__(name)
        self.module = module

    def step(self, batch):
        with torch.no_grad():
            self.module(**batch)


class Observe(Method):
    """``with actscope.observe(model, "blocks.*.mlp.post") as obs:`` held open over the stream."""

    def __init__(self, name: str, baseline: str, model: Any, fused: bool = True, pages: bool = False):
        super().__init__(name, baseline)
        self.model, self.fused = model, fused
        # pages: also what the unit pages keep (windows, samples, co-firing bits), as profile() does by default
        self.context = actscope.observe(model, SITES, k=K, eps=EPS, pages=PageConfig() if pages else None)
        self.observer = self.context.__enter__()

    def step(self, batch):
        before = os.environ.get("ACTSCOPE_FUSED")
        if not self.fused:
            os.environ["ACTSCOPE_FUSED"] = "0"  # the pure-torch statistics, read per update
        try:
            with torch.no_grad():
                self.model(**batch)
        finally:
            if not self.fused:
                if before is None:
                    del os.environ["ACTSCOPE_FUSED"]
                else:
                    os.environ["ACTSCOPE_FUSED"] = before

    def layer0(self):
        return actscope_result(self.observer.stats["blocks.0.mlp.post"])

    def close(self):
        self.context.__exit__(None, None, None)


class HandHooks(Method):
    """``register_forward_pre_hook`` on each MLP output projection + NaiveStats: no library."""

    def __init__(self, name: str, baseline: str, module: torch.nn.Module, paths: list[str], units: int):
        super().__init__(name, baseline)
        self.module = module
        self.stats = [NaiveStats(units) for _ in paths]
        self.handles = []
        for path, st in zip(paths, self.stats):
            def hook(mod, args, st=st):
                st.update(args[0])

            self.handles.append(module.get_submodule(path).register_forward_pre_hook(hook))

    def step(self, batch):
        with torch.no_grad():
            self.module(**batch)

    def layer0(self):
        return self.stats[0].result()

    def close(self):
        for h in self.handles:
            h.remove()


def peer_nnsight(hf: torch.nn.Module, baseline: str) -> tuple[list[Method], str]:
    try:
        import nnsight
        from nnsight import NNsight
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip, and say why
        return [], f"nnsight skipped: {type(exc).__name__}: {exc}"
    wrapped = NNsight(copy.deepcopy(hf))  # nnsight replaces the modules' forward: own copy
    layers = hf.config.n_layer
    units = hf.config.n_inner or 4 * hf.config.n_embd

    class Traced(Method):
        def __init__(self):
            super().__init__("nnsight trace+save, stats after", baseline)
            self.stats = [NaiveStats(units) for _ in range(layers)]

        def step(self, batch):
            with torch.no_grad():
                with wrapped.trace(**batch):
                    saved = nnsight.save(list())
                    for i in range(layers):
                        saved.append(wrapped.transformer.h[i].mlp.c_proj.input)
                for st, act in zip(self.stats, saved):
                    st.update(act)

        def layer0(self):
            return self.stats[0].result()

    return [Traced()], f"nnsight {nnsight.__version__}: NNsight(copy of the HF model).trace"


def peer_transformer_lens(hf: torch.nn.Module) -> tuple[list[Method], str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformer_lens import HookedTransformer, HookedTransformerConfig
    except Exception as exc:  # noqa: BLE001 - ImportError, or 4.x's "HookedTransformer was removed"
        return [], f"TransformerLens skipped: {type(exc).__name__}: {exc}"
    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, d_mlp=3072, n_heads=12, d_head=64, d_vocab=50257, n_ctx=1024,
        act_fn="gelu_new", normalization_type="LN", seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = HookedTransformer(cfg)
    note = "own random init (seed 0)"
    try:  # the HF model's random weights, unprocessed, so every tool observes the same network
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

        tl.load_and_process_state_dict(
            convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
            center_unembed=False, fold_value_biases=False,
        )
        note = "weights copied from the HF model, unprocessed"
    except Exception as exc:  # noqa: BLE001 - keep TL's own random init, and say so
        note += f"; weight copy failed: {type(exc).__name__}: {exc}"
    tl.eval()

    class TLBare(Method):
        def step(self, batch):
            with torch.no_grad():
                tl(batch["input_ids"])

    class TLHooked(Method):
        def __init__(self):
            super().__init__("TL run_with_hooks + stats", "TL bare forward")
            self.stats = [NaiveStats(cfg.d_mlp) for _ in range(cfg.n_layers)]

            def make(st):
                def hook(act, hook):
                    st.update(act)

                return hook

            self.hooks = [(f"blocks.{i}.mlp.hook_post", make(st)) for i, st in enumerate(self.stats)]

        def step(self, batch):
            with torch.no_grad():
                tl.run_with_hooks(batch["input_ids"], fwd_hooks=self.hooks)

        def layer0(self):
            return self.stats[0].result()

    return [TLBare("TL bare forward"), TLHooked()], f"transformer-lens {_dist_version('transformer-lens')}: HookedTransformer, {note}"


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _has_fused() -> bool:
    try:
        from actscope.stats import fused
    except ImportError:
        return False
    return fused.enabled()


# --------------------------------------------------------------------------- timing and reports


def measure(methods: list[Method], batches: list[dict], log: Callable[[str], None]) -> None:
    """Batch 0 warms every method up (untimed); then each batch runs through every method,
    the order rotating by one per batch."""
    for m in methods:
        m.step(batches[0])
    for j, batch in enumerate(batches[1:]):
        shift = j % len(methods)
        for m in methods[shift:] + methods[:shift]:
            gc.collect()
            start = time.perf_counter()
            m.step(batch)
            m.times.append(time.perf_counter() - start)
        log(f"  batch {j + 1}/{len(batches) - 1}: " + ", ".join(f"{m.name} {m.times[-1]:.2f}s" for m in methods))


def paired(methods: list[Method], m: Method) -> list[float] | None:
    base = next((b for b in methods if b.name == m.baseline), None)
    return None if base is None else sorted(a / b for a, b in zip(m.times, base.times))


def overhead(methods: list[Method], name: str) -> float | None:
    m = next((m for m in methods if m.name == name), None)
    ratios = paired(methods, m) if m is not None else None
    return None if not ratios else statistics.median(ratios) - 1


def report(title: str, methods: list[Method], anchor: str) -> list[str]:
    tokens = BATCH * SEQ
    ref = statistics.median(next(m for m in methods if m.name == anchor).times)
    lines = [title, f"{'method':<34} {'s/batch':>7} {'tokens/s':>8} {'overhead':>8} {'(p25..p75)':>15} {'x actscope':>10}"]
    for m in methods:
        med = statistics.median(m.times)
        ratios = paired(methods, m)
        if ratios:
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            over, spread = f"{statistics.median(ratios) - 1:+.1%}", f"{q[0] - 1:+.0%}..{q[2] - 1:+.0%}"
        else:
            over, spread = "-", ""
        lines.append(f"{m.name:<34} {med:>7.2f} {tokens / med:>8.0f} {over:>8} {spread:>15} {med / ref:>10.2f}")
    return lines


def cprofile_breakdown(step: Callable[[dict], None], batches: list[dict], top: int = 15) -> list[str]:
    import cProfile
    import pstats

    gc.collect()
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for b in batches:
        step(b)
    prof.disable()
    wall = time.perf_counter() - start
    raw = pstats.Stats(prof).stats

    def ours(file: str) -> bool:
        return "/actscope/" in file.replace("\\", "/")

    rows = sorted(
        ((ct, tt, nc, f"{file.replace(chr(92), '/').split('/actscope/', 1)[1]}:{line}({func})")
         for (file, line, func), (_cc, nc, tt, ct, _callers) in raw.items() if ours(file)),
        reverse=True,
    )
    out = [f"cProfile of {len(batches)} observed batches: {wall:.2f}s wall under the profiler",
           f"  top {top} entries under actscope/ by cumulative time:",
           f"  {'cum s':>7} {'%wall':>6} {'own s':>7} {'calls':>6}  function"]
    out += [f"  {ct:>7.3f} {ct / wall:>6.1%} {tt:>7.3f} {nc:>6}  {name}" for ct, tt, nc, name in rows[:top]]
    called: dict[str, list[float]] = {}
    for (file, _line, func), (*_, callers) in raw.items():
        if ours(file):
            continue
        for (cfile, _cl, _cf), (_ccc, cnc, ctt, _cct) in callers.items():
            if ours(cfile):
                entry = called.setdefault(func, [0.0, 0])
                entry[0] += ctt
                entry[1] += cnc
    out.append("  top 8 functions outside actscope/ called from actscope/, by own time (operators such as")
    out.append("  x[mask] or a == b are not function calls for cProfile and count as the caller's own time):")
    out += [f"  {tt:>7.3f} {tt / wall:>6.1%} {'':>7} {nc:>6}  {func}"
            for func, (tt, nc) in sorted(called.items(), key=lambda kv: -kv[1][0])[:8]]
    return out


# --------------------------------------------------------------------------- memory


def memory_worker(tokens: int, corpus_tokens: int) -> None:
    """Child process: ``actscope.profile`` of MiniLM over ``tokens`` tokens; one JSON line out."""
    model = actscope.load()
    rows = packed_rows(model.tokenizer, corpus_tokens // SEQ + 1)  # the same list in every child
    samples: list[tuple[int, int]] = []
    seen = [0]
    step = max(tokens // 10, 1)

    def progress(_documents: int, count: int) -> None:
        before = seen[0]
        seen[0] += count
        if seen[0] // step != before // step:
            samples.append((seen[0], current_rss()))

    gc.collect()
    rss_loaded, peak_loaded = current_rss(), vm_hwm()
    reset = reset_peak()  # from here on VmHWM is the peak of profile() (model weights included)
    start = time.perf_counter()
    run = actscope.profile(model, rows, sites=SITES, max_tokens=tokens, batch_size=BATCH, max_length=SEQ, k=K, eps=EPS, progress=progress)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "tokens": run.manifest["data"]["tokens"], "seconds": seconds, "rss_loaded": rss_loaded, "peak_loaded": peak_loaded,
        "reset": reset, "peak": vm_hwm(), "ru_maxrss": ru_maxrss(), "rss_end": current_rss(), "samples": samples,
    }))


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_hwm() -> int:
    """The resident-set high-water mark of this process's address space (bytes)."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_test(counts: list[int], log: Callable[[str], None]) -> tuple[list[str], float]:
    results = []
    for tokens in counts:
        log(f"memory: fresh process, actscope.profile of MiniLM over {tokens} tokens")
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--memory-worker", str(tokens), "--corpus-tokens", str(max(counts))],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"memory worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    reset = all(r["reset"] for r in results)
    lines = [
        "Peak memory, actscope.profile(MiniLM, built-in corpus rows, blocks.*.mlp.post, batch 8 x 128), fresh process per row",
        "(MiB; 'loaded': RSS after actscope.load(), before profile(); 'load peak': VmHWM then; 'peak': VmHWM "
        + ("reset after loading, so the peak of profile() itself, weights included" if reset else "(could not be reset: includes loading)") + ";",
        " 'ru_maxrss': getrusage, inherited from the parent over fork+exec, not used)",
        f"{'tokens':>8} {'seconds':>7} {'tok/s':>5} {'loaded':>6} {'load peak':>9} {'peak':>5} {'peak-loaded':>11} {'RSS end':>7} {'ru_maxrss':>9}",
    ]
    for r in results:
        lines.append(
            f"{r['tokens']:>8} {r['seconds']:>7.1f} {r['tokens'] / r['seconds']:>5.0f} {r['rss_loaded'] / MiB:>6.0f}"
            f" {r['peak_loaded'] / MiB:>9.0f} {r['peak'] / MiB:>5.0f} {(r['peak'] - r['rss_loaded']) / MiB:>11.0f}"
            f" {r['rss_end'] / MiB:>7.0f} {r['ru_maxrss'] / MiB:>9.0f}"
        )
    small, large = results[0], results[-1]
    growth = large["peak"] / small["peak"] - 1
    above = (large["peak"] - large["rss_loaded"]) / max(small["peak"] - small["rss_loaded"], 1) - 1
    lines.append(f"peak RSS growth {small['tokens']} -> {large['tokens']} tokens: {growth:+.1%} (target <= {TARGET_MEMORY_GROWTH:.0%}); "
                 f"of the part above the loaded model: {above:+.1%}")
    if large["samples"]:
        trail = ", ".join(f"{t // 1000}k {rss / MiB:.0f}" for t, rss in large["samples"])
        lines.append(f"RSS during the {large['tokens']}-token run (tokens MiB): {trail}")
    return lines, growth


# --------------------------------------------------------------------------- main


def machine() -> list[str]:
    import transformers

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=here).stdout.strip()
    except OSError:
        commit = "?"
    stats = "C kernel" if _has_fused() else "pure torch"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"machine: {os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, shared (load average at start {os.getloadavg()[0]:.2f})",
        f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, actscope {_dist_version('actscope')} (git {commit or '?'}, statistics: {stats})",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="Profiling overhead of actscope vs a bare forward and peer tools.")
    parser.add_argument("--quick", action="store_true", help="fewer batches, small memory test (~2 minutes without peers)")
    parser.add_argument("--batches", type=int, help="timed batches per model (default 24 MiniLM / 12 GPT-2; --quick 6 / 3)")
    parser.add_argument("--skip-gpt2", action="store_true")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-tokens", type=int, nargs=2, metavar=("SMALL", "LARGE"), help="default 10000 200000; --quick 2000 20000")
    parser.add_argument("--cprofile", choices=("auto", "always", "never"), default="auto", help="auto: when over the target")
    parser.add_argument("--memory-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--corpus-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.corpus_tokens)
        return

    warnings.filterwarnings("ignore")
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    command = f"$ {os.path.relpath(sys.executable)} benchmarks/profile_overhead.py {' '.join(sys.argv[1:])}".rstrip()
    out = [command, *machine()]
    summary: list[str] = []
    hot: list[tuple[str, float, Method, list[dict]]] = []
    torch_path = _has_fused() and not args.quick
    n_minilm = (args.batches or (6 if args.quick else 24)) + 1
    n_gpt2 = (args.batches or (3 if args.quick else 12)) + 1
    extra = 2  # batches for the cProfile breakdown, never seen by the timed methods

    # ---- MiniLM
    log("MiniLM: loading")
    minilm = actscope.load()
    batches = minilm_batches(minilm.tokenizer, n_minilm + extra)
    batches, spare = batches[:n_minilm], batches[n_minilm:]
    paths = [s.path for s in plan_sites(minilm, SITES).sites]
    units = minilm.module.config.intermediate_size

    def copy_of(model):
        return actscope.wrap(copy.deepcopy(model.module), model.tokenizer)

    methods: list[Method] = [Bare("bare forward", minilm), Observe("actscope.observe", "bare forward", copy_of(minilm)),
                             Observe("actscope.observe + unit pages", "bare forward", copy_of(minilm), pages=True)]
    if torch_path:
        methods.append(Observe("actscope.observe, torch path", "bare forward", copy_of(minilm), fused=False))
    methods.append(HandHooks("hand hooks + naive f64 stats", "bare forward", copy.deepcopy(minilm.module), paths, units))
    log(f"MiniLM: {len(batches) - 1} timed batches of {BATCH} x {SEQ} tokens, {len(methods)} methods")
    measure(methods, batches, log)
    out += [""] + report(
        f"MiniLM (all-MiniLM-L6-v2, 6 x {units} units, built-in corpus), {len(batches) - 1} batches of {BATCH} x {SEQ} tokens, "
        "median per batch", methods, "actscope.observe")
    out.append(f"check vs actscope, layer 0, after {len(batches)} batches:")
    out += [f"  {m.name}: {compare(methods[1].layer0(), m.layer0())}" for m in methods[2:] if m.layer0() is not None]
    ov = overhead(methods, "actscope.observe")
    minilm_bare = BATCH * SEQ / statistics.median(methods[0].times)
    summary.append(f"MiniLM  actscope.observe overhead {ov:+.1%} (target <= {TARGET_OVERHEAD:.0%}): {'OK' if ov <= TARGET_OVERHEAD else 'OVER TARGET'}")
    hot.append(("MiniLM", ov, methods[1], spare))
    for m in methods[2:]:
        summary.append(f"MiniLM  {m.name} overhead {overhead(methods, m.name):+.1%}")
    for m in methods:
        if m is not methods[1]:
            m.close()

    # ---- GPT-2 small shape
    if not args.skip_gpt2:
        log("GPT-2: GPT2LMHeadModel(GPT2Config()), random init, seed 0")
        hf = gpt2_model()
        wrapped = actscope.wrap(hf)
        batches = gpt2_batches(n_gpt2 + extra, hf.config.vocab_size)
        batches, spare = batches[:n_gpt2], batches[n_gpt2:]
        units = hf.config.n_inner or 4 * hf.config.n_embd
        paths = [s.path for s in plan_sites(wrapped, SITES).sites]
        methods = [Bare("HF bare forward", hf), Observe("actscope.observe", "HF bare forward", actscope.wrap(copy.deepcopy(hf))),
                   Observe("actscope.observe + unit pages", "HF bare forward", actscope.wrap(copy.deepcopy(hf)), pages=True)]
        if torch_path:
            methods.append(Observe("actscope.observe, torch path", "HF bare forward", actscope.wrap(copy.deepcopy(hf)), fused=False))
        methods.append(HandHooks("hand hooks + naive f64 stats", "HF bare forward", copy.deepcopy(hf), paths, units))
        notes = []
        if args.skip_peers:
            notes.append("peers skipped (--skip-peers)")
        else:
            for found, note in (peer_nnsight(hf, "HF bare forward"), peer_transformer_lens(hf)):
                methods += found
                notes.append(note)
                log(note)
        log(f"GPT-2: {len(batches) - 1} timed batches of {BATCH} x {SEQ} tokens, {len(methods)} methods")
        measure(methods, batches, log)
        out += [""] + report(
            f"GPT-2 small shape (GPT2Config(): 12 x {units} units, random init seed 0, random ids), {len(batches) - 1} batches "
            f"of {BATCH} x {SEQ} tokens, median per batch", methods, "actscope.observe")
        out += [f"peer: {n}" for n in notes]
        out.append(f"check vs actscope, layer 0, after {len(batches)} batches:")
        out += [f"  {m.name}: {compare(methods[1].layer0(), m.layer0())}" for m in methods[2:] if m.layer0() is not None]
        ov = overhead(methods, "actscope.observe")
        summary.append(f"GPT-2   actscope.observe overhead {ov:+.1%} (target <= {TARGET_OVERHEAD:.0%}): {'OK' if ov <= TARGET_OVERHEAD else 'OVER TARGET'}")
        for m in methods[2:]:
            if m.baseline:
                summary.append(f"GPT-2   {m.name} overhead {overhead(methods, m.name):+.1%}")
        hot.append(("GPT-2", ov, methods[1], spare))
        for m in methods:
            if m is not methods[1]:
                m.close()

    # ---- memory
    if not args.skip_memory:
        counts = list(args.memory_tokens or ([2_000, 20_000] if args.quick else [10_000, 200_000]))
        lines, growth = memory_test(counts, log)
        out += [""] + lines + [f"(for scale: bare MiniLM forward in the throughput test above: {minilm_bare:.0f} tokens/s)"]
        summary.append(f"MiniLM  peak RSS growth {counts[0] // 1000}k -> {counts[1] // 1000}k tokens {growth:+.1%} "
                       f"(target <= {TARGET_MEMORY_GROWTH:.0%}): {'OK' if growth <= TARGET_MEMORY_GROWTH else 'OVER TARGET'}")

    # ---- where the time goes
    for name, ov, method, spare in hot:
        if args.cprofile == "always" or (args.cprofile == "auto" and ov > TARGET_OVERHEAD):
            log(f"{name}: cProfile of actscope.observe")
            out += ["", f"[{name}: actscope.observe overhead {ov:+.1%}, target {TARGET_OVERHEAD:.0%}]", *cprofile_breakdown(method.step, spare)]
        method.close()

    out += ["", "Summary", *summary, f"load average at end {os.getloadavg()[0]:.2f}; total {time.perf_counter() - started:.0f}s"]
    print("\n".join(out))


if __name__ == "__main__":
    main()
