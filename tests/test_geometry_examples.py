"""Smoke runs of the representation-geometry reproductions (``examples/``, kept out of the suite
at full size): each runs end to end in its ``--quick`` mode, prints its verdict and writes its
SVG figures (well-formed, styled for reading outside the report)."""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from conftest import LABELS, example_script as script


def figures(folder: Path, names: set[str]) -> None:
    assert {path.name for path in folder.iterdir()} == names
    for path in folder.iterdir():
        root = ElementTree.parse(path).getroot()  # well-formed XML
        assert root.tag.endswith("svg") and root[0].tag.endswith("style")
        assert len(root.findall(".//{http://www.w3.org/2000/svg}rect")) + len(root.findall(".//{http://www.w3.org/2000/svg}polyline")) > 3


def test_tanh_relu_geometry_quick(capsys, tmp_path):
    verdicts = script("tanh_relu_geometry").main(["--quick", "--figures", str(tmp_path)])
    printed = capsys.readouterr().out
    assert set(verdicts) == {"A", "B"} and set(verdicts.values()) <= LABELS
    assert "family A: " in printed and "family B: " in printed and "tanh>relu seeds" in printed
    assert " ± " in printed  # the spread over seeds
    figures(tmp_path, {"tanh-relu-index.svg", "tanh-relu-parts.svg"})


def test_module_drift_fpf_quick(capsys, tmp_path):
    pytest.importorskip("sklearn")
    verdict = script("module_drift_fpf").main(["--quick", "--figures", str(tmp_path)])
    printed = capsys.readouterr().out
    assert verdict in LABELS and f"claim: {verdict}" in printed
    assert "fc3 > " in printed or "fc2 > " in printed or "fc1 > " in printed
    assert "full: forgetting" in printed and " ± " in printed and "trade-off (not judged)" in printed
    figures(tmp_path, {"module-drift-steps.svg", "module-drift-forgetting.svg", "module-drift-tradeoff.svg"})


def test_verdicts_follow_the_pass_rules():
    """The rules as written in the scripts, on hand-made results (so a flipped comparison fails)."""
    drift = script("module_drift_fpf")

    def row(fpf_forget, full_forget, fpf_b, full_b):
        return {"fpf": {"forgetting": fpf_forget, "acc_b": fpf_b}, "full": {"forgetting": full_forget, "acc_b": full_b}}

    assert drift.verdict([row(0.01, 0.2, 0.96, 0.98), row(0.02, 0.1, 0.95, 0.97)]) == "holds"
    assert drift.verdict([row(0.01, 0.2, 0.80, 0.98), row(0.02, 0.1, 0.95, 0.97)]) == "direction only"  # B too low once
    assert drift.verdict([row(0.3, 0.2, 0.96, 0.98), row(0.02, 0.2, 0.95, 0.97)]) == "direction only"  # more forgetting once
    assert drift.verdict([row(0.3, 0.2, 0.96, 0.98), row(0.2, 0.2, 0.95, 0.97)]) == "does not hold"
    geometry = script("tanh_relu_geometry")

    def results(tanh, relu):  # per tested level of family A: lists of per-seed indices
        found = {}
        for level, t, r in zip(geometry.TESTED["A"], tanh, relu):
            found[("A", level, "tanh")] = [{"index": v} for v in t]
            found[("A", level, "relu")] = [{"index": v} for v in r]
        return found

    assert geometry.verdict(results([[0.5, 0.4], [0.2, 0.3]], [[0.3, 0.3], [0.1, 0.1]]), "A", 2) == "holds"
    assert geometry.verdict(results([[0.5, 0.2], [0.2, 0.3]], [[0.3, 0.3], [0.1, 0.1]]), "A", 2) == "direction only"
    assert geometry.verdict(results([[0.1, 0.2], [0.2, 0.3]], [[0.3, 0.3], [0.1, 0.1]]), "A", 2) == "does not hold"
