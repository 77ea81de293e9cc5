"""Site grammar: globs, ranges, unit and head selections, module sites, did-you-mean."""
from __future__ import annotations

import pytest
import torch

import actscope
from actscope.sites import split_items


def test_glob_expands_to_every_block(minilm):
    plan = actscope.plan_sites(minilm, "blocks.*.mlp.post")
    assert plan.names == [f"blocks.{i}.mlp.post" for i in range(6)]


def test_range_and_units_and_heads(minilm):
    plan = actscope.plan_sites(minilm, "blocks.1-3.mlp.pre[0:3,7], blocks.2.attn.pattern[head=1,4]")
    assert plan.names == [
        "blocks.1.mlp.pre[0,1,2,7]",
        "blocks.2.mlp.pre[0,1,2,7]",
        "blocks.3.mlp.pre[0,1,2,7]",
        "blocks.2.attn.pattern[head=1,4]",
    ]
    assert plan.sites[0].units == (0, 1, 2, 7)
    assert plan.sites[-1].heads == (1, 4)
    assert plan.needs_eager


def test_split_items_respects_brackets():
    assert split_items("a[1,2],b, c[head=1,2]") == ["a[1,2]", "b", "c[head=1,2]"]
    assert split_items(["a,b", "c"]) == ["a", "b", "c"]


def test_unknown_site_suggests_and_names_the_command(minilm):
    with pytest.raises(actscope.SiteError) as error:
        actscope.plan_sites(minilm, "blocks.1.mlp.psot")
    message = str(error.value)
    assert "unknown site 'blocks.1.mlp.psot'" in message
    assert "Did you mean: blocks.1.mlp.post" in message
    assert f"Run `actscope sites {minilm.source}` to list them." in message
    assert "6 blocks" in message


@pytest.mark.parametrize("source,argument", [
    ("sentence-transformers/all-MiniLM-L6-v2@0123abcd", "sentence-transformers/all-MiniLM-L6-v2 --revision 0123abcd"),
    ("/models/my model", "'/models/my model'"),
    ("/models/a@b/model", "/models/a@b/model"),
    (None, ""),
])
def test_the_sites_command_in_messages_runs_as_written(source, argument):
    from actscope.sites import _command_model

    assert _command_model(source) == argument


def test_out_of_range_block_is_unknown(minilm):
    with pytest.raises(actscope.SiteError, match="blocks.9.mlp.post"):
        actscope.plan_sites(minilm, "blocks.9.mlp.post")


def test_bad_selectors(minilm):
    with pytest.raises(actscope.SiteError, match=r"\[head=…\] applies to attention sites"):
        actscope.plan_sites(minilm, "blocks.0.mlp.post[head=1]")
    with pytest.raises(actscope.SiteError, match="not an index"):
        actscope.plan_sites(minilm, "blocks.0.mlp.post[a]")
    with pytest.raises(actscope.SiteError, match="unknown selector"):
        actscope.plan_sites(minilm, "blocks.0.mlp.post[unit=1]")
    with pytest.raises(actscope.SiteError, match="empty"):
        actscope.plan_sites(minilm, " , ")


def test_module_sites_and_their_errors(minilm):
    plan = actscope.plan_sites(minilm, "module:encoder.layer.0.intermediate@output,module:pooler@input")
    assert [s.path for s in plan.sites] == ["encoder.layer.0.intermediate", "pooler"]
    assert [s.hook.at for s in plan.sites] == ["output", "input"]
    with pytest.raises(actscope.SiteError, match="Did you mean: encoder.layer.0.intermediate"):
        actscope.plan_sites(minilm, "module:encoder.layer.0.intermediat@output")
    with pytest.raises(actscope.SiteError, match="@input or @output"):
        actscope.plan_sites(minilm, "module:pooler@middle")


def test_unit_out_of_range_fails_with_the_size(minilm):
    inputs = minilm.tokenizer(["hello world"], return_tensors="pt")
    with pytest.raises(actscope.SiteError, match="has 1536 units"):
        with actscope.observe(minilm, "blocks.0.mlp.post[1536]"):
            minilm(**inputs)


def test_sites_lists_shapes(minilm):
    listing = {s.name: s for s in minilm.sites()}
    assert listing["blocks.0.mlp.post"].shape == ("batch", "pos", 1536)
    assert listing["blocks.5.attn.pattern"].shape == ("batch", 12, "pos", "pos")
    assert listing["blocks.5.attn.z"].shape == ("batch", "pos", 12, 32)
    assert listing["embed"].shape == ("batch", "pos", 384)
    assert len([n for n in listing if n.endswith("mlp.post")]) == 6


def test_plain_module_without_adapter():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = actscope.wrap(net, example_inputs={"input": torch.zeros(3, 4)})
    listing = {s.name: s.shape for s in model.sites()}
    assert listing["module:1@output"] == ("batch", 8) or listing["module:1@output"] == (3, 8)
    with pytest.raises(actscope.SiteError, match="no adapter table"):
        actscope.plan_sites(model, "blocks.*.mlp.post")
    with pytest.raises(actscope.SiteError, match="no adapter table"):
        actscope.plan_sites(model, None)


class _Stack(torch.nn.Module):
    """A user's own model: a ModuleList of blocks, each with two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"fc1": torch.nn.Linear(4, 6), "fc2": torch.nn.Linear(6, 4)}) for _ in range(3))

    def forward(self, x):
        for block in self.layers:
            x = block["fc2"](torch.relu(block["fc1"](x)))
        return x


def test_module_sites_take_globs_and_ranges():
    model = actscope.wrap(_Stack(), example_inputs={"x": torch.zeros(2, 4)})
    plan = actscope.plan_sites(model, "module:layers.*.fc2@input")
    assert plan.names == [f"module:layers.{i}.fc2@input" for i in range(3)]
    assert actscope.plan_sites(model, "module:layers.1-2.fc1").names == ["module:layers.1.fc1@output", "module:layers.2.fc1@output"]
    assert actscope.plan_sites(model, "module:layers.*.*[0:2]").names == [
        f"module:layers.{i}.{fc}@output[0,1]" for i in range(3) for fc in ("fc1", "fc2")]
    with pytest.raises(actscope.SiteError, match=r"matches only containers .* \(ModuleDict layers\.0, …\).*module:layers\.\*\.\*@output"):
        actscope.plan_sites(model, "module:layers.*")  # ModuleDicts are indexed, never called
    x = torch.randn(5, 4)
    from actscope.trace import Capture

    capture = Capture(model, "module:layers.*.fc2@input", announce=False)
    with torch.no_grad(), capture.attached():
        model(x=x)
    h = torch.relu(model.module.layers[0]["fc1"](x))
    assert torch.equal(capture.tensors["module:layers.0.fc2@input"][0], h.detach())
    with pytest.raises(actscope.SiteError, match=r"no module of .* matches 'layers\.\*\.fc3'\. Did you mean: layers\.\*\.fc"):
        actscope.plan_sites(model, "module:layers.*.fc3@input")
    with pytest.raises(actscope.SiteError, match="@input or @output"):
        actscope.plan_sites(model, "module:layers.*.fc1@middle")
