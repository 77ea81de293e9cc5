"""CETT and CETT-PPL-p% sparsity: every figure against a naive computation on full tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import InputError
from actscope.metrics.cett import (
    CausalLMLoss,
    CettSparsity,
    CettThresholds,
    ClassifierAccuracy,
    ClassifierKL,
    EmbeddingFidelity,
    MaskedLMLoss,
    cett_of_dropped,
    cett_sparsity,
    output_projection,
    record_cett_curves,
)
from actscope.metrics.cett.search import Evaluation, bisect_settings
from actscope.metrics.cett.settings import CettSettings
from actscope.sites import plan_sites
from actscope.zoo import held_out_corpus, tiny_lm
from actscope.zoo.tiny import tiny_model
from conftest import model_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread mostly waits on a shared machine
P = 0.01
DOCS = held_out_corpus(200)
CALIBRATION, EVALUATION = DOCS[:24], DOCS[100:148]


@pytest.fixture(scope="module")
def relu_lm():
    return actscope.load(tiny_lm("relu"))


class Counting:
    """Wraps an objective and counts its passes over the evaluation data."""

    name = "counting"

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def reference(self, model):
        self.calls += 1
        return self.inner.reference(model)

    def degradation(self, model, reference):
        self.calls += 1
        return self.inner.degradation(model, reference)


@pytest.fixture(scope="module")
def searched(relu_lm):
    """One full search on the trained ReLU tiny LM, with forward calls and passes counted."""
    module = relu_lm.module
    before = model_state(module)
    forwards = []
    handle = module.register_forward_pre_hook(lambda *_: forwards.append(1))
    objective = Counting(CausalLMLoss(EVALUATION, batch_size=16))
    try:
        result = cett_sparsity(relu_lm, CALIBRATION, objective, p=P, batch_size=8)
    finally:
        handle.remove()
    return result, objective.calls, len(forwards), before


def naive_loss(module, tokenizer, docs) -> float:
    """Mean next-token cross-entropy from the model's own labels loss, one batch."""
    enc = tokenizer(docs, padding=True, truncation=True, max_length=128, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(module(**enc, labels=labels).loss)


def mlp_inputs(module, layer, tokenizer, docs, batch_size=16) -> torch.Tensor:
    """The real-token inputs of layer ``layer``'s down_proj, [n, d_ff], by a hand-made hook,
    batched like the objective (so every value is bit-identical to what the search saw)."""
    rows = []
    for start in range(0, len(docs), batch_size):
        enc = tokenizer(docs[start:start + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        seen = []
        handle = module.model.layers[layer].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            with torch.no_grad():
                module(**enc)
        finally:
            handle.remove()
        rows.append(seen[0][enc["attention_mask"].bool()])
    return torch.cat(rows)


# -- CETT of a given dropped set ---------------------------------------------------------------
def test_cett_of_dropped_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    a, w, b = torch.randn(7, 12, generator=gen), torch.randn(5, 12, generator=gen), torch.randn(5, generator=gen)
    dropped = torch.rand(7, 12, generator=gen) < 0.4
    got = cett_of_dropped(a, w, dropped, b).numpy()
    A, Wn, B, Dn = (x.double().numpy() for x in (a, w, b, dropped))
    for t in range(7):
        lost = sum(Wn[:, i] * A[t, i] for i in range(12) if Dn[t, i])
        expected = np.linalg.norm(lost) / np.linalg.norm(Wn @ A[t] + B)
        assert got[t] == pytest.approx(expected, rel=1e-12)
    assert math.isnan(float(cett_of_dropped(torch.zeros(1, 12), w, dropped[:1])[0]))  # no output: undefined


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "opt"])
def test_output_projection_reproduces_the_module_output(family):
    """W_out from nn.Linear and GPT-2's transposed Conv1D, with bias: a W_outᵀ + b = module output."""
    module, inputs = tiny_model(family)
    model = actscope.wrap(module)
    site = plan_sites(model, "blocks.1.mlp.post").sites[0]
    w_out, bias = output_projection(model, site)
    with actscope.capture(model, [site.name, f"module:{site.path}@output"]) as cap:
        with torch.no_grad():
            module(**inputs)
    a = cap.tensor(site.name).double()
    out = cap.tensor(f"module:{site.path}@output").double()
    expected = a @ w_out.T + (0 if bias is None else bias)
    torch.testing.assert_close(expected.reshape(out.shape), out, rtol=1e-5, atol=1e-6)


# -- the recorded curves -----------------------------------------------------------------------
def naive_curve(a: torch.Tensor, w_out: torch.Tensor, bias, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token-averaged CETT and dropped fraction at every ε, one full-tensor product per ε."""
    a, w = a.detach().double(), w_out.detach().double()
    m = a.abs() * w.norm(dim=0)
    out = (a @ w.T + (0 if bias is None else bias)).norm(dim=-1)
    cett, dropped = [], []
    for eps in grid:
        mask = m < eps
        cett.append(float(((a * mask) @ w.T).norm(dim=-1).div(out).mean()))
        dropped.append(int(mask.sum()))
    return np.array(cett), np.array(dropped) / a.numel()


def test_a_unit_exactly_at_eps_is_kept():
    """D = {i : ‖n_i‖ < ε} is strict: a unit whose ‖n_i‖ equals a grid ε is not dropped there."""
    from actscope.metrics.cett.curves import CettCurveStats

    w_out = torch.eye(3, dtype=torch.float64)  # unit columns: ‖n_i‖ = |a_i|
    stats = CettCurveStats(w_out, None, grid_points=3)
    stats.grid = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    stats.update(torch.tensor([[1.0, 2.0, 4.0]]))
    expected = [0.0, 1.0 / math.sqrt(21), math.sqrt(5 / 21)]  # ε=1: none; ε=2: unit 0; ε=4: units 0, 1
    np.testing.assert_allclose(stats.cett().numpy(), expected, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(stats.dropped_fraction().numpy(), [0, 1 / 3, 2 / 3])


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_curves_equal_naive_full_tensor_cett_at_every_grid_point(family):
    module, inputs = tiny_model(family)
    model = actscope.wrap(module)
    for site in plan_sites(model, "blocks.*.mlp.post").sites:  # initialised at 0: make the bias count
        bias = module.get_submodule(site.path).bias
        if bias is not None:
            with torch.no_grad():
                bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(site.layer))
    curves = record_cett_curves(model, [inputs, inputs], grid_points=48)
    assert curves.cett.shape == (2, 48) and curves.tokens == 2 * inputs["input_ids"].numel()
    for row, label in enumerate(curves.sites):
        site = plan_sites(model, label).sites[0]
        with actscope.capture(model, label, flat=True) as cap, torch.no_grad():
            module(**inputs)
        a = torch.cat([cap.tensor(label)] * 2)
        cett, dropped = naive_curve(a, *output_projection(model, site), curves.grid[row])
        np.testing.assert_allclose(curves.cett[row], cett, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(curves.dropped_fraction[row], dropped)
        assert curves.cett[row, 0] < 1e-3 < curves.cett[row, -1]  # the grid spans the tail to all units


def test_curves_on_the_trained_lm_with_padding_equal_naive(relu_lm):
    curves = record_cett_curves(relu_lm, CALIBRATION[:16], batch_size=8, grid_points=64)
    for layer in range(2):
        a = mlp_inputs(relu_lm.module, layer, relu_lm.tokenizer, CALIBRATION[:16], batch_size=8)
        w = relu_lm.module.model.layers[layer].mlp.down_proj.weight
        cett, dropped = naive_curve(a, w, None, curves.grid[layer])
        np.testing.assert_allclose(curves.cett[layer], cett, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(curves.dropped_fraction[layer], dropped)
        assert curves.dense_activation_ratio[layer] == float((a != 0).double().mean())


def brute_force_curve(model, layer: int, grid: np.ndarray, docs) -> np.ndarray:
    """CETT at each ε from real edited forwards: ‖y_dense − y_edited‖ / ‖y_dense‖ of down_proj.

    All ε run in one forward: the batch is repeated once per ε and each copy gets its own
    per-unit thresholds ``ε / ‖W_out[:, i]‖`` through the threshold edit."""
    site, out_site = f"blocks.{layer}.mlp.post", f"module:model.layers.{layer}.mlp.down_proj@output"
    enc = model.tokenizer(docs, padding=True, return_tensors="pt")
    col = model.module.model.layers[layer].mlp.down_proj.weight.detach().double().norm(dim=0)
    per_copy = (torch.from_numpy(grid)[:, None] / col[None]).repeat_interleave(len(docs), 0)[:, None, :]  # [G·B, 1, d_ff]

    def output(edits, repeat):
        inputs = {k: v.repeat(repeat, 1) for k, v in enc.items()}
        with torch.no_grad(), actscope.edit(model, edits), actscope.capture(model, out_site, flat=True) as cap:
            model.module(**inputs)
        return cap.tensor(out_site).double()

    dense = output({}, 1)  # [n, d_model]
    edited = output({site: actscope.interventions.threshold(per_copy)}, len(grid)).view(len(grid), *dense.shape)
    return ((dense - edited).norm(dim=-1) / dense.norm(dim=-1)).mean(1).numpy()


def largest_within(curve: np.ndarray, c: float) -> int:
    ok = np.flatnonzero(curve <= c)
    return int(ok[-1]) if len(ok) else -1


def test_per_layer_eps_lands_within_one_bin_of_brute_force(relu_lm):
    docs = CALIBRATION[:16]
    curves = record_cett_curves(relu_lm, docs, grid_points=64)
    for layer in range(2):
        brute = brute_force_curve(relu_lm, layer, curves.grid[layer], docs)
        np.testing.assert_allclose(curves.cett[layer], brute, rtol=1e-4, atol=1e-6)
        for c in (0.002, 0.02, 0.1, 0.2, 0.3, 0.5):
            assert abs(curves.index_for(c)[layer] - largest_within(brute, c)) <= 1, (layer, c)


# -- the search ------------------------------------------------------------------------------
def test_search_counts_passes_honestly_and_within_budget(searched):
    result, objective_calls, forwards, _ = searched
    assert result.passes <= 12
    assert objective_calls == result.total_passes == 1 + sum(row.passes for row in result.sweep.rows)
    calibration_batches, evaluation_batches = math.ceil(len(CALIBRATION) / 8), math.ceil(len(EVALUATION) / 16)
    assert forwards == calibration_batches + result.total_passes * evaluation_batches
    expected = {(m, q) for m in ("cett", "topk", "fat") for q in (0.005, 0.01, 0.02, 0.05)}
    assert {(r.method, r.p) for r in result.sweep.rows} == expected


def test_model_is_unchanged_by_the_search(searched, relu_lm):
    *_, before = searched
    assert model_state(relu_lm.module) == before


def test_search_reaches_p_at_the_boundary_of_the_settings(searched, relu_lm):
    """exp(L_sparse − L_dense) − 1 recomputed with the model's own loss: ≤ p, and the next more
    aggressive CETT setting exceeds p. (How close to p the result lands depends on the step
    between adjacent settings, which depends on the trained model: the model trained on another
    CPU has a step from −0.3 % straight past 1 %, so no lower bound is asserted.)"""
    result, *_ = searched
    module, tok = relu_lm.module, relu_lm.tokenizer
    dense = naive_loss(module, tok, EVALUATION)
    with result.thresholds.apply(relu_lm):
        sparse = naive_loss(module, tok, EVALUATION)
    degradation = math.exp(sparse - dense) - 1
    assert degradation == pytest.approx(result.degradation, abs=1e-5)
    assert degradation <= P
    settings = CettSettings(result.curves, relu_lm)
    index = [c for c, _ in settings.points].index(result.c)
    with actscope.edit(relu_lm, settings.edits(index + 1)):
        assert math.exp(naive_loss(module, tok, EVALUATION) - dense) - 1 > P
    assert result.converged and result.sweep.row("cett", P).setting == result.c


def test_activation_ratio_after_thresholding_equals_hand_count(searched, relu_lm):
    result, *_ = searched
    module, tok = relu_lm.module, relu_lm.tokenizer
    t0, t1 = (torch.from_numpy(result.thresholds.thresholds[f"blocks.{i}.mlp.post"]).float() for i in range(2))
    a0 = mlp_inputs(module, 0, tok, EVALUATION)
    kept0 = torch.where(a0.abs() < t0, 0.0, a0)
    with actscope.edit(relu_lm, {"blocks.0.mlp.post": actscope.interventions.threshold(t0)}):
        a1 = mlp_inputs(module, 1, tok, EVALUATION)  # layer 1 sees layer 0's thresholded output
    kept1 = torch.where(a1.abs() < t1, 0.0, a1)
    expected = [float((k != 0).double().mean()) for k in (kept0, kept1)]
    np.testing.assert_array_equal(result.activation_ratio, expected)
    nonzero = sum(int((k != 0).sum()) for k in (kept0, kept1))
    assert result.sparsity == pytest.approx(1 - nonzero / (kept0.numel() + kept1.numel()), rel=1e-12)
    assert result.dense_activation_ratio[0] == float((a0 != 0).double().mean())
    w0 = module.model.layers[0].mlp.down_proj.weight.detach().double().norm(dim=0).numpy()
    np.testing.assert_allclose(result.thresholds.thresholds["blocks.0.mlp.post"], result.eps[0] / w0, rtol=1e-12)


def hand_edited_loss(relu_lm, keep) -> float:
    """Loss with every down_proj input replaced by ``keep(a)`` through hand-made hooks."""
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: (keep(args[0]),))
               for layer in relu_lm.module.model.layers]
    try:
        return naive_loss(relu_lm.module, relu_lm.tokenizer, EVALUATION)
    finally:
        for h in handles:
            h.remove()


def test_topk_and_fat_rows_equal_hand_made_edits(searched, relu_lm):
    result, *_ = searched
    dense = naive_loss(relu_lm.module, relu_lm.tokenizer, EVALUATION)
    topk, fat = result.sweep.row("topk", P), result.sweep.row("fat", P)

    def keep_topk(a):
        order = a.abs().argsort(dim=-1, descending=True)
        return a * torch.zeros_like(a).scatter(-1, order[..., :int(topk.setting)], 1.0)

    for row, keep in ((topk, keep_topk), (fat, lambda a: torch.where(a.abs() < fat.setting, 0.0, a))):
        degradation = math.exp(hand_edited_loss(relu_lm, keep) - dense) - 1
        assert degradation == pytest.approx(row.degradation, abs=1e-5) and degradation <= P
    assert 0 < topk.sparsity < 1 and 0 < fat.sparsity < 1


def test_sweep_settings_grow_with_p(searched):
    result, *_ = searched
    wide = result.sweep.side_by_side()
    np.testing.assert_array_equal(wide["p"], [0.005, 0.01, 0.02, 0.05])
    assert wide["fat_sparsity"][1] == result.sweep.row("fat", 0.01).sparsity
    assert wide["cett_sparsity"][1] == result.sparsity
    for method in ("cett", "topk", "fat"):
        rows = sorted((r for r in result.sweep.rows if r.method == method), key=lambda r: r.p)
        assert all(r.degradation <= r.p for r in rows)
        order = [r.setting for r in rows]
        assert order == (sorted(order, reverse=True) if method == "topk" else sorted(order))


# -- files -----------------------------------------------------------------------------------
def test_file_round_trip_and_refusal_for_another_model(searched, relu_lm, tmp_path):
    result, *_ = searched
    path = result.save(tmp_path / "cett.safetensors")
    back = CettSparsity.load(path, relu_lm)
    for name in ("objective", "p", "sparsity", "degradation", "passes", "total_passes", "converged"):
        assert getattr(back, name) == getattr(result, name)
    np.testing.assert_array_equal(back.eps, result.eps)
    np.testing.assert_array_equal(back.activation_ratio, result.activation_ratio)
    np.testing.assert_array_equal(back.curves.cett, result.curves.cett)
    assert back.sweep.rows == result.sweep.rows and back.c == result.c
    for site in result.thresholds.sites:
        np.testing.assert_array_equal(back.thresholds.thresholds[site], result.thresholds.thresholds[site])
    assert CettThresholds.load(path, relu_lm).weight_hash == result.thresholds.weight_hash
    with pytest.raises(InputError, match="already exists"):
        result.save(path)
    with pytest.raises(InputError, match="not for model"):
        CettSparsity.load(path, actscope.load(tiny_lm("silu")))


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0, -0.01, float("nan"), float("inf"), True, "1%", None])
def test_bad_p_is_refused(relu_lm, p):
    with pytest.raises(InputError, match="positive fraction"):
        cett_sparsity(relu_lm, CALIBRATION, CausalLMLoss(EVALUATION), p=p)


def test_bad_sweep_and_sites_are_refused(relu_lm):
    with pytest.raises(InputError, match="sweep"):
        cett_sparsity(relu_lm, CALIBRATION, CausalLMLoss(EVALUATION), sweep=(0.01, 0.0))
    with pytest.raises(InputError, match="objective must have"):
        cett_sparsity(relu_lm, CALIBRATION, lambda model: 0.0)
    with pytest.raises(InputError, match="every unit"):
        record_cett_curves(relu_lm, CALIBRATION, "blocks.0.mlp.post[1,2]")
    with pytest.raises(InputError, match="not a neuron site"):
        record_cett_curves(relu_lm, CALIBRATION, "blocks.0.mlp.pre")


# -- bisection ---------------------------------------------------------------------------------
def test_bisection_finds_the_boundary_and_reuses_passes():
    degradation = np.linspace(0, 0.1, 300)  # index j → degradation, monotone
    measured = []

    def evaluate(j):
        measured.append(j)
        return Evaluation(float(degradation[j]), np.zeros(1, np.int64), np.ones(1, np.int64))

    known = {}
    first = bisect_settings(300, evaluate, 0.01, budget=11, known=known, rtol=0.0)
    assert first.index == int(np.flatnonzero(degradation <= 0.01)[-1]) and first.converged
    assert first.passes == len(measured) <= 10
    again = bisect_settings(300, evaluate, 0.01, budget=11, known=known, rtol=0.0)
    assert again.passes == 0 and again.index == first.index
    short = bisect_settings(300, evaluate, 0.05, budget=2, known={}, rtol=0.0)
    assert short.passes == 2 and not short.converged


# -- objectives against naive computations -------------------------------------------------------
def test_causal_lm_loss_equals_the_models_labels_loss(relu_lm):
    objective = CausalLMLoss(EVALUATION[:20], batch_size=6)
    reference = objective.reference(relu_lm)
    assert reference.value == pytest.approx(naive_loss(relu_lm.module, relu_lm.tokenizer, EVALUATION[:20]), rel=1e-5)
    assert objective.degradation(relu_lm, reference) == pytest.approx(0.0, abs=1e-6)


def test_embedding_fidelity_is_one_minus_mean_cosine_of_mean_pooled_states(minilm):
    texts = ["a cat sat on the mat", "sparse neurons", "the quick brown fox jumps over the lazy dog"]
    objective = EmbeddingFidelity(texts, batch_size=2)
    reference = objective.reference(minilm)
    edits = {"blocks.*.mlp.post": actscope.interventions.threshold(0.05)}
    with actscope.edit(minilm, edits):
        got = objective.degradation(minilm, reference)

    def pooled():  # batched like the objective (2 texts per pass), so float32 rounding is the same
        rows = []
        for start in (0, 2):
            enc = minilm.tokenizer(texts[start:start + 2], padding=True, return_tensors="pt")
            mask = enc["attention_mask"][..., None].double()
            with torch.no_grad():
                hidden = minilm.module(**enc).last_hidden_state.double()
            rows.append((hidden * mask).sum(1) / mask.sum(1))
        return torch.cat(rows)

    dense = pooled()
    with actscope.edit(minilm, edits):
        sparse = pooled()
    cos = [float(s @ d / (s.norm() * d.norm())) for s, d in zip(sparse, dense)]
    assert got == pytest.approx(1 - sum(cos) / 3, rel=1e-6) and got > 0


def classifier_batches():
    module, inputs = tiny_model("llama")
    return actscope.wrap(module), [inputs, {k: v.flip(0) for k, v in inputs.items()}]


def test_classifier_kl_and_accuracy_equal_naive():
    model, batches = classifier_batches()
    edits = {"blocks.*.mlp.post": actscope.interventions.threshold(0.3)}
    with torch.no_grad():
        dense = [model.module(**b).logits.double().reshape(-1, 128) for b in batches]
        with actscope.edit(model, edits):
            sparse = [model.module(**b).logits.double().reshape(-1, 128) for b in batches]
    p, q = torch.cat(dense).softmax(-1), torch.cat(sparse).softmax(-1)
    kl = float((p * (p.log() - q.log())).sum(-1).mean())
    objective = ClassifierKL(batches)
    reference = objective.reference(model)
    with actscope.edit(model, edits):
        assert objective.degradation(model, reference) == pytest.approx(math.exp(kl) - 1, rel=1e-6)
    labels = torch.cat(sparse).argmax(-1).tolist()  # the sparse model is right everywhere
    accuracy = ClassifierAccuracy(batches, labels)
    reference = accuracy.reference(model)
    dense_accuracy = float((torch.cat(dense).argmax(-1) == torch.tensor(labels)).double().mean())
    assert reference.value == dense_accuracy < 1
    with actscope.edit(model, edits):
        assert accuracy.degradation(model, reference) == pytest.approx(1 - 1 / dense_accuracy, rel=1e-12)


def test_masked_lm_loss_scores_only_the_masked_tokens():
    from transformers import BertForMaskedLM

    from actscope.zoo.tiny import TINY_CONFIGS

    torch.manual_seed(0)
    module = BertForMaskedLM(TINY_CONFIGS["bert"]()).eval()
    model = actscope.wrap(module)
    ids = torch.randint(5, 128, (3, 20), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    objective = MaskedLMLoss([batch], mask_token_id=4, special_ids=(0,), mask_fraction=0.3)
    reference = objective.reference(model)
    masked = reference.batches[0]
    chosen = masked["labels"] != -100
    assert 0 < int(chosen.sum()) < ids.numel()
    assert torch.equal(masked["input_ids"][chosen], torch.full((int(chosen.sum()),), 4))
    assert torch.equal(masked["labels"][chosen], ids[chosen]) and torch.equal(masked["input_ids"][~chosen], ids[~chosen])
    with torch.no_grad():
        logits = module(input_ids=masked["input_ids"], attention_mask=batch["attention_mask"]).logits
    naive = float(torch.nn.functional.cross_entropy(logits[chosen], ids[chosen]))
    assert reference.value == pytest.approx(naive, rel=1e-6)
    assert objective.reference(model).batches[0]["input_ids"].equal(masked["input_ids"])  # fixed masks
