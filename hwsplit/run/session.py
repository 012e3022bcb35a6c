"""A run's session: what every stage of a run uses (data, loaders, device, cost models, the end-to-end
measurer), how each stage is seeded, the seed network, and the non-training part of a record.

**Determinism.** Each stage re-seeds every random number generator with :func:`stage_seed` and
draws its data order from loader epochs derived from the stage number, so a run resumed after a
crash continues, on the CPU, bit for bit as an uninterrupted run. See docs/design.md §5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import cost_models
from hwsplit.infra.devices import apply_threads
from hwsplit.infra.distributed import local_device, rank, world_size
from hwsplit.infra.errors import ConfigError, first_line
from hwsplit.network.families import build_seed as _build_family_seed
from hwsplit.network.graph import NeuronGroup, find_neuron_groups
from hwsplit.network.models import architecture
from hwsplit.run.config import GrowConfig, resolve_channel_multiple
from hwsplit.run.measurement import end_to_end_measurer
from hwsplit.training.bundle import DataBundle, preprocessing, split_validation
from hwsplit.training.data import load_dataset
from hwsplit.training.loaders import make_eval_loader, make_loaders
from hwsplit.training.train import seed_everything

Progress = Callable[[Iterable, str, int], Iterable]


def stage_seed(config: GrowConfig, stage: int) -> int:
    """The seed of every global random number generator at the start of ``stage``."""
    return config.seed * 1000 + stage


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_seed(config: GrowConfig, bundle: DataBundle, *, width_mult: float = 1.0,
               profile: dict[str, Any] | None = None) -> nn.Module:
    """The stage-0 model of ``config.model`` sized for ``bundle``'s inputs and classes.

    ``width_mult`` multiplies the configured width multiplier (the width baseline's scaling); with a
    channel multiple every growing width is rounded to it (make-divisible, hwsplit/network/families.py;
    ``"auto"`` takes it from the loaded ``profile``, :func:`~hwsplit.run.config.resolve_channel_multiple`).
    A run's own seed is :meth:`Session.seed_network`.
    """
    return _build_family_seed(config.model, config.model_options, bundle.input_shape, bundle.num_classes,
                              width_mult=width_mult, channel_multiple=resolve_channel_multiple(config, profile))


@dataclass
class Session:
    """What every stage of a run uses: data, loaders, device, cost models, end-to-end measurer."""

    config: GrowConfig
    bundle: DataBundle
    train_loader: Any
    test_loader: Any
    device: torch.device
    input_shape: tuple[int, ...]
    cost_model: Any
    flops: Any
    measure: Callable[[nn.Module, tuple[int, ...]], dict[str, Any]] | None
    val_loader: Any = None  # with config.val_fraction > 0: the validation images, in order
    profile: dict[str, Any] | None = None  # the device profile as the cost model loaded it (cost lut or energy)

    @property
    def channel_multiple(self) -> int | None:
        """The channel multiple the run grows by (``"auto"`` resolved from :attr:`profile`), or None."""
        return resolve_channel_multiple(self.config, self.profile)

    def seed_network(self, *, width_mult: float = 1.0) -> nn.Module:
        """The run's stage-0 model (:func:`build_seed`), on the CPU."""
        return build_seed(self.config, self.bundle, width_mult=width_mult, profile=self.profile)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The input the run's networks expect (:func:`hwsplit.training.bundle.preprocessing`): layout, value range,
        mean/std."""
        return preprocessing(self.bundle)

    def trace(self, model: nn.Module) -> list[NeuronGroup]:
        """The neuron groups of ``model`` (one fx trace; pass the result on instead of tracing again)."""
        return find_neuron_groups(model, torch.zeros(self.input_shape, device=self.device))


def open_session(config: GrowConfig, *, bundle: DataBundle | None = None, cost_model: Any = None) -> Session:
    """Load the data and build the cost models of ``config`` (``bundle``: data already loaded; ``cost_model``:
    the run's cost model already built from ``config``, :func:`build_cost_model`, so that a profile is read
    and fitted once). ``"auto"`` channel multiples are resolved here, from the profile the cost model loaded.

    Under a process group the loaders are this rank's shards (``config.batch_size`` per rank) and
    a CUDA device is this rank's (``cuda:LOCAL_RANK``).
    """
    seed_everything(config.seed)
    apply_threads(config.threads)
    device = local_device(config.device)
    if bundle is None:
        bundle = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download, seed=config.seed,
                              limit=config.data_limit, test_limit=config.test_limit)
    if config.val_fraction > 0 and bundle.val is None:
        bundle = split_validation(bundle, config.val_fraction, seed=config.seed)
    train_loader, test_loader = make_loaders(bundle, batch_size=config.batch_size, seed=config.seed,
                                             rank=rank(), world_size=world_size(),
                                             device=device if device.type == "cuda" else None)
    cost_model = build_cost_model(config) if cost_model is None else cost_model
    profile = getattr(cost_model, "profile", None) if config.profile else None
    resolve_channel_multiple(config, profile)  # "auto" needs the profile's channel_block: fail before any write
    return Session(config=config, bundle=bundle, train_loader=train_loader, test_loader=test_loader, device=device,
                   input_shape=(1, *bundle.input_shape), cost_model=cost_model,
                   flops=cost_models.get_cost_model("flops"), measure=end_to_end_measurer(config, profile),
                   val_loader=None if bundle.val is None else make_eval_loader(
                       bundle.val, batch_size=config.batch_size, seed=config.seed,
                       device=device if device.type == "cuda" else None), profile=profile)


def build_cost_model(config: GrowConfig) -> Any:
    """The run's cost model; a profile that cannot be fitted is a ``ConfigError`` naming the file."""
    import numpy as np

    try:
        return cost_models.get_cost_model(config.cost, **config.cost_options)
    except (np.linalg.LinAlgError, ArithmeticError) as err:
        raise ConfigError(f"profile: {config.profile}: cannot fit the {config.cost} cost model to it "
                          f"({type(err).__name__}: {first_line(err)}); it is degenerate (too few distinct rows?)"
                          ) from None


def describe(session: Session, model: nn.Module, groups: list[NeuronGroup] | None = None) -> dict[str, Any]:
    """Architecture, widths, MACs, parameters and cost of ``model`` (the non-training part of a record)."""
    shape = session.input_shape
    groups = [g for g in (groups if groups is not None else session.trace(model)) if g.splittable]
    return {
        "architecture": architecture(model),
        "layers": [g.name for g in groups],
        "widths": {g.name: g.width for g in groups},
        "macs": session.flops.total(model, shape),
        "params": count_params(model),
        "cost": {"name": session.cost_model.name, "unit": session.cost_model.unit,
                 "value": session.cost_model.total(model, shape)},
    }


__all__ = ["Progress", "Session", "build_cost_model", "build_seed", "count_params", "describe", "open_session",
           "stage_seed"]
