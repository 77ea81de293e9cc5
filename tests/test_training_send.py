"""SeND training callback (issue 17): snapshots, identification and the deterministic drop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actscope.errors import InputError
from actscope.train import send
from actscope.zoo.tiny import tiny_model
from conftest import model_state


def _setup():
    module, inputs = tiny_model("llama")
    module.train()
    probe = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    return module, inputs, probe


def _naive_resid(module, probe):
    """blocks.0.resid.post (layer 0's output) at the second-to-last token, eval mode."""
    seen = []
    handle = module.model.layers[0].register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach()))
    module.eval()
    with torch.no_grad():
        module(input_ids=probe)
    module.train()
    handle.remove()
    return seen[0][:, -2].double()  # [inputs, units]


def test_send_identifies_like_a_direct_computation_and_drops_those_units_in_training_only():
    module, inputs, probe = _setup()
    before = model_state(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    snapshots = []
    with send(module, probe, every=4, window=3, snapshot_every=2, history=2, top=0.25) as cb:
        assert cb.site == "blocks.0.resid.post"
        for step in range(6):
            loss = module(**inputs, labels=inputs["input_ids"]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            cb.step()
            if (step + 1) % 2 == 0:
                snapshots.append(_naive_resid(module, probe))
            if step == 3:  # identified now, from the last two snapshots
                trajectory = torch.stack(snapshots[-2:])
                naive = ((trajectory[1] - trajectory[0]).abs() * trajectory.var(dim=0, correction=0)).mean(dim=0)
                order = np.argsort(-naive.numpy(), kind="stable")[: round(0.25 * naive.numel())]
                assert sorted(cb.identifications[0][1].tolist()) == sorted(order.tolist())
                dropped = cb.dropped.clone()
                captured = []
                handle = module.model.layers[1].register_forward_pre_hook(lambda m, a, kw: captured.append(a[0] if a else kw["hidden_states"]),
                                                                           with_kwargs=True)
                module(**inputs)
                module.eval()
                with torch.no_grad():
                    module(**inputs)
                module.train()
                handle.remove()
                assert captured[0][..., dropped].abs().max().item() == 0  # dropped in training
                assert captured[1][..., dropped].abs().max().item() > 0  # not in evaluation
    table = cb.log.to_pandas()
    drops = table[table.metric == "dropped_units"].value.tolist()
    quarter = round(0.25 * module.config.hidden_size)
    assert drops == [0, 0, 0, 0, quarter, quarter]  # the window opens after step 3: steps 4, 5 (and 6) drop a quarter of the units
    module.zero_grad(set_to_none=True)
    assert model_state(module)[0] == before[0]


def test_send_refuses_bad_settings():
    module, _, probe = _setup()
    with pytest.raises(InputError, match="history must be an int >= 2"):
        send(module, probe, history=1)
    with pytest.raises(InputError, match="top is the fraction"):
        send(module, probe, top=0.0)
