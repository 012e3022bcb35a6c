"""Everything that prices a layer on hardware: LayerSpec, cost models and their registry."""

from cost_models import flops as _flops  # noqa: F401  (registers "flops")
from cost_models import lut as _lut  # noqa: F401  (registers "lut")
from cost_models import uniform as _uniform  # noqa: F401  (registers "none")
from cost_models.base import (
    LAYER_KINDS,
    CostModel,
    LayerCostModel,
    LayerSpec,
    available_cost_models,
    get_cost_model,
    register_cost_model,
)


@register_cost_model("energy")
def _energy(**options):
    """The "energy" predictor, imported on first use (scikit-learn is slow to import)."""
    from cost_models.predictor import EnergyPredictorCostModel

    return EnergyPredictorCostModel(**options)


__all__ = [
    "LAYER_KINDS",
    "CostModel",
    "LayerCostModel",
    "LayerSpec",
    "available_cost_models",
    "get_cost_model",
    "register_cost_model",
]
