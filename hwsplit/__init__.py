"""hwsplit: grow neural networks by splitting neurons under a hardware cost budget.

Public names (docs/design.md §1) are imported lazily so that ``import hwsplit`` stays cheap and the
pure parts (``hwsplit.splitting.knapsack``) never pull in model code. The modules live in layer folders
(docs/design.md §1): ``infra`` → ``network`` → ``splitting`` and ``training`` → ``run``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "find_neuron_groups": "hwsplit.network.graph",
    "layer_specs": "hwsplit.network.graph",
    "NeuronGroup": "hwsplit.network.graph",
    "splitting_indices": "hwsplit.splitting.score",
    "SplitScore": "hwsplit.splitting.estimators",
    "ScoringOptions": "hwsplit.splitting.score",
    "select_neurons": "hwsplit.splitting.select",
    "apply_split": "hwsplit.splitting.surgery",
    "build_model": "hwsplit.network.models",
    "architecture": "hwsplit.network.models",
    "model_from_architecture": "hwsplit.network.models",
    "Grower": "hwsplit.run.grower",
    "carry_optimizer": "hwsplit.run.grower",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hwsplit' has no attribute {name!r}")
