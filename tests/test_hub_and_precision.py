"""Hub ids resolved from the local Hugging Face cache (never the network unless downloading is
allowed), revisions, and the precision and placement options of ``load`` and every command.

The cache is built inside each test, in the layout huggingface_hub writes (``models--org--name``
with ``blobs/``, ``snapshots/<commit>/`` links and ``refs/<branch>``). huggingface_hub reads
``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` once, at import, into
``huggingface_hub.constants`` (and some of its functions bound the cache path at import), so
setting the variables during a test changes nothing by itself: the fixture sets the variables
*and* patches ``constants.HF_HUB_CACHE`` / ``constants.HF_HUB_OFFLINE`` (undone after the test);
actscope reads those two attributes once per call and passes the cache folder explicitly to every
huggingface_hub function. One test runs the CLI as a fresh process to check the variables
themselves, read at import as any user's shell would set them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import actscope
from actscope.cli.main import app
from actscope.zoo.tiny import tiny_model
from conftest import word_tokenizer

runner = CliRunner(env={"COLUMNS": "240"})
REPO = "org/name"
MAIN, OTHER = "a" * 40, "b" * 40  # commits: main, and branch 'other' (other weights)
LOADING_COMMANDS = ("profile", "sites", "decode", "contrast", "patch", "sparsify", "generate", "steer", "lens", "attention")
NEW_FLAGS = ("--device", "--dtype", "--device-map", "--revision", "--download", "--trust-remote-code")


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def said(result) -> str:
    return " ".join(result.output.split())


# --- fixtures -----------------------------------------------------------------------------------


def save_tiny_llama(directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    module, _ = tiny_model("llama", seed=seed)
    module.to(dtype).save_pretrained(directory)
    words = ["<pad>"] + [f"w{i}" for i in range(1, module.config.vocab_size)]
    word_tokenizer(words, pad_token="<pad>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-seed1"), seed=1)


def put_in_cache(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """``source``'s files as huggingface_hub caches them: content-addressed blobs, a snapshot folder
    of relative links to them, and a ref file per branch holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", digest))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp_path, offline, seen by huggingface_hub as its cache."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def cached(hf_cache, tiny_dir, other_dir) -> Path:
    """org/name in the cache: main at MAIN (seed 0), branch 'other' at OTHER (seed 1)."""
    put_in_cache(hf_cache, REPO, tiny_dir, MAIN)
    put_in_cache(hf_cache, REPO, other_dir, OTHER, refs=("other",))
    return hf_cache


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Record (and refuse) every socket connection and every huggingface_hub download or listing."""
    import huggingface_hub
    from huggingface_hub import _snapshot_download, file_download

    attempts: list = []

    def refuse(name):
        def refused(*args, **kwargs):
            attempts.append((name, args))
            raise OSError(f"test: {name} must not be called")
        return refused

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    for module in (huggingface_hub, file_download, _snapshot_download):
        for name in ("hf_hub_download", "snapshot_download"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", refuse("HfApi.list_repo_files"))
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", refuse("HfApi.repo_info"))
    return attempts


def first_weight(model) -> torch.Tensor:
    return next(model.module.parameters()).detach()


def saved_first_weight(directory: Path) -> torch.Tensor:
    return first_weight(actscope.load(directory))


# --- hub ids from the cache ---------------------------------------------------------------------


def test_hub_id_loads_from_the_cache_offline(cached, tiny_dir, no_network):
    model = actscope.load(REPO)
    assert model.name == REPO
    assert model.source == f"{REPO}@{MAIN}"
    assert torch.equal(first_weight(model), saved_first_weight(tiny_dir))
    assert model.tokenizer is not None and model.tokenizer("w1 w2")["input_ids"] == [1, 2]
    assert no_network == []


def test_revision_selects_a_branch_or_a_commit(cached, tiny_dir, other_dir, no_network):
    expected = saved_first_weight(other_dir)
    for revision in ("other", OTHER):
        model = actscope.load(REPO, revision=revision)
        assert model.name == REPO and model.source == f"{REPO}@{OTHER}"
        assert torch.equal(first_weight(model), expected)
    main = actscope.load(REPO, revision="main")
    assert torch.equal(first_weight(main), saved_first_weight(tiny_dir))
    assert not torch.equal(first_weight(main), expected)
    assert no_network == []


def test_a_local_directory_wins_over_a_hub_id(cached, tiny_dir, tmp_path, monkeypatch, no_network):
    shutil.copytree(tiny_dir, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    model = actscope.load(REPO)
    assert model.source == str(Path(REPO)) and model.name == "name"
    with pytest.raises(actscope.ModelLoadError, match="applies to a Hugging Face hub id, but 'org/name' is a local path"):
        actscope.load(REPO, revision="other")


def test_cli_profile_and_sites_take_a_hub_id_and_revision(cached, tmp_path, no_network):
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 120 + 1}" for j in range(9)) for i in range(12)) + "\n")
    out = tmp_path / "run"
    result = invoke("profile", REPO, "--data", str(data), "--max-tokens", "20", "--out", str(out), "--no-report")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["name"] == REPO and manifest["data"]["tokens"] == 20
    again = tmp_path / "run-other"
    result = invoke("profile", REPO, "--revision", OTHER, "--data", str(data), "--max-tokens", "20", "--out", str(again),
                    "--no-report", "--dtype", "float32", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((again / "manifest.json").read_text())["model"]["weight_hash"] != manifest["model"]["weight_hash"]
    result = invoke("sites", REPO, "--revision", "other", "--match", "blocks.0.mlp.*")
    assert result.exit_code == 0, result.output
    assert f"{REPO}: 3 sites" in said(result) and "blocks.0.mlp.post" in result.output
    assert no_network == []


def test_cli_reads_the_cache_from_hf_home_in_a_fresh_process(hf_cache, tiny_dir, tmp_path):
    put_in_cache(hf_cache, REPO, tiny_dir, MAIN)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE")}
    env.update(HF_HOME=str(hf_cache.parent), COLUMNS="200")  # the CLI itself makes the process offline
    proc = subprocess.run([sys.executable, "-m", "actscope.cli.main", "sites", REPO, "--match", "blocks.1.mlp.post"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{REPO}: 1 sites" in " ".join(proc.stdout.split())


# --- what is refused, and what is never downloaded ----------------------------------------------


def test_an_uncached_id_offline_exits_2_naming_both_fixes(hf_cache, no_network):
    result = runner.invoke(app, ["profile", "org/missing", "--out", str(hf_cache.parent / "run")])
    assert result.exit_code == 2, result.output
    message = said(result)
    assert "'org/missing' is not a local directory" in message and str(hf_cache) in message
    assert "hf download org/missing --local-dir ./missing" in message  # fix 1: a local directory
    assert "(CLI: --download)" in message  # fix 2: allow downloading
    assert "nothing was downloaded" in message
    assert no_network == [] and list(hf_cache.iterdir()) == []
    assert not (hf_cache.parent / "run").exists()
    with pytest.raises(actscope.ModelLoadError, match="download=True"):
        actscope.load("org/missing")
    with pytest.raises(actscope.ModelLoadError, match="not in the local cache"):
        actscope.load("just-a-name")  # a bare name is a valid hub id too
    assert no_network == []


def test_an_unknown_revision_exits_2_with_the_cached_ones(cached, no_network):
    result = runner.invoke(app, ["sites", REPO, "--revision", "unknown"])
    assert result.exit_code == 2, result.output
    message = said(result)
    assert f"revision 'unknown' of '{REPO}' is not in the local Hugging Face cache" in message
    assert f"main → {MAIN}" in message and f"other → {OTHER}" in message
    result = runner.invoke(app, ["sites", "org/missing", "--revision", "v1"])
    assert result.exit_code == 2 and "at revision 'v1' is not in the local cache" in said(result)
    assert "hf download org/missing --revision v1" in said(result)
    assert no_network == []


def test_hf_hub_offline_beats_download(cached, no_network):
    with pytest.raises(actscope.ModelLoadError, match="HF_HUB_OFFLINE=1 in the environment forbids any download"):
        actscope.load("org/missing", download=True)
    assert actscope.load(REPO, download=True).source == f"{REPO}@{MAIN}"  # offline: the cache only
    assert no_network == []


def test_a_cached_commit_without_main_is_named(hf_cache, tiny_dir, no_network):
    put_in_cache(hf_cache, REPO, tiny_dir, OTHER, refs=())
    with pytest.raises(actscope.ModelLoadError, match=f"revision 'main' of '{REPO}' is not in the local .*cached: {OTHER}"):
        actscope.load(REPO)
    assert actscope.load(REPO, revision=OTHER).source == f"{REPO}@{OTHER}"


def test_the_cli_stays_offline_unless_download_is_passed(monkeypatch):
    from actscope.cli.common import quiet_libraries

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    quiet_libraries(download=True)
    assert "HF_HUB_OFFLINE" not in os.environ
    quiet_libraries()
    assert os.environ["HF_HUB_OFFLINE"] == "1"


class FakeHub:
    """The hub's side of a download: a repository's files in ``remote``, served through the two
    huggingface_hub calls actscope makes, writing the cache as snapshot_download does."""

    def __init__(self, remote: Path, cache: Path, commit: str = MAIN):
        self.remote, self.cache, self.commit, self.fetched = remote, cache, commit, []

    def list_repo_files(self, repo_id, *, revision=None, **kwargs):  # set on HfApi unbound: self is the FakeHub
        return sorted(p.relative_to(self.remote).as_posix() for p in self.remote.rglob("*") if p.is_file())

    def snapshot_download(self, repo_id, *, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        assert Path(cache_dir) == self.cache
        names = list(filter_repo_objects(self.list_repo_files(repo_id), allow_patterns=allow_patterns))
        repo = self.cache / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / self.commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in names:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.remote / name, snapshot / name)
        self.fetched.extend(names)
        if revision != self.commit:
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / (revision or "main")).write_text(self.commit)
        return str(snapshot)


@pytest.fixture
def fake_hub(hf_cache, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    def make(remote: Path) -> FakeHub:
        hub = FakeHub(remote, hf_cache)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", hub.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
        return hub
    return make


def test_download_fetches_only_what_loading_reads(fake_hub, tiny_dir, tmp_path):
    remote = Path(shutil.copytree(tiny_dir, tmp_path / "remote"))
    extras = ["pytorch_model.bin", "consolidated.safetensors", "modeling_custom.py", "README.md", "onnx/model.onnx"]
    for name in extras:
        (remote / name).parent.mkdir(exist_ok=True)
        (remote / name).write_bytes(b"not needed")
    hub = fake_hub(remote)
    model = actscope.load(REPO, download=True)
    assert model.name == REPO and model.source == f"{REPO}@{MAIN}"
    assert torch.equal(first_weight(model), saved_first_weight(tiny_dir))
    assert set(hub.fetched) == {p.name for p in tiny_dir.iterdir()}  # config, generation config, tokenizer, weights
    assert not set(hub.fetched) & set(extras)
    # Once fetched, the same id loads offline from the cache.
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # (restored by the fixture's monkeypatch)
    assert torch.equal(first_weight(actscope.load(REPO)), first_weight(model))


def test_download_of_a_sharded_checkpoint_fetches_its_shards(fake_hub, tmp_path):
    module, _ = tiny_model("llama")
    remote = tmp_path / "remote"
    module.save_pretrained(remote, max_shard_size="20KB")
    shards = sorted(p.name for p in remote.glob("model-*.safetensors"))
    assert len(shards) > 1 and (remote / "model.safetensors.index.json").is_file()
    (remote / "modeling_custom.py").write_text("raise SystemExit('shipped code ran')\n")
    hub = fake_hub(remote)
    model = actscope.load(REPO, download=True)
    assert set(shards) | {"model.safetensors.index.json", "config.json"} <= set(hub.fetched)
    assert "modeling_custom.py" not in hub.fetched
    assert torch.equal(first_weight(model), next(module.parameters()).detach())
    hub.fetched.clear()
    actscope.load(REPO, download=True, trust_remote_code=True)
    assert "modeling_custom.py" in hub.fetched  # *.py only when the user trusts the code


# --- precision and placement --------------------------------------------------------------------


def test_dtype_casts_or_keeps_the_checkpoints(tiny_dir, tmp_path):
    for dtype in ("bfloat16", torch.bfloat16):
        model = actscope.load(tiny_dir, dtype=dtype)
        assert {p.dtype for p in model.module.parameters()} == {torch.bfloat16}
    saved_bf16 = save_tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16)
    kept = actscope.load(saved_bf16, dtype="auto")
    assert {p.dtype for p in kept.module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in actscope.load(saved_bf16, dtype="float32").module.parameters()} == {torch.float32}


def test_a_bad_dtype_exits_2_with_the_allowed_values(tiny_dir):
    result = runner.invoke(app, ["sites", str(tiny_dir), "--dtype", "int7"])
    assert result.exit_code == 2, result.output
    assert "unknown dtype 'int7'; use auto, float32, bfloat16, float16, float64" in said(result)
    with pytest.raises(actscope.ModelLoadError, match="unknown dtype 'torch.int8'"):
        actscope.load(tiny_dir, dtype=torch.int8)


def test_device_map_auto_on_cpu_loads_the_same_model(tiny_dir):
    pytest.importorskip("accelerate")
    plain = actscope.load(tiny_dir)
    mapped = actscope.load(tiny_dir, device_map="auto")
    assert {p.device.type for p in mapped.module.parameters()} == {"cpu"}
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(mapped.module(input_ids=ids).logits, plain.module(input_ids=ids).logits)
    one_place = actscope.load(tiny_dir, device_map={"": "cpu"})
    assert torch.equal(first_weight(one_place), first_weight(plain))


def test_device_and_device_map_together_are_refused(tiny_dir):
    with pytest.raises(actscope.ModelLoadError, match="device 'cpu' and device_map cannot be combined"):
        actscope.load(tiny_dir, device="cpu", device_map="auto")
    with pytest.raises(actscope.ModelLoadError, match="max_memory only applies with device_map"):
        actscope.load(tiny_dir, max_memory={"cpu": "1GiB"})
    with pytest.raises(actscope.ModelLoadError, match="device_map must be auto, balanced"):
        actscope.load(tiny_dir, device_map="everywhere")
    result = runner.invoke(app, ["sites", str(tiny_dir), "--device", "cpu", "--device-map", "auto"])
    assert result.exit_code == 2 and "cannot be combined" in said(result)
    result = runner.invoke(app, ["sites", str(tiny_dir), "--device-map", "{not json"])
    assert result.exit_code == 2 and "--device-map '{not json' is not valid JSON" in said(result)


def test_a_device_map_that_cannot_be_placed_exits_2_naming_the_placement(tiny_dir):
    pytest.importorskip("accelerate")
    with pytest.raises(actscope.ModelLoadError, match="with device_map='auto' .*10XB.*check --device-map, max_memory"):
        actscope.load(tiny_dir, device_map="auto", max_memory={"cpu": "10XB"})
    with pytest.raises(actscope.ModelLoadError, match="device_map puts 'lm_head' on unknown device 'tpu'"):
        actscope.load(tiny_dir, device_map={"model": "cpu", "lm_head": "tpu"})
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["sites", str(tiny_dir), "--device-map", '{"": 0}'])
        assert result.exit_code == 2 and "device_map puts '' on cuda:0, but there is no CUDA GPU" in said(result)


def test_device_map_without_accelerate_names_the_install(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # `import accelerate` now raises ImportError
    with pytest.raises(actscope.ModelLoadError, match=r"device_map needs the accelerate package.*pip install accelerate"):
        actscope.load(tiny_dir, device_map="auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_keeps_its_message(tiny_dir):
    for device in ("cuda", "cuda:1"):
        result = runner.invoke(app, ["sites", str(tiny_dir), "--device", device])
        assert result.exit_code == 2 and "no CUDA GPU is available" in said(result)
    assert actscope.load(tiny_dir, device="auto").device.type == "cpu"


@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_every_model_loading_command_takes_the_loading_options(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "240", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    missing = [flag for flag in NEW_FLAGS if flag not in result.output]
    assert missing == []


def test_sites_and_profile_run_with_the_loading_options(tiny_dir, tmp_path):
    pytest.importorskip("accelerate")
    result = invoke("sites", str(tiny_dir), "--device-map", '{"": "cpu"}', "--dtype", "bfloat16", "--match", "blocks.1.*")
    assert result.exit_code == 0, result.output
    assert "blocks.1.mlp.post" in result.output
    data = tmp_path / "docs.txt"
    data.write_text("w1 w2 w3 w4 w5 w6\nw7 w8 w9 w10\n")
    out = tmp_path / "run"
    result = invoke("profile", str(tiny_dir), "--data", str(data), "--device-map", "auto", "--dtype", "bfloat16",
                    "--out", str(out), "--no-report")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["data"]["tokens"] == 10
