"""DeadNeuronTracker and ap_prune_step, each checked against a naive computation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

import actscope
import actscope.train
from actscope.errors import InputError, SiteError
from actscope.train import DeadNeuronTracker, ap_prune_step, snapshot_weights
from conftest import hook_count

RELU_SITES = ["module:1@output", "module:3@output"]


def mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3)
    )


def data(steps: int = 6, batch: int = 10):
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 8, generator=generator), torch.randint(0, 3, (batch,), generator=generator)) for _ in range(steps)]


def train(model, batches, tracker=None, capture_steps=None, epochs=1):
    """Plain SGD; optionally a tracker, and per step the captured ReLU outputs."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    for _ in range(epochs):
        for x, y in batches:
            if capture_steps is not None:
                with actscope.capture(model, RELU_SITES) as cap:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                capture_steps.append({site: cap.tensor(site) for site in RELU_SITES})
            else:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
            if tracker is not None:
                tracker.step()
        if tracker is not None:
            tracker.epoch_end()
    return grads


def test_dnr_per_step_equals_naive(monkeypatch):
    monkeypatch.setattr(actscope.train.dnr, "FLUSH_EVERY", 5)  # device counters read mid-run too
    model, captured = mlp(), []
    with DeadNeuronTracker(model) as dnr:  # default sites: every nn.ReLU output
        assert dnr.sites == RELU_SITES
        train(model, data(), dnr, captured, epochs=2)
    table = dnr.to_pandas()
    assert list(table.columns) == ["step", "epoch", "site", "pairs", "zero_pairs", "dnr"]
    assert len(table) == 12 * 3
    for step, acts in enumerate(captured):
        rows = table[table.step == step].set_index("site")
        assert rows["epoch"].eq(step // 6).all()
        for site in RELU_SITES:
            zeros = int((acts[site] == 0).sum())
            assert rows.loc[site, "pairs"] == acts[site].numel()
            assert rows.loc[site, "zero_pairs"] == zeros
            assert rows.loc[site, "dnr"] == pytest.approx(zeros / acts[site].numel(), rel=1e-12)
        pooled = sum(int((a == 0).sum()) for a in acts.values()) / sum(a.numel() for a in acts.values())
        assert rows.loc["all", "dnr"] == pytest.approx(pooled, rel=1e-12)
    assert 0 < table.dnr.min() and table.dnr.max() < 1  # non-degenerate rates


def test_per_epoch_is_the_mean_of_its_steps():
    model = mlp()
    with DeadNeuronTracker(model, RELU_SITES) as dnr:
        train(model, data(), dnr, epochs=2)
    steps = dnr.to_pandas()
    epochs = dnr.result().per_epoch().to_pandas()
    assert len(epochs) == 2 * 3 and (epochs.steps == 6).all()
    for _, row in epochs.iterrows():
        chosen = steps[(steps.epoch == row.epoch) & (steps.site == row.site)]
        assert row.dnr == pytest.approx(chosen.dnr.mean(), rel=1e-12)


def test_plot_draws_one_line_per_site_through_every_step(tmp_path):
    import re
    import xml.etree.ElementTree as ET

    model = mlp()
    with DeadNeuronTracker(model, RELU_SITES) as dnr:
        train(model, data(), dnr, epochs=2)
    rates = dnr.result()
    svg = rates.plot(tmp_path / "dnr.svg")
    assert (tmp_path / "dnr.svg").read_text(encoding="utf-8") == svg
    root = ET.fromstring(svg)  # well-formed, standalone SVG
    lines = root.findall(".//{http://www.w3.org/2000/svg}polyline")
    sites = list(dict.fromkeys(rates.site.tolist()))
    assert len(lines) == len(sites) == 3
    assert any(len(set(rates.dnr[rates.site == site].tolist())) > 1 for site in sites)  # the checks below bite
    steps = len(set(rates.step.tolist()))
    for line, site in zip(lines, sites):
        points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
        assert len(points) == steps
        # y grows downwards: a higher DNR is drawn higher up, so the order of y is the order of -DNR
        dnr = rates.dnr[rates.site == site]
        assert all(a < b for (a, _), (b, _) in zip(points, points[1:]))  # steps left to right
        assert (min(dnr) == max(dnr)) or (points[int(np.argmax(dnr))][1] < points[int(np.argmin(dnr))][1])
    assert re.search(r"dynamic dead neuron rate \(a &gt; 0\)", svg)


def test_gradients_and_outputs_identical_with_and_without_tracker():
    plain, tracked = mlp(), mlp()
    batches = data()
    without = train(plain, batches)
    with DeadNeuronTracker(tracked) as dnr:
        with_tracker = train(tracked, batches, dnr)
    for a, b in zip(without, with_tracker):
        assert all(torch.equal(ga, gb) for ga, gb in zip(a, b))
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), tracked.parameters()))


def test_hooks_removed_after_exception_and_steps_outside_rejected():
    model = mlp()
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with DeadNeuronTracker(model) as dnr:
            assert hook_count(model) > before
            model(torch.randn(2, 8))
            dnr.step()
            raise RuntimeError("boom")
    assert hook_count(model) == before
    assert len(dnr.to_pandas()) == 3  # the finished step is kept
    with pytest.raises(InputError, match="not tracking"):
        dnr.step()


def test_token_model_counts_real_tokens_only():
    """A tiny GPT-2 with a ReLU MLP: pairs are (unit, real token), padding excluded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=16, n_inner=32, n_layer=2, n_head=2, n_positions=16,
                        activation_function="relu", initializer_range=0.2)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    naive = []
    with DeadNeuronTracker(model, "blocks.*.mlp.post") as dnr:
        for _ in range(2):
            with actscope.capture(model, "blocks.*.mlp.post") as cap:
                loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            real = {s: cap.tensor(s)[mask.bool()] for s in ("blocks.0.mlp.post", "blocks.1.mlp.post")}  # [15, 32]
            naive.append({s: (int((a == 0).sum()), a.numel()) for s, a in real.items()})
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            dnr.step()
    table = dnr.to_pandas()
    for step, sites in enumerate(naive):
        for site, (zeros, pairs) in sites.items():
            row = table[(table.step == step) & (table.site == site)].iloc[0]
            assert (row.zero_pairs, row.pairs) == (zeros, pairs) and pairs == 15 * 32


def test_paused_eps_criterion_and_bad_input():
    model = mlp()
    x = torch.randn(4, 8)
    with DeadNeuronTracker(model, "module:1@output", criterion=0.3) as dnr:
        with dnr.paused():
            model(torch.randn(50, 8))  # not counted
        with actscope.capture(model, "module:1@output") as cap:
            model(x)
        dnr.step()
        dnr.step()  # no forward pass: no row
    row = dnr.to_pandas().iloc[0]
    assert row.pairs == 4 * 16 and row.zero_pairs == int((cap.tensor("module:1@output").abs() <= 0.3).sum())
    assert len(dnr.to_pandas()) == 2
    with pytest.raises(InputError, match="criterion"):
        DeadNeuronTracker(model, criterion="zero")
    with pytest.raises(SiteError, match="no nn.ReLU"):
        DeadNeuronTracker(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()))


# -- the AP step ----------------------------------------------------------------------------
def naive_ap(weight, previous, fraction, base):
    """Python loops: the remaining negative entries sorted by (|change|, flat index)."""
    w, p, b = weight.flatten().tolist(), previous.flatten().tolist(), base.flatten().tolist()
    remaining = sum(1 for m in b if m == 1)
    candidates = sorted((abs(w[i] - p[i]), i) for i in range(len(w)) if b[i] == 1 and w[i] < 0)
    mask = list(b)
    for _, i in candidates[: min(round(fraction * remaining), len(candidates))]:
        mask[i] = 0.0
    return torch.tensor(mask, dtype=weight.dtype).view_as(weight)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.6, 1.0])
def test_ap_mask_equals_naive(fraction):
    generator = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(6, 7, generator=generator), "b": torch.randn(5, 4, 3, generator=generator)}
    previous = {k: w + 0.1 * torch.randn(w.shape, generator=generator) for k, w in weights.items()}
    weights["c"] = torch.randn(20, generator=generator)
    previous["c"] = weights["c"].clone()  # all changes equal (0): ties go to the lower index
    base = {"a": (torch.rand(6, 7, generator=generator) > 0.3).float()}
    masks = ap_prune_step(weights, previous, fraction, base)
    for key, w in weights.items():
        want = naive_ap(w, previous[key], fraction, base.get(key, torch.ones_like(w)))
        assert torch.equal(masks[key], want)
    kept = base["a"].bool()
    pruned = kept & (masks["a"] == 0)
    assert (weights["a"][pruned] < 0).all()  # only negative weights are pruned


def test_ap_composes_with_magnitude_pruning():
    model, reference = mlp(), mlp()
    previous = snapshot_weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for key, layer in [("0.weight", model[0]), ("2.weight", model[2]), ("4.weight", model[4])]:
        prune.l1_unstructured(layer, "weight", amount=0.3)
    base = {k: m.clone() for k, m in [("0.weight", model[0].weight_mask), ("2.weight", model[2].weight_mask), ("4.weight", model[4].weight_mask)]}
    masks = ap_prune_step(model, previous, 0.2)
    x = torch.randn(5, 8)
    for key, index in [("0.weight", 0), ("2.weight", 2), ("4.weight", 4)]:
        layer = model[index]
        want = naive_ap(layer.weight_orig.detach(), previous[key], 0.2, base[key])
        assert torch.equal(masks[key], want) and torch.equal(layer.weight_mask, want)
        assert torch.equal(layer.weight, layer.weight_orig * want)
        assert int((base[key] - want).sum()) == min(round(0.2 * int(base[key].sum())), int(((layer.weight_orig < 0) & base[key].bool()).sum()))
        reference[index].weight.data = (layer.weight_orig * want).detach()
        reference[index].bias.data = layer.bias.detach()
        prune.remove(layer, "weight")
    assert torch.equal(model(x), reference(x))


def test_ap_bad_input():
    weights = {"a": torch.randn(3, 3)}
    with pytest.raises(InputError, match="fraction"):
        ap_prune_step(weights, weights, 1.5)
    with pytest.raises(InputError, match="previous_weights has no 'a'"):
        ap_prune_step(weights, {}, 0.1)
    with pytest.raises(InputError, match="shape"):
        ap_prune_step(weights, {"a": torch.randn(2, 3)}, 0.1)
    with pytest.raises(InputError, match="not weights being pruned"):
        ap_prune_step(weights, weights, 0.1, base_mask={"b": torch.ones(3, 3)})
    clone = copy.deepcopy(weights)
    assert torch.equal(ap_prune_step(weights, clone, 0.0)["a"], torch.ones(3, 3))
