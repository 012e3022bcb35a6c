"""Uniform cost: every neuron costs 1 — vanilla splitting (Wu, Wang, Liu 2019) in the same knapsack."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cost_models.base import register_cost_model
from hwsplit.network.graph import find_neuron_groups
from hwsplit.network.specs import LayerSpec

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@register_cost_model("none")
class UniformCostModel:
    """Cost = number of neurons in splittable groups; marginal = 1 for every group. Unit "neurons"."""

    name = "none"
    unit = "neurons"

    def layer_cost(self, spec: LayerSpec) -> float:
        return float(spec.out_channels)

    def _groups(self, model: nn.Module, input_shape: tuple[int, ...]) -> list:
        import torch

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return [g for g in find_neuron_groups(model, torch.zeros(input_shape, device=device)) if g.splittable]

    def total(self, model: nn.Module, input_shape: tuple[int, ...]) -> float:
        return float(sum(g.width for g in self._groups(model, input_shape)))

    def marginal(self, model: nn.Module, input_shape: tuple[int, ...], *,
                 groups: list | None = None) -> dict[str, float]:
        found = self._groups(model, input_shape) if groups is None else [g for g in groups if g.splittable]
        return {g.name: 1.0 for g in found}
