"""IPR (memorising neurons) and the lazy/rich training metrics, against direct computations."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from conftest import example_script

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
    assert sel.ranked().tolist() == [1]  # unit numbers, not positions in the selection


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


def test_memorising_neurons_smoke(one_thread):
    """Seconds-long examples/memorising_neurons.py: p = 23, 70 % training pairs, 500 steps."""
    m = example_script("memorising_neurons")
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


# -- lazy / rich --------------------------------------------------------------------------
def _small_net(seed: int = 3) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))


def naive_ntk(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    params = [p for p in net.parameters()]
    rows = []  # per (example, output): the flattened gradient
    for i in range(len(x)):
        out = net(x[i:i + 1])[0]
        rows.append([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[c], params, retain_graph=True)]).double().numpy()
                     for c in range(out.numel())])
    n, outputs = len(x), len(rows[0])
    return np.array([[sum(rows[i][c] @ rows[j][c] for c in range(outputs)) for j in range(n)] for i in range(n)])


def naive_alignment(k: np.ndarray, y: np.ndarray) -> float:
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    kc, tc = h @ k @ h, h @ (y @ y.T) @ h
    return float((kc * tc).sum() / np.sqrt((kc * kc).sum() * (tc * tc).sum()))


def test_empirical_ntk_and_alignment_match_a_direct_computation():
    from actscope.metrics.richness import empirical_ntk, kernel_alignment, ntk_alignment

    net = _small_net()
    x = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 3, 1, 0, 2])
    kernel = empirical_ntk(net, x)
    np.testing.assert_allclose(kernel.numpy(), naive_ntk(net, x), rtol=1e-5, atol=1e-7)
    onehot = np.eye(4)[labels.numpy()]
    assert kernel_alignment(kernel, labels, centered=True) == pytest.approx(naive_alignment(kernel.numpy(), onehot), rel=1e-10)
    k = kernel.numpy()
    t = onehot @ onehot.T
    assert kernel_alignment(kernel, labels, centered=False) == pytest.approx(float((k * t).sum() / np.sqrt((k * k).sum() * (t * t).sum())), rel=1e-10)
    assert ntk_alignment(net, x, labels) == pytest.approx(naive_alignment(kernel.numpy(), onehot), rel=1e-10)
    ideal = torch.tensor(t)  # the label kernel itself is perfectly aligned
    assert kernel_alignment(ideal, labels) == pytest.approx(1.0)
    with pytest.raises(InputError, match="there are 5 targets"):
        kernel_alignment(kernel, labels[:5])


def test_weight_change_is_the_norms_written_out():
    from actscope.metrics.richness import weight_change

    a, b = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([3.0, 7.0], dtype=torch.float64)
    assert weight_change(a, b) == {"weight_norm": pytest.approx(float(np.hypot(3, 7))), "weight_distance": pytest.approx(3.0),
                                   "relative_weight_change": pytest.approx(3.0 / 5.0)}


def _train_steps(net, x, y, steps, callback=None):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if callback is not None:
            callback.step(loss=loss)


def test_lazy_rich_callback_records_direct_values_and_leaves_training_unchanged():
    from actscope.metrics.richness import ntk_alignment
    from actscope.metrics.similarity import cka
    from actscope.train.richness import lazy_rich

    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randint(0, 4, (12,))
    plain, watched = _small_net(), _small_net()
    initial = [p.detach().clone() for p in watched.parameters()]
    h0 = torch.tanh(watched[0](x)).detach().double()
    hooks_before = hook_count(watched)
    _train_steps(plain, x, y, 5)
    with lazy_rich(watched, x, y, sites="module:1@output", every=2) as cb:
        _train_steps(watched, x, y, 5, cb)
    assert hook_count(watched) == hooks_before and watched.training
    for p, q in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(p, q)  # observing does not change training
    table = cb.log.to_pandas()
    assert sorted(set(table.step[table.metric == "ntk_alignment"])) == [0, 2, 4]
    last = table[table.step == 4].set_index("metric").value
    theta = torch.cat([p.detach().reshape(-1) for p in watched.parameters()]).double()
    theta0 = torch.cat([p.reshape(-1) for p in initial]).double()
    assert last["weight_norm"] == pytest.approx(float(theta.norm()), rel=1e-12)
    assert last["weight_distance"] == pytest.approx(float((theta - theta0).norm()), rel=1e-12)
    assert last["relative_weight_change"] == pytest.approx(float((theta - theta0).norm() / theta0.norm()), rel=1e-12)
    assert last["ntk_alignment"] == pytest.approx(ntk_alignment(watched, x, y), rel=1e-10)
    assert last["feature_cka"] == pytest.approx(cka(h0, torch.tanh(watched[0](x)).detach().double()), rel=1e-9)
    assert table[(table.metric == "feature_cka")].site.unique().tolist() == ["module:1@output"]


def test_lazy_rich_refuses_bad_arguments():
    from actscope.train.richness import lazy_rich

    net = _small_net()
    with pytest.raises(InputError, match="every must be"):
        lazy_rich(net, torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), every=0)
    with pytest.raises(InputError, match="one row per probe example"):
        lazy_rich(net, torch.zeros(3, 3), torch.zeros(2, dtype=torch.long))


def test_grokking_lazy_rich_smoke(tmp_path, one_thread):
    """Seconds-long examples/grokking_lazy_rich.py: p = 17, 64 neurons, 300 steps."""
    from actscope.store import read_run
    from actscope.train import StepLog, write_steps

    g = example_script("grokking_lazy_rich")
    data, model, probe, targets = g.setup(17, 0, share=0.6, width=64)
    log = StepLog()
    g.train_watched(data, model, probe, targets, steps=300, every=100, log=log, lr=3e-3)
    c = g.curves(log)
    assert set(c) >= {"train_acc", "test_acc", "ntk_alignment", "feature_cka", "weight_norm", "weight_distance", "relative_weight_change"}
    assert c["train_acc"][1][-1] == 1.0
    assert c["ntk_alignment"][1].max() > c["ntk_alignment"][1][0]  # the kernel turns towards the labels
    assert c["feature_cka"][1][-1] < 0.95 and c["relative_weight_change"][1][-1] > 0.1  # features and weights moved
    t = g.timings(c)
    assert t["fit"] <= 300 and t["rich"] <= 300
    run = read_run(write_steps(tmp_path / "run", log))
    assert "ntk_alignment" in set(run.tables["training_steps"]["metric"].to_pylist())


def test_direction_alignment_is_the_cosine_per_neuron():
    from actscope.metrics import direction_alignment

    net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0], [0, 0, -2.0], [0, 0, 0]]))
    u = torch.tensor([[2.0, 0, 0], [0, 0, 1.0]])
    got = direction_alignment(net, "0", u)
    w = net[0].weight.detach().double().numpy()
    for j in range(3):
        for k in range(2):
            assert got[j, k].item() == pytest.approx(float(w[j] @ u[k].double().numpy() / np.linalg.norm(w[j]) / np.linalg.norm(u[k].numpy())))
    assert torch.isnan(got[3]).all()
    assert direction_alignment(net, "0", torch.ones(4), of="output").shape == (3, 1)
    with pytest.raises(InputError, match=r"directions must be \[k, 3\]"):
        direction_alignment(net, "0", torch.ones(2, 5))


def test_benign_overfitting_xor_smoke(one_thread):
    """Seconds-long examples/benign_overfitting_xor.py: d = 600, n = 24, 40 neurons, 100 steps."""
    b = example_script("benign_overfitting_xor")
    data = b.xor_data(1, d=600, n=24, norm=9, test=500)
    s = b.series(b.run(data, b.network(600, 40, 1), steps=100))
    assert data["flipped"].any()
    assert s["train_acc"][1] == 1.0 and s["flipped_fit"][1] == 1.0 and s["test_acc"][1] <= 0.6  # fitted at once, noise included
    assert s["train_acc"][-1] == 1.0 and s["test_acc"][-1] >= s["test_acc"][1] + 0.2  # still fitted, and generalises later
    assert s["cluster_alignment"][-1] >= 3 * s["cluster_alignment"][0]


# -- opposing signals ---------------------------------------------------------------------
def test_opposition_score_is_minus_the_pearson_correlation():
    from actscope.metrics.opposition import opposition_score

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert opposition_score(a, b) == pytest.approx(-np.corrcoef(a, b)[0, 1], rel=1e-12)
    assert opposition_score(a, -2 * a + 1) == pytest.approx(1.0)
    assert math.isnan(opposition_score(a, np.ones(30)))
    with pytest.raises(InputError, match="same length"):
        opposition_score(a, b[:5])


def test_opposing_groups_recovers_planted_groups_and_the_separating_feature():
    from actscope.metrics.opposition import opposing_groups, opposition_score, separating_feature

    rng = np.random.default_rng(1)
    t = np.arange(60)
    wave = np.sin(t / 2.0)
    losses = 1.0 + 0.01 * rng.normal(size=(60, 20))
    losses[:, [2, 5, 7, 11]] += wave[:, None]
    losses[:, [3, 8, 13, 17, 19]] -= 0.8 * wave[:, None]
    found = opposing_groups(losses, top=9)
    groups = {tuple(found.group_a.tolist()), tuple(found.group_b.tolist())}
    assert groups == {(2, 5, 7, 11), (3, 8, 13, 17, 19)}
    delta = np.diff(losses, axis=0)
    assert found.score == pytest.approx(opposition_score(delta[:, found.group_a].mean(1), delta[:, found.group_b].mean(1)), rel=1e-12)
    assert found.score > 0.99
    np.testing.assert_allclose(found.swing, delta.var(axis=0), rtol=1e-12)
    assert found.to_table()["group"][2] in ("A", "B") and found.to_table()["group"][0] == ""
    x = rng.normal(size=(20, 4))
    x[[2, 5, 7, 11], 3] += 5.0
    order, diff = separating_feature(x, [2, 5, 7, 11], [3, 8, 13, 17, 19])
    a, b = x[[2, 5, 7, 11], 3], x[[3, 8, 13, 17, 19], 3]
    pooled = np.sqrt((a.var(ddof=1) * 3 + b.var(ddof=1) * 4) / 7)
    assert order[0] == 3 and diff[0] == pytest.approx((a.mean() - b.mean()) / pooled, rel=1e-12)


def test_loss_trajectories_keep_bounded_evenly_spaced_direct_losses():
    from actscope.train import loss_trajectories

    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randint(0, 4, (12,))
    plain, watched = _small_net(), _small_net()
    _train_steps(plain, x, y, 21)
    with loss_trajectories(watched, x[:6], y[:6], max_points=4) as cb:
        _train_steps(watched, x, y, 21, cb)
    for p, q in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(p, q)
    steps, losses = cb.losses()
    assert steps.tolist() == [0, 8, 16] and cb.stride == 8 and losses.shape == (3, 6)  # 21 steps in at most 4 points
    with torch.no_grad():
        direct = torch.nn.functional.cross_entropy(watched(x[:6]), y[:6], reduction="none").double().numpy()
    np.testing.assert_allclose(cb.measure(), direct, rtol=1e-12)
    table = cb.log.to_pandas()
    # measured at every step until the buffer overflowed at step 4, then every 2nd, 4th, 8th step
    assert table[table.metric == "tracked_loss"].step.tolist() == [0, 1, 2, 3, 4, 6, 8, 12, 16]


def test_separating_feature_ranks_a_feature_constant_within_groups_first():
    from actscope.metrics.opposition import separating_feature

    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 3))
    x[:, 1] = [6.0] * 4 + [0.0] * 6  # constant within each group, different between them: perfectly separating
    x[:, 2] = 1.0  # constant everywhere: separates nothing
    order, diff = separating_feature(x, [0, 1, 2, 3], [4, 5, 6, 7, 8, 9])
    assert order[0] == 1 and diff[0] == np.inf and order[-1] == 2 and diff[-1] == 0.0
    assert separating_feature(x, [4, 5, 6], [0, 1, 2])[1][0] == -np.inf


def naive_spikes(losses, a, b, factor, window):
    total = losses.mean(axis=1)
    spikes = [t for t in range(window, len(total)) if total[t] > factor * statistics.median(total[t - window:t].tolist())]
    gap = [abs(np.mean(losses[t, a]) - np.mean(losses[t, b])) for t in range(len(total))]
    calm = [t for t in range(window, len(total)) if t not in spikes]
    lift = np.mean([gap[t] for t in spikes]) / np.mean([gap[t] for t in calm])
    rise = {t: losses[t] - losses[t - 1] for t in spikes}
    share = sum(rise[t][i] for t in spikes for i in a + b) / sum(rise[t].sum() for t in spikes)
    return spikes, lift, share


def test_spike_coincidence_matches_a_direct_computation():
    from actscope.metrics.opposition import spike_coincidence

    rng = np.random.default_rng(3)
    losses = 0.1 + 0.01 * rng.random(size=(80, 12))
    wave = np.where(np.arange(80) % 2 == 0, 1.0, -1.0) * np.linspace(0, 0.5, 80)
    losses[:, [0, 1, 2]] += 0.6 + wave[:, None]
    losses[:, [3, 4, 5]] += 0.6 - wave[:, None]
    losses[[30, 55, 70], 0:3] += 6.0  # the groups' swing blows up: the mean loss spikes
    losses[60, 8] += 1.0  # a smaller rise elsewhere, not a spike
    for window in (20, 7):
        got = spike_coincidence(losses, [0, 1, 2], [3, 4, 5], factor=2.0, window=window)
        spikes, lift, share = naive_spikes(losses, [0, 1, 2], [3, 4, 5], 2.0, window)
        assert got.spikes.tolist() == spikes == [30, 55, 70]
        assert got.lift == pytest.approx(lift, rel=1e-12) and got.lift > 3
        assert got.share == pytest.approx(share, rel=1e-12) and abs(got.share - 1.0) < 0.05
    calm = spike_coincidence(losses[:25], [0, 1, 2], [3, 4, 5])
    assert len(calm.spikes) == 0 and math.isnan(calm.lift) and math.isnan(calm.share)
    with pytest.raises(InputError, match="window must be"):
        spike_coincidence(losses, [0], [3], window=80)
    with pytest.raises(InputError, match="factor must be > 1"):
        spike_coincidence(losses, [0], [3], factor=1.0)
    with pytest.raises(InputError, match="both groups"):
        spike_coincidence(losses, [], [3])


def test_opposing_signals_smoke(one_thread):
    """Seconds-long examples/opposing_signals.py: 400 digits, 15 + 15 with the bright border, width 64, 400 steps."""
    m = example_script("opposing_signals")
    data, plain = m.digits_data(2, n=400, per_group=15), m.digits_data(2, n=400, per_group=15, patch=0.0)
    runs = [m.analyse(d, m.train(m.network(2, 64), d, steps=400)[1], burn=100, top=30) for d in (data, plain)]
    got, control = runs
    assert got["overlap"] >= 0.8 and got["score"] >= 0.6 and got["border_top"]  # the planted pair, opposing, set apart by the border
    assert got["spikes"] >= 1 and got["lift"] >= 1.5  # the training loss spikes with the groups' swings
    assert control["overlap"] <= 0.3 and control["spikes"] == 0 and control["swing"] <= got["swing"] / 3
# -- feature complexity: variance explained ---------------------------------------------------
def naive_variance_explained(r: np.ndarray, design: np.ndarray) -> float:
    """R² of the least-squares fit of every column of ``r`` on ``[1, design]``, pooled over columns."""
    x = np.column_stack([np.ones(len(r)), design])
    coef, *_ = np.linalg.lstsq(x, r, rcond=None)
    residual = r - x @ coef
    centred = r - r.mean(axis=0)
    return 1 - float((residual ** 2).sum() / (centred ** 2).sum())


def test_variance_explained_matches_least_squares_written_out():
    from actscope.metrics import feature_variance, variance_explained

    rng = np.random.default_rng(0)
    r = rng.normal(size=(60, 5)) + np.outer(rng.integers(0, 3, 60), [1.0, -2.0, 0.0, 0.5, 0.0])
    levels = rng.integers(0, 3, 60)  # categorical: dummy coding (the intercept covers level 0)
    value = rng.normal(size=60)  # continuous
    onehot = np.eye(3)[levels][:, 1:]
    assert variance_explained(r, levels) == pytest.approx(naive_variance_explained(r, onehot), rel=1e-10)
    assert variance_explained(torch.tensor(r), value) == pytest.approx(naive_variance_explained(r, value[:, None]), rel=1e-10)
    names = np.array(["a", "b", "c"])[levels]  # string values are categories too
    got = feature_variance(r, {"levels": levels, "names": names, "value": value}, probes=False)
    assert got.of("names") == pytest.approx(got.of("levels"), rel=1e-12)
    assert got.kind.tolist() == ["categorical", "categorical", "continuous"] and np.isnan(got.linear_probe).all()
    assert got.total_variance[0] == pytest.approx(float(r.var(axis=0).sum()), rel=1e-12)


def test_variance_explained_of_summed_embeddings_is_their_share():
    from actscope.metrics import feature_variance

    n = 400  # every (a, b) pair equally often: the two features are exactly balanced and uncorrelated
    a, b = np.arange(n) % 2, (np.arange(n) // 2) % 2
    u, v = np.array([3.0, 0.0, 4.0, 0.0]), np.array([0.0, 1.0, 0.0, -1.0])
    r = np.where(a[:, None] == 1, u, -u) + np.where(b[:, None] == 1, v, -v)
    got = feature_variance(r, {"a": a, "b": b, "noise": np.random.default_rng(1).normal(size=n)})
    total = u @ u + v @ v  # each ±embedding has variance ‖e‖²
    assert got.of("a") == pytest.approx(25 / total, abs=1e-12) and got.of("b") == pytest.approx(2 / total, abs=1e-12)
    assert got.of("noise") < 0.05
    assert got.of("a", column="linear_probe") == 1.0 and got.of("b", column="nonlinear_probe") == 1.0
    assert abs(got.of("noise", column="linear_probe")) < 0.1  # held-out R² of a feature that is not there


def test_probes_tell_a_linear_from_a_nonlinear_feature():
    from actscope.metrics import feature_variance

    rng = np.random.default_rng(2)
    r = rng.normal(size=(1000, 2))
    features = {"first": (r[:, 0] > 0).astype(int), "xor": (r[:, 0] * r[:, 1] > 0).astype(int)}  # xor: the quadrant checkerboard
    got = feature_variance(r, features, seed=3)
    assert got.of("first", column="linear_probe") >= 0.95
    assert got.of("xor", column="linear_probe") < 0.65 and got.of("xor", column="nonlinear_probe") >= 0.9  # chance is 0.5
    assert got.of("xor") < 0.02  # both classes have the same mean: XOR explains no variance
    again = feature_variance(r, features, seed=3)
    assert np.array_equal(again.nonlinear_probe, got.nonlinear_probe)  # the seed fixes split and initialisation


def test_feature_variance_reads_sites_of_any_module():
    from actscope.metrics import feature_variance, variance_explained

    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).train()
    x = torch.randn(30, 3)
    feature = (x[:, 0] > 0).long()
    hooks_before = hook_count(net)
    got = feature_variance(net, {"sign": feature}, x, "module:1@output,module:2@output", probes=False, batch_size=7)
    with torch.no_grad():
        hidden = torch.relu(net[0](x)).double()
        out = net(x).double()
    assert got.site.tolist() == ["module:1@output", "module:2@output"]
    assert got.of("sign", "module:1@output") == pytest.approx(variance_explained(hidden, feature.numpy()), rel=1e-6)
    assert got.of("sign", "module:2@output") == pytest.approx(variance_explained(out, feature.numpy()), rel=1e-6)
    assert hook_count(net) == hooks_before and net.training


def test_feature_variance_refuses_bad_input_with_the_fix():
    from actscope.metrics import feature_variance

    r = np.random.default_rng(5).normal(size=(20, 3))
    ok = np.arange(20) % 2
    with pytest.raises(InputError, match="one value per row"):
        feature_variance(r, {"short": ok[:10]})
    with pytest.raises(InputError, match="single value"):
        feature_variance(r, {"constant": np.zeros(20, dtype=int)})
    with pytest.raises(InputError, match="non-empty dict"):
        feature_variance(r, [ok])
    with pytest.raises(InputError, match="NaN"):
        feature_variance(r, {"gap": np.where(ok == 1, np.nan, 1.0)})
    with pytest.raises(InputError, match="sites= needs data="):
        feature_variance(r, {"ok": ok}, sites="module:0@output")
    with pytest.raises(InputError, match="needs sites="):
        feature_variance(torch.nn.Linear(3, 2), {"ok": ok}, torch.zeros(20, 3))
    with pytest.raises(InputError, match="test_share"):
        feature_variance(r, {"ok": ok}, test_share=1.5)
    with pytest.raises(InputError, match="flatten the other axes"):
        feature_variance(np.zeros((20, 3, 2)), {"ok": ok})
    with pytest.raises(InputError, match="no feature 'other'"):
        feature_variance(r, {"ok": ok}, probes=False).of("other")


def test_feature_variance_probes_without_scikit_learn_name_the_extra(monkeypatch):
    import sys

    from actscope.metrics import feature_variance

    r = np.random.default_rng(5).normal(size=(20, 3))
    monkeypatch.setitem(sys.modules, "sklearn.exceptions", None)  # import fails as if not installed
    with pytest.raises(InputError, match=r"pip install 'actscope\[metrics\]', or pass probes=False"):
        feature_variance(r, {"ok": np.arange(20) % 2})
    assert feature_variance(r, {"ok": np.arange(20) % 2}, probes=False).of("ok") >= 0


def test_feature_variance_tracker_records_direct_values_and_leaves_training_unchanged():
    from actscope.metrics import variance_explained
    from actscope.train import feature_variance_tracker

    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randint(0, 4, (12,))
    features = {"label": y, "sign": (x[:, 1] > 0).long()}
    plain, watched = _small_net(), _small_net()
    hooks_before = hook_count(watched)
    _train_steps(plain, x, y, 5)
    with feature_variance_tracker(watched, x, features, "module:1@output", every=2) as cb:
        _train_steps(watched, x, y, 5, cb)
    assert hook_count(watched) == hooks_before and watched.training
    for p, q in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(p, q)  # observing does not change training
    table = cb.log.to_pandas()
    chosen = table[table.metric == "variance_explained"]
    assert sorted(set(chosen.step)) == [0, 2, 4] and chosen.site.unique().tolist() == ["label", "sign"]
    hidden = torch.tanh(watched[0](x)).detach().double()
    last = chosen[chosen.step == 4].set_index("site").value
    for name, values in features.items():
        assert last[name] == pytest.approx(variance_explained(hidden, values.numpy()), rel=1e-9)
    both = feature_variance_tracker(watched, x, features, "module:1@output,module:2@output", probes=True).measure()
    assert set(both) >= {("variance_explained", "module:2@output:sign"), ("linear_probe", "module:1@output:label")}
    with pytest.raises(InputError, match="one value per row"):
        feature_variance_tracker(watched, x, {"short": y[:5]}, "module:1@output")
    with pytest.raises(InputError, match="every must be"):
        feature_variance_tracker(watched, x, features, "module:1@output", every=0)


def test_complexity_bias_smoke(tmp_path, one_thread):
    """Seconds-long examples/complexity_bias.py: 2048 inputs, 400 steps at lr 3e-3, seed 4."""
    from conftest import LABELS, example_script

    from actscope.store import read_run
    from actscope.train import StepLog, write_steps

    m = example_script("complexity_bias")
    data, model = m.task(4, inputs=2048, train=1536), m.network(4)
    log = StepLog()
    m.train_watched(data, model, steps=400, every=100, log=log, lr=3e-3)
    c = m.curves(log)
    assert all(c[f"test_acc_{n}"][1][-1] >= 0.99 for n in m.FEATURES)  # every feature learned
    ve = {n: c[f"variance_explained:{n}"][1] for n in m.FEATURES}
    assert ve["easy"][-1] >= 3 * ve["hard"][-1] and ve["easy"][-1] > ve["medium"][-1] > ve["hard"][-1]
    assert ve["easy"][-1] >= 3 * ve["easy"][0]  # the easy feature's share grew with training
    end = m.final(data, model, 4)
    assert min(end["hidden"].of(n, column="linear_probe") for n in m.FEATURES) >= 0.99
    assert end["input"].of("hard", column="linear_probe") < 0.65  # parity is not linear in the input bits
    m.SEEDS = (4,)  # the script's pass rule, applied to this one run
    label, checks = m.verdict({4: end})
    assert label in LABELS and label == "holds" and len(checks) == 4
    run = read_run(write_steps(tmp_path / "run", log))
    steps = run.tables["training_steps"].to_pandas()
    assert set(steps[steps.metric == "variance_explained"].site) == set(m.FEATURES)
