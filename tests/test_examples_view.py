"""top_examples: the run's examples for chosen sites and units, in order, with the token marked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import actscope
from actscope.explain.examples import TopExamples, marked, top_examples
from actscope.zoo.tiny import tiny_model

DOCS = [
    "the cat sat on the mat", "a dog ran in the park", "the sun is hot today",
    "my cat likes the warm sun", "dogs and cats play",
]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from conftest import word_tokenizer

    words = sorted({w for d in DOCS for w in d.split()})
    tokenizer = word_tokenizer(["<pad>", "<unk>", *words], pad_token="<pad>", unk_token="<unk>")
    module, _ = tiny_model("llama")
    model = actscope.wrap(module, tokenizer=tokenizer)
    out = tmp_path_factory.mktemp("runs") / "run"
    actscope.profile(model, DOCS, sites="blocks.0.mlp.post,blocks.1.attn.z,blocks.0.attn.pattern", out=out, k=3)
    return out


def by_hand(run_dir, site, units):
    frame = actscope.open_run(run_dir).to_pandas("examples")
    frame = frame[(frame.site == site) & frame.unit.isin(units)]
    return frame.sort_values(["unit", "rank"]).reset_index(drop=True)


def test_units_of_a_site_equal_the_run_rows(text_run):
    shown = top_examples(text_run, "blocks.0.mlp.post[5]", units=[9, 2])
    expected = by_hand(text_run, "blocks.0.mlp.post", [2, 5, 9])
    assert isinstance(shown, TopExamples)
    frame = shown.to_pandas()
    assert frame.unit.tolist() == expected.unit.tolist() == [2, 2, 2, 5, 5, 5, 9, 9, 9]
    assert frame["rank"].tolist() == [0, 1, 2] * 3
    for column in ("value", "doc", "pos", "left", "token", "right"):
        assert frame[column].tolist() == expected[column].tolist()
    assert all(np.diff(frame.value[frame.unit == 5]) <= 0)
    first = frame.iloc[0]
    assert first.text == f"{first.left}[[{first.token}]]{first.right}"
    assert first.token in DOCS[first.doc].split()


def test_the_marked_token_is_the_one_at_its_position(text_run):
    shown = top_examples(actscope.open_run(text_run), "blocks.0.mlp.post", top=1)
    assert len(shown.unit) == 64 and set(shown.rank.tolist()) == {0}
    for doc, pos, token in zip(shown.doc, shown.pos, shown.token):
        assert DOCS[doc].split()[pos] == token  # no special tokens: position p is word p
    text = shown.rich_text(0)  # a rich Text: the token is the one styled span, the data literal
    assert [(text.plain[s.start:s.end], str(s.style)) for s in text.spans] == [(shown.token[0], "bold reverse")]


def test_head_sites_glob_and_markers(text_run):
    shown = top_examples(text_run, "blocks.*.attn.z[0:8]")  # head 0 of blocks.1.attn.z: units 0-7
    assert set(shown.site.tolist()) == {"blocks.1.attn.z"} and sorted(set(shown.unit.tolist())) == list(range(8))
    assert marked("a\nb ", "x", " c") == "a⏎b [[x]] c"


def test_expert_and_router_examples():
    module, inputs = tiny_model("mixtral")
    run = actscope.profile(module, [inputs], sites="blocks.0.moe.experts.1.post,blocks.0.moe.router", k=2)
    router = top_examples(run, "blocks.0.moe.router[1]")
    logits = []
    with torch.no_grad(), actscope.capture(module, "blocks.0.moe.router", flat=True) as cap:
        module(**inputs)
    logits = cap.tensor("blocks.0.moe.router")[:, 1]  # [tokens] expert 1's router logit
    np.testing.assert_allclose(router.value, torch.sort(logits, descending=True).values[:2].double().numpy(), rtol=1e-6)
    assert len(top_examples(run, "blocks.0.moe.experts.1.post", units=0).unit) == 2


@pytest.mark.parametrize(("site", "units", "message"), [
    ("blocks.0.mlp.pots", None, "Did you mean: blocks.0.mlp.post"),
    ("blocks.0.attn.pattern", None, "no top examples for attention-pattern sites"),
    ("blocks.0.mlp.post", 999, r"no examples for unit\(s\) \[999\]"),
    ("blocks.1.attn.z[head=1]", None, "not per head"),
])
def test_what_the_run_does_not_hold_is_said(text_run, site, units, message):
    with pytest.raises(actscope.InputError, match=message):
        top_examples(text_run, site, units)


def test_rows_come_sorted_by_unit_and_rank_whatever_the_table_order(text_run):
    run = actscope.open_run(text_run)
    table = run.examples
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    shown = top_examples(actscope.Run(run.manifest, {"examples": shuffled}, {}), "blocks.0.mlp.post[3,4]")
    assert list(zip(shown.unit.tolist(), shown.rank.tolist())) == [(3, 0), (3, 1), (3, 2), (4, 0), (4, 1), (4, 2)]
