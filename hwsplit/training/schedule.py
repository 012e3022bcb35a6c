"""Post-split training policies: the learning-rate schedule of each growth stage (docs/design.md §5).

A split at step ε = 0.01 is (almost) function-preserving: the network right after it is as good as
the one before. What the stage's training does with it is the policy:

* ``restart`` — every stage trains a fresh cosine schedule from the peak ``lr`` (hwsplit's
  behaviour before this setting existed). The jump back to a large step can undo what the split preserved.
* ``warm`` — every growth stage starts from a lower peak (``WARM_LR_FACTOR`` × ``lr``) reached by
  a linear warm-up over ``WARMUP_FRACTION`` of the stage's epochs, then a cosine to 0. The seed
  (stage 0) trains as under ``restart``.
* ``continue`` — one cosine schedule over the whole run (seed epochs + stages × stage epochs);
  each stage trains its segment of it, so the learning rate keeps falling across splits.

`restart` is the default, chosen on validation (BENCHMARKS.md, "Post-split training policy");
`continue` also ends a budget-stopped run at a high rate.
"""

from __future__ import annotations

import dataclasses

from hwsplit.training.train import TrainConfig

POLICIES = ("restart", "warm", "continue")
#: ``warm``: peak learning rate of a growth stage as a fraction of the run's ``lr``.
WARM_LR_FACTOR = 0.3
#: ``warm``: linear warm-up over this fraction of a growth stage's epochs.
WARMUP_FRACTION = 0.2


def stage_train_config(base: TrainConfig, policy: str, stage: int, *, seed_epochs: int, stage_epochs: int,
                       stages: int) -> TrainConfig:
    """The :class:`~hwsplit.training.train.TrainConfig` of ``stage`` (0 = the seed) under ``policy``.

    ``base`` carries the run's SGD settings; its ``epochs`` is replaced by the stage's
    (``seed_epochs`` for stage 0, else ``stage_epochs``). ``stages`` is the number of growth stages
    the run is configured for (the length of ``continue``'s single schedule).
    """
    if policy not in POLICIES:
        raise ValueError(f"post_split: expected one of {', '.join(POLICIES)}, got {policy!r}")
    epochs = seed_epochs if stage == 0 else stage_epochs
    config = dataclasses.replace(base, epochs=epochs, warmup_epochs=0.0, horizon_epochs=None, offset_epochs=0)
    if policy == "warm" and stage > 0:
        return dataclasses.replace(config, lr=base.lr * WARM_LR_FACTOR, warmup_epochs=WARMUP_FRACTION * epochs)
    if policy == "continue":
        offset = 0 if stage == 0 else seed_epochs + (stage - 1) * stage_epochs
        horizon = max(seed_epochs + stages * stage_epochs, offset + epochs)
        return dataclasses.replace(config, horizon_epochs=horizon, offset_epochs=offset)
    return config


__all__ = ["POLICIES", "WARMUP_FRACTION", "WARM_LR_FACTOR", "stage_train_config"]
