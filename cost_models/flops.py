"""Analytical cost: multiply-accumulates (MACs) of Conv2d and Linear layers.

Only convolutions and linear layers are counted, one MAC per weight per output pixel per sample
(the convention of the MobileNet papers); BatchNorm, activations, pooling and bias adds are not.
"""

from __future__ import annotations

from cost_models.base import LayerCostModel, register_cost_model
from hwsplit.network.specs import LayerSpec


@register_cost_model("flops")
class FlopsCostModel(LayerCostModel):
    """Cost = MACs of conv and linear layers. ``unit`` is ``"MACs"``."""

    name = "flops"
    unit = "MACs"

    def layer_cost(self, spec: LayerSpec) -> float:
        return float(spec.macs)
