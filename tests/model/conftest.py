"""Fixtures shared by the model tests: a seeded tiny Mask2Former and its outputs."""

from __future__ import annotations

import pytest
import torch

from model.mask2former import build_model


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return build_model("tiny")


@pytest.fixture(scope="module")
def images():
    return torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(1)) * 255


@pytest.fixture(scope="module")
def tiny_outputs(tiny_net, images):
    with torch.no_grad():
        return tiny_net(images)
