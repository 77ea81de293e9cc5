"""``sparsify`` with ``edit``/``observe``/``capture`` and with a user's own hooks.

Sparse execution swaps each MLP block's forward, so a hook inside the MLP (``mlp.pre``,
``mlp.post``, the projections, the activation; for OPT the hooks of ``fc1``/``activation_fn``
and the input of ``fc2``) would never fire or would see the wrong tensor. Both nesting orders
are refused before any forward pass, and leave the model as it was; the sites outside the
swapped forwards (``mlp.out``, the residual stream) still work and see the sparse model.
"""
from __future__ import annotations

import pytest
import torch

import actscope
from actscope.errors import InputError, SiteError
from actscope.interventions import zero
from actscope.sparse import calibrate, dense_with_thresholds, evaluate, sparsify
from actscope.store import weight_hash
from actscope.zoo.tiny import tiny_model
from conftest import hook_count

FAMILIES = ["llama", "gpt2", "opt"]
LOW = 3  # token ids below this are special in some tiny configs
# What each family's block 0 calls its MLP neuron's module and its pre-activation's module.
DOWN = {"llama": "model.layers.0.mlp.down_proj", "gpt2": "transformer.h.0.mlp.c_proj", "opt": "model.decoder.layers.0.fc2"}
FIRST = {"llama": "model.layers.0.mlp.gate_proj", "gpt2": "transformer.h.0.mlp.c_fc", "opt": "model.decoder.layers.0.fc1"}
STILL_WORKS = "blocks.{i}.mlp.out, blocks.{i}.resid.*, blocks.{i}.attn.*, embed and logits"


def calibration_data() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(LOW, 128, (4, 12), generator=g) for _ in range(2)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def inputs() -> dict:
    ids = torch.randint(LOW, 128, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: padding must not count
    return {"input_ids": ids, "attention_mask": mask}


_CACHE: dict = {}


def setup(family: str) -> tuple:
    """The tiny model, its wrapper and a CATS calibration (cheap, and it changes the output)."""
    if family not in _CACHE:
        module, _ = tiny_model(family)
        model = actscope.wrap(module)
        _CACHE[family] = (module, model, calibrate(model, calibration_data(), method="cats", sparsity=0.7))
    return _CACHE[family]


def state(module: torch.nn.Module) -> tuple:
    """Hooks, weights, instance-level forwards: what must be back after every refusal."""
    swapped = tuple(sorted(name for name, m in module.named_modules() if "forward" in m.__dict__))
    return hook_count(module), weight_hash(module), swapped


def text(error: pytest.ExceptionInfo) -> str:
    return " ".join(str(error.value).split())


# -- hooks first, then sparsify ----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("outer", ["edit post", "observe pre"])
def test_sparsify_inside_edit_or_observe_is_refused(family, outer):
    module, model, cal = setup(family)
    before = state(module)
    site, path, at = (("blocks.0.mlp.post", DOWN[family], "input") if outer == "edit post"
                      else ("blocks.0.mlp.pre", FIRST[family], "output"))
    context = actscope.edit(model, {site: zero()}) if outer == "edit post" else actscope.observe(model, site)
    with context, pytest.raises(InputError) as error:
        with sparsify(model, cal):
            pytest.fail("sparsify must refuse before its block runs")
    message = text(error)
    assert f"hooks are registered inside the MLP blocks of model '{model.name}'" in message
    assert f"{path}@{at} ({site})" in message
    assert "would never fire or would see the wrong tensor" in message
    assert f"under sparse execution {STILL_WORKS} still work" in message
    assert "exit the edit/observe/capture block (or remove your hooks) before entering sparsify" in message
    assert state(module) == before


def test_a_users_own_hook_is_refused_at_entry():
    module, model, cal = setup("llama")
    before = state(module)
    handle = module.model.layers[1].mlp.down_proj.register_forward_hook(lambda mod, args, out: None)
    try:
        with pytest.raises(InputError) as error:
            with sparsify(model, cal):
                pass
        assert "model.layers.1.mlp.down_proj@output" in text(error)
        handle.remove()
        assert state(module) == before
    finally:
        handle.remove()


def test_a_users_hook_on_the_mlp_container_is_fine():
    """The container's own hooks see its input and the sparse MLP's output."""
    module, model, cal = setup("llama")
    seen = []
    handle = module.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    try:
        with sparsify(model, cal), torch.no_grad():
            module(**inputs())
    finally:
        handle.remove()
    with dense_with_thresholds(model, cal), actscope.capture(model, "blocks.0.mlp.out") as cap, torch.no_grad():
        module(**inputs())
    torch.testing.assert_close(seen[0], cap.tensor("blocks.0.mlp.out"), rtol=1e-5, atol=1e-5)


# -- sparsify first, then hooks ----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("inner", ["edit post", "observe pre", "capture post"])
def test_edit_or_observe_inside_sparsify_is_refused(family, inner):
    module, model, cal = setup(family)
    before = state(module)
    verb, _, short = inner.partition(" ")
    site, path, at = ((f"blocks.0.mlp.{short}", DOWN[family], "input") if short == "post"
                      else ("blocks.0.mlp.pre", FIRST[family], "output"))
    with sparsify(model, cal):
        with pytest.raises(SiteError) as error:
            if verb == "edit":
                context = actscope.edit(model, {"blocks.1.mlp.out": zero(), site: zero()})
            else:
                context = getattr(actscope, verb)(model, ["blocks.1.resid.post", site])
            with context:
                pytest.fail(f"{verb} must refuse before its block runs")
        assert hook_count(module) == before[0] + 1  # only sparsify's own root hook
    message = text(error)
    assert f"cannot {'edit' if verb == 'edit' else 'hook'} {site} ({path}@{at}) under sparse execution" in message
    assert "actscope.sparse.sparsify" in message
    assert f"under sparse execution {STILL_WORKS} still work" in message
    assert "use blocks.0.mlp.out, or leave the sparsify block first" in message
    assert state(module) == before


def test_module_site_inside_a_sparse_mlp_is_refused():
    module, model, cal = setup("llama")
    with sparsify(model, cal), pytest.raises(SiteError) as error:
        with actscope.observe(model, "module:model.layers.1.mlp.act_fn@output"):
            pass
    assert "cannot hook module:model.layers.1.mlp.act_fn@output (model.layers.1.mlp.act_fn@output)" in text(error)


@pytest.mark.parametrize("family", FAMILIES)
def test_observe_outside_the_mlp_sees_the_sparse_model(family):
    """mlp.out and resid.post observed inside sparsify equal the reference's (the dense model
    with the same skips), and differ from the dense model's."""
    module, model, cal = setup(family)
    sites = ["blocks.0.mlp.out", "blocks.1.resid.post"]
    with sparsify(model, cal), actscope.observe(model, sites) as seen, torch.no_grad():
        module(**inputs())
    with dense_with_thresholds(model, cal), actscope.capture(model, sites, flat=True) as reference, torch.no_grad():
        module(**inputs())
    with actscope.capture(model, sites, flat=True) as dense, torch.no_grad():
        module(**inputs())
    for site in sites:
        values = reference.tensor(site).double()  # [real tokens, units]
        stats = seen.stats[site].moments
        assert (stats.count == values.shape[0]).all()
        torch.testing.assert_close(stats.mean, values.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.max, values.max(0).values, rtol=1e-5, atol=1e-5)
        assert float((dense.tensor(site).double().mean(0) - values.mean(0)).abs().max()) > 1e-3, site


def test_opt_mlp_out_hook_set_before_sparsify_still_works():
    """OPT's mlp.out is the output of fc2, whose forward becomes the whole sparse MLP: allowed
    in both orders, and it sees the sparse MLP's output."""
    module, model, cal = setup("opt")
    with actscope.observe(model, "blocks.0.mlp.out") as outer, sparsify(model, cal), torch.no_grad():
        module(**inputs())
    with dense_with_thresholds(model, cal), actscope.capture(model, "blocks.0.mlp.out", flat=True) as cap, torch.no_grad():
        module(**inputs())
    torch.testing.assert_close(outer.stats["blocks.0.mlp.out"].moments.mean, cap.tensor("blocks.0.mlp.out").double().mean(0),
                               rtol=1e-5, atol=1e-5)


def test_nested_sparsify_calibrate_reference_and_evaluate_are_refused():
    module, model, cal = setup("opt")
    before = state(module)
    with sparsify(model, cal):
        with pytest.raises(InputError, match="already runs sparsely"):
            with sparsify(model, cal):
                pass
        with pytest.raises(InputError, match="already runs sparsely"):
            calibrate(model, calibration_data(), method="cats", sparsity=0.5)
        with pytest.raises(InputError, match="already runs sparsely"):
            with dense_with_thresholds(model, cal):
                pass
        with pytest.raises(InputError, match="already runs sparsely"):
            evaluate(model, cal, calibration_data())
    assert state(module) == before
