"""Seconds-long versions of the training reproductions (issue 17; the full runs are in examples/)."""
from __future__ import annotations

import torch

import actscope
from actscope.interventions import zero
from actscope.train import StepLog, delta_activation_loss, held_edit, prosparse, topk_activations
from actscope.zoo.tiny import tiny_model


def _train(module, callbacks, steps, lr=3e-3):
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    ids = torch.randint(3, 100, (8, 12), generator=torch.Generator().manual_seed(0))
    for cb in callbacks:
        cb.start()
    try:
        for _ in range(steps):
            loss = module(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            (loss + sum(cb.penalty() for cb in callbacks)).backward()
            optimizer.step()
            for cb in callbacks:
                cb.step()
    finally:
        for cb in callbacks:
            cb.close()


def _series(log, metric):
    table = log.to_pandas()
    return table[table.metric == metric].groupby("step").value.mean().tolist()


def test_prosparse_smoke_lowers_the_activation_ratio():
    module, _ = tiny_model("llama")
    ps = prosparse(module, stages=[(5, 0.3)])
    _train(module, [ps], steps=15, lr=1e-2)
    ratio = _series(ps.log, "activation_ratio")
    assert ratio[-1] < 0.2 * ratio[0]


def test_topk_smoke_keeps_k_units_per_token():
    module, _ = tiny_model("llama")
    k = 4
    cb = topk_activations(module, k)
    _train(module, [cb], steps=3)
    assert max(_series(cb.log, "activation_ratio")) <= k / module.config.intermediate_size + 1e-9


def test_delta_smoke_raises_temporal_sparsity():
    module, _ = tiny_model("llama")
    log = StepLog()
    _train(module, [delta_activation_loss(module, 3.0, eps=1e-2, log=log)], steps=15, lr=1e-2)
    still = _series(log, "temporal_sparsity")
    assert still[-1] > still[0] + 0.03


def test_ablation_held_through_training_keeps_the_ablated_heads_from_learning():
    module, _ = tiny_model("llama")
    layer0 = module.model.layers[0].self_attn
    before = {name: p.detach().clone() for name, p in layer0.named_parameters()}
    other = module.model.layers[1].self_attn.o_proj.weight.detach().clone()
    _train(module, [held_edit(actscope.wrap(module), {"blocks.0.attn.z": zero()})], steps=5)
    for name, p in layer0.named_parameters():  # nothing downstream of a zeroed head output reaches them
        assert torch.equal(p, before[name]), name
    assert not torch.equal(module.model.layers[1].self_attn.o_proj.weight, other)
