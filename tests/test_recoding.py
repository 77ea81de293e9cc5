"""Recoding at inference through ``edit``: 0 steps changes nothing, steps move the read-out
towards its target (a transformer's residual stream and a recurrent cell's state), one step is
the hand-computed gradient step, and training gradients are not disturbed."""
from __future__ import annotations

import pytest
import torch

import actscope
from actscope.interventions import lm_readout, recode
from actscope.zoo.tiny import tiny_model
from conftest import model_state

SITE = "blocks.1.resid.post"


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2", 0)


def site_value(module, inputs, edits=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (edited) site tensor as the next layer receives it, and the logits."""
    with torch.no_grad(), actscope.edit(module, edits or {}), actscope.capture(module, SITE) as capture:
        logits = module(**inputs).logits
    return capture.tensor(SITE), logits


def test_zero_steps_is_the_identity(gpt2):
    module, inputs = gpt2
    state = model_state(module)
    plain = site_value(module, inputs)
    edited = site_value(module, inputs, {SITE: recode(lm_readout(module), 3, steps=0)})
    assert torch.equal(plain[0], edited[0]) and torch.equal(plain[1], edited[1])
    assert model_state(module) == state
    h = torch.randn(2, 5, 32)
    assert recode(lm_readout(module), 3, steps=0)(h) is h


def test_steps_move_the_readout_towards_its_target(gpt2):
    module, inputs = gpt2
    readout, target = lm_readout(module), 11
    base, _ = site_value(module, inputs)
    with torch.no_grad():
        before = readout(base).log_softmax(-1)[..., target]
    previous = before
    for steps in (1, 3, 10):
        h, logits = site_value(module, inputs, {SITE: recode(readout, target, steps=steps, lr=0.5)})
        with torch.no_grad():
            now = readout(h).log_softmax(-1)[..., target]
        assert bool((now > previous).all()), steps  # every position, every extra step
        previous = now
    assert float(previous.mean()) > float(before.mean()) + 1.0
    # the last block is the site here, so the model's own output moves too
    assert float(logits.log_softmax(-1)[..., target].mean()) > float(before.mean()) + 1.0


def test_one_step_is_the_gradient_step_computed_by_hand(gpt2):
    module, inputs = gpt2
    readout = lm_readout(module)
    targets = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    base, _ = site_value(module, inputs)
    h = base.clone().requires_grad_(True)
    final, head = module.transformer.ln_f, module.lm_head
    loss = torch.nn.functional.cross_entropy(head(final(h)).reshape(-1, module.config.vocab_size), targets.reshape(-1), reduction="sum")
    (gradient,) = torch.autograd.grad(loss, h)
    edited, _ = site_value(module, inputs, {SITE: recode(readout, targets, steps=1, lr=0.25)})
    assert (edited - (base - 0.25 * gradient)).abs().max() < 1e-5


def test_mse_loss_and_a_probe_readout():
    probe = torch.nn.Linear(4, 2)
    h = torch.randn(3, 4)
    target = torch.tensor([1.0, -1.0])
    moved = recode(probe, target, steps=20, lr=0.1, loss="mse")(h)
    with torch.no_grad():
        assert ((probe(moved) - target).square().sum() < (probe(h) - target).square().sum()).item()
    assert probe.weight.grad is None  # the read-out's parameters get no gradient from recoding


class CellLoop(torch.nn.Module):
    """A GRU cell called once per time step, its state read out by a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = torch.nn.GRUCell(5, 8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 8)
        outputs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outputs.append(self.out(h))
        return torch.stack(outputs, 1)  # [batch, time, 3]


def test_recoding_a_recurrent_state_feeds_the_next_step():
    torch.manual_seed(0)
    model, x = CellLoop(), torch.randn(2, 6, 5)
    with torch.no_grad():
        plain = model(x)
        with actscope.edit(model, {"module:cell@output": recode(model.out, 2, steps=5, lr=0.5)}):
            recoded = model(x)
    assert bool((recoded.log_softmax(-1)[..., 2] > plain.log_softmax(-1)[..., 2]).all())
    # step 2's state depends on the recoded step 1: only editing step 0 still changes it
    calls = {"n": 0}

    def first_step_only(h):
        calls["n"] += 1
        return recode(model.out, 2, steps=5, lr=0.5)(h) if calls["n"] == 1 else h

    with torch.no_grad(), actscope.edit(model, {"module:cell@output": first_step_only}):
        once = model(x)
    assert (once[:, 1:] - plain[:, 1:]).abs().max() > 1e-4


def test_gradients_of_training_flow_through_the_edit(gpt2):
    module, inputs = gpt2
    readout = lm_readout(module)

    def grads(edits) -> torch.Tensor:
        module.zero_grad()
        with actscope.edit(module, edits):
            module(**inputs).logits.square().mean().backward()
        return module.transformer.h[0].mlp.c_fc.weight.grad.clone()

    plain = grads({})
    shifted = grads({SITE: recode(readout, 3, steps=1, lr=1e-3)})
    assert plain.abs().sum() > 0 and shifted.abs().sum() > 0
    assert torch.allclose(plain, grads({SITE: recode(readout, 3, steps=0)}))
    module.zero_grad()


@pytest.mark.parametrize("make,message", [
    (lambda: recode(torch.nn.Identity(), 1, steps=-1), "steps must be a whole number"),
    (lambda: recode(torch.nn.Identity(), 1, lr=0), "lr must be a positive step size"),
    (lambda: recode("head", 1), "readout must be a function"),
    (lambda: recode(torch.nn.Identity(), 1, loss="hinge"), "loss must be one of"),
    (lambda: lm_readout(torch.nn.Linear(2, 2)), "has no output embedding"),
])
def test_bad_arguments_are_refused(make, message):
    with pytest.raises(actscope.InputError, match=message):
        make()
