"""hwsplit: grow neural networks by splitting neurons under a hardware cost budget.

Public names (docs/design.md §5) are imported lazily so that ``import hwsplit`` stays cheap and the
pure parts (``hwsplit.select``) never pull in model code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "find_neuron_groups": "hwsplit.graph",
    "layer_specs": "hwsplit.graph",
    "NeuronGroup": "hwsplit.graph",
    "splitting_indices": "hwsplit.score",
    "SplitScore": "hwsplit.score",
    "select_neurons": "hwsplit.select",
    "apply_split": "hwsplit.surgery",
    "build_model": "hwsplit.models",
    "architecture": "hwsplit.models",
    "model_from_architecture": "hwsplit.models",
    "Grower": "hwsplit.grower",
    "carry_optimizer": "hwsplit.grower",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hwsplit' has no attribute {name!r}")
