"""Resumable runs in one process: a run stopped by Ctrl-C after a checkpoint and resumed ends with
exactly the run an uninterrupted one writes (SIGKILL, one process and torchrun: test_distributed);
a resume with other data, model, sites, config or number of processes is refused, naming what
differs; a new run never silently drops an interrupted one's checkpoint."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import actscope
from actscope.cli.main import app
from test_distributed import LM_SITES, assert_same_run, lm_docs

EVERY = 60


@pytest.fixture(scope="module")
def lm():
    from actscope.zoo import tiny_lm

    return actscope.load(tiny_lm("relu"))


@pytest.fixture(scope="module")
def uninterrupted(lm):
    return actscope.profile(lm, lm_docs(), sites=LM_SITES, batch_size=2)


def stop_after_checkpoint(out, after=2):
    """A progress callback that presses Ctrl-C some batches after the first checkpoint exists."""
    folder = out.parent / f".{out.name}.checkpoint"
    seen = []

    def progress(documents, tokens):
        if (folder / "rank-00000.pt").exists():
            seen.append(1)
            if len(seen) >= after:
                raise KeyboardInterrupt

    return progress


@pytest.fixture()
def interrupted(lm, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        actscope.profile(lm, lm_docs(), sites=LM_SITES, out=out, batch_size=2, checkpoint_every=EVERY,
                         progress=stop_after_checkpoint(out))
    assert not out.exists() and (tmp_path / ".run.checkpoint" / "rank-00000.pt").is_file()
    return out


def test_ctrl_c_then_resume_equals_uninterrupted(lm, uninterrupted, interrupted):
    resumed = actscope.profile(lm, lm_docs(), sites=LM_SITES, out=interrupted, batch_size=2, resume=True)
    assert_same_run(uninterrupted, resumed)
    assert actscope.open_run(interrupted).manifest["data"]["tokens"] == uninterrupted.manifest["data"]["tokens"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sites": "blocks.1.mlp.post"}, "the sites (checkpoint: blocks.0.mlp.post, blocks.1.mlp.post, blocks.0.resid.post, now: blocks.1.mlp.post)"),
        ({"batch_size": 3}, "--batch-size (checkpoint: 2, now: 3)"),
        ({"k": 3}, "--top-k (checkpoint: 8, now: 3)"),
        ({"data": "other"}, "the data (fingerprint) (checkpoint: "),
        ({"model": "other"}, "the model's weights (weight hash) (checkpoint: "),
    ],
)
def test_mismatched_resume_is_refused_naming_what_differs(lm, interrupted, change, message):
    from actscope.zoo import tiny_lm

    options = {"sites": LM_SITES, "batch_size": 2, **change}
    data = lm_docs()[:-1] if options.pop("data", None) else lm_docs()
    model = actscope.load(tiny_lm("silu")) if options.pop("model", None) else lm
    with pytest.raises(actscope.InputError) as error:
        actscope.profile(model, data, out=interrupted, resume=True, **options)
    assert message in str(error.value)
    assert "cannot resume from the checkpoint in" in str(error.value) and "start over without --resume" in str(error.value)


def test_other_number_of_processes_is_refused(lm, interrupted):
    file = interrupted.parent / ".run.checkpoint" / "rank-00000.pt"
    content = torch.load(file, weights_only=True)
    content["identity"]["processes"] = 2  # as if written by two processes
    torch.save(content, file)
    with pytest.raises(actscope.InputError, match=r"the number of processes \(checkpoint: 2, now: 1\)"):
        actscope.profile(lm, lm_docs(), sites=LM_SITES, out=interrupted, batch_size=2, resume=True)


def test_fresh_run_over_a_checkpoint_is_refused_unless_overwrite(lm, interrupted, uninterrupted):
    with pytest.raises(actscope.InputError, match="has the checkpoint of an interrupted run .* pass --resume"):
        actscope.profile(lm, lm_docs(), sites=LM_SITES, out=interrupted, batch_size=2, checkpoint_every=EVERY)
    again = actscope.profile(lm, lm_docs(), sites=LM_SITES, out=interrupted, batch_size=2, overwrite=True)
    assert_same_run(uninterrupted, again)
    assert not (interrupted.parent / ".run.checkpoint").exists()


def test_resume_without_checkpoint_and_without_out(lm, tmp_path):
    with pytest.raises(actscope.InputError, match="there is no checkpoint to resume .*looked for .*\\.nothing\\.checkpoint"):
        actscope.profile(lm, lm_docs(), sites=LM_SITES, out=tmp_path / "nothing", resume=True)
    with pytest.raises(actscope.InputError, match="--checkpoint-every needs --out"):
        actscope.profile(lm, lm_docs(), sites=LM_SITES, checkpoint_every=10)
    with pytest.raises(actscope.InputError, match="model-input dicts cannot be checked"):
        actscope.profile(lm, [{"input_ids": torch.ones(1, 3, dtype=torch.int64)}], sites=LM_SITES, out=tmp_path / "d", checkpoint_every=10)


def test_cli_resume_refusal_exits_2(interrupted):
    from actscope.zoo import tiny_lm

    runner = CliRunner(env={"COLUMNS": "200"})
    data = interrupted.parent / "docs.txt"
    data.write_text("\n".join(lm_docs()) + "\n")
    result = runner.invoke(app, ["profile", str(tiny_lm("relu")), "--data", str(data), "--sites", "blocks.0.mlp.post",
                                 "--out", str(interrupted), "--resume", "--no-report"])
    assert result.exit_code == 2
    text = result.output.replace("\n", "")
    assert "this run differs from it in the sites (checkpoint: " in text and "--batch-size (checkpoint: 2, now: 8)" in text
    result = runner.invoke(app, ["profile", "--out", str(interrupted.parent / "none"), "--resume"])
    assert result.exit_code == 2 and "there is no checkpoint to resume" in result.output.replace("\n", "")


def test_checkpoint_is_not_a_leftover_of_later_writes(lm, interrupted):
    from actscope.store.files import remove_leftovers

    remove_leftovers(interrupted)  # what every write of the run does first
    assert (interrupted.parent / ".run.checkpoint" / "rank-00000.pt").is_file()  # .NAME.checkpoint, never .NAME.tmp-*
