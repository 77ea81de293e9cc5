"""Training callbacks (issue 17): the protocol, ProSparse, the HF Trainer adapter, the steps table."""
from __future__ import annotations

import math

import pytest
import torch

from actscope.errors import InputError
from actscope.train import SineSchedule, StepLog, prosparse, relufied, write_steps
from actscope.zoo.tiny import tiny_model
from conftest import hook_count, model_state


def _gated():
    module, inputs = tiny_model("llama")
    module.train()
    return module, {**inputs, "labels": inputs["input_ids"]}


class PlainMlp(torch.nn.Module):
    """A user's own model: no family card, a GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.act, self.down = torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


# -- the sine schedule ------------------------------------------------------------------------
def test_sine_schedule_matches_the_formula():
    schedule = SineSchedule([(10, 1.0), (4, 3.0)])
    for step in range(20):
        if step < 10:
            expected = 0.5 * (math.sin(-math.pi / 2 + math.pi * step / 10) + 1) * 1.0
        elif step < 14:
            expected = 1.0 + 0.5 * (math.sin(-math.pi / 2 + math.pi * (step - 10) / 4) + 1) * 2.0
        else:
            expected = 3.0
        assert abs(schedule(step) - expected) < 1e-12
    assert schedule(0) == 0.0 and abs(schedule(5) - 0.5) < 1e-12


def test_sine_schedule_refuses_bad_stages():
    with pytest.raises(InputError, match="steps >= 1"):
        SineSchedule([(0, 1.0)])
    with pytest.raises(InputError, match="at least one stage"):
        SineSchedule([])


# -- ReLU-fication and the penalty --------------------------------------------------------------
def test_prosparse_relufies_gated_mlp_like_hand_edited_activation():
    module, inputs = _gated()
    with prosparse(module, stages=[(5, 0.0)]):
        got = module(**inputs).logits
    # hand edit: the same weights with the activation module replaced by ReLU
    for layer in module.model.layers:
        layer.mlp.act_fn, saved = torch.nn.ReLU(), layer.mlp.act_fn
    expected = module(**inputs).logits
    for layer in module.model.layers:
        layer.mlp.act_fn = saved
    assert (got - expected).abs().max().item() < 1e-6


def test_fat_relu_threshold_zeroes_below_t():
    model = PlainMlp()
    x = torch.randn(5, 8)
    with prosparse(model, stages=[(1, 0.0)], threshold=0.05) as ps:
        got = model(x)
        ps.threshold = 0.0
        relu = model(x)
    hidden = model.up(x)
    expected = model.down(torch.where(hidden > 0.05, hidden, torch.zeros(())))
    assert (got - expected).abs().max().item() < 1e-6
    assert (relu - model.down(torch.relu(hidden))).abs().max().item() < 1e-6


def test_penalty_is_l1_of_the_activation_over_real_tokens():
    module, inputs = _gated()
    mask = inputs["attention_mask"].clone()
    mask[0, -2:] = 0
    seen = []
    handles = [layer.mlp.act_fn.register_forward_hook(lambda m, a, o: seen.append(torch.relu(a[0]).detach()))
               for layer in module.model.layers]
    with prosparse(module, stages=[(1, 0.3)], start=0.3) as ps:
        module(input_ids=inputs["input_ids"], attention_mask=mask)
        penalty = ps.penalty()
    for h in handles:
        h.remove()
    expected = sum(0.3 * (a.abs().sum(-1) * mask).sum() / mask.sum() for a in seen)
    assert abs(penalty.item() - expected.item()) < 1e-5
    assert penalty.requires_grad


def test_injected_gradient_equals_penalty_added_to_loss():
    grads = []
    for inject in (False, True):
        module, inputs = _gated()
        with prosparse(module, stages=[(1, 0.2)], start=0.2) as ps:
            ps._inject = inject
            loss = module(**inputs).loss
            if not inject:
                loss = loss + ps.penalty()
            loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in module.parameters()]))
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max().item() < 1e-6 * max(1.0, grads[0].abs().max().item())


def test_removing_the_callback_leaves_the_model_as_before():
    module, inputs = _gated()
    before, reference = model_state(module), module(**inputs).logits
    with pytest.raises(RuntimeError, match="boom"):
        with prosparse(module, stages=[(3, 0.1)]) as ps:
            assert hook_count(module) > before[0]
            module(**inputs).loss.add(ps.penalty()).backward()
            ps.step()
            raise RuntimeError("boom")
    module.zero_grad(set_to_none=True)
    assert model_state(module) == before
    assert torch.equal(module(**inputs).logits, reference)
    assert not ps.active


def test_plain_loop_records_ratio_lambda_and_penalty():
    model = PlainMlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with prosparse(model, stages=[(4, 0.5)]) as ps:
        for _ in range(6):
            loss = torch.nn.functional.cross_entropy(model(x), y) + ps.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ps.step()
    table = ps.log.to_pandas()
    ratio = table[table.metric == "activation_ratio"]
    assert list(ratio.step) == list(range(6)) and set(ratio.site) == {"module:act@output"}
    lam = table[table.metric == "lambda"].value.tolist()
    assert [round(v, 9) for v in lam] == [round(SineSchedule([(4, 0.5)])(s), 9) for s in range(6)]
    assert table[table.metric == "penalty"].step.tolist() == [1, 2, 3, 4, 5]  # λ = 0 at step 0: no penalty


def test_activation_ratio_matches_a_direct_count():
    module, inputs = _gated()
    mask = inputs["attention_mask"].clone()
    mask[1, -3:] = 0
    gates = []
    handles = [layer.mlp.act_fn.register_forward_hook(lambda m, a, o: gates.append(a[0].detach())) for layer in module.model.layers]
    with prosparse(module, stages=[(1, 0.0)]) as ps:
        module(input_ids=inputs["input_ids"], attention_mask=mask)
        ps.step()
    for h in handles:
        h.remove()
    table = ps.log.to_pandas()
    got = table[table.metric == "activation_ratio"].value.tolist()
    expected = [float((g > 0)[mask.bool()].float().mean()) for g in gates]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-9


def test_relufied_matches_the_callback_and_unhooks():
    module, inputs = _gated()
    module.eval()
    before = model_state(module)
    with prosparse(module, stages=[(1, 0.0)], threshold=0.01):
        a = module(**inputs).logits
    with relufied(module, 0.01):
        b = module(**inputs).logits
    assert torch.equal(a, b) and model_state(module) == before


def test_model_without_card_needs_activation_modules():
    bare = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(InputError, match="modules="):
        prosparse(bare)
    with pytest.raises(InputError, match="no module 'nope'"):
        prosparse(PlainMlp(), modules=["nope"])


# -- Hugging Face Trainer ------------------------------------------------------------------------
def test_hf_trainer_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    from actscope.train.hf import trainer_callback

    module, inputs = _gated()
    before = model_state(module)
    rows = [{"input_ids": ids, "attention_mask": m, "labels": ids} for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    ps = prosparse(module, stages=[(2, 0.1)])
    Trainer(model=module, args=args, train_dataset=rows * 3, callbacks=[trainer_callback(ps)]).train()
    table = ps.log.to_pandas()
    assert sorted(set(table.step)) == [0, 1, 2]
    ratio_sites = sorted(set(table[table.metric == "activation_ratio"].site))
    assert ratio_sites == [f"module:model.layers.{i}.mlp.act_fn@output" for i in range(len(module.model.layers))]
    from actscope.models import as_model
    from actscope.sites import plan_sites

    assert plan_sites(as_model(module), ratio_sites).names == ratio_sites  # valid site strings of this model
    assert len(table[table.metric == "penalty"]) == 2  # steps 1, 2 (λ = 0 at step 0)
    assert hook_count(module) == before[0] and not ps.active and not ps._inject
    assert model_state(module)[1] != before[1]  # it did train


def _trainer_step(tmp_path, rows, batch: int, accumulate: int):
    """One SGD step of a Trainer with ProSparse (λ = 0.5 from the start) injected; the weights after it."""
    from transformers import Trainer, TrainingArguments

    from actscope.train.hf import trainer_callback

    module, _ = _gated()
    args = TrainingArguments(output_dir=str(tmp_path / f"b{batch}-a{accumulate}"), max_steps=1, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulate, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                             weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0)
    ps = prosparse(module, stages=[(1, 0.5)], start=0.5)
    Trainer(model=module, args=args, train_dataset=rows, callbacks=[trainer_callback(ps)]).train()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, ps.log.to_pandas()


def test_hf_trainer_accumulation_gives_the_full_batch_step(tmp_path):
    """Two micro-batches of one accumulated give the same step as one batch of two: the injected
    penalty gradient is scaled by 1 / gradient_accumulation_steps as the Trainer scales its loss."""
    _, inputs = _gated()
    ids = inputs["input_ids"][:2]
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]  # equal lengths, no padding
    full, log_full = _trainer_step(tmp_path, rows, batch=2, accumulate=1)
    micro, _ = _trainer_step(tmp_path, rows, batch=1, accumulate=2)
    assert float(log_full[log_full.metric == "penalty"].value.iloc[0]) > 0  # the penalty took part
    for name in full:
        assert torch.allclose(full[name], micro[name], atol=1e-6, rtol=1e-5), name
    untouched, _ = _gated()
    assert any(not torch.equal(full[k], v) for k, v in untouched.state_dict().items())  # it did step


# -- the steps table ------------------------------------------------------------------------------
def test_steps_table_round_trips_through_a_run(tmp_path):
    from actscope import open_run

    log = StepLog()
    log.record(0, "loss", torch.tensor(2.5))
    log.record(0, "activation_ratio", 0.25, "blocks.0")
    log.record(1, "loss", 2.0)
    out = write_steps(tmp_path / "run", log, config={"method": "prosparse"})
    table = open_run(out).to_pandas("training_steps")
    assert table.to_dict("list") == {"step": [0, 0, 1], "metric": ["loss", "activation_ratio", "loss"],
                                     "site": ["", "blocks.0", ""], "value": [2.5, 0.25, 2.0]}
    assert log.result().series("loss") == {"model": ([0, 1], [2.5, 2.0])}
    with pytest.raises(InputError, match="recorded: loss, activation_ratio"):
        log.result().series("dnr")
    svg = log.result().plot("loss", tmp_path / "loss.svg")
    assert svg.startswith("<svg") and (tmp_path / "loss.svg").read_text(encoding="utf-8") == svg


def test_bad_threshold_and_penalty_misuse_are_refused():
    with pytest.raises(InputError, match="FATReLU threshold must be a finite number >= 0"):
        prosparse(PlainMlp(), threshold=-0.1)
    ps = prosparse(PlainMlp())
    with pytest.raises(InputError, match="inside its `with` block"):
        ps.step()
    ps._inject = True
    with pytest.raises(InputError, match="do not also add penalty"):
        ps.penalty()


def test_dnr_and_callbacks_share_one_steps_table_and_the_report_draws_it(tmp_path):
    from actscope.report import write_report
    from actscope.train import DeadNeuronTracker

    model = PlainMlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    log = StepLog()
    with prosparse(model, stages=[(3, 0.2)], log=log) as ps, DeadNeuronTracker(model, sites="module:act@output") as dnr:
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            (loss + ps.penalty()).backward()
            optimizer.step()
            ps.step(loss=loss)
            dnr.step()
    log.extend(dnr.result().as_steps())
    table = log.to_pandas()
    assert set(table.metric) == {"activation_ratio", "lambda", "penalty", "loss", "dnr"}
    ratio = table[(table.metric == "activation_ratio")].value.to_numpy()
    dead = table[(table.metric == "dnr") & (table.site == "module:act@output")].value.to_numpy()
    assert abs(ratio + dead - 1).max() < 1e-9  # the same ReLU-fied outputs, counted two ways
    out = write_steps(tmp_path / "run", log)
    html = write_report(out).read_text(encoding="utf-8")
    assert 'id="training_steps"' in html and "activation_ratio per training step" in html and "dnr per training step" in html


@pytest.mark.parametrize("make", ["prosparse", "topk", "delta", "held_edit", "send"])
def test_every_callback_leaves_modules_and_forward_as_before(make):
    from actscope.interventions import zero
    from actscope.train import delta_activation_loss, held_edit, send, topk_activations

    module, inputs = _gated()
    factories = {
        "prosparse": lambda: prosparse(module, stages=[(2, 0.1)]),
        "topk": lambda: topk_activations(module, 3),
        "delta": lambda: delta_activation_loss(module, 0.5),
        "held_edit": lambda: held_edit(module, {"blocks.1.mlp.post[0,2]": zero()}),
        "send": lambda: send(module, inputs["input_ids"], every=1, window=1, snapshot_every=1, history=2),
    }
    before, reference = model_state(module), module(**inputs).logits
    cb = factories[make]()
    with cb:
        for _ in range(2):
            module(**inputs).loss.add(cb.penalty()).backward()
            cb.step()
        changed = module(**inputs).logits
    module.zero_grad(set_to_none=True)
    assert model_state(module) == before
    assert torch.equal(module(**inputs).logits, reference)
    if make != "delta":  # the delta loss only adds a penalty; the others change the forward while attached
        assert not torch.equal(changed, reference)


def test_hf_adapter_leaves_a_callback_entered_by_the_user_to_its_block(tmp_path):
    from transformers import Trainer, TrainingArguments

    from actscope.train.hf import trainer_callback

    module, inputs = _gated()
    before = model_state(module)[0]
    rows = [{"input_ids": ids, "attention_mask": m, "labels": ids} for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    ps = prosparse(module, stages=[(1, 0.1)])
    with ps:
        Trainer(model=module, args=args, train_dataset=rows, callbacks=[trainer_callback(ps)]).train()
        assert ps.active  # still attached: the user's block owns it
    assert not ps.active and model_state(module)[0] == before


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_prosparse_relufies_plain_and_fused_mlps_through_the_card(family):
    module, inputs = tiny_model(family)
    with prosparse(module, stages=[(1, 0.0)]) as ps:
        got = module(**inputs).logits
    assert len(ps.paths) == module.config.num_hidden_layers  # one activation module per block
    saved = [(parent, name, getattr(parent, name)) for path in ps.paths
             for parent, name in [(module.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2])]]
    for parent, name, _ in saved:
        setattr(parent, name, torch.nn.ReLU())
    expected = module(**inputs).logits
    for parent, name, act in saved:
        setattr(parent, name, act)
    assert (got - expected).abs().max().item() < 1e-6
    assert not torch.equal(got, module(**inputs).logits)  # the model's own activation is back


@pytest.mark.parametrize("make", ["held_edit", "send"])
def test_hf_trainer_drives_the_other_callbacks(tmp_path, make):
    from transformers import Trainer, TrainingArguments

    from actscope.interventions import zero
    from actscope.train import held_edit, send
    from actscope.train.hf import trainer_callback

    module, inputs = _gated()
    before = model_state(module)
    rows = [{"input_ids": ids, "attention_mask": m, "labels": ids} for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    down = module.model.layers[0].mlp.down_proj.weight.detach().clone()
    cb = (held_edit(module, {"blocks.0.mlp.post[1]": zero()}) if make == "held_edit"
          else send(module, inputs["input_ids"], every=2, window=1, snapshot_every=1, history=2))
    Trainer(model=module, args=args, train_dataset=rows * 3, callbacks=[trainer_callback(cb)]).train()
    assert cb.steps == 3 and not cb.active
    assert model_state(module)[0] == before[0]
    if make == "send":
        assert [step for step, _ in cb.identifications] == [1]
        assert cb.log.to_pandas().query("metric == 'dropped_units'").value.tolist() == [0, 0, round(0.1 * module.config.hidden_size)]
    else:  # the ablated unit's column of down_proj never learned
        after = module.model.layers[0].mlp.down_proj.weight
        assert torch.equal(after[:, 1], down[:, 1]) and not torch.equal(after[:, 0], down[:, 0])
