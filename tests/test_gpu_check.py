"""benchmarks/gpu_check.py, the prepared GPU check: it parses its arguments, refuses cleanly (exit
status 2, a message saying what to do) without a CUDA GPU, and its sections run end to end on a tiny
model on the CPU (``--cpu-dry-run``: the code paths, not the figures)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import example_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return example_script("gpu_check", SCRIPT.parent)


def test_help_and_argument_checks(gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--help"])
    assert exit_.value.code == 0 and "--sparsities" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--sparsities", "1.5"])
    assert exit_.value.code == 2 and "values in (0, 1)" in capsys.readouterr().err
    args = gpu_check.parse_args(["--quick"])
    assert args.batches <= 6 and args.new_tokens <= 48 and args.sparsities == [0.4, 0.5]


def test_refuses_without_a_gpu(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--quick"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no CUDA GPU is visible" in err and "--cpu-dry-run" in err


def test_dry_run_on_the_cpu_runs_every_section(gpu_check, capsys):
    assert gpu_check.main(["--cpu-dry-run"]) == 0
    out = capsys.readouterr().out
    for heading in ("1. bandwidth", "2. profiling overhead", "3. decoding", "4. kernels"):
        assert heading in out
    assert "statistics agree" in out and "teal-7" in out and "sparsify" in out and "section" not in out
    assert out.rstrip().endswith("done")
