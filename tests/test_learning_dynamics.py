"""IPR (memorising neurons) and the lazy/rich training metrics, against direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actscope.errors import InputError
from actscope.metrics.ipr import ipr, ipr_of


def naive_ipr(v: list[float]) -> float:
    s2 = sum(x * x for x in v)
    return sum(x ** 4 for x in v) / s2 ** 2


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_ipr_of_matches_the_formula_and_its_extremes():
    torch.manual_seed(0)
    v = torch.randn(5, 7)
    got = ipr_of(v)
    for row, value in zip(v.tolist(), got.tolist()):
        assert value == pytest.approx(naive_ipr(row), rel=1e-12)
    ends = ipr_of(torch.tensor([[0.0, 3.0, 0.0, 0.0], [2.0, -2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]]))
    assert ends[0] == 1.0 and ends[1] == pytest.approx(0.25) and math.isnan(ends[2])


def test_fourier_ipr_of_a_sinusoid_per_group():
    p = 11
    k = torch.arange(p, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * 3 * k / p)
    both = torch.cat([wave, 2 * torch.sin(2 * math.pi * 5 * k / p)])[None]
    # each block: energy split equally between frequencies f and p - f
    assert ipr_of(wave[None], basis="fourier").item() == pytest.approx(0.5, rel=1e-9)
    assert ipr_of(both, basis="fourier", groups=2).item() == pytest.approx(naive_ipr(
        list(np.abs(np.fft.fft(both[0, :p].numpy()))) + list(np.abs(np.fft.fft(both[0, p:].numpy())))), rel=1e-9)
    with pytest.raises(InputError, match="divides the 22 weights"):
        ipr_of(both, basis="fourier", groups=3)


def test_weight_ipr_reads_rows_or_columns_of_any_module():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    rows = ipr(net, module="0")
    w = net[0].weight.detach().double()
    np.testing.assert_allclose(rows.of("0"), [naive_ipr(r) for r in w.tolist()], rtol=1e-12)
    cols = ipr(net, module="2", of="output")
    w2 = net[2].weight.detach().double()
    np.testing.assert_allclose(cols.ipr, [naive_ipr(c) for c in w2.t().tolist()], rtol=1e-12)
    assert list(cols.to_table()["length"]) == [3] * 6 and cols.source == "weights"
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3))
    got = ipr(conv, module="0").ipr
    np.testing.assert_allclose(got, [naive_ipr(r) for r in conv[0].weight.detach().double().reshape(4, -1).tolist()], rtol=1e-12)


def test_activation_ipr_streams_over_batches_and_leaves_no_hooks():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)).train()
    x = torch.randn(23, 3)
    before_hooks, before_out = hook_count(net), net(x)
    got = ipr(net, x, "module:1@output,module:2@output", batch_size=4)
    with torch.no_grad():
        hidden = net[1](net[0](x)).double()
        out = net[2](net[1](net[0](x))).double()
    expected = [naive_ipr(c) if any(c) else float("nan") for c in hidden.t().tolist()]
    # float32 forward passes in batches of 4 vs one: equal to float32 rounding
    np.testing.assert_allclose(got.of("module:1@output"), expected, rtol=1e-5)
    np.testing.assert_allclose(got.of("module:2@output"), [naive_ipr(c) for c in out.t().tolist()], rtol=1e-5)
    assert set(got.length.tolist()) == {23}
    assert hook_count(net) == before_hooks and net.training
    assert torch.equal(net(x), before_out)
    sel = ipr(net, x, "module:2@output[1]")
    assert sel.unit.tolist() == [1] and sel.ipr[0] == pytest.approx(naive_ipr(out[:, 1].tolist()), rel=1e-5)


def test_ipr_ranking_and_errors_name_the_fix():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]))
    result = ipr(net, module="0")
    assert result.ranked().tolist() == [0, 1, 2] and result.ranked(lowest=False).tolist() == [1, 0, 2]
    with pytest.raises(InputError, match="either module="):
        ipr(net)
    with pytest.raises(InputError, match="has no module 'fc'; modules with weights include 0"):
        ipr(net, module="fc")
    with pytest.raises(InputError, match="of must be 'input'"):
        ipr(net, module="0", of="rows")
    with pytest.raises(InputError, match="needs sites="):
        ipr(net, torch.zeros(2, 2))
    with pytest.raises(InputError, match="name one"):
        ipr(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), torch.zeros(2, 2), "module:0@output,module:1@output").of()


def _example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memorising_neurons_smoke():
    """Seconds-long examples/memorising_neurons.py: p = 23, 70 % training pairs, 500 steps."""
    m = _example("memorising_neurons")
    torch.manual_seed(0)
    data = m.task(23, 0, train_share=0.7)
    model = m.mlp(23, 96, 0)
    m.train(model, data, steps=500, lr=1e-2)
    order = ipr(model, module="0", basis="fourier", groups=2).ranked().tolist()
    base, low, high = (m.accuracies(model, data, chosen) for chosen in ([], order[:38], order[-38:]))
    assert base["corrupted_fit"] == 1.0 and base["clean_train"] == 1.0  # memorised every corrupted label
    assert base["corrupted_fit"] - low["corrupted_fit"] >= 0.15  # low-IPR neurons carry the memorised labels...
    assert low["clean_train"] >= 0.9 and low["test"] >= base["test"]  # ...and not the rule
    assert high["clean_train"] < 0.7  # the periodic (high-IPR) neurons do carry the rule
