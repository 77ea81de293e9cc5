"""Top-k activations, the delta-activation loss and edits held through training (issue 17)."""
from __future__ import annotations

import pytest
import torch

from actscope.errors import InputError, SiteError
from actscope.interventions import zero
from actscope.train import delta_activation_loss, held_edit, topk_activations
from actscope.zoo.tiny import tiny_model
from conftest import model_state


class PlainMlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.act, self.down = torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _naive_topk(a: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(a)
    for row in range(a.shape[0]):
        order = sorted(range(a.shape[1]), key=lambda j: -float(a[row, j]))[:k]
        out[row, order] = a[row, order]
    return out


def test_topk_keeps_the_k_largest_per_token_and_records_the_ratio():
    model = PlainMlp()
    model.train()
    x = torch.randn(6, 8)
    with topk_activations(model, 3, "module:down@input") as cb:
        got = model(x)
        cb.step()
    hidden = torch.relu(model.up(x)).detach()
    assert (got - model.down(_naive_topk(hidden, 3))).abs().max().item() < 1e-6
    expected_ratio = float((_naive_topk(hidden, 3) > 0).float().mean())
    assert abs(cb.log.to_pandas().value.item() - expected_ratio) < 1e-9


def _delta_naive(a: torch.Tensor, mask: torch.Tensor, lam: float) -> float:
    total, count = 0.0, 0
    for b in range(a.shape[0]):
        for t in range(1, a.shape[1]):
            if mask[b, t] and mask[b, t - 1]:
                total += float((a[b, t] - a[b, t - 1]).abs().sum())
                count += a.shape[2]
    return lam * total / count


def test_delta_penalty_matches_a_naive_sum_and_injection_gives_the_same_gradient():
    grads = []
    for inject in (False, True):
        module, inputs = tiny_model("llama")
        module.train()
        mask = inputs["attention_mask"].clone()
        mask[0, -2:] = 0
        seen = []
        handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) for layer in module.model.layers]
        with delta_activation_loss(module, 0.5, eps=1e-3) as cb:
            cb._inject = inject
            out = module(input_ids=inputs["input_ids"], attention_mask=mask, labels=inputs["input_ids"])
            loss = out.loss
            if not inject:
                penalty = cb.penalty()
                expected = sum(_delta_naive(a, mask, 0.5) for a in seen)
                assert abs(penalty.item() - expected) < 1e-5 * max(1, expected)
                loss = loss + penalty
            loss.backward()
            cb.step()
        for h in handles:
            h.remove()
        grads.append(torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None]))
        table = cb.log.to_pandas()
        still = table[table.metric == "temporal_sparsity"].value.tolist()
        pairs = mask[:, 1:].bool() & mask[:, :-1].bool()
        naive = [float((((a[:, 1:] - a[:, :-1]).abs() <= 1e-3) & pairs.unsqueeze(-1)).sum() / (pairs.sum() * a.shape[-1])) for a in seen]
        assert max(abs(s - n) for s, n in zip(still, naive)) < 1e-9
    assert (grads[0] - grads[1]).abs().max().item() < 1e-5 * max(1.0, grads[0].abs().max().item())


def test_held_edit_equals_hand_edited_weights_and_blocks_learning_downstream():
    model = PlainMlp()
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    before = model_state(model)
    edited = PlainMlp()
    with torch.no_grad():
        edited.down.weight[:, [1, 3]] = 0
    with held_edit(model, {"module:down@input[1,3]": zero()}) as cb:
        assert torch.equal(model(x), edited(x)) or (model(x) - edited(x)).abs().max() < 1e-6
        torch.nn.functional.cross_entropy(model(x), y).backward()
        cb.step()
    assert model.down.weight.grad[:, [1, 3]].abs().max().item() == 0
    assert model.down.weight.grad[:, [0, 2]].abs().max().item() > 0
    model.zero_grad(set_to_none=True)
    assert model_state(model) == before
    assert cb.sites == ["module:down@input[1,3]"]


def test_shaping_callbacks_refuse_bad_arguments():
    model = PlainMlp()
    with pytest.raises(InputError, match="k >= 1"):
        topk_activations(model, 0, "module:down@input")
    with pytest.raises(InputError, match="lam must be"):
        delta_activation_loss(model, -1.0, "module:down@input")
    with pytest.raises(SiteError):
        held_edit(model, {"module:nothing@input": zero()})
    with pytest.raises(InputError, match="per-token site"):
        with delta_activation_loss(model, 0.1, "module:down@input"):
            model(torch.randn(2, 8))


def test_callbacks_nest_and_unwind_in_a_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from actscope.train import StepLog
    from actscope.train.hf import trainer_callback

    module, inputs = tiny_model("llama")
    before = model_state(module)
    rows = [{"input_ids": ids, "attention_mask": m, "labels": ids} for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    log = StepLog()
    callbacks = [topk_activations(module, 4, log=log), delta_activation_loss(module, 0.1, log=log)]
    Trainer(model=module, args=args, train_dataset=rows * 2, callbacks=[trainer_callback(*callbacks)]).train()
    table = log.to_pandas()
    assert {"activation_ratio", "temporal_sparsity", "penalty"} <= set(table.metric)
    top = table[(table.metric == "activation_ratio")].value.to_numpy()
    assert (top <= 4 / module.config.intermediate_size + 1e-9).all()
    assert model_state(module)[0] == before[0]
