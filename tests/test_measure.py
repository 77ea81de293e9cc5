"""``actscope.measure`` and ``profile(metrics=…)``: the measurements saved into a run are the
metric functions' own tables, skipped ones say why, bad names fail before any work."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import actscope
from actscope.cli.main import app
from actscope.data import builtin_corpus
from actscope.errors import InputError
from actscope.measure import MEASUREMENTS, MeasureConfig, measure, objective_for, resolve_metrics

TEXTS = list(builtin_corpus().documents[:24])


def _same_columns(saved, direct) -> None:
    """A table read back from the run equals the metric's own table, column by column."""
    saved = saved.to_pandas()
    assert list(saved.columns) == list(direct)
    for name, column in direct.items():
        expected = np.asarray(column)
        if expected.dtype == object:
            assert list(saved[name]) == list(expected), name
        else:
            np.testing.assert_allclose(saved[name].to_numpy(dtype=float), expected.astype(float), rtol=1e-12, equal_nan=True, err_msg=name)


def test_unknown_measurement_names_the_choices():
    with pytest.raises(InputError) as error:
        resolve_metrics("temporal,sparkles")
    assert "'sparkles'" in str(error.value) and "cett" in str(error.value) and "'all'" in str(error.value)
    assert [m.name for m in resolve_metrics("all")] == list(MEASUREMENTS)
    assert [m.name for m in resolve_metrics("codes, temporal,codes")] == ["codes", "temporal"]


def test_profile_refuses_bad_metrics_before_profiling(minilm, tmp_path):
    calls = []
    with pytest.raises(InputError, match="unknown measurement 'nope'"):
        actscope.profile(minilm, TEXTS, out=tmp_path / "run", metrics="nope", progress=lambda d, t: calls.append(d))
    assert calls == [] and not (tmp_path / "run").exists()
    inputs = [{"input_ids": torch.tensor([[101, 2023, 102]])}]
    with pytest.raises(InputError, match="measurements need text data"):
        actscope.profile(minilm, inputs, metrics="temporal")
    with pytest.raises(InputError, match="at least 2 non-empty text documents, got 1"):  # before the pass, not after it
        actscope.profile(minilm, ["only one document here", "   "], out=tmp_path / "run", metrics="temporal",
                         progress=lambda d, t: calls.append(d))
    assert calls == [] and not (tmp_path / "run").exists()


def test_saved_measurements_equal_the_metric_functions(minilm, tmp_path):
    from actscope.metrics.codes import activation_codes
    from actscope.feeding import materialised
    from actscope.metrics.extreme import extreme_tokens
    from actscope.metrics.outliers import outlier_channels
    from actscope.metrics.temporal import temporal_sparsity

    config = MeasureConfig(batch_size=8)
    run = actscope.profile(minilm, TEXTS, out=tmp_path / "run", metrics="temporal,codes,extreme,outliers,moe,sensitivity",
                           measure_config=config)
    saved = actscope.open_run(tmp_path / "run")
    _same_columns(saved.table("temporal"), temporal_sparsity(minilm, TEXTS, "blocks.*.mlp.post", batch_size=8).to_table())
    batches = materialised(minilm, TEXTS, batch_size=8, max_length=128, what="test")
    _same_columns(saved.table("activation_codes"), activation_codes(minilm, batches, "blocks.*.mlp.post", per="token").to_table())
    extreme = extreme_tokens(minilm, TEXTS, batch_size=8)
    _same_columns(saved.table("extreme_heads"), extreme.to_table())
    _same_columns(saved.table("extreme_layers"), extreme.layers_table())
    _same_columns(saved.table("outliers"), outlier_channels(minilm, TEXTS, batch_size=8).to_table())
    outcome = saved.manifest["measurements"]
    assert outcome["moe"]["skipped"] == "the model is not a supported mixture of experts"
    assert "--checkpoints" in outcome["sensitivity"]["skipped"] and outcome["sensitivity"]["tables"] == []
    assert outcome["temporal"]["tables"] == ["temporal"] and outcome["temporal"]["skipped"] is None
    assert any("redundancy ratio" in line for line in outcome["codes"]["summary"])
    assert set(run.tables) == set(saved.tables)


def test_cett_measurement_matches_a_direct_search():
    from actscope.metrics.cett import cett_sparsity
    from actscope.metrics.cett.objectives import CausalLMLoss
    from actscope.zoo import held_out_corpus, tiny_lm

    model = actscope.load(tiny_lm("relu"))
    texts = held_out_corpus(40)
    config = MeasureConfig(sweep=(0.02,), held_out=0.25, batch_size=16)
    (result,) = measure(model, texts, "cett", config)
    direct = cett_sparsity(model, texts[:30], CausalLMLoss(texts[30:], batch_size=16), p=0.01, sweep=(0.02,), batch_size=16)
    sweep = result.tables["cett_sweep"]
    np.testing.assert_allclose(sweep["sparsity"], direct.sweep.to_table()["sparsity"], rtol=1e-12)
    assert sorted(set(sweep["method"])) == ["cett", "fat", "topk"] and sorted(set(sweep["p"])) == [0.01, 0.02]
    np.testing.assert_allclose(result.tables["cett_thresholds"]["threshold"], direct.thresholds.to_table()["threshold"], rtol=1e-12)
    for column in ("cett_at_eps", "activation_ratio", "dense_activation_ratio"):
        np.testing.assert_allclose(result.tables["cett_layers"][column], direct.to_table()[column], rtol=1e-12, err_msg=column)
    assert result.summary[0].startswith("CETT-causal_lm_loss-1.0%: sparsity")


@pytest.mark.parametrize("cls, objective", [
    ("LlamaForCausalLM", "CausalLMLoss"),
    ("GPT2LMHeadModel", "CausalLMLoss"),
    ("BertForMaskedLM", "MaskedLMLoss"),
    ("BertForSequenceClassification", "ClassifierKL"),
    ("BertModel", "EmbeddingFidelity"),
])
def test_cett_objective_follows_the_model_head(cls, objective):
    model = types.SimpleNamespace(module=type(cls, (), {})())
    chosen = objective_for(model, ["a b", "c d"], MeasureConfig())
    assert type(chosen).__name__ == objective and list(chosen.data) == ["a b", "c d"]


def test_measurements_that_do_not_apply_say_why():
    from actscope.zoo.tiny import tiny_model

    wrapped = actscope.wrap(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    results = {r.name: r for r in measure(wrapped, ["one text", "two texts"], "all")}
    assert all(r.skipped for r in results.values())
    assert "no tokenizer" in results["memory"].skipped and "MLP neuron" in results["cett"].skipped
    from actscope.measure import _is_moe

    assert _is_moe(actscope.wrap(tiny_model("mixtral")[0]), MeasureConfig()) is None
    assert _is_moe(actscope.wrap(tiny_model("bert")[0]), MeasureConfig()) == "the model is not a supported mixture of experts"


def test_cli_profile_metrics(tmp_path):
    runner = CliRunner(env={"COLUMNS": "160"})
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    bad = runner.invoke(app, ["profile", "--data", str(data), "--metrics", "temporal,bogus", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "unknown measurement 'bogus'" in bad.output and not (tmp_path / "bad").exists()
    good = runner.invoke(app, ["profile", "--data", str(data), "--metrics", "temporal,moe", "--out", str(tmp_path / "run")])
    assert good.exit_code == 0, good.output
    assert "temporal → tables temporal" in good.output and "moe: skipped" in good.output
    assert "temporal" in actscope.open_run(tmp_path / "run").tables


def test_sensitivity_over_given_checkpoints_ends_with_this_model(tmp_path):
    from actscope.metrics.sensitivity import neuron_sensitivity
    from actscope.zoo.tiny import tiny_model

    texts = ["a b c d", "c d e f g", "b a d"]
    module = tiny_model("llama")[0]
    tokenizer = _tiny_tokenizer(module.config.vocab_size)
    earlier = []
    for step in range(2):  # two "earlier checkpoints": the model with perturbed weights
        torch.manual_seed(step)
        copy = type(module)(module.config).eval()
        copy.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in module.state_dict().items()})
        copy.save_pretrained(tmp_path / f"ckpt{step}")
        earlier.append(str(tmp_path / f"ckpt{step}"))
    model = actscope.wrap(module.eval(), tokenizer)
    (result,) = measure(model, texts, "sensitivity", MeasureConfig(checkpoints=tuple(earlier)))
    direct = neuron_sensitivity([*earlier, model], texts, tokenizer=tokenizer)
    np.testing.assert_allclose(result.tables["sensitivity"]["sensitivity"], direct.sensitivity, rtol=1e-12)
    assert "over 3 checkpoints" in result.summary[0]


def _tiny_tokenizer(vocab_size: int):
    from conftest import word_tokenizer

    words = ["<pad>", "<unk>", "<s>", *"abcdefg"] + [f"w{i}" for i in range(vocab_size - 10)]
    return word_tokenizer(words, bos="<s>", pad_token="<pad>", unk_token="<unk>")


def test_cli_passes_checkpoints_to_sensitivity(tmp_path):
    runner = CliRunner(env={"COLUMNS": "160"})
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS[:6]) + "\n")
    missing = runner.invoke(app, ["profile", "--data", str(data), "--metrics", "sensitivity", "--checkpoints",
                                  str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    assert missing.exit_code == 2 and not (tmp_path / "run").exists()
    assert f"checkpoint directory not found: {tmp_path / 'nope'}" in " ".join(missing.output.split())
    assert "6/6 docs" not in missing.output  # refused before the profiling pass
