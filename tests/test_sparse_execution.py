"""Sparse execution equals the dense model with the same thresholds, and leaves no trace.

For the tiny model of every family that sparse execution supports (from the cards, and the
card-less families matched to such a card's layout) and every method: prefill and three cached
decoding steps, batch 1 and batch 4 (left-padded), logits of ``sparsify`` against
``dense_with_thresholds`` (an independent computation: the model's own dense forward with the
skips applied by hooks). Each comparison also checks that the thresholds changed the dense
output, so equality is not the trivial one.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import InputError
from actscope.sparse import calibrate, dense_with_thresholds, sparse_families, sparsify
from actscope.store import weight_hash
from actscope.zoo.tiny import tiny_model
from conftest import hook_count
from test_layouts import LAYOUTS, fresh

# Every family whose card lets sparse execution run its MLPs, and the card-less families whose
# matched layout is one of them (tests/test_layouts.py).
FAMILIES = [*sparse_families(), *(name for name, tiny in LAYOUTS.items() if tiny.layout in sparse_families())]
SETTINGS = {  # name: calibrate's options
    "cats": {"method": "cats", "sparsity": 0.7},
    "teal": {"method": "teal", "sparsity": 0.6, "step": 0.05},  # greedy over every projection, attention ones too
    "teal uniform mlp": {"method": "teal", "sparsity": 0.6, "allocation": "uniform", "projections": "mlp"},
    "cett": {"method": "cett", "p": 0.005},
    "core": {"method": "core", "sparsity": 0.5},
}
LOW = 3  # token ids below this are special in some tiny configs
STEPS = 3


def calibration_data(seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(LOW, 128, (4, 12), generator=g) for _ in range(2)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def prompt(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` prompts of 7 tokens, left-padded: example j has j padding positions."""
    ids = torch.randint(LOW, 128, (4, 7), generator=torch.Generator().manual_seed(5))[:batch]
    mask = torch.ones_like(ids)
    for j in range(batch):
        mask[j, :j] = 0
    return ids, mask


_CACHE: dict = {}


def setup(family: str) -> tuple:
    if family not in _CACHE:
        module = fresh(family) if family in LAYOUTS else tiny_model(family)[0]
        model = actscope.wrap(module)
        cals = {name: calibrate(model, calibration_data(), **kw) for name, kw in SETTINGS.items()}
        cals["cett"] = non_degenerate(cals["cett"])
        _CACHE[family] = (module, model, cals)
    return _CACHE[family]


def non_degenerate(cal):
    """Random tiny models have no quality to lose, so CETT-PPL-p% may skip every unit of some
    of them (phi3, gpt2); lower such thresholds so that the comparison is not the trivial one."""
    if cal.expected_sparsity.max() < 0.95:
        return cal
    return dataclasses.replace(cal, thresholds={k: v * 0.1 for k, v in cal.thresholds.items()})


def decode(module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Logits of the prefill and of STEPS cached decoding steps with fixed next tokens."""
    steps = torch.randint(LOW, 128, (ids.shape[0], STEPS), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = module(input_ids=ids, attention_mask=mask, use_cache=True)
        logits = [out.logits]
        for k in range(STEPS):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = module(input_ids=steps[:, k:k + 1], attention_mask=mask, cache=out.cache, use_cache=True)
            logits.append(out.logits)
    return logits


def real(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prefill logits of the real tokens only (padded positions compute nonsense in both)."""
    return logits[mask.bool()] if logits.shape[1] == mask.shape[1] else logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 4])
def test_sparse_equals_dense_with_thresholds(family, batch):
    module, model, cals = setup(family)
    ids, mask = prompt(batch)
    dense = decode(module, ids, mask)
    for method, cal in cals.items():
        with dense_with_thresholds(model, cal):
            reference = decode(module, ids, mask)
        with sparsify(model, cal) as handle:
            sparse = decode(module, ids, mask)
        for step, (s, r, d) in enumerate(zip(sparse, reference, dense)):
            s, r, d = real(s, mask), real(r, mask), real(d, mask)
            torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5, msg=lambda m: f"{family} {method} step {step}: {m}")
        changed = max(float((real(r, mask) - real(d, mask)).abs().max()) for r, d in zip(reference[1:], dense[1:]))
        assert changed > 1e-3, f"{family} {method}: the thresholds did not change decoding ({changed})"
        realised = handle.realised()
        assert (realised.tokens == int(mask.sum()) + STEPS * batch).all()
        assert (realised.decode_tokens == STEPS * batch).all()
        assert 0 < realised.sparsity.mean() < 1, (family, method, realised.sparsity)
        assert 0 < realised.decode_sparsity.mean() < 1, (family, method, realised.decode_sparsity)


@pytest.mark.parametrize("method", ["cats", "core"])
def test_greedy_generate_matches_reference(method):
    module, model, cals = setup("llama")
    ids, mask = prompt(4)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    with dense_with_thresholds(model, cals[method]):
        reference = module.generate(ids, **kwargs)
    with sparsify(model, cals[method]) as handle:
        sparse = module.generate(ids, **kwargs)
    assert torch.equal(sparse.sequences, reference.sequences)
    for s, r in zip(sparse.scores, reference.scores):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)
    assert (handle.realised().tokens == int(mask.sum()) + 4 * 4).all()  # 4 decoding calls of 4 tokens


@pytest.mark.parametrize("family,method", [("llama", "cett"), ("llama", "cats"), ("gpt2", "cett"), ("opt", "cats")])
def test_realised_sparsity_counts_zeroed_neurons(family, method):
    """handle.sparsity = share of zero neurons (real tokens) in the reference's down input."""
    module, model, cals = setup(family)
    ids, mask = prompt(4)
    with dense_with_thresholds(model, cals[method]), actscope.capture(model, "blocks.*.mlp.post", flat=True) as cap:
        with torch.no_grad():
            module(input_ids=ids, attention_mask=mask)
    with sparsify(model, cals[method]) as handle, torch.no_grad():
        module(input_ids=ids, attention_mask=mask)
    naive = [float((cap.tensor(f"blocks.{i}.mlp.post") == 0).double().mean()) for i in range(2)]
    np.testing.assert_allclose(handle.sparsity, naive, rtol=1e-12)


def model_state(module: torch.nn.Module) -> tuple:
    """Hooks, weights (conftest's checksum cannot view Gemma's 0-dim buffers; weight_hash can),
    training flag, attention implementation."""
    return hook_count(module), weight_hash(module), module.training, getattr(module.config, "_attn_implementation", None)


def blocks_state(module: torch.nn.Module) -> tuple:
    return tuple(sorted(name for name, m in module.named_modules() if "forward" in m.__dict__))


@pytest.mark.parametrize("family", FAMILIES)
def test_model_unchanged_after_context_and_after_exception(family):
    module, model, cals = setup(family)
    ids, mask = prompt(4)
    before_state, before_swaps = model_state(module), blocks_state(module)
    before = decode(module, ids, mask)
    with sparsify(model, cals["teal"]):
        assert blocks_state(module) != before_swaps  # the forwards really were swapped
    with pytest.raises(RuntimeError, match="inside"):
        with sparsify(model, cals["core"]):
            decode(module, ids, mask)
            raise RuntimeError("boom inside the context")
    assert model_state(module) == before_state
    assert blocks_state(module) == before_swaps
    for a, b in zip(before, decode(module, ids, mask)):
        assert torch.equal(a, b)


def test_a_forward_set_by_someone_else_is_restored():
    module, model, cals = setup("llama")
    mlp = module.model.layers[0].mlp
    own = lambda x: type(mlp).forward(mlp, x)  # noqa: E731
    mlp.forward = own
    try:
        with sparsify(model, cals["cats"]):
            assert mlp.forward is not own
        assert mlp.__dict__["forward"] is own
    finally:
        del mlp.forward


def test_core_decoding_without_prefill_is_refused():
    module, model, cals = setup("llama")
    ids, mask = prompt(1)
    with torch.no_grad():
        past = module(input_ids=ids, use_cache=True).cache
    with sparsify(model, cals["core"]), pytest.raises(InputError, match="prefill inside the same"):
        with torch.no_grad():
            module(input_ids=ids[:, :1], cache=past, use_cache=True)


def test_other_model_and_moe_refused():
    _, model, cals = setup("llama")
    other = actscope.wrap(tiny_model("llama", seed=1)[0])
    with pytest.raises(InputError, match=r"not for model 'LlamaForCausalLM' \(weight hash"):
        with sparsify(other, cals["cats"]):
            pass
    gpt2 = actscope.wrap(tiny_model("gpt2")[0])
    with pytest.raises(InputError, match="gpt2"):
        with sparsify(gpt2, cals["cats"]):
            pass
    with pytest.raises(InputError, match="mixture-of-experts"):
        calibrate(actscope.wrap(tiny_model("mixtral")[0]), calibration_data(), method="cats", sparsity=0.5)


def test_evaluate_matches_the_cett_objective_dense_and_under_the_reference():
    """evaluate's perplexities = exp of CausalLMLoss (an independent loss) on the dense model and
    under dense_with_thresholds."""
    import math

    from actscope.metrics.cett import CausalLMLoss
    from actscope.sparse import evaluate

    module, model, cals = setup("llama")
    data = calibration_data(seed=7)
    for inputs in data:
        inputs["attention_mask"][2, 8:] = 0
    objective = CausalLMLoss(data)
    batches = objective.batches(model)
    report = evaluate(model, cals["cats"], data)
    assert math.isclose(report.dense_ppl, math.exp(objective.measure(model, batches)), rel_tol=1e-6)
    with dense_with_thresholds(model, cals["cats"]):
        reference = math.exp(objective.measure(model, batches))
    assert math.isclose(report.sparse_ppl, reference, rel_tol=1e-5)
    assert report.sparse_ppl != report.dense_ppl
    assert report.tokens == sum(int((b["attention_mask"][:, :-1] & b["attention_mask"][:, 1:]).sum()) for b in data)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_evaluate_core_scores_the_continuation(family):
    from actscope.sparse import evaluate

    module, model, cals = setup(family)
    data = calibration_data(seed=7)  # rows of 12 tokens: prompt 6, continuation 6, 5 predictions each
    report = evaluate(model, cals["core"], data)
    assert report.scored == "continuation" and report.tokens == 8 * 5
    assert report.sparse_ppl != report.dense_ppl
    assert 0 < report.realised_sparsity < 1
