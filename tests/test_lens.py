"""Logit and tuned lenses: the last layer's lens is the model's logits, every layer's is the
readout of its residual stream (checked by hand), the tuned lens is deterministic and lowers the
KL to the final distribution on held-out text; attention patterns and the two commands."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import actscope
from actscope.cli.main import app
from actscope.explain import attention_patterns, fit_tuned_lens, lens_kl, logit_lens

PROMPT = "Siri feneet un peo . shi gasoet los"


@pytest.fixture(scope="module")
def lm():
    from actscope.zoo import tiny_lm

    return actscope.load(str(tiny_lm("relu")))


@pytest.fixture(scope="module")
def docs():
    from actscope.zoo import held_out_corpus

    return held_out_corpus(400)


@pytest.fixture(scope="module")
def tuned(lm, docs):
    return fit_tuned_lens(lm, docs, seed=0, steps=60)


def test_the_last_layers_lens_is_the_models_logits(lm):
    result = logit_lens(lm, PROMPT, top=3).to_pandas()
    ids = lm.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(lm(**ids).logits[0].double(), -1)  # [pos, vocab]
    last = result[result.layer == result.layer.max()]
    top = torch.topk(probs, 3, dim=-1)
    assert list(last.token_id) == top.indices.reshape(-1).tolist()
    assert np.allclose(last.prob, top.values.reshape(-1).numpy(), atol=1e-6)
    assert np.abs(last.kl).max() < 1e-9


@pytest.mark.parametrize("config_class, model_class, field, value", [
    ("Gemma2Config", "Gemma2ForCausalLM", "final_logit_softcapping", 0.5),  # a card of its own
    ("GraniteConfig", "GraniteForCausalLM", "logits_scaling", 8.0),  # matched to the Llama layout
])
def test_the_last_layers_lens_applies_what_the_config_does_to_the_logits(config_class, model_class, field, value):
    import transformers

    from actscope.explain.lens import _residuals, readout

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                                 max_position_embeddings=32, **{field: value})
    model = actscope.wrap(getattr(transformers, model_class)(config).eval())
    ids = torch.randint(1, 64, (1, 6))
    residuals, own = _residuals(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with torch.no_grad():
        lensed = readout(model)(residuals[-1])
        head_only = model.module.lm_head(model.module.model.norm(residuals[-1]))
    assert torch.allclose(lensed, own.logits, atol=1e-5), (lensed - own.logits).abs().max()
    assert not torch.allclose(head_only, own.logits, atol=1e-3)  # without the config's transform it would differ


def test_every_layers_lens_reads_its_residual_stream_through_the_final_norm_and_head(lm):
    result = logit_lens(lm, PROMPT, top=1).to_pandas()
    ids = lm.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = lm.module(**ids, output_hidden_states=True)
        final = torch.log_softmax(out.logits[0].double(), -1)
        block0 = out.hidden_states[1]  # block 0's output (hidden_states[0] is the embeddings)
        logp = torch.log_softmax(lm.module.lm_head(lm.module.model.norm(block0))[0].double(), -1)
    first = result[result.layer == 0]
    assert list(first.token_id) == logp.argmax(-1).tolist()
    assert np.allclose(first.kl, (final.exp() * (final - logp)).sum(-1).numpy(), atol=1e-6)
    assert list(first.input) == [lm.tokenizer.decode([i]) for i in ids["input_ids"][0].tolist()]


def test_the_tuned_lens_lowers_the_kl_on_held_out_text(lm, docs, tuned):
    held = docs[-80:]  # fit_tuned_lens held out the last fifth of these documents: same text
    logit, tuned_kl = lens_kl(lm, held), lens_kl(lm, held, tuned)
    assert tuned_kl[0] < 0.8 * logit[0], (logit, tuned_kl)
    assert abs(tuned_kl[-1]) < 1e-9 and abs(logit[-1]) < 1e-9  # the last layer is the model's own readout
    assert tuned.held_out["tuned"][0] == pytest.approx(tuned_kl[0], rel=1e-4)
    other = lens_kl(lm, docs[:40], tuned)  # fitted text too
    assert other[0] < lens_kl(lm, docs[:40])[0]


def test_the_tuned_lens_is_deterministic_with_a_seed(lm, docs, tuned):
    again = fit_tuned_lens(lm, docs, seed=0, steps=60)
    assert torch.equal(again.A, tuned.A) and torch.equal(again.b, tuned.b)
    other = fit_tuned_lens(lm, docs, seed=1, steps=60)
    assert not torch.equal(other.A, tuned.A)
    grids = logit_lens(lm, PROMPT, lens=tuned)
    assert grids.kind == "tuned" and len(grids.grid()) == 2


def test_fitting_never_touches_the_model(lm, docs):
    before = {name: p.detach().clone() for name, p in lm.module.named_parameters()}
    fit_tuned_lens(lm, docs[:60], steps=3)
    assert all(torch.equal(before[name], p) and p.grad is None for name, p in lm.module.named_parameters())


def test_attention_patterns_are_the_models_own(lm):
    result = attention_patterns(lm, PROMPT)
    ids = lm.tokenizer(PROMPT, return_tensors="pt")
    lm.module.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            want = lm.module(**ids, output_attentions=True).attentions
    finally:
        lm.module.set_attn_implementation("sdpa")
    for layer in range(2):
        for head in range(4):
            assert np.allclose(result.pattern(f"blocks.{layer}.attn.pattern", head), want[layer][0, head].double().numpy(), atol=1e-6)
    sinks = result.sinks()
    assert sinks[("blocks.1.attn.pattern", 2)] == pytest.approx(float(want[1][0, 2, :, 0].mean()), abs=1e-6)
    assert len(result.tokens) == ids["input_ids"].shape[1]


def test_lens_and_attention_commands_write_into_one_run(lm, docs, tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(docs[:100]))
    out = tmp_path / "run"
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["lens", str(lm.source), "--prompt", PROMPT, "--tuned", "--data", str(data), "--steps", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "logit lens" in result.output and "tuned lens" in result.output and "held-out" in result.output
    result = runner.invoke(app, ["attention", str(lm.source), "--prompt", PROMPT, "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = actscope.open_run(out)
    assert {"lens", "lens_kl", "attention", "attention_tokens"} <= set(run.tables)
    assert set(run.to_pandas("lens").kind) == {"logit", "tuned"}
    page = (out / "report.html").read_text()
    assert 'id="lens"' in page and 'id="attention"' in page
    other = runner.invoke(app, ["lens", "--prompt", "x", "--out", str(out)])  # MiniLM into a tiny-LM run: refused
    assert other.exit_code == 2 and "other weights" in other.output
