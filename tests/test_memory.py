"""Activation memory: a tiny CNN against shapes × element size worked out by hand, a
MobileNetV2-shaped CNN whose first blocks dominate (MCUNetV2), and a tiny transformer's block
and site rows against tensors captured independently."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from actscope.errors import InputError
from actscope.metrics.memory import activation_memory
from actscope.zoo.cnn import mobilenet_v2
from actscope.zoo.tiny import tiny_model

from conftest import model_state


def tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # [2, 8, 16, 16]
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),  # [2, 16, 8, 8]
        nn.Flatten(),  # [2, 1024]
        nn.Linear(1024, 10),  # [2, 10]
    ).eval()


def rows(result) -> dict[str, dict]:
    table = result.to_table()
    return {name: {key: table[key][i] for key in table} for i, name in enumerate(table["name"])}


@pytest.mark.parametrize("dtype, size", [(None, 4), (torch.int8, 1), ("float16", 2)])
def test_tiny_cnn_against_a_hand_computation(dtype, size):
    net = tiny_cnn()
    before = model_state(net)
    result = activation_memory(net, torch.zeros(2, 3, 16, 16), dtype)
    assert model_state(net) == before  # no hook left, nothing changed
    by = rows(result)
    image, conv1, conv2, flat, logits = 2 * 3 * 16 * 16, 2 * 8 * 16 * 16, 2 * 16 * 8 * 8, 2 * 1024, 2 * 10
    expected = {  # module: (input elements, output elements)
        "0": (image, conv1), "1": (conv1, conv1), "2": (conv1, conv2), "3": (conv2, flat), "4": (flat, logits), "": (image, logits),
    }
    for name, (inputs, outputs) in expected.items():
        assert by[name]["output_bytes"] == outputs * size, name
        assert by[name]["input_bytes"] == inputs * size, name
        assert by[name]["elements"] == outputs and by[name]["calls"] == 1 and by[name]["level"] == "module"
    assert by["0"]["shape"] == "(2, 8, 16, 16)" and by["0"]["kind"] == "Conv2d"
    for name in "01234":  # a leaf's peak: its own input + output
        assert by[name]["peak_bytes"] == sum(expected[name]) * size
    assert by[""]["peak_bytes"] == result.peak_bytes == 2 * conv1 * size  # the ReLU: in and out live
    assert result.leaf_output_bytes == (2 * conv1 + conv2 + flat + logits) * size


def test_shared_module_called_twice_adds_up():
    layer = nn.Linear(4, 4)
    net = nn.Sequential(layer, nn.ReLU(), layer)
    by = rows(activation_memory(net, torch.zeros(3, 4)))
    assert by["0"]["calls"] == 2 and by["0"]["output_bytes"] == 2 * 3 * 4 * 4
    assert "2" not in by  # the same module: one row
    assert by["0"]["peak_bytes"] == 2 * 3 * 4 * 4  # the largest single call, not the sum


class Twice(nn.Module):
    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = x * scale
        return y, y, {"again": y}


def test_a_tensor_returned_twice_counts_once_and_keyword_inputs_count():
    by = rows(activation_memory(Twice(), {"x": torch.zeros(5, 3), "scale": torch.ones(3)}))
    assert by[""]["output_bytes"] == 5 * 3 * 4
    assert by[""]["input_bytes"] == (5 * 3 + 3) * 4


# -- MCUNetV2: the first blocks of a MobileNetV2 dominate ------------------------------------------
def test_first_blocks_of_a_mobilenet_dominate():
    table = activation_memory(mobilenet_v2(), torch.zeros(1, 3, 224, 224), torch.int8).to_table()
    block = np.array([name.count(".") == 1 and name.startswith("0.") for name in table["name"]])
    peaks = table["peak_bytes"][block]  # [19] blocks in order
    assert len(peaks) == 19
    # Block 2 (first stride-2 inverted residual): its 1×1 expansion to 96 channels at 112×112
    # feeds a BatchNorm whose input and output are both live: 2 · 96 · 112 · 112 bytes in int8.
    assert peaks[2] == 2 * 96 * 112 * 112
    assert int(np.argmax(peaks)) < 4  # the largest peak is in the first blocks
    later = np.median(peaks[len(peaks) // 2:])
    assert peaks.max() >= 10 * later  # an order of magnitude above the later blocks


# -- a transformer with an adapter ---------------------------------------------------------------
def test_blocks_and_sites_of_a_tiny_llama():
    import actscope

    model, inputs = tiny_model("llama")
    config = model.config
    batch, positions = inputs["input_ids"].shape
    before = model_state(model)
    result = activation_memory(model, inputs)
    assert model_state(model) == before
    by = rows(result)
    hidden = batch * positions * config.hidden_size * 4
    assert by["blocks.0"]["output_bytes"] == hidden and by["blocks.1"]["level"] == "block"
    assert by["blocks.1"]["layer"] == 1 and by["blocks.1"]["module"] == "model.layers.1"
    sites = "blocks.0.mlp.post,blocks.1.attn.v,logits,embed"
    with torch.no_grad(), actscope.capture(model, sites) as captured:
        model(**inputs)
    for site in sites.split(","):
        tensor = captured.tensor(site)
        assert by[site]["output_bytes"] == tensor.numel() * tensor.element_size(), site
        assert by[site]["level"] == "site" and by[site]["peak_bytes"] == -1
    assert by["blocks.0.mlp.post"]["output_bytes"] == batch * positions * config.intermediate_size * 4
    assert not any("attn.pattern" in name for name in by)  # needs eager attention: left out by default
    pattern = rows(activation_memory(model, inputs, sites="blocks.0.attn.pattern"))
    assert pattern["blocks.0.attn.pattern"]["output_bytes"] == batch * config.num_attention_heads * positions**2 * 4
    with_modules = rows(activation_memory(model, inputs, modules=True))
    assert with_modules["model.layers.0.mlp.down_proj"]["output_bytes"] == hidden
    assert with_modules["model.layers.0.mlp.down_proj"]["input_bytes"] == by["blocks.0.mlp.post"]["output_bytes"]


def test_expert_sites_count_the_routed_tokens():
    model, inputs = tiny_model("mixtral")
    seen = {}
    handle = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: seen.update(index=out[2]))
    try:
        by = rows(activation_memory(model, inputs))
    finally:
        handle.remove()
    for expert in range(model.config.num_local_experts):
        routed = int((seen["index"] == expert).any(-1).sum())
        assert by[f"blocks.0.moe.experts.{expert}.post"]["output_bytes"] == routed * model.config.intermediate_size * 4


def test_bad_arguments_are_refused():
    with pytest.raises(InputError, match="dtype"):
        activation_memory(tiny_cnn(), torch.zeros(1, 3, 8, 8), "int9")
    with pytest.raises(InputError, match="inputs"):
        activation_memory(tiny_cnn(), "an image")
