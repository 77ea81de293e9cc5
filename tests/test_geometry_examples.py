"""Smoke runs of the representation-geometry reproductions (``examples/``, kept out of the suite
at full size): each runs end to end in its ``--quick`` mode and prints its verdict."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LABELS = {"holds", "direction only", "does not hold"}


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tanh_relu_geometry_quick(capsys):
    verdicts = script("tanh_relu_geometry").main(["--quick"])
    printed = capsys.readouterr().out
    assert set(verdicts) == {"A", "B"} and set(verdicts.values()) <= LABELS
    assert "family A: " in printed and "family B: " in printed and "tanh>relu seeds" in printed


def test_module_drift_fpf_quick(capsys):
    pytest.importorskip("sklearn")
    verdict = script("module_drift_fpf").main(["--quick"])
    printed = capsys.readouterr().out
    assert verdict in LABELS and f"claim: {verdict}" in printed
    assert "fc3 > " in printed or "fc2 > " in printed or "fc1 > " in printed
