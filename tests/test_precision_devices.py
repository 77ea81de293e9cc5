"""Precision, devices, offloaded and quantised models (issue 12, items 2-4).

* Low precision: bf16/fp16 models are observed in their own dtype, and every statistic equals a
  float64 reference computed here from the same bf16/fp16 tensors (counts, histograms, firing
  and top-k exactly, moments to 1e-9), on the C kernel's path and the torch path; the torch
  path's float32 work (what it does off the CPU) stays exact for counts and within its proven
  bound for sums and moments.
* Devices: with pretend CUDA devices (``fake_cuda.py``: tensors that say ``cuda:N``, compute on
  the CPU and refuse what CUDA refuses), statistics stay where the activations are and every
  API gives what it gives on the CPU, on one GPU and on a model split over two by accelerate.
  The ``cuda``-marked tests do the same on a real GPU.
* Offloaded models (accelerate: weights on disk, on the meta device until their module runs) and
  quantised ones (optimum-quanto int8 weights) are profiled, edited, patched, decoded and hashed
  like the same weights in memory; sparse execution refuses them, saying why.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import actscope
from actscope.stats import AbsHistogram, HeadSink, SiteStats, ThresholdLadder, TopExamples, UnitMoments
from actscope.stats import _common
from actscope.zoo.tiny import tiny_model
from conftest import first_input_of

SITES = "blocks.*.mlp.post"
EPS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
K = 4
U_ROUNDOFF = 2.0**-24
GAMMA = (_common.BLOCK - 1) * U_ROUNDOFF / (1 - (_common.BLOCK - 1) * U_ROUNDOFF)

no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
cuda = [pytest.mark.cuda, no_cuda]


# -- helpers ----------------------------------------------------------------------------------
def padded(inputs: dict) -> dict:
    """The tiny model's inputs with the last two positions of row 1 padding."""
    mask = inputs["attention_mask"].clone()
    mask[1, -2:] = 0
    return {"input_ids": inputs["input_ids"], "attention_mask": mask}


@pytest.fixture(params=["fused", "torch"])
def stats_path(request, monkeypatch):
    """The C kernel (CPU float32/16/bf16 batches) or the pure-torch statistics."""
    from actscope.stats import fused

    if request.param == "fused" and fused.library() is None:
        pytest.skip("no C compiler: the fused kernel cannot be built here")
    monkeypatch.setenv("ACTSCOPE_FUSED", "1" if request.param == "fused" else "0")
    return request.param


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend CUDA devices; the Triton kernels (which need a real GPU) are switched off."""
    from fake_cuda import fake_cuda

    monkeypatch.setenv("ACTSCOPE_TRITON", "0")
    monkeypatch.setenv("ACTSCOPE_SPARSE_KERNEL", "0")
    return fake_cuda


def reference(x: torch.Tensor, eps=EPS, k=K, lo=1e-6, hi=1e4, bins_per_decade=8) -> dict:
    """Every statistic of ``x`` ``[N, U]`` (finite), naively in float64 numpy."""
    a = x.to(torch.float64).numpy()
    n, u = a.shape
    fired = [a > 0] + [np.abs(a) > e for e in eps]  # [C] x [N, U]
    edges = lo * 10 ** (np.arange(round(bins_per_decade * math.log10(hi / lo)) + 1) / bins_per_decade)
    edges[0], edges[-1] = lo, hi
    v = np.abs(a).reshape(-1)
    return {
        "count": np.full(u, n), "mean": a.mean(0), "var": a.var(0), "min": a.min(0), "max": a.max(0),
        "fired": np.stack([f.sum(0) for f in fired]),
        "firing_hist": np.stack([np.bincount(f.sum(1), minlength=u + 1) for f in fired]),
        "zero": int((v == 0).sum()), "underflow": int(((v > 0) & (v < lo)).sum()), "overflow": int((v >= hi).sum()),
        "counts": np.histogram(v[(v >= lo) & (v < hi)], bins=edges)[0],
        "top": -np.sort(-a, axis=0)[:k].T,  # [U, k] descending
    }


def assert_site_stats(stats: SiteStats, ref: dict, rtol: float | None = 1e-9) -> None:
    """Counts, firing, histogram and top-k exactly; moments to rtol (of the spread; None: not
    checked here)."""
    m, ladder, hist = stats.moments, stats.ladder, stats.hist
    np.testing.assert_array_equal(m.count.numpy(), ref["count"])
    np.testing.assert_array_equal(m.min.numpy(), ref["min"])
    np.testing.assert_array_equal(m.max.numpy(), ref["max"])
    if rtol is not None:
        scale = np.maximum(np.abs(ref["max"]), np.abs(ref["min"]))
        np.testing.assert_allclose(m.mean.numpy(), ref["mean"], rtol=rtol, atol=rtol * scale.max())
        np.testing.assert_allclose(m.var.numpy(), ref["var"], rtol=rtol, atol=rtol * (scale**2).max())
    np.testing.assert_array_equal(torch.cat([ladder.pos[None], ladder.abs_gt]).numpy(), ref["fired"])
    np.testing.assert_array_equal(ladder.firing_hist.numpy(), ref["firing_hist"])
    assert (hist.zero, hist.underflow, hist.overflow) == (ref["zero"], ref["underflow"], ref["overflow"])
    np.testing.assert_array_equal(hist.counts.numpy(), ref["counts"])
    np.testing.assert_array_equal(stats.top.values.numpy(), ref["top"])


def low_precision_model(dtype: torch.dtype):
    module, inputs = tiny_model("llama")
    return actscope.wrap(module.to(dtype).eval()), padded(inputs)


# -- item 2: precision --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_are_observed_in_their_dtype_and_match_a_float64_reference(dtype, stats_path):
    model, inputs = low_precision_model(dtype)
    halves = [{key: value[i:i + 1] for key, value in inputs.items()} for i in range(2)]  # two batches
    with torch.no_grad(), actscope.capture(model, SITES, flat=True) as captured, actscope.observe(model, SITES, k=K, eps=EPS) as observed:
        for batch in halves:
            model(**batch)
    run = actscope.profile(model, halves, sites=SITES, k=K, eps=EPS)
    neurons = run.neurons.to_pandas()
    for site in ("blocks.0.mlp.post", "blocks.1.mlp.post"):
        x = captured.tensor(site)  # [real tokens, units], as the model computed them
        assert x.dtype == dtype and x.shape[0] == 10  # 12 positions, 2 of them padding
        ref = reference(x)
        assert_site_stats(observed.stats[site], ref)
        rows = neurons[neurons.site == site]
        np.testing.assert_allclose(rows["mean"].to_numpy(), ref["mean"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(rows["std"].to_numpy(), np.sqrt(ref["var"]), rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(rows["max"].to_numpy(), ref["max"])
        np.testing.assert_array_equal(rows["frac_pos"].to_numpy(), ref["fired"][0] / 10)
        np.testing.assert_array_equal(rows["frac_abs_gt_0.01"].to_numpy(), ref["fired"][3] / 10)


def adversarial(dtype: torch.dtype, n: int = 4099, seed: int = 0) -> torch.Tensor:
    """``[n, 7]`` columns that stress float32 sums: a mean 10⁴ standard deviations from zero,
    cancelling signs, twelve decades of magnitude, exact zeros, values on histogram edges."""
    g = torch.Generator().manual_seed(seed)
    cols = [
        1000.0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64),
        torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double() * 3e3 + torch.randn(n, generator=g, dtype=torch.float64),
        torch.randn(n, generator=g, dtype=torch.float64) * 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 12 - 8),
        torch.randn(n, generator=g, dtype=torch.float64).clamp(min=0),
        torch.full((n,), 1e-2, dtype=torch.float64) * (torch.rand(n, generator=g) < 0.5),
        torch.randn(n, generator=g, dtype=torch.float64) * 1e-3,
        -torch.rand(n, generator=g, dtype=torch.float64) * 5e3,
    ]
    x = torch.stack(cols, 1).to(dtype)
    return x if dtype != torch.float16 else x.clamp(-6e4, 6e4)


def moment_bounds(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on the float32 path's errors in the mean and the variance (see
    ``moments._float32_moments``): m32 is the float32-rounded first-pass mean, off by at most
    δ = u|m| + γΣ|x|/n; the second pass sums d = x − m32 (each rounded by u) in column sums
    (error γ Σ|d|), so mean = m32 + Σd/n errs by at most E/n with E = (u + γ)(1 + u)Σ|d|, and
    M2 = Σd² − (Σd)²/n by (3u + γ)(1 + 3u)Σd² + (2nδE + E²)/n."""
    n = a.shape[0]
    m = a.mean(0)
    delta = U_ROUNDOFF * np.abs(m) + GAMMA * np.abs(a).sum(0) / n
    sum_abs_d = np.abs(a - m).sum(0) + n * delta
    e1 = (U_ROUNDOFF + GAMMA) * (1 + U_ROUNDOFF) * sum_abs_d
    m2 = ((a - m) ** 2).sum(0)
    d2 = m2 + n * delta**2
    mean_bound = e1 / n + 4e-16 * np.abs(m)
    m2_bound = (3 * U_ROUNDOFF + GAMMA) * (1 + 3 * U_ROUNDOFF) * d2 + (2 * n * delta * e1 + e1**2) / n + 1e-15 * m2
    return mean_bound, m2_bound / n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float32_work_off_the_cpu_is_exact_for_counts_and_within_its_bound_for_moments(dtype, monkeypatch):
    # What the torch path does on a GPU (float32 work, column sums in float32 blocks), here on
    # the CPU: counts, firing, histogram and top-k stay exact; moments meet the proven bound.
    monkeypatch.setenv("ACTSCOPE_FUSED", "0")
    monkeypatch.setattr(_common, "FLOAT64_DEVICES", ())
    x = adversarial(dtype)
    stats = SiteStats(x.shape[1], eps=EPS, k=K)
    for chunk, tok in zip(x.split(1000), torch.arange(x.shape[0]).split(1000)):
        stats.update(chunk, tok)
    ref = reference(x)
    assert_site_stats(stats, ref, rtol=None)  # exact parts only; the moments next
    mean_bound, var_bound = moment_bounds(x.double().numpy())
    assert (np.abs(stats.moments.mean.numpy() - ref["mean"]) <= mean_bound).all()
    assert (np.abs(stats.moments.var.numpy() - ref["var"]) <= var_bound).all()
    # and the bound is tight: about 2e-6 of the variance, plus float32's resolution of the mean
    assert (var_bound <= 5e-6 * ref["var"] + 4 * ((U_ROUNDOFF + GAMMA) * ref["mean"]) ** 2).all()


def test_column_sums_meet_their_error_bound_where_a_float32_running_sum_does_not():
    x64 = adversarial(torch.float64, n=100_003)
    x = x64.float()  # the values summed, exactly
    total = _common.column_sum(x)
    exact = torch.tensor([math.fsum(col) for col in x.double().T.tolist()], dtype=torch.float64)
    bound = _common.sum_error_bound(x.abs().double().sum(0))
    assert ((total - exact).abs() <= bound).all()
    assert (bound <= 2e-6 * x.abs().double().sum(0)).all()
    tenths = torch.full((100_003,), 0.1)  # a float32 running sum drifts: 9998.86 for 10000.30
    running = float(np.cumsum(tenths.numpy(), dtype=np.float32)[-1])
    exact_tenths = math.fsum(tenths.double().tolist())
    bound_tenths = float(_common.sum_error_bound(tenths.double().abs().sum(0, keepdim=True))[0])
    assert abs(running - exact_tenths) > 50 * bound_tenths
    assert abs(float(_common.column_sum(tenths[:, None])[0]) - exact_tenths) <= bound_tenths


# -- item 2: devices (pretend GPUs) ---------------------------------------------------------------
def _state_tensors(acc) -> list[torch.Tensor]:
    parts = [acc.moments, acc.ladder, acc.hist, acc.top] if isinstance(acc, SiteStats) else [acc]
    return [getattr(part, name) for part in parts for name in part._STATE]


ACCUMULATORS = {
    "site": lambda: SiteStats(7, eps=EPS, k=K),
    "moments": lambda: UnitMoments(7),
    "ladder": lambda: ThresholdLadder(7, EPS),
    "hist": lambda: AbsHistogram(),
    "top": lambda: TopExamples(7, K),
}


@pytest.mark.parametrize("name", sorted(ACCUMULATORS))
def test_accumulators_keep_their_state_where_the_activations_are(name, fake_gpus):
    x, tok = adversarial(torch.bfloat16, n=300), torch.arange(300)
    x[5, 2], x[9, 3] = math.nan, math.inf  # non-finite entries take the masked paths
    on_cpu, on_gpu = ACCUMULATORS[name](), ACCUMULATORS[name]()
    for chunk, ids in zip(x.split(64), tok.split(64)):
        on_cpu.update(chunk, ids)
    with fake_gpus() as gpu:
        for chunk, ids in zip(x.split(64), tok.split(64)):
            on_gpu.update(chunk.to("cuda"), ids.to("cuda"))
        assert gpu.transfers == 0  # no update copied anything to the host
        assert all(t.device.type == "cuda" for t in _state_tensors(on_gpu))
        gathered = on_gpu.state_dict()
        merged = ACCUMULATORS[name]().merge(on_gpu)  # a CPU accumulator takes a GPU one's data
    assert_states_close(gathered, on_cpu.state_dict())
    assert_states_close(merged.state_dict(), on_cpu.state_dict())
    top = gathered.get("top", gathered)
    if "tok" in top:  # ties may keep other tokens of the same value, never other values
        kept = top["tok"] >= 0
        found = x.double()[top["tok"].clamp(min=0), torch.arange(7)[:, None].expand_as(top["tok"])]
        assert torch.equal(found[kept], top["values"][kept])


def assert_states_close(gpu: dict, cpu: dict) -> None:
    """GPU (float32 work) and CPU (float64) states: equal, but for rounding in the moments and
    the tokens kept among tied top values (checked by the caller)."""
    for key, value in cpu.items():
        mine = gpu[key]
        if isinstance(value, dict):
            assert_states_close(mine, value)
        elif isinstance(value, torch.Tensor):
            assert type(mine) is torch.Tensor and mine.device.type == "cpu", key
            if key == "tok":
                assert mine.shape == value.shape
            elif key in ("mean", "m2"):
                np.testing.assert_allclose(mine.numpy(), value.numpy(), rtol=1e-5, atol=1e-9 * float(value.abs().max()))
            else:
                assert torch.equal(mine, value), key
        else:
            assert mine == value, key


def test_head_sink_keeps_its_sums_on_the_gpu(fake_gpus):
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(3, 2, 5, 5, generator=g).softmax(-1)  # [B, H, Q, K]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    on_cpu, on_gpu = HeadSink(2), HeadSink(2)
    on_cpu.update(pattern, mask)
    with fake_gpus() as gpu:
        on_gpu.update(pattern.to("cuda"), mask.to("cuda"))
        assert gpu.transfers == 0 and all(t.device.type == "cuda" for t in _state_tensors(on_gpu))
        for field in ("first_token_attention", "mean_max_attention", "mean_entropy"):
            result = getattr(on_gpu, field)  # read on the CPU
            assert type(result) is torch.Tensor
            torch.testing.assert_close(result, getattr(on_cpu, field), rtol=1e-6, atol=1e-9)


TIED = ("doc", "pos", "left", "token", "right", "window_start", "window")  # the examples table's token columns


def _compare(cpu, gpu, rtol=1e-5):
    """Results of one API on the CPU and on a pretend GPU: tables to rtol (float32 work off the
    CPU), integer and text columns exactly."""
    if isinstance(cpu, torch.Tensor):
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=rtol, atol=1e-6)
        return
    left, right = (t.to_pandas() for t in (cpu, gpu))
    assert list(left.columns) == list(right.columns)
    for column in left.columns:
        if column in TIED:  # which of several tokens tied at a unit's k-th value is kept may differ
            continue
        a, b = left[column].to_numpy(), right[column].to_numpy()
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=rtol, atol=1e-6, err_msg=column)
        else:
            np.testing.assert_array_equal(b, a, err_msg=column)


def _api_calls():
    """(name, function of (model, inputs) returning something comparable)."""
    from actscope.explain import activation_patching, attribution_patching, decode, logit_difference, subspace_patching
    from actscope.sparse import calibrate, dense_with_thresholds, sparsify

    def corrupted(inputs):
        ids = inputs["input_ids"].clone()
        ids[:, 2] = (ids[:, 2] + 11) % 128
        return {**inputs, "input_ids": ids}

    def edited(model, inputs):
        with actscope.edit(model, {"blocks.0.mlp.post[1,5]": actscope.interventions.zero(), "blocks.1.attn.z[head=1]": actscope.interventions.scale(2.0)}):
            return model(**inputs).logits

    def sparse(model, inputs):
        calibration = calibrate(model, [inputs], method="teal", sparsity=0.5)
        with dense_with_thresholds(model, calibration):
            reference = model(**inputs).logits
        with sparsify(model, calibration):
            out = model(**inputs).logits
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
        return out

    return {
        "profile": lambda model, inputs: actscope.profile(model, [inputs], sites="blocks.*.mlp.post,blocks.*.attn.pattern,blocks.*.resid.post").neurons,
        "edit": edited,
        "decode": lambda model, inputs: decode(model, SITES, top=3),
        "calibrate and sparsify": sparse,
        "activation patching": lambda model, inputs: activation_patching(model, inputs, corrupted(inputs), logit_difference(3, 4), sites=SITES, per="unit"),
        "attribution patching": lambda model, inputs: attribution_patching(model, inputs, corrupted(inputs), logit_difference(3, 4), sites=SITES),
        "subspace patching": lambda model, inputs: subspace_patching(model, inputs, corrupted(inputs), logit_difference(3, 4), "blocks.0.mlp.post", torch.eye(64)[:3]),
    }


@pytest.mark.parametrize("call", sorted(_api_calls()))
def test_every_api_gives_on_a_gpu_what_it_gives_on_the_cpu(call, fake_gpus):
    module, inputs = tiny_model("llama")
    module.requires_grad_(False)
    inputs = padded(inputs)
    function = _api_calls()[call]
    on_cpu = function(actscope.wrap(module), inputs)
    with fake_gpus():
        module.to("cuda")
        on_gpu = function(actscope.wrap(module), {key: value.to("cuda") for key, value in inputs.items()})
        _compare(on_cpu, on_gpu)


def test_profile_with_every_measurement_and_the_report_run_on_a_gpu(fake_gpus, tmp_path):
    from actscope.report import write_report
    from actscope.zoo import held_out_corpus, tiny_lm

    texts = held_out_corpus(8)
    model = actscope.load(tiny_lm("relu"))
    model.module.requires_grad_(False)
    on_cpu = actscope.profile(model, texts, metrics="all", max_length=24)
    with fake_gpus():
        model.module.to("cuda")
        on_gpu = actscope.profile(model, texts, metrics="all", max_length=24, out=tmp_path / "run")
        page = write_report(on_gpu, tmp_path / "report.html")
    assert page.is_file()
    assert sorted(on_gpu.tables) == sorted(on_cpu.tables)
    for name in on_cpu.tables:  # the profile's own tables and every measurement's
        _compare(on_cpu.table(name), on_gpu.table(name))
    assert on_gpu.manifest["model"]["weight_hash"] == actscope.open_run(tmp_path / "run").manifest["model"]["weight_hash"]


def test_a_model_split_over_two_gpus_runs_as_one_on_the_cpu(fake_gpus):
    from accelerate import dispatch_model

    module, inputs = tiny_model("llama")
    module.requires_grad_(False)
    inputs = padded(inputs)
    calls = _api_calls()
    chosen = ("profile", "edit", "decode", "calibrate and sparsify", "activation patching")
    on_cpu = {name: calls[name](actscope.wrap(module), inputs) for name in chosen}
    generated = module.generate(**inputs, max_new_tokens=4, do_sample=False)
    halves = {"model.embed_tokens": "cuda:0", "model.rotary_emb": "cuda:0", "model.layers.0": "cuda:0",
              "model.layers.1": "cuda:1", "model.norm": "cuda:1", "lm_head": "cuda:1"}
    with fake_gpus():
        split = dispatch_model(module, device_map=halves)
        assert {p.device.index for p in split.parameters()} == {0, 1}
        on_gpus = {name: calls[name](actscope.wrap(split), {k: v.to("cuda:0") for k, v in inputs.items()}) for name in chosen}
        again = split.generate(**{k: v.to("cuda:0") for k, v in inputs.items()}, max_new_tokens=4, do_sample=False)
        for name in chosen:
            _compare(on_cpu[name], on_gpus[name])
        assert torch.equal(again.cpu(), generated)


# -- item 3: offloaded models --------------------------------------------------------------------
@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """A tiny Llama in memory, and the same weights loaded with accelerate offloading the second
    block, the final norm and the head to disk (meta tensors until their module runs)."""
    from transformers import AutoModelForCausalLM

    module, inputs = tiny_model("llama")
    module.requires_grad_(False)
    directory = tmp_path_factory.mktemp("tiny-llama")
    module.save_pretrained(directory)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    split = AutoModelForCausalLM.from_pretrained(
        directory, device_map="auto", max_memory={"cpu": int(0.9 * size)}, offload_folder=str(tmp_path_factory.mktemp("offload")))
    split.requires_grad_(False)
    assert "disk" in split.hf_device_map.values() and "cpu" in split.hf_device_map.values()
    assert split.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    return actscope.wrap(module), actscope.wrap(split), padded(inputs), directory


def test_an_offloaded_model_hashes_like_its_weights_in_memory(offloaded):
    from actscope.store import weight_hash

    plain, split, _, _ = offloaded
    assert weight_hash(split.module) == weight_hash(plain.module)


def test_an_offloaded_model_profiles_as_the_plain_one(offloaded, tmp_path):
    plain, split, inputs, _ = offloaded
    expected = actscope.profile(plain, [inputs], sites=f"{SITES},blocks.*.resid.post")
    run = actscope.profile(split, [inputs], sites=f"{SITES},blocks.*.resid.post", out=tmp_path / "run")
    for name in ("neurons", "layers", "examples"):
        _compare(expected.table(name), run.table(name), rtol=1e-12)
    assert run.manifest["model"]["weight_hash"] == expected.manifest["model"]["weight_hash"]


def test_editing_an_offloaded_model_equals_editing_the_plain_one(offloaded):
    plain, split, inputs, _ = offloaded
    edits = {"blocks.0.mlp.post[1,2]": actscope.interventions.zero(), "blocks.1.mlp.post[3,40]": actscope.interventions.zero()}
    down = plain.module.model.layers[1].mlp.down_proj

    def zero_units(x):
        x = x.clone()
        x[..., [3, 40]] = 0
        return x

    handle = down.register_forward_pre_hook(lambda mod, args: (zero_units(args[0]),))
    try:
        with actscope.edit(plain, {"blocks.0.mlp.post[1,2]": actscope.interventions.zero()}), torch.no_grad():
            by_hand = plain(**inputs).logits
    finally:
        handle.remove()
    with actscope.edit(split, edits), torch.no_grad():
        edited = split(**inputs).logits
    torch.testing.assert_close(edited, by_hand, rtol=0, atol=0)
    assert not torch.equal(edited, plain(**inputs).logits)


def test_patching_generating_and_decoding_an_offloaded_model(offloaded):
    from actscope.explain import activation_patching, decode, logit_difference

    plain, split, inputs, _ = offloaded
    corrupted = {**inputs, "input_ids": (inputs["input_ids"] + 7) % 128}
    patch = lambda model: activation_patching(model, inputs, corrupted, logit_difference(3, 4), sites=SITES)  # noqa: E731
    _compare(patch(plain), patch(split), rtol=0)
    _compare(decode(plain, SITES, top=5), decode(split, SITES, top=5), rtol=0)
    generated = split.module.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, plain.module.generate(**inputs, max_new_tokens=5, do_sample=False))


def test_calibration_works_and_sparse_execution_refuses_an_offloaded_model(offloaded):
    from actscope.sparse import calibrate, dense_with_thresholds, sparsify

    plain, split, inputs, _ = offloaded
    calibration = calibrate(split, [inputs], method="cats", sparsity=0.5)
    expected = calibrate(plain, [inputs], method="cats", sparsity=0.5)
    assert calibration.weight_hash == expected.weight_hash and calibration.thresholds.keys() == expected.thresholds.keys()
    for key, value in expected.thresholds.items():
        assert torch.equal(calibration.thresholds[key], value)
    with dense_with_thresholds(split, calibration), torch.no_grad():
        thresholded = split(**inputs).logits
    with dense_with_thresholds(plain, expected), torch.no_grad():
        torch.testing.assert_close(thresholded, plain(**inputs).logits, rtol=0, atol=0)
    with pytest.raises(actscope.InputError, match="offloaded by accelerate.*bypasses.*Load the model without offloading"):
        with sparsify(split, calibration):
            pass


def test_a_model_wholly_on_disk_gets_its_inputs_on_the_execution_device(offloaded, tmp_path):
    from transformers import AutoModelForCausalLM

    plain, _, inputs, directory = offloaded
    on_disk = AutoModelForCausalLM.from_pretrained(directory, device_map="auto", max_memory={"cpu": 1}, offload_folder=str(tmp_path))
    assert set(on_disk.hf_device_map.values()) == {"disk"}
    model = actscope.wrap(on_disk)
    assert next(on_disk.parameters()).device.type == "meta"
    assert model.device == torch.device("cpu")  # the execution device, not the meta device
    _compare(actscope.profile(plain, [inputs], sites=SITES).neurons, actscope.profile(model, [inputs], sites=SITES).neurons, rtol=1e-12)


# -- item 4: quantised weights -------------------------------------------------------------------
@pytest.fixture
def quantised():
    """A tiny Llama whose linear layers hold optimum-quanto int8 weights (frozen), its inputs, and
    a float copy carrying exactly the dequantised weights."""
    quanto = pytest.importorskip("optimum.quanto")
    module, inputs = tiny_model("llama")
    float_copy, _ = tiny_model("llama")
    quanto.quantize(module, weights=quanto.qint8)
    quanto.freeze(module)
    module.requires_grad_(False)
    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, quanto.QModuleMixin):
                float_copy.get_submodule(name).weight.copy_(layer.weight.dequantize())
    return actscope.wrap(module), actscope.wrap(float_copy.requires_grad_(False)), padded(inputs)


def test_the_neuron_of_a_quantised_model_is_still_the_input_of_its_output_projection(quantised):
    from optimum.quanto import QLinear

    model, _, inputs = quantised
    site = model.catalog["blocks.0.mlp.post"]
    down = model.module.get_submodule(site.path)
    assert isinstance(down, QLinear) and site.path.endswith("mlp.down_proj") and site.hook.at == "input"
    with torch.no_grad(), actscope.capture(model, "blocks.0.mlp.post,blocks.0.mlp.out") as captured:
        model(input_ids=inputs["input_ids"])
    neuron = captured.tensor("blocks.0.mlp.post")
    assert torch.equal(neuron, first_input_of(model.module, down, inputs["input_ids"]))  # what QLinear receives
    with torch.no_grad():
        assert torch.equal(down(neuron), captured.tensor("blocks.0.mlp.out"))  # and all it receives


def test_a_quantised_model_is_observed_and_edited_like_any_other(quantised):
    model, _, inputs = quantised
    run = actscope.profile(model, [inputs], sites=SITES)
    assert run.neurons.num_rows == 2 * 64 and run.manifest["model"]["weight_hash"]
    down = model.module.model.layers[1].mlp.down_proj

    def zero_units(x):
        x = x.clone()
        x[..., [3, 40]] = 0
        return x

    handle = down.register_forward_pre_hook(lambda mod, args: (zero_units(args[0]),))
    try:
        with torch.no_grad():
            by_hand = model(**inputs).logits
    finally:
        handle.remove()
    with actscope.edit(model, {"blocks.1.mlp.post[3,40]": actscope.interventions.zero()}), torch.no_grad():
        edited = model(**inputs).logits
    torch.testing.assert_close(edited, by_hand, rtol=0, atol=0)


def test_out_in_weight_dequantises_and_views_plain_weights(quantised):
    from actscope.models.adapters import out_in_weight

    model, float_model, _ = quantised
    plain = float_model.module.model.layers[0].mlp.down_proj
    assert out_in_weight(plain) is plain.weight  # a view: no copy
    down = model.module.model.layers[0].mlp.down_proj
    weight = out_in_weight(down)
    assert type(weight) is torch.Tensor and weight.dtype == torch.float32 and weight.shape == (32, 64)
    assert torch.equal(weight, down.weight.dequantize()) and torch.equal(weight, plain.weight)


def test_decoding_and_cett_of_a_quantised_model_use_its_dequantised_weights(quantised):
    from actscope.explain import decode
    from actscope.metrics.cett.core import output_projection

    model, float_model, _ = quantised
    _compare(decode(float_model, SITES, top=5), decode(model, SITES, top=5), rtol=0)
    site = actscope.plan_sites(model, "blocks.1.mlp.post").sites[0]
    weight, bias = output_projection(model, site)
    expected = float_model.module.model.layers[1].mlp.down_proj.weight.double()
    assert bias is None and torch.equal(weight, expected)


def test_sparse_execution_refuses_a_quantised_model_and_its_hash_is_its_own(quantised):
    from actscope.sparse import calibrate, sparsify
    from actscope.store import weight_hash

    model, float_model, inputs = quantised
    calibration = calibrate(model, [inputs], method="teal", sparsity=0.5)
    with pytest.raises(actscope.InputError, match="quantised \\(QLinear\\).*dequantised weights"):
        with sparsify(model, calibration):
            pass
    assert weight_hash(model.module) == calibration.weight_hash != weight_hash(float_model.module)


# -- on a real GPU --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.cuda
@no_cuda
def test_cuda_statistics_of_low_precision_activations_match_a_float64_reference(dtype):
    model, inputs = low_precision_model(dtype)
    model.module.cuda()
    with torch.no_grad(), actscope.capture(model, SITES, flat=True) as captured, actscope.observe(model, SITES, k=K, eps=EPS) as observed:
        model(**{key: value.cuda() for key, value in inputs.items()})
    for site in ("blocks.0.mlp.post", "blocks.1.mlp.post"):
        x = captured.tensor(site)
        assert x.dtype == dtype
        assert_site_stats(observed.stats[site], reference(x), rtol=1e-5)  # float32 work: about 2e-6


@pytest.mark.parametrize("call", sorted(_api_calls()))
@pytest.mark.cuda
@no_cuda
def test_cuda_every_api_gives_what_it_gives_on_the_cpu(call):
    module, inputs = tiny_model("llama")
    module.requires_grad_(False)
    inputs = padded(inputs)
    function = _api_calls()[call]
    on_cpu = function(actscope.wrap(module), inputs)
    module.cuda()
    on_gpu = function(actscope.wrap(module), {key: value.cuda() for key, value in inputs.items()})
    if call == "calibrate and sparsify":
        # Calibrated on each device from activations that differ by rounding, the thresholds may
        # differ where a value sits on one: the GPU's sparse run was checked against its own
        # dense_with_thresholds inside the call.
        assert on_gpu.device.type == "cuda" and bool(torch.isfinite(on_gpu).all())
        return
    _compare(on_cpu, on_gpu, rtol=1e-4)


@pytest.mark.cuda
@no_cuda
def test_cuda_offloaded_to_the_cpu_profiles_as_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    module, inputs = tiny_model("llama")
    module.save_pretrained(tmp_path / "model")
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    split = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map="auto", max_memory={0: int(0.5 * size), "cpu": 10 * size})
    assert "cpu" in split.hf_device_map.values()
    _compare(actscope.profile(module, [padded(inputs)], sites=SITES).neurons,
             actscope.profile(split, [padded(inputs)], sites=SITES).neurons, rtol=1e-4)


@pytest.mark.cuda
@no_cuda
def test_cuda_bitsandbytes_int8_weights_are_decoded_dequantised():
    bnb = pytest.importorskip("bitsandbytes")
    from actscope.models.adapters import out_in_weight

    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    float_weight = torch.randn(32, 64)
    layer.weight = bnb.nn.Int8Params(float_weight.clone(), requires_grad=False, has_fp16_weights=False)
    layer.cuda()
    weight = out_in_weight(layer)
    assert weight.shape == (32, 64) and weight.is_floating_point()
    torch.testing.assert_close(weight.cpu(), float_weight, rtol=0.02, atol=0.02 * float(float_weight.abs().max()))
    from actscope.store import weight_hash

    assert weight_hash(layer)


@pytest.mark.skipif(os.environ.get("ACTSCOPE_FUSED") == "0", reason="checks the C kernel's dtype gate")
def test_the_c_kernel_takes_low_precision_batches_widened_exactly():
    from actscope.stats import fused

    if fused.library() is None:
        pytest.skip("no C compiler: the fused kernel cannot be built here")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert fused.usable(torch.zeros(2, 2, dtype=dtype))
    assert not fused.usable(torch.zeros(2, 2, dtype=torch.float64))  # float64 takes the torch path
