"""Families no other test builds, used the way a new user would (sites, profile, edit): each test
here failed before the fix it names."""
from __future__ import annotations

import torch

import actscope

torch.set_num_threads(1)
TEXTS = ["The cat sat on the mat.", "Rain again today, héllo ☃.", "Short."]


def tiny_resnet() -> torch.nn.Module:
    """A Hugging Face CNN: its config has channels but no image size."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config).eval()


def test_cnn_without_image_size_lists_its_sites_with_shapes():
    # was: example inputs were token ids (no image_size in ResNet's config), so the forward failed
    # with "'NoneType' object has no attribute 'shape'" blamed on the model
    model = actscope.wrap(tiny_resnet())
    assert model.takes_images
    shapes = {site.name: site.shape for site in model.sites()}
    assert shapes["module:resnet.encoder.stages.1@output"] == ("batch", 16, 28, 28)  # 224 / 8: the stem halves twice, stage 1 once
