"""The one hook registry: every hook, swap and switch undone on every exit path, proven for the
registry itself and then for every context that registers through it; and no other module of
actscope registers a hook or sets a forward on its own."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import actscope
from actscope.errors import SiteError
from actscope.hooks import SWAP_MARK, hooks
from actscope.zoo.tiny import tiny_model
from conftest import hook_count, model_state

SRC = Path(actscope.__file__).parent


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def snapshot(module: torch.nn.Module) -> tuple:
    return hook_count(module), tuple(name for name, m in module.named_modules() if "forward" in m.__dict__)


# -- the registry itself --------------------------------------------------------------------------

class Boom(Exception):
    pass


@pytest.mark.parametrize("raised", [None, Boom, KeyboardInterrupt])
def test_everything_registered_is_undone_on_every_exit(raised):
    model = net()
    before, switched = snapshot(model), []
    x = torch.randn(3, 4)
    expected = model(x)

    class Switch:
        def __enter__(self):
            switched.append("on")

        def __exit__(self, *exc):
            switched.append("off")

    def body():
        with hooks(model) as registry:
            registry.before(model[0], lambda mod, args: (args[0] * 0,))
            registry.after(model[2], lambda mod, args, out: out + 1, with_kwargs=False)
            registry.before(model, lambda mod, args, kwargs: None, with_kwargs=True)
            registry.swap_forward(model[1], lambda x: x)
            registry.enter(Switch())
            assert hook_count(model) == 3 and "forward" in model[1].__dict__
            assert not torch.equal(model(x), expected)
            if raised is not None:
                raise raised

    if raised is None:
        body()
    else:
        with pytest.raises(raised):
            body()
    assert snapshot(model) == before and switched == ["on", "off"]
    assert torch.equal(model(x), expected)


def test_nested_registries_undo_inside_out_and_keep_a_forward_someone_else_set():
    model = net()
    theirs = lambda x: x * 2  # noqa: E731 - another tool's instance-level forward
    model[1].forward = theirs
    with hooks(model) as outer:
        outer.swap_forward(model[1], lambda x: x)
        with hooks(model) as inner:
            inner.swap_forward(model[1], lambda x: x + 1)
            inner.before(model[0], lambda mod, args: None)
        assert model[1].forward is not theirs and hook_count(model) == 0
    assert model[1].__dict__["forward"] is theirs


class Mark:
    keeps = ("output",)
    explain = "because a swapped forward computes the whole block"


def test_a_hook_below_a_swapped_forward_is_refused_before_it_exists():
    model = torch.nn.Sequential(net())
    runner = lambda x: x  # noqa: E731
    setattr(runner, SWAP_MARK, Mark())
    with hooks(model) as registry:
        registry.swap_forward(model[0], runner)
        with pytest.raises(SiteError, match=r"cannot hook 0\.2@output because a swapped forward"):
            registry.after(model[0][2], lambda *a: None)
        with pytest.raises(SiteError, match=r"cannot hook 0@input because"):
            registry.before(model[0], lambda *a: None)  # the swapped module's own input: not kept
        registry.after(model[0], lambda *a: None)  # its output is kept: allowed
        with pytest.raises(SiteError, match="cannot observe my site because"):
            registry.before(model[0][0], lambda *a: None, name="observe my site")
        assert hook_count(model) == 1
    assert snapshot(model) == (0, ())


# -- every context that registers, after an exception ----------------------------------------------

def _tiny(family: str) -> actscope.Model:
    return actscope.wrap(tiny_model(family)[0])


def _calibrated():
    from actscope.sparse import calibrate

    model = _tiny("llama")
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    return model, calibrate(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], method="cats", sparsity=0.5)


def _contexts():
    from actscope.interventions import experts, replace_activation, zero
    from actscope.sparse import dense_with_thresholds, sparsify
    from actscope.train import DeadNeuronTracker

    yield "observe", lambda: _tiny("llama"), lambda m: actscope.observe(m, "blocks.*.mlp.post,blocks.0.attn.pattern")
    yield "capture", lambda: _tiny("gpt2"), lambda m: actscope.capture(m, "blocks.*.attn.z,blocks.0.mlp.pre")
    yield "edit", lambda: _tiny("opt"), lambda m: actscope.edit(m, {"blocks.*.mlp.post[0:3]": zero(), "blocks.0.attn.z[head=1]": zero()})
    yield "replace_activation", lambda: _tiny("llama"), lambda m: replace_activation(m, "blocks.*", "relu")
    yield "experts", lambda: _tiny("mixtral"), lambda m: experts(m, off={0: [1]}, on={1: [2]})
    yield "DeadNeuronTracker", lambda: _tiny("gpt2"), lambda m: DeadNeuronTracker(m, "blocks.*.mlp.post")
    cal_model, cal = None, None

    def calibrated():
        nonlocal cal_model, cal
        if cal_model is None:
            cal_model, cal = _calibrated()
        return cal_model

    yield "sparsify", calibrated, lambda m: sparsify(m, cal)
    yield "dense_with_thresholds", calibrated, lambda m: dense_with_thresholds(m, cal)


CONTEXTS = list(_contexts())


@pytest.mark.parametrize("name,make,enter", CONTEXTS, ids=[c[0] for c in CONTEXTS])
def test_every_context_leaves_the_model_as_it_was_after_an_exception(name, make, enter):
    model = make()
    before = model_state(model.module) + snapshot(model.module)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    with pytest.raises(Boom):
        with torch.no_grad(), enter(model):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            assert hook_count(model.module) > 0 or "forward" in str(snapshot(model.module))
            raise Boom
    assert model_state(model.module) + snapshot(model.module) == before


def test_measurements_remove_their_hooks_when_the_models_forward_raises():
    from actscope.metrics.memory import activation_memory
    from actscope.sparse import calibrate

    model = _tiny("llama")
    before = snapshot(model.module)
    bad = {"input_ids": torch.full((1, 4), 10_000)}  # out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        activation_memory(model, bad)
    with pytest.raises(IndexError):
        calibrate(model, [bad], method="teal", sparsity=0.5)
    assert snapshot(model.module) == before


# -- nothing else registers on its own -------------------------------------------------------------

REGISTERING = {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
               "register_full_backward_pre_hook", "register_backward_hook"}


def test_only_the_registry_registers_hooks_or_sets_forward():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "hooks.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in REGISTERING:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {node.attr}")
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
            offenders += [f"{path.relative_to(SRC)}:{node.lineno} sets .forward" for t in targets
                          if isinstance(t, ast.Attribute) and t.attr == "forward"]
    assert offenders == []
