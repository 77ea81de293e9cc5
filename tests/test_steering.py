"""Steering vectors: contrastive means checked by hand, scale 0 changes nothing, scale s is a hand
``interventions.add``, positions are counted across a generation's calls, and the command."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import actscope
import actscope.interventions as iv
from actscope.cli.main import app
from actscope.errors import InputError, SiteError
from actscope.explain import steer, steering_sweep, steering_vector
from actscope.explain.steering import steered

SITE = "blocks.0.resid.post"


@pytest.fixture(scope="module")
def lm():
    from actscope.zoo import tiny_lm

    return actscope.load(str(tiny_lm("relu")))


@pytest.fixture(scope="module")
def prompts():
    from actscope.zoo import held_out_corpus

    docs = held_out_corpus(300)
    return [d for d in docs if " los " in d][:12], [d for d in docs if " lo " in d and " los " not in d][:12]


@pytest.fixture(scope="module")
def vector(lm, prompts):
    return steering_vector(lm, SITE, *prompts)


def hidden(model, texts, last: bool):
    """Per prompt, the mean (or last) block-0 output, one forward per prompt (no padding)."""
    out = []
    for text in texts:
        ids = model.tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
        with torch.no_grad():
            h = model.module(**ids, output_hidden_states=True).hidden_states[1][0].double()  # after block 0
        out.append(h[-1] if last else h.mean(0))
    return torch.stack(out).mean(0)


@pytest.mark.parametrize("tokens", ["mean", "last"])
def test_the_contrastive_vector_is_the_difference_of_the_means(lm, prompts, tokens):
    vector = steering_vector(lm, SITE, *prompts, tokens=tokens)
    want = hidden(lm, prompts[0], tokens == "last") - hidden(lm, prompts[1], tokens == "last")
    assert torch.allclose(vector.vectors[SITE].double(), want, atol=1e-5)
    assert vector.source == f"12 positive − 12 negative prompts ({tokens})"


def logits(model, text, context=None):
    ids = model.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        if context is None:
            return model(**ids).logits
        with context:
            return model(**ids).logits


def test_scale_zero_is_the_unsteered_model_and_scale_s_a_hand_add(lm, vector):
    base = logits(lm, "Siri feneet un peo")
    assert torch.equal(logits(lm, "Siri feneet un peo", steered(lm, vector, 0.0)), base)
    for scale in (0.5, 3.0, -2.0):
        hand = logits(lm, "Siri feneet un peo", actscope.edit(lm, {SITE: iv.add(scale * vector.vectors[SITE])}))
        assert torch.equal(logits(lm, "Siri feneet un peo", steered(lm, vector, scale)), hand)
        assert (hand - base).abs().max() > 1e-3  # and it does change the output
    result = steer(lm, vector, "Siri feneet", scale=0.0, max_new_tokens=8)
    assert result.steered.token_ids == result.unsteered.token_ids


def test_positions_are_counted_across_the_calls_of_a_generation(lm, vector):
    """The first call holds the prompt, each later one a generated token."""
    from actscope.explain.steering import _Adder

    for positions, want in (("all", [1, 1, 1, 1, 1]), ("prompt", [1, 1, 1, 0, 0]), ("new", [0, 0, 0, 1, 1]), ([0, -1], [1, 0, 1, 0, 0])):
        adder = _Adder(torch.ones(2), 1.0, positions, None)
        first = adder(torch.zeros(1, 3, 2))[0, :, 0].tolist()
        rest = [adder(torch.zeros(1, 1, 2))[0, 0, 0].item() for _ in range(2)]
        assert first + rest == want, positions
    base = logits(lm, "Siri feneet un")
    assert torch.equal(logits(lm, "Siri feneet un", steered(lm, vector, 2.0, positions="new")), base)  # a prompt-only call
    hand = logits(lm, "Siri feneet un", actscope.edit(lm, {SITE: iv.add(2.0 * vector.vectors[SITE])}))
    assert torch.equal(logits(lm, "Siri feneet un", steered(lm, vector, 2.0, positions="prompt")), hand)
    unsteered = steer(lm, vector, "Siri feneet un", scale=6.0, positions="new", max_new_tokens=4)
    assert unsteered.steered.token_ids[0] == unsteered.unsteered.token_ids[0]  # from the untouched last prompt position


def test_a_unit_vector_adds_to_that_unit_alone(lm):
    vector = steering_vector(lm, unit="blocks.1.mlp.post[17]")
    hand = logits(lm, "la mua", actscope.edit(lm, {"blocks.1.mlp.post[17]": iv.add(5.0)}))
    assert torch.equal(logits(lm, "la mua", steered(lm, vector, 5.0)), hand)


def test_the_sweep_measures_target_log_probabilities(lm, vector):
    sweep = steering_sweep(lm, vector, ["Siri feneet", "la mua"], [0.0, 4.0], targets=[" los", " las"], max_new_tokens=5,
                           classifier=lambda text: float(text.count("los")))
    table = sweep.to_pandas()
    assert list(table.scale) == [0.0, 0.0, 4.0, 4.0] and list(table.prompt) == ["Siri feneet", "la mua"] * 2
    unsteered = steer(lm, vector, "Siri feneet", scale=4.0, max_new_tokens=5, targets=[" los", " las"])
    assert table.text[0] == unsteered.unsteered.text and table.text[2] == unsteered.steered.text
    # by hand: the mean over generated steps of log(p(los) + p(las)), from the unsteered generation
    ids = [lm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" los", " las")]
    prompt = lm.tokenizer("Siri feneet", return_tensors="pt")["input_ids"]
    sequence = torch.cat([prompt, torch.tensor([list(unsteered.unsteered.token_ids)])], 1)
    with torch.no_grad():
        probs = torch.softmax(lm(input_ids=sequence).logits[0].double(), -1)
    steps = [math.log(float(probs[prompt.shape[1] - 1 + i, ids].sum())) for i in range(len(unsteered.unsteered.token_ids))]
    assert table.logprob[0] == pytest.approx(np.mean(steps), abs=1e-4)
    assert list(table.score) == [float(t.count("los")) for t in table.text]
    assert set(sweep.summary()) == {0.0, 4.0}


def test_bad_requests_are_refused_with_the_fix(lm, prompts):
    with pytest.raises(InputError, match="exactly one of"):
        steering_vector(lm, SITE, *prompts, unit="blocks.0.mlp.post[1]")
    with pytest.raises(SiteError, match="per-head"):
        steering_vector(lm, "blocks.0.attn.z", *prompts)
    with pytest.raises(InputError, match="positions must be"):
        steering_sweep(lm, steering_vector(lm, unit="blocks.0.mlp.post[1]"), "x", [1.0], positions="middle")
    with pytest.raises(InputError, match="does not generate text"):
        steer(actscope.load(), steering_vector(actscope.load(), unit="blocks.0.mlp.post[1]"), "hello")


def test_steer_command_prints_both_and_writes_the_sweep(lm, prompts, tmp_path):
    positive, negative = tmp_path / "pos.txt", tmp_path / "neg.txt"
    positive.write_text("\n".join(prompts[0]))
    negative.write_text("\n".join(prompts[1]))
    out = tmp_path / "run"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, [
        "steer", str(lm.source), "--positive", str(positive), "--negative", str(negative), "--site", SITE, "--scale", "3",
        "--prompt", "Siri feneet", "--sweep", "0,3", "--target", " los", "--max-new-tokens", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "unsteered" in result.output and "steered" in result.output and "scale sweep" in result.output
    run = actscope.open_run(out)
    assert list(run.to_pandas("steering").scale) == [0.0, 3.0]
    assert (out / "report.html").is_file() and 'id="steering"' in (out / "report.html").read_text()
    bad = CliRunner().invoke(app, ["steer", str(lm.source), "--prompt", "x"])
    assert bad.exit_code == 2 and "--positive" in bad.output


def test_a_range_of_sites_steers_at_every_layer_of_it(lm, prompts):
    vector = steering_vector(lm, "blocks.0-1.resid.post", *prompts)
    assert vector.sites == ["blocks.0.resid.post", "blocks.1.resid.post"]
    want = block_output(lm, prompts[0], 1) - block_output(lm, prompts[1], 1)  # block 1's own contrast of means, by hand
    assert torch.allclose(vector.vectors["blocks.1.resid.post"].double(), want, atol=1e-5)
    hand = logits(lm, "Siri feneet un peo", actscope.edit(lm, {site: iv.add(1.5 * v) for site, v in vector.vectors.items()}))
    assert torch.equal(logits(lm, "Siri feneet un peo", steered(lm, vector, 1.5)), hand)
    only_first = logits(lm, "Siri feneet un peo", actscope.edit(lm, {SITE: iv.add(1.5 * vector.vectors[SITE])}))
    assert (hand - only_first).abs().max() > 1e-4  # the second layer's vector did act


def block_output(model, texts, block: int) -> torch.Tensor:
    """The mean over prompts of each prompt's mean output of decoder layer ``block`` (a raw forward hook)."""
    out = []
    handle = model.module.model.layers[block].register_forward_hook(
        lambda mod, args, output: out.append((output[0] if isinstance(output, tuple) else output)[0].double().mean(0)))
    try:
        for text in texts:
            with torch.no_grad():
                model.module(**model.tokenizer(text, return_tensors="pt", truncation=True, max_length=128))
    finally:
        handle.remove()
    return torch.stack(out).mean(0)


def saved_sae(folder, width: int, site: str = SITE, features: int = 12):
    from test_sae import random_tensors, save_saelens

    tensors = random_tensors(width, features, scale=3.0, seed=3)
    save_saelens(folder, tensors, metadata={"actscope_site": site})
    return tensors


def test_an_sae_features_direction_steers_as_a_hand_add_of_its_decoder_row(tmp_path):
    from actscope.sae import attach, load_sae
    from actscope.zoo import tiny_lm

    model = actscope.load(str(tiny_lm("relu")))
    tensors = saved_sae(tmp_path / "sae", model.module.config.hidden_size)
    feature = attach(model, load_sae(tmp_path / "sae")) + "[3]"
    vector = steering_vector(model, unit=feature)
    assert vector.sites == ["blocks.0.resid.post.sae[3]"]
    base = logits(model, "Siri feneet un peo")
    assert torch.equal(logits(model, "Siri feneet un peo", steered(model, vector, 0.0)), base)
    for scale in (2.0, -3.0):  # feature 3 raised by s: the stream gains s · W_dec[3], the SAE's error term kept
        hand = logits(model, "Siri feneet un peo", actscope.edit(model, {SITE: iv.add(scale * tensors["W_dec"][3])}))
        got = logits(model, "Siri feneet un peo", steered(model, vector, scale))
        torch.testing.assert_close(got, hand, atol=1e-5, rtol=1e-5)
        assert (got - base).abs().max() > 1e-3


def test_steer_command_takes_an_sae_feature(lm, tmp_path):
    saved_sae(tmp_path / "sae", lm.module.config.hidden_size)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, [
        "steer", str(lm.source), "--sae", str(tmp_path / "sae"), "--unit", "blocks.0.resid.post.sae[3]", "--scale", "8",
        "--prompt", "Siri feneet", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "steering vector: blocks.0.resid.post.sae[3]" in result.output and "unsteered" in result.output
    bad = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["steer", str(lm.source), "--unit", "blocks.0.resid.post.sae[3]", "--prompt", "x"])
    assert bad.exit_code == 2 and "--sae" in bad.output.replace("\n", "")
