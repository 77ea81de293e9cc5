"""Many processes equal one: 2 and 3 CPU processes (gloo) against single-process runs on the same
data (counts, histograms, minima and maxima exactly, means and variances to 1e-12, top-k examples
identical, ties included); jobs killed with SIGKILL at a random moment after a checkpoint, then
resumed (a two-process one by ``actscope profile --processes 2 --resume``, i.e. torchrun); a
harvest written by three processes.

The processes that do the work here are forked from the test process (torch.multiprocessing, with
torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, …), so that they need no imports of their
own; the command line starts real torchrun. Every process runs with one intra-op thread, as the
single-process references here do, so that the activations are bit for bit the same.
"""
from __future__ import annotations

import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import actscope

TOLERANT = {"mean", "std", "first_token_attention", "max_attention", "entropy"}  # sums merged in another order
LM_SITES = "blocks.*.mlp.post,blocks.0.resid.post"
BERT_SITES = "blocks.0.mlp.post,blocks.1.resid.post,blocks.1.attn.pattern"
HARVEST_SITES = "blocks.0.mlp.post,blocks.1.resid.post"
CHECKPOINT_EVERY = 60


def bert_batches():
    """Model-input dicts (no tokenizer): rows repeated inside and across batches (ties), padding."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(5, 128, (6, 9), generator=generator)
    batches = []
    for index in range(7):
        lengths = [9, 9 - index % 4, 4 + index % 3]
        ids = torch.stack([rows[index % 6], rows[index % 6], rows[(index + 2) % 6]])
        mask = torch.stack([(torch.arange(9) < n).long() for n in lengths])
        mask[1] = mask[0]  # the repeated row is padded alike
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


def lm_docs() -> list[str]:
    from actscope.zoo import held_out_corpus

    docs = held_out_corpus(40)
    return docs + docs[:10]  # exact repeats: every position-0 token ties, and more


def assert_same_run(a, b) -> None:
    """Equal runs: every table and array exactly, the merged sums (means, variances) to 1e-12."""
    assert sorted(a.tables) == sorted(b.tables)
    for name in a.tables:
        left, right = a.to_pandas(name), b.to_pandas(name)
        assert list(left.columns) == list(right.columns) and len(left) == len(right), name
        for column in left.columns:
            x, y = left[column].to_numpy(), right[column].to_numpy()
            if column in TOLERANT:
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=0, equal_nan=True, err_msg=f"{name}.{column}")
            elif x.dtype == object and any(isinstance(v, np.ndarray) for v in x):  # list columns (activation windows)
                assert all(np.array_equal(p, q, equal_nan=True) for p, q in zip(x, y)), f"{name}.{column}"
            else:
                assert (x == y).all() or (x.dtype.kind == "f" and np.array_equal(x, y, equal_nan=True)), f"{name}.{column}"
    assert sorted(a.arrays) == sorted(b.arrays)
    for key in a.arrays:
        assert torch.equal(a.arrays[key], b.arrays[key]), key


MODELS: dict = {}  # what the forked processes use (loaded once, before forking)


def _environment(rank: int, world: int, port: int) -> None:
    """What torchrun sets for each process it starts."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    warnings.resetwarnings()
    torch.set_num_threads(1)


def _killer(folder: Path, rank: int) -> None:
    """SIGKILL this process at a random moment after its first checkpoint."""
    mine = folder / f"rank-{rank:05d}.pt"
    while not mine.exists():
        time.sleep(0.002)
    time.sleep(random.uniform(0.0, 0.1))
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_job(rank: int, folder: Path, kill_rank: int) -> None:
    if rank == kill_rank:
        threading.Thread(target=_killer, args=(folder / ".killed.checkpoint", rank), daemon=True).start()
    actscope.profile(MODELS["lm"], folder / "data.txt", sites=LM_SITES, out=folder / "killed", batch_size=2,
                     checkpoint_every=CHECKPOINT_EVERY, progress=lambda docs, tokens: time.sleep(0.03))
    raise SystemExit("the run was not killed")


def _work_job(rank: int, folder: Path) -> None:
    actscope.profile(MODELS["bert"], bert_batches(), sites=BERT_SITES, out=folder / "bert", k=4)
    actscope.harvest(MODELS["lm"], folder / "data.txt", sites=HARVEST_SITES, out=folder / "acts", batch_size=3, max_tokens=900,
                     shard_mb=0.05)


def _rank(rank: int, world: int, port: int, job, *args) -> None:
    _environment(rank, world, port)
    job(rank, *args)


def _single(job, *args) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    warnings.resetwarnings()
    torch.set_num_threads(1)
    job(0, *args)


def forked(world: int, job, *args):
    """``world`` processes forked from this one, running ``job(rank, *args)`` as torchrun would."""
    import torch.multiprocessing as mp

    if world == 1:
        process = mp.get_context("fork").Process(target=_single, args=(job, *args))
        process.start()
        return process
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return mp.start_processes(_rank, args=(world, port, job, *args), nprocs=world, join=False, start_method="fork")


def outcome(started) -> list[int | None]:
    """The exit codes of forked processes, by rank (-9: SIGKILL); when one fails, the others are
    stopped, as torchrun does."""
    import torch.multiprocessing as mp

    processes = started.processes if hasattr(started, "processes") else [started]
    if hasattr(started, "processes"):  # a torch.multiprocessing context
        try:
            while not started.join(timeout=300):
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException):
            pass
    for process in processes:
        process.join(timeout=300)
    return [process.exitcode for process in processes]


def job_folder(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "data.txt").write_text("\n".join(lm_docs()) + "\n")
    return folder


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, lm):
    """Every multi-process job of this module, run once: the killed ones and the three-process work
    together, then the command line resuming the killed two-process job through torchrun."""
    from actscope.zoo import tiny_lm
    from actscope.zoo.tiny import tiny_model

    MODELS.update(lm=lm, bert=tiny_model("bert")[0])
    root = tmp_path_factory.mktemp("distributed")
    folders = {name: job_folder(root, name) for name in ("torchrun", "single", "work")}
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's threads do not survive a fork
    try:
        started = {"killed torchrun": forked(2, _kill_job, folders["torchrun"], 1), "killed single": forked(1, _kill_job, folders["single"], 0),
                   "work": forked(3, _work_job, folders["work"])}
        done = {name: outcome(process) for name, process in started.items()}
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM") if before is None else os.environ.update(TOKENIZERS_PARALLELISM=before)
    checkpoints = {name: sorted(p.name for p in (folders[name] / ".killed.checkpoint").glob("rank-*.pt")) for name in ("torchrun", "single")}
    folder = folders["torchrun"]
    cli = subprocess.run([sys.executable, "-m", "actscope", "profile", str(tiny_lm("relu")), "--data", str(folder / "data.txt"),
                          "--sites", LM_SITES, "--batch-size", "2", "--out", str(folder / "killed"), "--resume", "--no-report",
                          "--processes", "2"], env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=300)
    done["cli"] = (cli.returncode, cli.stdout + cli.stderr)
    return folders, done, checkpoints


@pytest.fixture(scope="module")
def lm():
    from actscope.zoo import tiny_lm

    return actscope.load(tiny_lm("relu"))


@pytest.fixture(scope="module")
def reference(lm, tmp_path_factory):
    """The uninterrupted single-process run on the same data file, one intra-op thread."""
    folder = tmp_path_factory.mktemp("reference")
    (folder / "data.txt").write_text("\n".join(lm_docs()) + "\n")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return actscope.profile(lm, folder / "data.txt", sites=LM_SITES, batch_size=2)
    finally:
        torch.set_num_threads(before)


def test_killed_torchrun_job_resumed_by_processes_2_equals_one_process(jobs, reference):
    folders, done, checkpoints = jobs
    assert done["killed torchrun"][1] == -signal.SIGKILL  # rank 1 was killed; torchrun-like, rank 0 was stopped
    assert "rank-00001.pt" in checkpoints["torchrun"]  # the killed process had checkpointed
    code, output = done["cli"]
    assert code == 0, output
    assert "Run directory" in output and output.count("blocks.0.resid.post") == 1  # one summary: rank 0's
    run = actscope.open_run(folders["torchrun"] / "killed")
    assert run.manifest["processes"] == 2 and "merge_seconds" in run.manifest["timings"]
    assert {k: v for k, v in run.manifest["data"].items() if k != "source"} == {k: v for k, v in reference.manifest["data"].items() if k != "source"}
    assert_same_run(reference, run)
    assert not (folders["torchrun"] / ".killed.checkpoint").exists()  # removed once the run was written
    top = reference.to_pandas("examples")
    tied = top[top.duplicated(["site", "unit", "value"], keep=False)]
    assert tied["doc"].nunique() > 2  # the repeats made ties, and the processes broke them as one does


def test_killed_single_process_resumed_equals_uninterrupted(jobs, lm, reference, one_thread):
    folders, done, checkpoints = jobs
    assert done["killed single"] == [-signal.SIGKILL]
    folder = folders["single"]
    assert checkpoints["single"] == ["rank-00000.pt"] and not (folder / "killed").exists()
    saved = torch.load(folder / ".killed.checkpoint" / "rank-00000.pt", weights_only=True)
    assert 0 < saved["position"] < 25 and saved["tokens"] >= CHECKPOINT_EVERY
    resumed = actscope.profile(lm, folder / "data.txt", sites=LM_SITES, out=folder / "killed", batch_size=2, resume=True)
    assert_same_run(reference, resumed)
    assert not (folder / ".killed.checkpoint").exists()


def test_three_processes_equal_one_on_bert_inputs_with_ties_and_padding(jobs, one_thread):
    folders, done, _ = jobs
    assert done["work"] == [0, 0, 0]
    single = actscope.profile(MODELS["bert"], bert_batches(), sites=BERT_SITES, k=4)
    run = actscope.open_run(folders["work"] / "bert")
    assert run.manifest["processes"] == 3 and run.manifest["data"] == single.manifest["data"]
    assert_same_run(single, run)
    top = single.to_pandas("examples")
    tied = top[top.duplicated(["site", "unit", "value"], keep=False)]
    assert len(tied) > 0 and tied["doc"].nunique() > 3  # ties across examples of different processes' batches


def test_harvest_by_three_processes_equals_one(jobs, lm, tmp_path, one_thread):
    folders, done, _ = jobs
    assert done["work"] == [0, 0, 0]
    merged = actscope.open_activations(folders["work"] / "acts")
    single = actscope.harvest(lm, folders["work"] / "data.txt", sites=HARVEST_SITES, out=tmp_path / "acts", batch_size=3,
                              max_tokens=900, shard_mb=0.05)
    assert {s["rank"] for s in merged.manifest["shards"]} == {0, 1, 2} and merged.manifest["processes"] == 3
    assert len(merged) == len(single) == 900 and merged.manifest["data"] == single.manifest["data"]
    for index in range(len(single)):
        a, b = merged[index], single[index]
        assert (a["doc"], a["pos"]) == (b["doc"], b["pos"])
        assert all(torch.equal(a[site], b[site]) for site in single.sites)
    assert max(f.stat().st_size for f in merged.files) <= 0.05e6


def test_shard_takes_every_nth_batch_from_the_start_position():
    from actscope.distributed import Context, shard

    batches = [{"x": torch.zeros(n, 2)} for n in (2, 3, 1, 4, 2, 5, 1)]
    rows = lambda b: b["x"].shape[0]  # noqa: E731
    got = [(i, first) for i, first, _ in shard(batches, Context(rank=1, world=3), start=2, rows=rows)]
    assert got == [(4, 10)]  # batch 1 is before the start; batch 4's first example counts every earlier row
    got = [(i, first) for i, first, _ in shard(batches, Context(rank=0, world=3), rows=rows)]
    assert got == [(0, 0), (3, 6), (6, 17)]


def test_merge_states_equals_one_accumulator():
    from actscope.distributed import merge_states
    from actscope.stats import SiteStats

    torch.manual_seed(0)
    x = torch.randn(90, 5)
    x[30:60] = x[:30]  # exact repeats: ties at the k-th value
    tok = torch.arange(90, dtype=torch.int64)
    whole = SiteStats(5, k=4)
    whole.update(x, tok)
    parts = []
    for rank in range(3):
        stats = SiteStats(5, k=4)
        stats.update(x[rank * 30:(rank + 1) * 30], tok[rank * 30:(rank + 1) * 30])
        parts.append({"site": stats.state_dict()})
    merged = merge_states(parts)["site"]
    assert torch.equal(merged.top.tok, whole.top.tok) and torch.equal(merged.top.values, whole.top.values)
    assert torch.equal(merged.moments.count, whole.moments.count) and torch.equal(merged.moments.max, whole.moments.max)
    rel = ((merged.moments.var - whole.moments.var).abs() / whole.moments.var).max().item()
    assert rel <= 1e-12 and not math.isnan(rel)


def test_processes_relaunches_the_same_command_line(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import actscope.distributed
    from actscope.cli.main import app

    launched = []
    monkeypatch.setattr(actscope.distributed, "launch", lambda arguments, processes: launched.append((arguments, processes)) or 2)
    runner = CliRunner()
    result = runner.invoke(app, ["profile", "some/model", "--processes", "3", "--sites", "blocks.0.mlp.post", "--no-report",
                                 "--out", str(tmp_path / "run"), "--checkpoint-every", "100", "-d", "docs.txt"])
    assert result.exit_code == 2  # the launched command's exit code, passed on
    arguments, processes = launched[0]
    assert processes == 3 and arguments[:2] == ["profile", "some/model"] and "--processes" not in arguments
    given = {"--sites": "blocks.0.mlp.post", "--out": str(tmp_path / "run"), "--checkpoint-every": "100", "--data": "docs.txt"}
    assert all(arguments[arguments.index(flag) + 1] == value for flag, value in given.items())
    assert "--no-report" in arguments and "--batch-size" not in arguments  # defaults are left to the processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = runner.invoke(app, ["profile", "--processes", "2"])
    assert result.exit_code == 2 and "under torchrun leave --processes out" in result.output


def test_measurements_run_on_rank_0_and_say_so(lm):
    from actscope.distributed import Context
    from actscope.feeding import source_for
    from actscope.profiling import _with_measurements

    run = actscope.profile(lm, lm_docs()[:6], sites="blocks.0.mlp.post")
    source = source_for(lm, lm_docs()[:6])
    measured = _with_measurements(run, lm, source, ["memory"], None, None, Context(rank=0, world=2))
    assert measured.manifest["measurements"]["memory"]["processes"] == "rank 0 only (of 2; measurements do not run distributed)"
    alone = _with_measurements(run, lm, source, ["memory"], None, None)
    assert "processes" not in alone.manifest["measurements"]["memory"]
