"""Activation harvesting: values bit-identical to a captured forward, token order, bounded shards,
the shuffled stream, resume after an interruption (identical shards), and every refusal."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import actscope
from actscope.cli.main import app
from actscope.feeding import feed
from actscope.trace import Capture, split_token_id

SITES = "blocks.0.mlp.post,blocks.1.resid.post"
SHARD_MB = 0.03


@pytest.fixture(scope="module")
def lm():
    from actscope.zoo import tiny_lm

    return actscope.load(tiny_lm("relu"))


@pytest.fixture(scope="module")
def docs():
    from actscope.zoo import held_out_corpus

    return held_out_corpus(24)


@pytest.fixture(scope="module")
def harvested(lm, docs, tmp_path_factory):
    return actscope.harvest(lm, docs, sites=SITES, out=tmp_path_factory.mktemp("h") / "acts", batch_size=3, shard_mb=SHARD_MB)


def captured(lm, docs, **limits):
    capture = Capture(lm, SITES, flat=True)
    feed(capture, docs, batch_size=3, **limits)
    return capture


def stacked(dataset, name):
    return torch.stack([dataset[i][name] for i in range(len(dataset))]) if name in dataset.sites else \
        torch.tensor([dataset[i][name] for i in range(len(dataset))])


def test_values_are_bit_identical_to_a_captured_forward_in_document_order(lm, docs, harvested):
    capture = captured(lm, docs)
    for site in harvested.sites:
        assert torch.equal(stacked(harvested, site), capture.tensor(site)), site
    doc, pos = split_token_id(capture.token_ids("blocks.0.mlp.post"))
    assert torch.equal(stacked(harvested, "doc"), doc) and torch.equal(stacked(harvested, "pos"), pos)
    first = harvested[0]
    assert (first["doc"], first["pos"]) == (0, 0) and harvested[-1]["doc"] == len(docs) - 1
    assert set(first) == {*SITES.split(","), "doc", "pos"} and first["blocks.0.mlp.post"].shape == (256,)


def test_shards_are_bounded_and_the_manifest_describes_them(harvested, docs):
    sizes = [f.stat().st_size for f in harvested.files]
    assert len(sizes) > 3 and max(sizes) <= SHARD_MB * 1e6 and min(sizes[:-1]) > 0.8 * SHARD_MB * 1e6
    manifest = json.loads((harvested.path / "manifest.json").read_text())
    assert manifest["format"] == "actscope-activations" and manifest["format_version"] == 1 and manifest["status"] == "complete"
    assert manifest["data"]["documents"] == len(docs) and manifest["data"]["tokens"] == len(harvested)
    assert manifest["sites"] == {"blocks.0.mlp.post": {"units": 256, "dtype": "float32"}, "blocks.1.resid.post": {"units": 64, "dtype": "float32"}}
    assert sum(s["tokens"] for s in manifest["shards"]) == len(harvested)
    assert harvested.units == {"blocks.0.mlp.post": 256, "blocks.1.resid.post": 64}


def test_store_dtype_and_max_tokens(lm, docs, tmp_path):
    dataset = actscope.harvest(lm, docs, sites=SITES, out=tmp_path / "bf16", batch_size=3, max_tokens=100, store_dtype="bfloat16")
    capture = captured(lm, docs, max_tokens=100)
    assert len(dataset) == 100 and dataset.sites["blocks.0.mlp.post"]["dtype"] == "bfloat16"
    assert torch.equal(stacked(dataset, "blocks.0.mlp.post"), capture.tensor("blocks.0.mlp.post").to(torch.bfloat16))


def test_stream_covers_every_token_once_in_a_seeded_shuffled_order(harvested):
    stream = harvested.stream(seed=3, chunk=40)
    order = [(item["doc"], item["pos"]) for item in stream]
    in_documents = [(harvested[i]["doc"], harvested[i]["pos"]) for i in range(len(harvested))]
    assert sorted(order) == sorted(in_documents) and order != in_documents
    assert order == [(item["doc"], item["pos"]) for item in harvested.stream(seed=3, chunk=40)]
    stream.set_epoch(1)
    assert [(item["doc"], item["pos"]) for item in stream] != order
    batches = list(harvested.stream(seed=0, batch_size=64))
    assert sum(len(b["doc"]) for b in batches) == len(harvested) and batches[0]["blocks.0.mlp.post"].shape == (64, 256)
    loader = torch.utils.data.DataLoader(harvested.stream(seed=0), batch_size=50)
    first = next(iter(loader))
    assert first["blocks.1.resid.post"].shape == (50, 64) and first["doc"].dtype == torch.int64
    assert len(list(harvested.stream(shuffle=False, batch_size=7))) == len(harvested.stream(batch_size=7))


def test_interrupted_harvest_resumes_to_identical_shards(lm, docs, harvested, tmp_path):
    out = tmp_path / "acts"

    def stop(documents, tokens):
        if len(list(out.glob("shard-*"))) >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        actscope.harvest(lm, docs, sites=SITES, out=out, batch_size=3, shard_mb=SHARD_MB, progress=stop)
    assert json.loads((out / "manifest.json").read_text())["status"] == "incomplete"
    with pytest.raises(actscope.RunDirError, match="was interrupted .* --resume"):
        actscope.open_activations(out)
    with pytest.raises(actscope.InputError, match=r"this one differs from it in the sites \(dataset: blocks.0.mlp.post, blocks.1.resid.post, now: blocks.0.mlp.post\)"):
        actscope.harvest(lm, docs, sites="blocks.0.mlp.post", out=out, batch_size=3, shard_mb=SHARD_MB, resume=True)
    with pytest.raises(actscope.RunDirError, match="holds an interrupted harvest"):
        actscope.harvest(lm, docs, sites=SITES, out=out, batch_size=3, shard_mb=SHARD_MB)
    resumed = actscope.harvest(lm, docs, sites=SITES, out=out, batch_size=3, shard_mb=SHARD_MB, resume=True)
    assert [f.name for f in resumed.files] == [f.name for f in harvested.files]
    for a, b in zip(resumed.files, harvested.files):  # the same tensors and header (safetensors orders the header freely)
        with safe_open(str(a), "pt") as left, safe_open(str(b), "pt") as right:
            assert left.metadata() == right.metadata() and sorted(left.keys()) == sorted(right.keys())
            assert all(torch.equal(left.get_tensor(key), right.get_tensor(key)) for key in left.keys())
    assert resumed.manifest["data"] == harvested.manifest["data"]


def test_refusals(lm, docs, harvested, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(actscope.RunDirError, match="not an actscope activation dataset"):
        actscope.harvest(lm, docs, sites=SITES, out=foreign)
    out = tmp_path / "acts"
    actscope.harvest(lm, docs[:4], sites=SITES, out=out)
    with pytest.raises(actscope.RunDirError, match="holds a finished activation dataset; pass --overwrite"):
        actscope.harvest(lm, docs[:4], sites=SITES, out=out)
    with pytest.raises(actscope.InputError, match="is complete; nothing to resume"):
        actscope.harvest(lm, docs[:4], sites=SITES, out=out, resume=True)
    (out / "mine.txt").write_text("keep me too")
    with pytest.raises(actscope.RunDirError, match=r"files actscope did not write \(mine.txt\)"):
        actscope.harvest(lm, docs[:4], sites=SITES, out=out, overwrite=True)
    (out / "mine.txt").unlink()
    assert len(actscope.harvest(lm, docs[:2], sites=SITES, out=out, overwrite=True)) < len(actscope.open_activations(harvested.path))
    with pytest.raises(actscope.SiteError, match="attention pattern"):
        actscope.harvest(lm, docs, sites="blocks.0.attn.pattern", out=tmp_path / "p")
    with pytest.raises(actscope.InputError, match="--shard-mb 0.001 is too small"):
        actscope.harvest(lm, docs, sites=SITES, out=tmp_path / "s", shard_mb=0.001)
    with pytest.raises(actscope.InputError, match="harvest needs sites="):
        actscope.harvest(lm, docs, sites=None, out=tmp_path / "n")
    with pytest.raises(IndexError, match="out of range"):
        harvested[len(harvested)]


def test_model_input_dicts_number_examples_globally(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU())
    data = [{"input": torch.randn(n, 6)} for n in (3, 2, 4)]
    dataset = actscope.harvest(net, data, sites="module:1@output", out=tmp_path / "acts")
    assert len(dataset) == 9 and [dataset[i]["doc"] for i in range(9)] == list(range(9))
    expected = torch.relu(net[0](torch.cat([d["input"] for d in data])))
    assert torch.equal(stacked(dataset, "module:1@output"), expected.detach())


def test_cli_harvest(lm, tmp_path):
    from actscope.zoo import held_out_corpus, tiny_lm

    data = tmp_path / "docs.txt"
    data.write_text("\n".join(held_out_corpus(6)) + "\n")
    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["harvest", str(tiny_lm("relu")), "--data", str(data), "--sites", "blocks.1.mlp.post", "--out", str(tmp_path / "acts"),
            "--shard-mb", "0.05", "--store-dtype", "float16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "blocks.1.mlp.post (256 × float16)" in result.output and "Dataset: " in result.output
    assert actscope.open_activations(tmp_path / "acts").sites["blocks.1.mlp.post"]["dtype"] == "float16"
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 2 and "nothing to resume" in result.output
