"""SAE and transcoder features as units: loading the SAELens layout, features as a site (profile,
statistics, edit, patching, decoding), reconstruction quality and the trainer, each checked
against a hand computation written here from the captured activations."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import actscope
from actscope import interventions as iv
from actscope.cli.main import app
from actscope.errors import InputError, SiteError
from actscope.feeding import feed
from actscope.sae import SAE, attach, load_sae
from actscope.trace import Capture
from actscope.zoo.tiny import FAMILIES, tiny_model

runner = CliRunner(env={"COLUMNS": "200"})
TEXTS = ["The cat sat on the mat and looked at the door.", "Paris is the capital of France.",
         "Rain fell all night over the quiet town.", "She opened the book and began to read aloud.",
         "Numbers like 42 and 7 appear in the list.", "A small boat drifted toward the harbour at dawn."]


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


# -- building SAEs by hand ----------------------------------------------------------------------
def random_tensors(d_in: int, d_sae: int, architecture: str = "standard", seed: int = 0, d_out: int | None = None,
                   scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d_out = d_out or d_in
    tensors = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in) * scale,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_out, generator=g) / math.sqrt(d_sae),
        "b_dec": torch.randn(d_out, generator=g) * 0.05,
    }
    if architecture.startswith("jumprelu"):
        tensors["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    return tensors


def save_saelens(folder, tensors: dict, **config) -> None:
    """The SAELens ≥ 6 layout, written here without actscope's writer."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    metadata = {"sae_lens_version": "6.5.0", "hook_name": config.pop("hook_name", None), **config.pop("metadata", {})}
    cfg = {"architecture": "standard", "d_in": tensors["W_enc"].shape[0], "d_sae": tensors["W_enc"].shape[1], "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": metadata, **config}
    (folder / "cfg.json").write_text(json.dumps(cfg))


def hand_features(x: torch.Tensor, t: dict, architecture: str = "standard", k: int | None = None, b_dec: bool = True) -> torch.Tensor:
    """The SAELens encoders, written out: ReLU, JumpReLU, top-k."""
    pre = ((x - t["b_dec"]) if b_dec else x) @ t["W_enc"] + t["b_enc"]
    if architecture.startswith("jumprelu"):
        return torch.where(pre > t["threshold"], pre, torch.zeros_like(pre)).clamp_min(0)
    if architecture == "topk":
        values, index = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, index, values.clamp_min(0))
    return pre.clamp_min(0)


def captured(model, site: str, texts=TEXTS) -> torch.Tensor:
    """``site``'s real-token rows for ``texts``, batched as profile batches them."""
    capture = Capture(model, site, flat=True, announce=False)
    feed(capture, texts)
    return capture.tensor(site)


# -- profiling through the CLI ------------------------------------------------------------------
@pytest.mark.parametrize(("architecture", "k"), [("standard", None), ("jumprelu", None), ("topk", 5)])
def test_cli_profile_of_a_saelens_sae_equals_hand_features(tmp_path, minilm, architecture, k):
    tensors = random_tensors(384, 48, architecture, scale=3.0)
    extra = {"k": k} if k else {}
    save_saelens(tmp_path / "sae", tensors, architecture=architecture, hook_name="blocks.2.hook_resid_pre", **extra)
    data = tmp_path / "data.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "run"
    result = invoke("profile", "--data", str(data), "--sae", str(tmp_path / "sae"), "--out", str(out), "--no-report")
    assert result.exit_code == 0, result.output
    assert "blocks.2.resid.pre.sae" in result.output and "explained variance" in result.output

    run = actscope.open_run(out)
    neurons = run.tables["neurons"].to_pandas()
    rows = neurons[neurons.site == "blocks.2.resid.pre.sae"].sort_values("unit")
    x = captured(minilm, "blocks.2.resid.pre")
    f = hand_features(x, tensors, architecture, k).double()  # [tokens, 48]
    assert len(rows) == 48 and set(neurons.site) == {"blocks.2.resid.pre.sae"}  # --sae alone: only the features
    np.testing.assert_allclose(rows["mean"], f.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["max"], f.max(0).values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["frac_pos"], (f > 0).double().mean(0), atol=1e-9)
    assert 0 < float((f > 0).double().mean()) < 1  # the features do fire, and not everywhere

    quality = run.tables["sae"].to_pandas().iloc[0]
    x64, f64 = x.double(), f
    recon = f64 @ tensors["W_dec"].double() + tensors["b_dec"].double()
    explained = 1 - (x64 - recon).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()
    assert quality["explained_variance"] == pytest.approx(float(explained), rel=1e-4, abs=1e-5)
    assert quality["l0"] == pytest.approx(float((f > 0).sum(-1).double().mean()), rel=1e-9)
    assert quality["dead"] == int((~(f > 0).any(0)).sum())
    assert quality["objective"] == "embedding_fidelity" and 0 < quality["degradation"] < quality["degradation_ablated"]
    assert "decode" in run.tables  # the features' decoded tokens


def test_cli_profile_with_sae_and_metrics_names_what_each_measures(tmp_path, minilm):
    """--sae with --metrics: the neurons table holds the SAE's features; the measurements are of the
    model's MLP neurons, and every summary line says so (nobody reads them as the features')."""
    save_saelens(tmp_path / "sae", random_tensors(384, 48, scale=3.0), hook_name="blocks.2.hook_resid_pre")
    data = tmp_path / "data.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "run"
    result = invoke("profile", "--data", str(data), "--sae", str(tmp_path / "sae"), "--metrics", "temporal,codes",
                    "--out", str(out), "--no-report")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    assert "temporal sparsity of the MLP neurons (blocks.*.mlp.post" in text
    assert "activation codes of the MLP neurons (blocks.*.mlp.post" in text
    run = actscope.open_run(out)
    assert set(run.tables["neurons"].to_pandas().site) == {"blocks.2.resid.pre.sae"}
    assert set(run.tables["temporal"].to_pandas().site) == {f"blocks.{i}.mlp.post" for i in range(6)}
    assert "sae" in run.tables


def test_explicit_site_overrides_the_hook_name_and_names_tell_saes_apart(tmp_path, minilm):
    save_saelens(tmp_path / "a", random_tensors(384, 16), hook_name="blocks.0.hook_resid_pre")
    save_saelens(tmp_path / "b", random_tensors(384, 16, seed=1), hook_name="blocks.0.hook_resid_pre")
    model = actscope.load()
    assert attach(model, load_sae(tmp_path / "a", site="blocks.1.resid.pre")) == "blocks.1.resid.pre.sae"
    assert attach(model, load_sae(tmp_path / "a")) == "blocks.0.resid.pre.sae"
    with pytest.raises(SiteError, match="name them apart"):
        attach(model, load_sae(tmp_path / "b"))
    assert attach(model, load_sae(tmp_path / "b", name="wide")) == "blocks.0.resid.pre.sae_wide"
    plan = actscope.plan_sites(model, "blocks.*.resid.pre.sae")
    assert plan.names == ["blocks.0.resid.pre.sae", "blocks.1.resid.pre.sae"]  # a glob over blocks; the named one is its own site
    result = invoke("profile", "--sae", f"wide={tmp_path / 'b'}@blocks.3.resid.pre", "--sae", str(tmp_path / "a"),
                    "--max-tokens", "60", "--out", str(tmp_path / "run"), "--no-report", "--sites", "blocks.0.mlp.post[0:4]")
    assert result.exit_code == 0, result.output
    sites = set(actscope.open_run(tmp_path / "run").tables["neurons"].to_pandas().site)
    assert sites == {"blocks.0.mlp.post[0,1,2,3]", "blocks.3.resid.pre.sae_wide", "blocks.0.resid.pre.sae"}


# -- edits keep the error term ------------------------------------------------------------------
def gpt2_with_sae(site: str, d_sae: int = 40, **options) -> tuple:
    module, inputs = tiny_model("gpt2")
    model = actscope.wrap(module)
    d_in = module.config.n_inner if site.endswith("mlp.post") else module.config.n_embd
    t = random_tensors(d_in, d_sae, scale=3.0)
    sae = SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], site=site, **options)
    return module, inputs, model, attach(model, sae), t, sae


@pytest.mark.parametrize("site", ["blocks.1.resid.pre", "blocks.0.attn.z", "blocks.1.mlp.post"])
def test_identity_edit_of_features_is_bit_identical(site):
    module, inputs, model, features, _, _ = gpt2_with_sae(site)
    clean = module(**inputs).logits
    with torch.no_grad(), actscope.edit(model, {features: lambda f: f}):
        same = module(**inputs).logits
    with torch.no_grad(), actscope.edit(model, {features: iv.scale(1.0)}):
        scaled = module(**inputs).logits
    assert torch.equal(same, clean) and torch.equal(scaled, clean)


def test_identity_edit_on_a_flat_site_is_bit_identical():
    module, inputs = tiny_model("opt")
    model = actscope.wrap(module)
    t = random_tensors(module.config.ffn_dim, 24, scale=3.0)
    features = attach(model, SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], hook_name="blocks.1.mlp.hook_post"))
    assert features == "blocks.1.mlp.post.sae" and model.catalog[features].hook.layout == "flat"  # OPT's [batch·pos, units]
    clean = module(**inputs).logits
    with torch.no_grad(), actscope.edit(model, {features: iv.scale(1.0)}):
        assert torch.equal(module(**inputs).logits, clean)
    with torch.no_grad(), actscope.capture(model, features) as c:
        module(**inputs)
    strongest = int(c.tensor(features).reshape(-1, 24).max(0).values.argmax())
    with torch.no_grad(), actscope.edit(model, {f"{features}[{strongest}]": iv.zero()}):
        assert not torch.equal(module(**inputs).logits, clean)


def hooked(module, inputs, target, change):
    """Logits with ``change(x)`` replacing ``target``'s first input (a raw PyTorch pre-hook)."""
    handle = target.register_forward_pre_hook(lambda mod, args: (change(args[0]),) + args[1:])
    try:
        with torch.no_grad():
            return module(**inputs).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
def test_ablating_and_clamping_a_feature_equal_the_hand_computation(normalize):
    module, inputs, model, features, t, sae = gpt2_with_sae("blocks.1.resid.pre", normalize_activations=normalize)
    block = module.transformer.h[1]

    def normalised(x):
        if normalize == "constant_norm_rescale":
            d = x.shape[-1]
            return x * (math.sqrt(d) / x.norm(dim=-1, keepdim=True)), x.norm(dim=-1, keepdim=True) / math.sqrt(d)
        if normalize == "layer_norm":
            centred = x - x.mean(-1, keepdim=True)
            return centred / (centred.std(-1, keepdim=True) + 1e-5), centred.std(-1, keepdim=True)
        return x, torch.ones(())

    def change(x, value):  # x + (value − f_j) · W_dec[j], un-normalised
        z, back = normalised(x)
        f = hand_features(z, t)
        return x + (value - f[..., 7:8]) * t["W_dec"][7] * back

    for intervention, value in ((iv.zero(), lambda f: 0.0), (iv.set_value(2.5), lambda f: 2.5)):
        with torch.no_grad(), actscope.edit(model, {features + "[7]": intervention}):
            edited = module(**inputs).logits
        expected = hooked(module, inputs, block, lambda x: change(x, value(None)))
        torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(edited, module(**inputs).logits, atol=1e-4)


def test_ablating_a_feature_of_concatenated_heads():
    module, inputs, model, features, t, _ = gpt2_with_sae("blocks.0.attn.z")
    with torch.no_grad(), actscope.edit(model, {features + "[3]": iv.zero()}):
        edited = module(**inputs).logits

    def change(z):  # z [batch, pos, heads·d_head] is the input of c_proj: heads concatenated, as SAELens does
        return z - hand_features(z, t)[..., 3:4] * t["W_dec"][3]

    expected = hooked(module, inputs, module.transformer.h[0].attn.c_proj, change)
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)


# -- patching and decoding -------------------------------------------------------------------------
def test_activation_and_attribution_patching_of_features():
    from actscope.explain import activation_patching, attribution_patching, logit_difference
    from conftest import clean_and_corrupted

    module, clean, corrupted = clean_and_corrupted("gpt2")
    model = actscope.wrap(module)
    t = random_tensors(module.config.n_embd, 16, scale=3.0)
    features = attach(model, SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], site="blocks.1.resid.pre"))
    metric = logit_difference(5, 9)
    exact = activation_patching(model, clean, corrupted, metric, sites=features, per="site")
    with torch.no_grad(), actscope.capture(model, "blocks.1.resid.pre") as x_clean:
        module(input_ids=clean)
    f_clean = hand_features(x_clean.tensor("blocks.1.resid.pre"), t)

    def patched(x):  # the corrupted run's error term kept: x + decode(f_clean) − decode(f_corrupt)
        return x + (f_clean - hand_features(x, t)) @ t["W_dec"]

    expected = float(metric(hooked(module, {"input_ids": corrupted}, module.transformer.h[1], patched), {}))
    assert float(exact.metric[0]) == pytest.approx(expected, abs=1e-5)

    estimate = attribution_patching(model, clean, corrupted, metric, sites=features, per="unit")
    x = module.transformer.h[1]
    seen = {}

    def keep(mod, args):
        seen["x"] = args[0].detach().clone().requires_grad_(True)
        return (seen["x"],) + args[1:]

    handle = x.register_forward_pre_hook(keep)
    try:
        metric(module(input_ids=corrupted).logits, {}).backward()
    finally:
        handle.remove()
    grad = seen["x"].grad @ t["W_dec"].T  # ∂m/∂f = ∂m/∂x · W_dec[j]
    by_unit = (grad * (f_clean - hand_features(seen["x"].detach(), t))).sum((0, 1))
    np.testing.assert_allclose(estimate.effect, by_unit.numpy(), atol=1e-5)


def test_decoding_features_equals_the_hand_computation():
    module, inputs, model, features, t, _ = gpt2_with_sae("blocks.1.resid.post")
    decoded = actscope.explain.decode(model, features + "[2]", top=5, skip_special=False)
    ln = module.transformer.ln_f
    direction = t["W_dec"][2].double()
    mapped = ln.weight.double() * (direction - direction.mean())
    scores = module.lm_head.weight.double() @ mapped
    assert decoded.tokens(features, 2) == [str(i) for i in scores.topk(5).indices.tolist()]
    heads = gpt2_with_sae("blocks.0.attn.z")
    module, model, features, t = heads[0], heads[2], heads[3], heads[4]
    decoded = actscope.explain.decode(model, features + "[1]", top=3, skip_special=False)
    written = module.transformer.h[0].attn.c_proj.weight.double().T @ t["W_dec"][1].double()  # Conv1D: [in, out]
    scores = module.lm_head.weight.double() @ (module.transformer.ln_f.weight.double() * (written - written.mean()))
    assert decoded.tokens(features, 1) == [str(i) for i in scores.topk(3).indices.tolist()]


def test_decoding_features_of_a_post_norm_encoder_passes_the_later_norms(bert):
    module, inputs = bert
    model = actscope.wrap(module)
    t = random_tensors(module.config.hidden_size, 8)
    features = attach(model, SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], site="blocks.0.resid.post"))
    decoded = actscope.explain.decode(model, features + "[0]", top=4, skip_special=False)
    d = t["W_dec"][0].double()
    norms = [module.encoder.layer[1].attention.output.LayerNorm, module.encoder.layer[1].output.LayerNorm]  # block 1's only
    for norm in norms:
        d = norm.weight.double() * (d - d.mean())
    scores = module.embeddings.word_embeddings.weight.double() @ d
    assert decoded.tokens(features, 0) == [str(i) for i in scores.topk(4).indices.tolist()]


# -- hook names ----------------------------------------------------------------------------------
PRE_NORM = {"hook_resid_pre": "resid.pre", "hook_resid_mid": "resid.mid", "hook_resid_post": "resid.post",
            "hook_mlp_in": "resid.mid", "hook_attn_out": "attn.out", "hook_mlp_out": "mlp.out", "attn.hook_z": "attn.z",
            "attn.hook_v": "attn.v", "mlp.hook_pre": "mlp.pre", "mlp.hook_post": "mlp.post", "hook_normalized_resid_post": None}
POST_NORM = {**PRE_NORM, "hook_resid_mid": None, "hook_mlp_in": None, "hook_resid_post": None,
             "hook_normalized_resid_post": "resid.post"}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformerlens_hook_names_map_to_the_right_sites(family):
    from actscope.sae.hooknames import site_for_hook

    module, inputs = tiny_model(family)
    model = actscope.wrap(module)
    post_norm = family in ("bert", "roberta")  # TransformerLens's BertBlock: norm(x + f(x))
    expected = POST_NORM if post_norm else PRE_NORM
    mapped = {}
    for hook, suffix in expected.items():
        site = f"blocks.1.{suffix}"
        if suffix is None or site not in model.catalog:
            with pytest.raises(InputError, match="DIR@SITE"):
                site_for_hook(model, f"blocks.1.{hook}")
            continue
        assert site_for_hook(model, f"blocks.1.{hook}") == site
        mapped[hook] = site
    assert "hook_resid_pre" in mapped and "attn.hook_z" in mapped and model.catalog[mapped["attn.hook_z"]].hook.layout == "heads"
    # TransformerLens's defining equations hold on the mapped sites
    names = sorted(set(mapped.values()) | {"blocks.0.resid.post", "blocks.0.resid.pre"})
    names = [n for n in names if not n.endswith(("attn.z", "attn.v", "mlp.pre", "mlp.post"))]
    with torch.no_grad(), actscope.capture(model, names, flat=True) as c:
        module(**inputs)
    v = {name: c.tensor(name) for name in names}
    pre, post = v["blocks.1.resid.pre"], v[mapped.get("hook_resid_post", mapped.get("hook_normalized_resid_post"))]
    torch.testing.assert_close(v["blocks.0.resid.post"], pre, atol=0, rtol=0)
    if "hook_resid_mid" in mapped:
        mid = v[mapped["hook_resid_mid"]]
        torch.testing.assert_close(mid, pre + v[mapped["hook_attn_out"]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post, mid + v[mapped["hook_mlp_out"]], atol=1e-5, rtol=1e-5)
    elif not post_norm:  # a parallel block: attention and MLP both read the block's input
        torch.testing.assert_close(post, pre + v[mapped["hook_attn_out"]] + v[mapped["hook_mlp_out"]], atol=1e-5, rtol=1e-5)


# -- loading: formats and refusals ------------------------------------------------------------------
def test_a_mis_shaped_or_missing_tensor_is_exit_2_naming_it(tmp_path):
    bad = random_tensors(384, 48)
    bad["W_dec"] = bad["W_dec"][:, :100].contiguous()
    save_saelens(tmp_path / "bad", bad, hook_name="blocks.1.hook_resid_pre")
    result = invoke("profile", "--sae", str(tmp_path / "bad"), "--max-tokens", "20", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "W_dec has shape [48, 100] but must be [d_sae, d_in] = [48, 384]" in result.output.replace("\n", "")
    missing = random_tensors(384, 48)
    del missing["b_enc"]
    save_saelens(tmp_path / "missing", missing, hook_name="blocks.1.hook_resid_pre")
    result = invoke("profile", "--sae", str(tmp_path / "missing"), "--max-tokens", "20", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "the tensor b_enc is missing" in result.output.replace("\n", "")
    wide = random_tensors(512, 48)
    save_saelens(tmp_path / "wide", wide, hook_name="blocks.1.hook_resid_pre")
    result = invoke("profile", "--sae", str(tmp_path / "wide"), "--max-tokens", "20", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "reads 512 dimensions per token, but blocks.1.resid.pre" in result.output.replace("\n", "")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"architecture": "gated"}, "architecture 'gated' is not supported"),
    ({"architecture": "topk"}, "needs k"),
    ({"normalize_activations": "expected_average_only_in"}, "scaling factor is not saved"),
    ({"normalize_activations": "rms"}, "normalize_activations 'rms'"),
    ({"metadata": {"hook_head_index": 3}}, "one attention head"),
])
def test_unsupported_settings_are_refused_with_the_reason(tmp_path, change, message):
    save_saelens(tmp_path / "sae", random_tensors(8, 4), hook_name="blocks.0.hook_resid_pre", **change)
    with pytest.raises(InputError, match=message):
        load_sae(tmp_path / "sae")


def test_pickles_are_refused_and_plain_safetensors_with_a_json_load(tmp_path):
    (tmp_path / "sae.pt").write_bytes(b"not read")
    with pytest.raises(InputError, match="pickle"):
        load_sae(tmp_path / "sae.pt")
    t = random_tensors(8, 4, "jumprelu")
    save_file(t, str(tmp_path / "mine.safetensors"))
    (tmp_path / "mine.json").write_text(json.dumps({"architecture": "jumprelu", "hook_name": "blocks.0.hook_mlp_out"}))
    sae = load_sae(tmp_path / "mine.safetensors")
    assert (sae.architecture, sae.d_in, sae.d_sae, sae.hook_name) == ("jumprelu", 8, 4, "blocks.0.hook_mlp_out")
    x = torch.randn(5, 8)
    torch.testing.assert_close(sae.encode(x), hand_features(x, t, "jumprelu"))


def test_saelens_5_configs_and_the_folded_scaling_factor(tmp_path):
    t = random_tensors(8, 6)
    t["W_enc"] = t["W_enc"] * 4
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    old = {"d_in": 8, "d_sae": 6, "hook_point": "blocks.0.hook_resid_pre", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 2}, "normalize_activations": True, "dtype": "float32"}
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    sae = load_sae(tmp_path)
    assert (sae.architecture, sae.k, sae.hook_name, sae.normalize_activations) == ("topk", 2, "blocks.0.hook_resid_pre", "none")
    x = torch.randn(5, 8)
    features = hand_features(x * 2.5, t, "topk", 2)  # the SAE reads activations scaled by s
    torch.testing.assert_close(sae.encode(x), features)
    torch.testing.assert_close(sae.reconstruct(x), (features @ t["W_dec"] + t["b_dec"]) / 2.5)


def test_normalisations_equal_saelens_formulas():
    t = random_tensors(16, 10)
    x = torch.randn(3, 4, 16) * 5 + 1
    for normalize in ("constant_norm_rescale", "layer_norm"):
        sae = SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], normalize_activations=normalize)
        if normalize == "constant_norm_rescale":
            coeff = 4.0 / x.norm(dim=-1, keepdim=True)
            z, out = x * coeff, lambda y: y / coeff
        else:
            mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
            z, out = (x - mu) / (std + 1e-5), lambda y: y * std + mu
        f = hand_features(z, t)
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae.reconstruct(x), out(f @ t["W_dec"] + t["b_dec"]))


# -- transcoders --------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["transcoder", "jumprelu_transcoder", "skip_transcoder"])
def test_transcoder_loading_features_and_reconstruction(tmp_path, architecture):
    module, inputs = tiny_model("gpt2")
    model = actscope.wrap(module)
    d = module.config.n_embd
    t = random_tensors(d, 20, architecture, d_out=d, scale=3.0)
    if architecture == "skip_transcoder":
        t["W_skip"] = torch.randn(d, d) * 0.01
    save_saelens(tmp_path / "tc", t, architecture=architecture, d_out=d, apply_b_dec_to_input=False, hook_name="blocks.1.hook_resid_mid",
                 metadata={"hook_name_out": "blocks.1.hook_mlp_out"})
    sae = load_sae(tmp_path / "tc")
    assert sae.transcoder and (sae.d_in, sae.d_sae, sae.d_out) == (d, 20, d)
    features = attach(model, sae)
    assert features == "blocks.1.resid.mid.transcoder"
    with torch.no_grad(), actscope.capture(model, [features, "blocks.1.resid.mid", "blocks.1.mlp.out"]) as c:
        module(**inputs)
    x, y = c.tensor("blocks.1.resid.mid"), c.tensor("blocks.1.mlp.out")
    f = hand_features(x, t, architecture, b_dec=False)  # no b_dec subtracted from a transcoder's input
    torch.testing.assert_close(c.tensor(features), f)
    quality = actscope.sae.reconstruction(model, features, [inputs]).row(features)
    y_hat = f @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "W_skip" in t else 0)
    explained = 1 - (y - y_hat).double().pow(2).sum() / (y - y.mean((0, 1))).double().pow(2).sum()
    assert quality["writes"] == "blocks.1.mlp.out" and quality["explained_variance"] == pytest.approx(float(explained), rel=1e-5)
    bad = dict(t)
    bad["b_dec"] = torch.zeros(d - 1)
    save_saelens(tmp_path / "bad", bad, architecture=architecture, d_out=d, apply_b_dec_to_input=False, hook_name="blocks.1.hook_resid_mid")
    with pytest.raises(InputError, match=rf"b_dec has shape \[{d - 1}\] but must be \[d_out\] = \[{d}\]"):
        load_sae(tmp_path / "bad")


def gpt2_with_transcoder(architecture: str = "skip_transcoder"):
    """A tiny GPT-2 with a transcoder reading block 1's MLP input (resid.mid) and writing its output."""
    module, inputs = tiny_model("gpt2")
    model = actscope.wrap(module)
    d = module.config.n_embd
    t = random_tensors(d, 20, architecture, scale=3.0, seed=4)
    if architecture == "skip_transcoder":
        t["W_skip"] = torch.randn(d, d, generator=torch.Generator().manual_seed(5)) * 0.01
    sae = SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], architecture="jumprelu" if "jumprelu" in architecture else "standard",
              threshold=t.get("threshold"), W_skip=t.get("W_skip"), transcoder=True, apply_b_dec_to_input=False,
              site="blocks.1.resid.mid", out_site="blocks.1.mlp.out")
    return module, inputs, model, attach(model, sae), t


def transcoded(module, inputs, change):
    """Logits with block 1's MLP output y replaced by ``change(x, y)``, x the MLP's input (raw hooks)."""
    block, seen = module.transformer.h[1], {}
    handles = [block.ln_2.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0])),
               block.mlp.register_forward_hook(lambda mod, args, out: change(seen["x"], out))]
    try:
        with torch.no_grad():
            return module(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("architecture", ["transcoder", "jumprelu_transcoder", "skip_transcoder"])
def test_editing_transcoder_features_changes_the_site_they_write(architecture):
    module, inputs, model, features, t = gpt2_with_transcoder(architecture)
    clean = module(**inputs).logits
    with torch.no_grad(), actscope.edit(model, {features: lambda f: f}):
        assert torch.equal(module(**inputs).logits, clean)  # identity: bit-identical
    with torch.no_grad(), actscope.edit(model, {features: iv.scale(1.0)}):
        assert torch.equal(module(**inputs).logits, clean)
    f = hand_features  # read at the MLP's input without b_dec; written to its output
    for intervention, value in ((iv.zero(), 0.0), (iv.set_value(2.5), 2.5)):
        with torch.no_grad(), actscope.edit(model, {features + "[6]": intervention}):
            edited = module(**inputs).logits
        expected = transcoded(module, inputs, lambda x, y: y + (value - f(x, t, architecture, b_dec=False)[..., 6:7]) * t["W_dec"][6])
        torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(edited, clean, atol=1e-4)


def test_activation_and_attribution_patching_of_transcoder_features():
    from actscope.explain import activation_patching, attribution_patching, logit_difference
    from conftest import clean_and_corrupted

    module, clean, corrupted = clean_and_corrupted("gpt2")
    model = actscope.wrap(module)
    d = module.config.n_embd
    t = random_tensors(d, 16, "transcoder", scale=3.0, seed=6)
    features = attach(model, SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], transcoder=True, apply_b_dec_to_input=False,
                                 site="blocks.1.resid.mid", out_site="blocks.1.mlp.out"))
    metric = logit_difference(5, 9)
    block = module.transformer.h[1]
    with torch.no_grad(), actscope.capture(model, "blocks.1.resid.mid") as captured:
        module(input_ids=clean)
    f_clean = hand_features(captured.tensor("blocks.1.resid.mid"), t, b_dec=False)
    exact = activation_patching(model, clean, corrupted, metric, sites=features, per="site")
    patched = transcoded(module, {"input_ids": corrupted}, lambda x, y: y + (f_clean - hand_features(x, t, b_dec=False)) @ t["W_dec"])
    assert float(exact.metric[0]) == pytest.approx(float(metric(patched, {})), abs=1e-5)

    estimate = attribution_patching(model, clean, corrupted, metric, sites=features, per="unit")
    seen = {}

    def keep_output(mod, args, out):
        seen["y"] = out.detach().clone().requires_grad_(True)
        return seen["y"]

    handles = [block.ln_2.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0].detach())),
               block.mlp.register_forward_hook(keep_output)]
    try:
        metric(module(input_ids=corrupted).logits, {}).backward()
    finally:
        for handle in handles:
            handle.remove()
    grad = seen["y"].grad @ t["W_dec"].T  # ∂m/∂f_j = ∂m/∂y · W_dec[j]
    by_unit = (grad * (f_clean - hand_features(seen["x"], t, b_dec=False))).sum((0, 1))
    np.testing.assert_allclose(estimate.effect, by_unit.numpy(), atol=1e-5)
    assert np.abs(by_unit.numpy()).max() > 1e-4  # the estimate is not trivially zero


# -- reconstruction and loss ---------------------------------------------------------------------------
def test_loss_on_the_reconstruction_equals_the_hand_run():
    from actscope.metrics import CausalLMLoss

    module, inputs, model, features, t, sae = gpt2_with_sae("blocks.1.resid.pre")
    texts = [inputs]
    objective = CausalLMLoss(texts)
    row = actscope.sae.reconstruction(model, features, texts, objective=objective).row(features)

    def loss(logits):
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), inputs["input_ids"][:, 1:].reshape(-1)))

    block = module.transformer.h[1]
    clean = loss(module(**inputs).logits.detach())
    recon = loss(hooked(module, inputs, block, lambda x: hand_features(x, t) @ t["W_dec"] + t["b_dec"]))
    ablated = loss(hooked(module, inputs, block, torch.zeros_like))
    assert row["clean"] == pytest.approx(clean, rel=1e-5) and row["reconstructed"] == pytest.approx(recon, rel=1e-5)
    assert row["ablated"] == pytest.approx(ablated, rel=1e-5)
    assert row["loss_increase"] == pytest.approx(recon - clean, abs=1e-5)
    assert row["recovered"] == pytest.approx((ablated - recon) / (ablated - clean), rel=1e-4)


# -- the trainer -----------------------------------------------------------------------------------------
def test_trainer_reduces_its_loss_saves_and_loads_back_deterministically(tmp_path, minilm):
    options = dict(site="blocks.1.resid.post", d_sae=96, steps=40, batch_size=128, lr=3e-3, log_every=5, max_tokens=600)
    first = actscope.train_sae(minilm, TEXTS * 4, out=tmp_path / "sae", **options)
    assert first.loss[-1] < 0.7 * first.loss[0] and first.explained_variance[-1] > first.explained_variance[0]
    again = actscope.train_sae(minilm, TEXTS * 4, **options)
    assert torch.equal(again.sae.W_enc, first.sae.W_enc) and torch.equal(again.sae.b_dec, first.sae.b_dec)  # the seed decides
    loaded = load_sae(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(first.sae, name))
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert config["metadata"]["hook_name"] == "blocks.1.hook_normalized_resid_post"  # MiniLM is post-norm
    assert config["metadata"]["actscope_site"] == "blocks.1.resid.post" and config["normalize_activations"] == "none"
    model = actscope.load()
    assert attach(model, loaded) == "blocks.1.resid.post.sae"
    x = captured(minilm, "blocks.1.resid.post")
    weights = {k: getattr(loaded, k) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    torch.testing.assert_close(captured(model, "blocks.1.resid.post.sae"), hand_features(x, weights))
    with pytest.raises(actscope.RunDirError, match="already holds an SAE"):
        actscope.train_sae(minilm, TEXTS, out=tmp_path / "sae", **options)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(actscope.RunDirError, match="not an SAE actscope wrote"):
        actscope.train_sae(minilm, TEXTS, out=tmp_path / "mine", overwrite=True, **options)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_topk_trainer_on_harvested_activations(tmp_path, minilm):
    acts = actscope.harvest(minilm, TEXTS * 3, sites="blocks.2.resid.post", out=tmp_path / "acts")
    trained = actscope.train_sae(activations=acts, architecture="topk", k=8, d_sae=64, steps=30, batch_size=64, lr=3e-3, log_every=5,
                                 out=tmp_path / "sae")
    assert trained.loss[-1] < 0.7 * trained.loss[0] and np.all(trained.l0 <= 8)
    assert trained.sae.site == "blocks.2.resid.post" and trained.sae.architecture == "topk"
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())  # no model at hand: the manifest's family (BERT) names the hook
    assert config["metadata"]["hook_name"] == "blocks.2.hook_normalized_resid_post" and config["k"] == 8
    assert attach(actscope.load(), load_sae(tmp_path / "sae")) == "blocks.2.resid.post.sae"
    x = torch.stack([acts[i]["blocks.2.resid.post"] for i in range(10)]).float()
    t = {k: getattr(trained.sae, k) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    torch.testing.assert_close(trained.sae.encode(x), hand_features(x, t, "topk", 8))


def test_train_sae_command(tmp_path):
    result = invoke("train-sae", "--site", "blocks.0.resid.post", "--out", str(tmp_path / "sae"), "--steps", "5", "--batch-size", "64",
                    "--d-sae", "32", "--max-tokens", "300")
    assert result.exit_code == 0, result.output
    assert "SAE: " in result.output and (tmp_path / "sae" / "sae_weights.safetensors").exists()
    result = invoke("train-sae", "--site", "blocks.0.resid.post", "--out", str(tmp_path / "sae"), "--steps", "5")
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_decode_and_patch_commands_take_sae_features(tmp_path):
    from conftest import word_tokenizer

    module, _ = tiny_model("gpt2")
    module.save_pretrained(tmp_path / "gpt2")
    word_tokenizer([f"w{i}" for i in range(module.config.vocab_size)]).save_pretrained(tmp_path / "gpt2")
    save_saelens(tmp_path / "sae", random_tensors(module.config.n_embd, 12, scale=3.0), hook_name="blocks.1.hook_resid_pre")
    result = invoke("decode", str(tmp_path / "gpt2"), "--sae", str(tmp_path / "sae"), "--site", "blocks.1.resid.pre.sae[3]", "--top", "4")
    assert result.exit_code == 0, result.output
    assert "blocks.1.resid.pre.sae" in result.output and "1 units" in result.output
    result = invoke("patch", str(tmp_path / "gpt2"), "--sae", str(tmp_path / "sae"), "--sites", "blocks.1.resid.pre.sae", "--per", "unit",
                    "--clean", "w1 w2 w3 w4", "--corrupted", "w1 w9 w3 w4", "--answer", "w5", "--wrong", "w6")
    assert result.exit_code == 0, result.output
    assert "blocks.1.resid.pre.sae" in result.output


def test_a_checkpointed_run_resumes_only_with_the_same_sae(tmp_path):
    save_saelens(tmp_path / "a", random_tensors(384, 16), hook_name="blocks.0.hook_resid_pre")
    save_saelens(tmp_path / "b", random_tensors(384, 16, seed=5), hook_name="blocks.0.hook_resid_pre")
    out, folder = tmp_path / "run", tmp_path / ".run.checkpoint"

    def stop(documents, tokens):  # Ctrl-C once the first checkpoint exists
        if (folder / "rank-00000.pt").exists():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        actscope.profile(None, TEXTS * 3, sae=str(tmp_path / "a"), out=out, batch_size=2, checkpoint_every=20, progress=stop)
    with pytest.raises(InputError, match="sae .checkpoint: "):
        actscope.profile(None, TEXTS * 3, sae=str(tmp_path / "b"), out=out, batch_size=2, resume=True)
    resumed = actscope.profile(None, TEXTS * 3, sae=str(tmp_path / "a"), out=out, batch_size=2, resume=True)
    assert resumed.manifest["data"]["tokens"] == actscope.profile(None, TEXTS * 3, sae=str(tmp_path / "a"), batch_size=2).manifest["data"]["tokens"]


def test_the_readmes_three_lines_run_as_written_and_the_report_shows_the_features(tmp_path, minilm, monkeypatch):
    """README's 'Profile your own SAELens SAE in three lines', run on MiniLM with SAEs saved here
    (only --max-tokens added, for speed); the report has the features and the quality table."""
    import re
    import shlex
    from pathlib import Path

    from test_report import Page, decode as decoded_column

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Sparse autoencoders and transcoders"):]
    lines = [line.split("   #")[0].strip() for line in re.search(r"```bash\n(.*?)```", section, re.S)[1].strip().splitlines()]
    assert len(lines) == 3 and all(line.startswith("actscope ") for line in lines)
    save_saelens(tmp_path / "path/to/saelens-sae", random_tensors(384, 32, scale=3.0), hook_name="blocks.2.hook_resid_pre")
    save_saelens(tmp_path / "path/to/sae", random_tensors(384, 16, seed=1), hook_name="blocks.0.hook_resid_pre")
    save_saelens(tmp_path / "path/to/other", random_tensors(384, 16, seed=2), hook_name="blocks.3.hook_normalized_resid_post")
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS) + "\n")
    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in lines:
        args = [minilm.source if a == "path/to/model" else a for a in shlex.split(line)[1:]]
        result = invoke(*args, *(["--max-tokens", "300"] if args[0] == "profile" else []))
        assert result.exit_code == 0, (line, result.output)
        outputs.append(result.output)
    assert "blocks.2.resid.pre.sae" in outputs[0] and "explained variance" in outputs[0]
    assert "blocks.3.resid.post.sae" in outputs[1] and "blocks.3.resid.post.sae_wide" in outputs[1]  # @SITE beat the hook name
    run = actscope.open_run(tmp_path / "runs/sae")
    quality = run.to_pandas("sae").iloc[0]
    assert f"{quality['explained_variance']:.4g}"[:4] in outputs[2].replace("\n", "") and "loss_increase" in outputs[2]
    page = Page((tmp_path / "runs/sae/report.html").read_text())
    payload = page.payload()
    neurons = payload["neurons"]
    assert set(decoded_column(neurons["columns"]["site"], neurons["n"])) == {"blocks.2.resid.pre.sae"} and neurons["n"] == 32
    assert "sae" in payload["tables"] and "table-sae" in page.sections  # the reconstruction quality, its own section
    shown = decoded_column(payload["tables"]["sae"]["columns"]["explained_variance"], 1)[0]
    assert shown == pytest.approx(quality["explained_variance"], rel=1e-3)
