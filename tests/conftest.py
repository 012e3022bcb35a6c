"""Shared fixtures: small MobileNet-like networks with depthwise chains, trained on synthetic data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hwsplit import build_model

# Tiny tensors: one thread avoids oversubscription when other processes share the two cores.
torch.set_num_threads(1)


def synthetic_data(n: int = 256, *, resolution: int = 12, classes: int = 5, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class depends non-linearly on local patterns, so the nets learn something."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, resolution, resolution, generator=gen, dtype=dtype)
    feature = (x[:, 0, : resolution // 2].mean((1, 2)) * 3 + x[:, 1].abs().mean((1, 2)) * 2
               - x[:, 2, :, resolution // 2:].mean((1, 2)) * 2)
    edges = torch.quantile(feature.float(), torch.linspace(0, 1, classes + 1)[1:-1]).to(dtype)
    y = torch.bucketize(feature, edges)
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def tiny_mobilenet(*, activation: str = "silu", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mobilenet_v1_cifar", stem_width=6, widths=[8, 10, 12], strides=[1, 2, 2],
                       num_classes=5, activation=activation)


def train_briefly(model: torch.nn.Module, data: list, *, epochs: int = 15, lr: float = 0.05) -> torch.nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    return model


@pytest.fixture(scope="session")
def trained_tiny() -> tuple[torch.nn.Module, list]:
    """A tiny MobileNetV1 (depthwise chains, SiLU) trained briefly, with its data in batches of 64."""
    x, y = synthetic_data()
    data = batches(x, y, 64)
    return train_briefly(tiny_mobilenet(), data), data


@pytest.fixture(scope="session")
def trained_tiny64(trained_tiny) -> tuple[torch.nn.Module, list]:
    """The same network and data in float64."""
    import copy

    model, data = trained_tiny
    return copy.deepcopy(model).double(), [(x.double(), y) for x, y in data]
