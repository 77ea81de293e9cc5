"""The doc LMs of the Sparsing Law reproduction: their corpus (docstrings read, never executed), the
held-out split, a miniature training run, and the reproduction script's measurement and pass rule."""
from __future__ import annotations

import json
import sys

import pytest

from actscope.errors import InputError
from actscope.zoo.doctext import HELD_OUT_EVERY, doc_texts, fingerprint, split_texts
from conftest import example_script

MINI = dict(steps=12, d_model=32, d_ff=64, n_layers=2, vocab_size=400, batch_size=8, sources=("actscope",), max_texts=200)


@pytest.fixture
def planted_package(tmp_path, monkeypatch):
    """A package whose import would write a file: doc_texts must read it without importing it."""
    pkg = tmp_path / "doc_corpus_probe"
    (pkg / "tests").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        '"""The probe package documents itself in a sentence long enough to be kept by the reader."""\n'
        f'open({str(tmp_path / "executed")!r}, "w").write("ran")\n'
        'def helper():\n    """A helper function whose docstring is also long enough to be kept as a text."""\n'
        'def short():\n    """Too short."""\n')
    (pkg / "tests" / "test_x.py").write_text('"""A docstring inside a tests folder is skipped by the corpus reader."""\n')
    (pkg / "broken.py").write_text('"""unterminated\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    sys.modules.pop("doc_corpus_probe", None)


def test_doc_texts_reads_docstrings_without_running_the_package(planted_package, tmp_path):
    texts = doc_texts(("doc_corpus_probe",), min_chars=40)
    assert texts == ("The probe package documents itself in a sentence long enough to be kept by the reader.",
                     "A helper function whose docstring is also long enough to be kept as a text.")
    assert not (tmp_path / "executed").exists() and "doc_corpus_probe" not in sys.modules


def test_doc_texts_names_the_fix_for_an_unknown_source():
    with pytest.raises(InputError, match=r"'no_such_package_xyz' is neither 'stdlib' nor an installed package"):
        doc_texts(("no_such_package_xyz",))


def test_held_out_split_depends_on_content_only():
    texts = [f"text number {i} of the split test" for i in range(2000)]
    train, held = split_texts(texts)
    train_r, held_r = split_texts(texts[::-1])
    assert sorted(held) == sorted(held_r) and len(train) + len(held) == len(texts)
    assert abs(len(held) / len(texts) - 1 / HELD_OUT_EVERY) < 0.02 and not set(train) & set(held)
    assert fingerprint(texts) != fingerprint(texts[::-1]) and fingerprint(texts) == fingerprint(list(texts))


@pytest.fixture(scope="module")
def mini_pair(tmp_path_factory):
    from actscope.zoo.doc_lm import train_doc_lm

    root = tmp_path_factory.mktemp("doc-lm")
    return {act: train_doc_lm(act, 1, root / act, **MINI) for act in ("relu", "silu")}


def test_mini_doc_lms_train_from_the_same_start_and_are_reused(mini_pair):
    from safetensors.torch import load_file

    from actscope.zoo.doc_lm import train_doc_lm

    relu, silu = (json.loads((mini_pair[a] / "actscope_zoo.json").read_text()) for a in ("relu", "silu"))
    assert relu["config"]["corpus"] == silu["config"]["corpus"] != ""
    assert {k: v for k, v in relu["config"].items() if k != "activation"} == \
        {k: v for k, v in silu["config"].items() if k != "activation"}
    assert relu["held_out"]["mlp_activation_ratio"]["nonzero"] < 1.0 == silu["held_out"]["mlp_activation_ratio"]["nonzero"]
    assert relu["held_out"]["held_out_loss"] < relu["loss_log"][0][1]  # it learned something
    weights = load_file(mini_pair["relu"] / "model.safetensors")
    mtime = (mini_pair["relu"] / "model.safetensors").stat().st_mtime_ns
    assert train_doc_lm("relu", 1, mini_pair["relu"], **MINI) == mini_pair["relu"]
    assert (mini_pair["relu"] / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained
    assert weights["lm_head.weight"].shape == (400, 32)


@pytest.mark.parametrize("settings, message", [
    (dict(activation="gelu"), "activation must be one of"),
    (dict(vocab_size=100), "vocab_size must be at least 300"),
    (dict(d_model=30), "d_model must be a multiple of 8"),
    (dict(corpus="abc"), "corpus \\(it is computed from the texts\\)"),
    (dict(layers=3), "unknown setting\\(s\\) \\['layers'\\]"),
])
def test_bad_settings_are_refused_with_the_fix(settings, message, tmp_path):
    from actscope.zoo.doc_lm import train_doc_lm

    activation = settings.pop("activation", "relu")
    with pytest.raises(InputError, match=message):
        train_doc_lm(activation, 1, tmp_path / "m", **{**MINI, **settings})
    assert not (tmp_path / "m").exists()


def test_sparsing_law_scale_measures_and_labels(mini_pair):
    """Seconds-long smoke of examples/sparsing_law_scale.py on the miniature models."""
    from actscope.zoo.doc_lm import DocLMConfig, doc_corpus

    script = example_script("sparsing_law_scale")
    _, held_out, _ = doc_corpus(DocLMConfig(**MINI))
    found = {act: script.measure(path, held_out[:20], held_out[20:60], sweep=(), baselines=False)
             for act, path in mini_pair.items()}
    for m in found.values():
        assert 0 <= m["ratio"] <= 1 and m["degradation"] <= script.P and len(m["per_layer"]) == 2
        assert m["ratio"] == pytest.approx(1 - m["result"].sparsity)
    assert found["silu"]["dense"] == [1.0, 1.0] and max(found["relu"]["dense"]) < 1.0
    assert script.verdict([0.07, 0.06], [0.40, 0.39]) == "holds"
    assert script.verdict([0.07, 0.30], [0.40, 0.39]) == "direction only"
    assert script.verdict([0.07, 0.45], [0.40, 0.39]) == "does not hold"
    assert script.verdict([0.01, 0.01], [0.40, 0.05]) == "uninformative"
