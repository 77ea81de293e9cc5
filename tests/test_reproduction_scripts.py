"""Smoke runs of reproduction scripts kept out of the suite at full size (``examples/``): each
runs end to end on a tiny budget, and its pass rules give the labels they say they give."""
from __future__ import annotations

from conftest import LABELS, example_script as script


def test_bigram_backcopy_runs_every_variant(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path))  # tiny models: not the zoo's
    verdicts = script("bigram_backcopy").main(["--steps", "5", "--seeds", "0", "--variants", "adam,relu,sgd"])
    printed = capsys.readouterr().out
    assert set(verdicts) == {"sink", "drain", "peak", "relu removes the sink", "relu removes the drain", "sgd removes the peak"}
    assert set(verdicts.values()) <= LABELS
    assert "== relu, seed 0: backcopy-L1-H1-relu-adam-s5-seed0" in printed and "summary over seeds [0]" in printed


def test_bigram_backcopy_rules():
    backcopy = script("bigram_backcopy")
    adam = {"share": 0.7, "share_trigger": 0.01, "value_ratio": 0.1, "residual_ratio": 3.0, "uniform": 0.1, "copy_accuracy": 1.0}
    relu = {**adam, "share": 0.05, "value_ratio": 1.2, "residual_ratio": 1.0}
    assert backcopy.label("sink", {"adam": [adam] * 3})[0] == "holds"
    assert backcopy.label("relu removes the sink", {"adam": [adam] * 3, "relu": [relu] * 3})[0] == "holds"
    # no sink but the task not learned: not a mitigation
    assert backcopy.label("relu removes the sink", {"adam": [adam], "relu": [{**relu, "copy_accuracy": 0.3}]})[0] != "holds"
    # one seed above the line, the mean still below Adam's: direction only
    mixed = [relu, relu, {**relu, "share": 0.3}]
    assert backcopy.label("relu removes the sink", {"adam": [adam] * 3, "relu": mixed}) == ("direction only", 2, 3)
    assert backcopy.label("sgd removes the peak", {"adam": [adam], "sgd": [{**adam, "residual_ratio": 3.5}]})[0] == "does not hold"


def test_lazy_neuron_width_rule():
    lazy = script("lazy_neuron_sparsity")
    widths, seeds = lazy.WIDTHS, lazy.SEEDS
    falling = {(w, s): 0.3 - 0.0001 * w for w in widths for s in seeds}
    assert lazy.width_trend(falling)[0] == "holds"
    one_seed_up = {**falling, (widths[-1], seeds[0]): 0.3}
    assert lazy.width_trend(one_seed_up)[0] == "direction only"
    assert lazy.width_trend({(w, s): 0.2 for w in widths for s in seeds})[0] == "does not hold"


def test_core_temporal_rules():
    core = script("core_temporal")
    positive, negative = [0.9, 0.5, 0.3], [0.4, 0.5, 0.1, 0.2]
    naive = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positive for n in negative) / 12
    assert core.auc(positive, negative) == naive
    assert core.overall([True, True], [True, True]) == "holds"
    assert core.overall([True, False], [True, True]) == "direction only"
    assert core.overall([False, False], [True, False]) == "does not hold"
    assert len(core.PAIRS) > 5 and len({p for pair in core.PAIRS for p in pair}) == 2 * len(core.PAIRS)
