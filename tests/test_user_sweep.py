"""Families no other test builds, used the way a new user would (sites, profile, edit): each test
here failed before the fix it names."""
from __future__ import annotations

import logging

import pytest
import torch

import actscope
from conftest import hook_count

pytestmark = pytest.mark.usefixtures("one_thread")  # not set at import: that held every later test file at one thread
TEXTS = ["The cat sat on the mat.", "Rain again today, héllo ☃.", "Short."]


def tiny_resnet() -> torch.nn.Module:
    """A Hugging Face CNN: its config has channels but no image size."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config).eval()


def tiny_t5(tokenizer) -> torch.nn.Module:
    """An encoder-decoder that, unlike BART, does not make its decoder's input itself."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def words():
    from conftest import word_tokenizer

    vocab = ["<pad>", "</s>", "<unk>", *sorted({w for text in TEXTS for w in text.split()})]
    return word_tokenizer(vocab, pad_token="<pad>", unk_token="<unk>")


def test_cnn_without_image_size_lists_its_sites_with_shapes():
    # was: example inputs were token ids (no image_size in ResNet's config), so the forward failed
    # with "'NoneType' object has no attribute 'shape'" blamed on the model
    model = actscope.wrap(tiny_resnet())
    assert model.takes_images
    shapes = {site.name: site.shape for site in model.sites()}
    assert shapes["module:resnet.encoder.stages.1@output"] == ("batch", 16, 28, 28)  # 224 / 8: the stem halves twice, stage 1 once


def test_encoder_decoder_profile_feeds_its_decoder_the_shifted_text(words):
    # was: T5 got only input_ids and its own forward refused ("exactly one of input_ids or inputs_embeds")
    module = tiny_t5(words)
    model = actscope.wrap(module, words)
    site = "module:decoder.block.0.layer.2.DenseReluDense.wo@input"
    shapes = {s.name: s.shape for s in model.sites()}  # found by a forward pass the model accepts
    assert shapes[site.replace("@input", "@output")] == ("batch", "pos", 16)
    run = actscope.profile(model, TEXTS, sites=f"module:encoder.block.0.layer.1.DenseReluDense.wo@input,{site}")
    layers = run.to_pandas("layers").set_index("site")
    real = sum(len(text.split()) for text in TEXTS)
    assert int(run.to_pandas("neurons").groupby("site")["count"].first()[site]) == real  # padding excluded in the decoder too
    assert set(layers.index) == {site, "module:encoder.block.0.layer.1.DenseReluDense.wo@input"}
    # what the decoder saw: the text shifted right behind decoder_start_token_id, checked by hand
    inputs = words(TEXTS, return_tensors="pt", padding=True)
    shifted = torch.cat([torch.zeros_like(inputs["input_ids"][:, :1]), inputs["input_ids"][:, :-1]], dim=1)
    seen = []
    handle = module.decoder.block[0].layer[2].DenseReluDense.wo.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            module(**inputs, decoder_input_ids=shifted, decoder_attention_mask=inputs["attention_mask"])
    finally:
        handle.remove()
    mask = inputs["attention_mask"].bool()
    expected = seen[0][mask].double()  # [tokens, d_ff]
    got = torch.tensor(run.to_pandas("neurons").query("site == @site")["mean"].to_numpy())
    assert (got - expected.mean(0)).abs().max() < 1e-5
    assert hook_count(module) == 0


def test_measurements_on_image_data_are_refused_naming_images():
    # was: "measurements need text data …, not ready model inputs" for a folder of images
    from actscope.errors import InputError

    images = torch.rand(2, 3, 32, 32).numpy()
    with pytest.raises(InputError, match="the data are images; profile the images without --metrics"):
        actscope.profile(actscope.wrap(tiny_resnet()), images, sites="module:resnet.encoder.stages.0@output", metrics="all")


def test_a_module_list_is_refused_before_any_forward_and_left_out_of_sites(words):
    # was: module:decoder.block@output (a ModuleList, never called) was listed and profiled into a run with no
    # table at all; the CLI then said "this run has no 'layers' table"
    from actscope.errors import SiteError

    model = actscope.wrap(tiny_t5(words), words)
    assert "module:decoder.block@output" not in {s.name for s in model.sites(shapes=False)}
    assert "module:decoder.block.0@output" in {s.name for s in model.sites(shapes=False)}
    with pytest.raises(SiteError, match=r"ModuleList 'decoder.block' is a container the model never calls.*"
                                        r"module:decoder.block.0@output"):
        actscope.profile(model, TEXTS, sites="module:decoder.block@output")


def test_a_module_that_never_runs_is_named_not_dropped_silently(words, caplog):
    # was: T5's `shared` embedding (reached as encoder.embed_tokens) gave no row and no word about it
    model = actscope.wrap(tiny_t5(words), words)
    with caplog.at_level(logging.WARNING, logger="actscope"):
        run = actscope.profile(model, TEXTS, sites="module:shared@output,module:encoder.block.0@output")
    assert "module:shared@output: the module never ran" in caplog.text and "no rows for it" in caplog.text
    assert set(run.to_pandas("neurons").site) == {"module:encoder.block.0@output"}  # the site that ran is kept
    assert hook_count(model.module) == 0


def tiny_phi(tokenizer) -> torch.nn.Module:
    """A decoder whose modules match no carded layout (fc1/fc2 MLP, one norm per block)."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=32, pad_token_id=0)
    return PhiForCausalLM(config).eval()


@pytest.mark.parametrize("call", ["lens", "tuned", "attention"])
def test_canonical_only_explanations_on_a_card_less_model_say_a_card_is_needed(words, call):
    # was: "'blocks.*.resid.post' is a canonical site name … use module sites instead", which lens and
    # the attention viewer cannot take
    from actscope.errors import InputError
    from actscope.explain import attention_patterns, fit_tuned_lens, logit_lens

    model = actscope.wrap(tiny_phi(words), words)
    run = {"lens": lambda: logit_lens(model, "The cat sat"), "tuned": lambda: fit_tuned_lens(model, TEXTS * 4, seed=0),
           "attention": lambda: attention_patterns(model, "The cat sat")}[call]
    with pytest.raises(InputError, match=r"which only a family card gives; .*model type 'phi'.* has no card") as caught:
        run()
    assert "use module sites" not in str(caught.value)
    assert hook_count(model.module) == 0


def test_gemma3_text_has_a_card_where_the_layout_matcher_saw_none():
    # was: Gemma 3's q_norm/k_norm kept it from Gemma 2's layout, so `actscope profile` refused its default sites;
    # the family matrix (tests/test_families.py) checks its sites against the model's own arithmetic
    from actscope.models.adapters import card_for
    from actscope.zoo.tiny import tiny_model

    module, _ = tiny_model("gemma3_text")
    assert card_for(module).family == "gemma3_text"


def test_decoding_a_card_less_model_says_a_card_is_needed_not_cett(words):
    # was: "… is not a neuron site read at the input of an output projection; CETT needs …" for fc2's input
    from actscope.errors import InputError
    from actscope.explain import decode

    model = actscope.wrap(tiny_phi(words), words)
    with pytest.raises(InputError, match="decoding reads a neuron's path to the vocabulary") as caught:
        decode(model, "module:model.layers.0.mlp.fc2@input")
    assert "CETT" not in str(caught.value)


def test_generate_on_an_encoder_exits_2_naming_what_generates(words, tmp_path):
    # was: exit 1, "internal error: AttributeError: 'BertModel' object has no attribute 'generate'"
    from transformers import BertConfig, BertModel
    from typer.testing import CliRunner

    from actscope.cli.main import app

    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path / "bert")
    words.save_pretrained(tmp_path / "bert")
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["generate", str(tmp_path / "bert"), "--prompt", "The cat"])
    assert result.exit_code == 2, result.output
    assert "does not generate text; generate needs a causal LM" in " ".join(result.output.split())


def test_an_encoder_decoders_continuation_is_its_decoders_tokens_after_the_start(words):
    # was: the prompt's length was cut off the decoder's output too, dropping generated tokens (T5)
    from actscope.explain.steering import generate

    module = tiny_t5(words)
    model = actscope.wrap(module, words)
    inputs = words("The cat sat on the mat.", return_tensors="pt")
    with torch.no_grad():
        expected = module.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert expected.shape[1] == 5 and int(expected[0, 0]) == module.config.decoder_start_token_id
    module.generation_config.min_new_tokens = 4  # no early end of sequence, so the four tokens are all there
    assert generate(model, "The cat sat on the mat.", max_new_tokens=4).token_ids == tuple(expected[0, 1:].tolist())


def test_patching_an_encoder_decoder_from_prompts_is_refused_naming_the_decoder(words):
    # was: the model's own ValueError ("exactly one of input_ids or inputs_embeds"), blamed on its config
    from actscope.errors import InputError
    from actscope.explain import activation_patching, logit_difference

    model = actscope.wrap(tiny_t5(words), words)
    metric = logit_difference(words.convert_tokens_to_ids("cat"), words.convert_tokens_to_ids("mat."))
    with pytest.raises(InputError, match="clean: T5ForConditionalGeneration is an encoder-decoder.*decoder_input_ids"):
        activation_patching(model, "The cat sat", "The mat. sat", metric, "module:encoder.block.0@output", per="site")
    assert hook_count(model.module) == 0


def test_sites_of_a_card_less_model_print_whole_names_in_80_columns(words, tmp_path):
    # was: piped at 80 columns, the duplicate module column squeezed the names to "module:model.l…"
    from typer.testing import CliRunner

    from actscope.cli.main import app

    tiny_phi(words).save_pretrained(tmp_path / "phi")
    words.save_pretrained(tmp_path / "phi")
    result = CliRunner().invoke(app, ["sites", str(tmp_path / "phi"), "--match", "*layers.0.mlp*"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    for name in ("module:model.layers.0.mlp.fc1@output", "module:model.layers.0.mlp.fc2@output"):
        assert name in result.output
    header = next(line for line in result.output.splitlines() if "site" in line and "shape" in line)
    assert "module" not in header and "┃ ┃" not in header  # no empty, squeezed module column
    assert "several at once with * (e.g. module:model.layers.*.mlp@output)" in " ".join(result.output.split())
