"""Module drift across checkpoints (weight change by hand, CKA of captured outputs) and FPF
freezing (only the chosen modules get gradients; ``restore`` gives back every flag)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import actscope
from actscope.metrics import cka, module_drift
from actscope.train import freeze_except, freeze_for_finetuning
from actscope.zoo.tiny import tiny_model
from conftest import model_state

CHANGED = "transformer.h.1.mlp.c_fc"


@pytest.fixture(scope="module")
def checkpoints():
    first, _ = tiny_model("gpt2", 0)
    second = copy.deepcopy(first)
    third = copy.deepcopy(first)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = second.get_submodule(CHANGED).weight
        weight.add_(torch.randn(weight.shape, generator=generator) * 0.3)
        third.get_submodule(CHANGED).weight.copy_(weight)
        third.get_submodule("transformer.h.0.attn.c_attn").weight.mul_(1.5)
    data = [{"input_ids": torch.randint(0, first.config.vocab_size, (4, 12), generator=generator)} for _ in range(3)]
    return [first, second, third], data


def outputs(module, name, data) -> torch.Tensor:
    with torch.no_grad(), actscope.capture(module, f"module:{name}@output", flat=True) as capture:
        for batch in data:
            module(**batch)
    return capture.tensor(f"module:{name}@output")


def test_weight_and_representation_change_per_module(checkpoints):
    models, data = checkpoints
    before = [model_state(m) for m in models]
    drift = module_drift(models, data)
    assert [model_state(m) for m in models] == before
    modules = list(drift.modules)
    assert CHANGED in modules and "transformer.h.0.ln_1" in modules and "transformer.h.0" not in modules  # own parameters only
    k = modules.index(CHANGED)
    a, b = ([p.detach().double() for p in m.get_submodule(CHANGED).parameters()] for m in models[:2])
    moved = torch.sqrt(sum((y - x).square().sum() for x, y in zip(a, b)))
    scale = torch.sqrt(sum(x.square().sum() for x in a))
    assert abs(drift.weight_change[0, k] - float(moved / scale)) < 1e-12
    assert drift.weight_change[1, k] == 0.0  # unchanged from checkpoint 1 to 2
    # modules upstream of the change keep their outputs exactly; the changed one does not
    assert np.all(np.abs(drift.cka[0, : modules.index("transformer.h.1.ln_2") + 1] - 1) < 1e-9)
    want = cka(outputs(models[0], CHANGED, data), outputs(models[1], CHANGED, data))
    assert abs(drift.cka[0, k] - want) < 1e-6 and drift.cka[0, k] < 0.99
    assert drift.samples == 3 * 4 * 12
    table = drift.to_pandas()
    assert len(table) == 2 * len(modules) and set(table["reference"]) == {"checkpoint 0", "checkpoint 1"}
    assert drift.ranking(by="weight", step=0)[0] == CHANGED
    assert drift.ranking(by="weight", step=1)[0] == "transformer.h.0.attn.c_attn"


def test_reference_first_and_chosen_modules(checkpoints):
    models, data = checkpoints
    drift = module_drift(models, data, ["transformer.h.*.mlp.c_fc", "lm_head"], reference="first")
    assert drift.modules == ("transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "lm_head")
    assert drift.weight_change[1, 1] == drift.weight_change[0, 1] > 0  # both against checkpoint 0
    assert set(drift.to_table()["reference"]) == {"checkpoint 0"}
    only_weights = module_drift(models, data, "transformer.h.1.mlp.c_fc", representation=False)
    assert np.isnan(only_weights.cka).all() and only_weights.weight_change[0, 0] > 0


def test_outputs_wider_than_max_units_are_left_out(checkpoints):
    models, data = checkpoints
    drift = module_drift(models[:2], data, ["lm_head", CHANGED], max_units=100)  # lm_head: 128 vocabulary units
    assert np.isnan(drift.cka[0, 0]) and np.isfinite(drift.cka[0, 1])
    assert drift.ranking()[-1] == "lm_head"


@pytest.mark.parametrize("call,message", [
    (lambda m, d: module_drift(m[:1], d), "at least two checkpoints, got 1"),
    (lambda m, d: module_drift(m[0], d), "got a single one"),
    (lambda m, d: module_drift(m, d, "nothing.*"), "no module of"),
    (lambda m, d: module_drift(m, d, reference="last"), "reference must be 'previous'"),
    (lambda m, d: module_drift([m[0], torch.nn.Linear(2, 2)], d, "lm_head", representation=False), "checkpoint 1 has no module 'lm_head'"),
])
def test_bad_input_is_refused(checkpoints, call, message):
    models, data = checkpoints
    with pytest.raises(actscope.InputError, match=message):
        call(models, data)


def test_freezing_trains_only_the_most_drifted_and_restores_every_flag(checkpoints):
    models, data = checkpoints
    drift = module_drift(models, data)
    model = copy.deepcopy(models[2])
    model.transformer.wpe.weight.requires_grad_(False)  # frozen before: must stay frozen after restore
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    top = drift.ranking(by="weight")[:2]
    frozen = freeze_for_finetuning(model, drift, top=2, by="weight", also=["transformer.ln_f"])
    assert frozen.trainable == (*top, "transformer.ln_f")
    kept = {f"{name}.{p}" for name in frozen.trainable for p, _ in model.get_submodule(name).named_parameters()}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == kept
    model(**data[0], labels=data[0]["input_ids"]).loss.backward()
    assert all((p.grad is not None) == (name in kept) for name, p in model.named_parameters())
    frozen.restore()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    with freeze_except(model, ["lm_head"]) as inner:
        assert len(inner.parameters()) == 1
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_freezing_checks_its_arguments(checkpoints):
    models, data = checkpoints
    drift = module_drift(models[:2], data, representation=False)
    with pytest.raises(actscope.InputError, match="top is how many modules"):
        freeze_for_finetuning(models[0], drift, top=0)
    with pytest.raises(actscope.InputError, match="no module named 'nope'"):
        freeze_except(models[0], ["nope"])
    frozen = freeze_for_finetuning(copy.deepcopy(models[0]), drift, top=0.25, by="weight")
    assert len(frozen.trainable) == round(0.25 * len(drift.modules))


def test_checkpoints_as_directories_give_the_same_drift(checkpoints, tmp_path):
    models, data = checkpoints
    folders = []
    for k, model in enumerate(models):
        model.save_pretrained(tmp_path / f"step{k}")
        folders.append(tmp_path / f"step{k}")
    from_modules = module_drift(models, data, "transformer.h.*.mlp.c_fc")
    from_folders = module_drift(folders, data, "transformer.h.*.mlp.c_fc")
    assert from_folders.modules == from_modules.modules
    assert np.array_equal(from_folders.weight_change, from_modules.weight_change)
    assert np.abs(from_folders.cka - from_modules.cka).max() < 1e-9
    assert len(set(from_folders.checkpoints)) == 3  # one name each, even if the folders' models share one
