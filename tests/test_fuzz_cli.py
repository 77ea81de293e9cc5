"""Fuzzing the CLI's inputs: hundreds of random site selections, data files of random bytes and
random structure, config fields and calibration headers. Whatever comes in, the CLI answers
with exit 0 or 2 (never 1, "a bug in actscope"), and leaves nothing half-written: no temporary
files, and no output where it refused.

Seeded (FUZZ_SEED, default 0): a failure names its case, and the same seed replays it."""
from __future__ import annotations

import json
import os
import random
import shutil
import string
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actscope.cli.main import app
from actscope.zoo import tiny_lm

SEED = int(os.environ.get("FUZZ_SEED", "0"))
runner = CliRunner(env={"COLUMNS": "200"})
TEXT = "the cat sat on the mat\nan owl flew over the barn at night\n"
NASTY = ["", " ", "\x00", "\x01", "\x1b[31m", "\u202e", "\u2066", "\u200b", "[/bold]", "[red]", ":cat:", "\\", "%s", "{i}",
         "é", "日本", "\U0001f600", "'", '"', "\n", "\r\n", "\t", ",", ";", "../", "NaN", "-1", "1e309", "0x10"]


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def check(result, case: str, tmp: Path, out: Path | None = None) -> None:
    """Exit 0 or 2, no internal error, no temporaries, and no output left by a refusal."""
    assert result.exit_code in (0, 2), f"{case}: exit {result.exit_code}\n{result.output}"
    assert "bug in actscope" not in result.output, f"{case}\n{result.output}"
    leftovers = [str(p) for p in tmp.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, f"{case}: temporaries left behind: {leftovers}"
    if out is not None and result.exit_code == 2:
        assert not out.exists(), f"{case}: refused, yet {out} was written\n{result.output}"


def random_text(rng: random.Random, length: int = 12) -> str:
    return "".join(rng.choice([rng.choice(NASTY), rng.choice(string.printable)]) for _ in range(rng.randint(0, length)))


@pytest.fixture(scope="module")
def lm() -> Path:
    return tiny_lm("relu")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


# -- site selections ------------------------------------------------------------------------------

SITE_PARTS = ["blocks", "*", "0", "1", "2", "9", "0-1", "1-0", "0-9", "1-1", "mlp", "post", "pre", "out", "attn", "pattern",
              "z", "z_norm", "v", "resid", "mid", "embed", "logits", "moe", "router", "experts", "shared", "[0]", "[1,2]",
              "[0:4]", "[4:0]", "[head=1]", "[head=x]", "[-1]", "[99999]", "[a=b]", "[", "]", "module:", "@input",
              "@output", "@side", "model.layers.0.mlp", "lm_head", "layers.0", "..", ",", "  "]


def random_selection(rng: random.Random) -> str:
    items = []
    for _ in range(rng.randint(1, 3)):
        parts = [rng.choice(SITE_PARTS) if rng.random() < 0.9 else random_text(rng, 3) for _ in range(rng.randint(1, 5))]
        items.append(rng.choice([".", "", "."]).join(parts))
    return ",".join(items)


def test_random_site_selections(lm, text_file, tmp_path):
    rng = random.Random(SEED)
    for case in range(150):
        selection = random_selection(rng)
        out = tmp_path / f"sites{case}"
        result = cli("profile", lm, "--data", text_file, "--sites", selection, "--max-tokens", 8, "--no-report", "--out", out)
        check(result, f"--sites {selection!r}", tmp_path, out)


# -- data files -----------------------------------------------------------------------------------

def random_json(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "null", "bool"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "dict":
        keys = ["text", "body", random_text(rng, 4)]
        return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return {"str": lambda: random_text(rng), "int": lambda: rng.randint(-5, 5), "float": lambda: rng.choice([0.5, float("nan")]),
            "null": lambda: None, "bool": lambda: rng.random() < 0.5}[kind]()


def random_data_file(rng: random.Random, folder: Path, case: int) -> Path:
    suffix = rng.choice(["", ".txt", ".md", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".bin"])
    path = folder / f"data{case}{suffix}"
    style = rng.choice(["bytes", "structure", "structure"])
    if style == "bytes":
        path.write_bytes(rng.randbytes(rng.randint(0, 300)))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(random_json(rng)) if rng.random() < 0.9 else random_text(rng) for _ in range(rng.randint(0, 5))))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = rng.choice(["text", "body", random_text(rng, 4) or "x"])
        values = rng.choice([[random_text(rng) for _ in range(3)], [1, 2, 3], [None, None, None], [0.5, 1.5, 2.5]])
        pq.write_table(pa.table({column: values}), path)
    elif suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        rows = [sep.join(random_text(rng, 5) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 5))]
        path.write_text("\n".join(rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(random_json(rng)) if suffix == ".json" else random_text(rng, 60),
                        encoding="utf-8")
    return path


def test_random_data_files(lm, tmp_path):
    rng = random.Random(SEED + 1)
    for case in range(120):
        data = random_data_file(rng, tmp_path, case)
        column = rng.choice([[], [], ["--column", "text"], ["--column", "body"], ["--column", random_text(rng, 4) or "y"]])
        out = tmp_path / f"run{case}"
        result = cli("profile", lm, "--data", data, *column, "--max-tokens", 16, "--no-report", "--out", out)
        check(result, f"data {data.name} ({data.read_bytes()[:80]!r}) {column}", tmp_path, out)


# -- config fields --------------------------------------------------------------------------------

CONFIG_FIELDS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
                 "vocab_size", "head_dim", "max_position_embeddings", "hidden_act", "model_type", "architectures",
                 "rms_norm_eps", "rope_parameters", "pad_token_id", "dtype", "tie_word_embeddings", "auto_map"]
CONFIG_VALUES = [-1, 0, 1, 2, 3, 7, 64, 100, 0.5, "abc", "", None, True, [], {}, ["LlamaForCausalLM"], ["Nope"],
                 "llama", "gpt2", "silu", "relu", "float16", "bfloat16", "float99", {"rope_type": "nope"},
                 {"AutoModel": "x.Y"}, 1e9]


def test_random_config_fields(lm, text_file, tmp_path):
    rng = random.Random(SEED + 2)
    for case in range(40):
        directory = tmp_path / f"model{case}"
        shutil.copytree(lm, directory)
        config = json.loads((directory / "config.json").read_text())
        changes = {rng.choice(CONFIG_FIELDS): rng.choice(CONFIG_VALUES) for _ in range(rng.randint(1, 2))}
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 10_000 for v in changes.values()):
            changes = {k: v for k, v in changes.items() if k not in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers",
                                                                     "num_attention_heads", "num_key_value_heads", "head_dim")}
        config.update(changes)
        (directory / "config.json").write_text(json.dumps(config))
        out = tmp_path / f"cfg-run{case}"
        result = cli("profile", directory, "--data", text_file, "--max-tokens", 8, "--no-report", "--out", out)
        check(result, f"config changes {changes}", tmp_path, out)
        shutil.rmtree(directory)


# -- calibration headers --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibration(lm, tmp_path_factory) -> Path:
    import actscope
    from actscope.zoo import held_out_corpus

    model = actscope.load(lm)
    path = tmp_path_factory.mktemp("cal") / "cats.safetensors"
    actscope.sparse.calibrate(model, held_out_corpus(16), method="cats", sparsity=0.5).save(path)
    return path


def mutate_header(rng: random.Random, header: dict) -> dict:
    header = json.loads(json.dumps(header))
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(header) + ["settings", "layers", "units", "new"])
        action = rng.choice(["delete", "replace", "replace", "nest"])
        if action == "delete":
            header.pop(key, None)
        elif action == "nest" and isinstance(header.get(key), dict) and header[key]:
            header[key][rng.choice(list(header[key]))] = random_json(rng)
        elif action == "nest" and isinstance(header.get(key), list) and header[key]:
            header[key][rng.randrange(len(header[key]))] = random_json(rng)
        else:
            header[key] = random_json(rng)
    return header


def mutate_tensors(rng: random.Random, tensors: dict) -> dict:
    import torch

    tensors = dict(tensors)
    name = rng.choice(list(tensors))
    action = rng.choice(["none", "none", "nan", "inf", "negative", "shape", "dtype", "drop", "extra"])
    if action == "nan":
        tensors[name] = torch.full_like(tensors[name], float("nan")) if tensors[name].is_floating_point() else tensors[name]
    elif action == "inf":
        tensors[name] = torch.full_like(tensors[name], float("inf")) if tensors[name].is_floating_point() else tensors[name]
    elif action == "negative":
        tensors[name] = -tensors[name].abs() - 1
    elif action == "shape":
        tensors[name] = torch.zeros(rng.randint(0, 5), dtype=tensors[name].dtype)
    elif action == "dtype":
        tensors[name] = tensors[name].to(torch.int32)
    elif action == "drop" and len(tensors) > 1:
        del tensors[name]
    elif action == "extra":
        tensors["9.act"] = torch.zeros(1)
    return tensors


def test_random_calibration_headers(lm, calibration, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    rng = random.Random(SEED + 3)
    with safe_open(str(calibration), framework="pt") as handle:
        header = json.loads(handle.metadata()["actscope"])
    tensors = load_file(str(calibration))
    for case in range(60):
        path = tmp_path / f"cal{case}.safetensors"
        mutated = mutate_header(rng, header) if rng.random() < 0.7 else header
        save_file(mutate_tensors(rng, tensors), str(path), metadata={"actscope": json.dumps(mutated)})
        result = cli("generate", lm, "--prompt", "the cat", "--calibration", path, "--max-new-tokens", 2)
        check(result, f"calibration header {mutated}", tmp_path)
