"""What a growth run depends on: :class:`GrowConfig`, budgets with units, and reading a run's config.

Every rule about which settings combine lives here, so the library and the command line refuse the
same things with the same ``ValueError`` (naming the field): a ``--cost lut|energy`` needs a
profile, ``--profile`` needs one of them, options of ``--resume`` and ``--like``. See
docs/design.md §5.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwsplit.infra.errors import ConfigError
from hwsplit.network.families import CEILINGS, FAMILIES, supports_channel_multiple
from hwsplit.splitting.knapsack import PRICES
from hwsplit.splitting.recipe import GROUP_BUDGETS
from hwsplit.splitting.ritz import RITZ_ALLOCATIONS
from hwsplit.splitting.score import METHODS as SPLIT_METHODS
from hwsplit.splitting.score import SCORINGS, SPLIT_CANDIDATES
from hwsplit.splitting.select import SELECTIONS
from hwsplit.training.schedule import POLICIES, stage_train_config
from hwsplit.training.train import TrainConfig

#: How ``--final-epochs`` starts the network it ships: the grown weights, or the grown architecture re-initialised.
FINAL_INITS = ("grown", "fresh")
#: Cost models that price from a device profile (and need one).
PROFILED_COSTS = ("lut", "energy")
COSTS = ("flops", "none", *PROFILED_COSTS)
#: Largest --channel-multiple accepted (a block wider than any seed layer would never grow).
MAX_CHANNEL_MULTIPLE = 1024

#: Presets of the selection settings (``grow --recipe``); an option given with the preset overrides it.
#: ``authors``: the selection of dilinwang820/fast-energy-aware-splitting (mbv1_cifar100/main_split.py): the
#: price √ΔMACs, the budget split over two groups by map size, at most doubling per stage, the authors'
#: width ceilings (max_splitcfg) and the LP kept at β ≥ 0.99 (with selection lp; the others have no LP).
RECIPES: dict[str, dict[str, Any]] = {
    "authors": {"price": "sqrt", "group_budgets": "authors", "max_layer_growth": 1.0, "max_widths": "authors",
                "lp_threshold": 0.99},
}
#: Values of the fields a config.json written before they existed implies (the behaviour of that time),
#: where they differ from today's defaults: a run directory of then resumes as it was started.
LEGACY_FIELDS: dict[str, Any] = {"max_widths": None}

# Units a budget may be written in, per cost-model unit: suffix → multiplier to the model's unit.
_UNIT_SUFFIXES = {
    "MACs": {"": 1.0, "macs": 1.0, "k": 1e3, "kmacs": 1e3, "m": 1e6, "mmacs": 1e6, "g": 1e9, "gmacs": 1e9},
    "ms": {"ms": 1.0, "s": 1e3, "us": 1e-3},
    "mJ": {"mj": 1.0, "j": 1e3, "uj": 1e-3},
    "neurons": {"": 1.0, "neurons": 1.0},
}


def parse_budget(text: str | float, unit: str) -> float:
    """A budget such as ``"4.5ms"``, ``"12mJ"`` or ``"300M"`` (MACs) in the cost model's ``unit``.

    Raises ``ValueError`` naming the budget when the number is malformed, not finite, not positive
    or its unit does not match the cost model's (e.g. ``"4.5ms"`` for an energy model in mJ).
    """
    if isinstance(text, (int, float)):
        value, suffix = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ]*)\s*", str(text))
        if not m:
            raise ConfigError(f"budget: cannot read {text!r}; write a number with its unit, e.g. 4.5ms, 12mJ, 300M")
        value, suffix = float(m.group(1)), m.group(2).replace("µ", "u").lower()
    table = _UNIT_SUFFIXES.get(unit, {unit.lower(): 1.0})
    if suffix not in table:
        accepted = ", ".join(s for s in table if s) or "a plain number"
        raise ConfigError(f"budget: unit {suffix or '(none)'!r} does not match the cost model's unit {unit!r} "
                          f"(accepted: {accepted})")
    value *= table[suffix]
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"budget: must be a finite positive number, got {text!r}")
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(kw_only=True)
class GrowConfig:
    """Everything a growth run depends on (saved as config.json); invalid values raise ``ValueError``."""

    model: str = "mobilenet_v1"
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    data_limit: int | None = None
    test_limit: int | str | None = "auto"  # test images: "auto" = data_limit // 5 (all without a limit), None = all
    cost: str = "flops"
    cost_options: dict[str, Any] = field(default_factory=dict)
    growth_ratio: float = 0.5
    stages: int = 4
    budget: float | None = None  # absolute, in the cost model's unit
    epochs: int = 15
    seed_epochs: int | None = None  # stage 0; defaults to epochs
    split_epochs: int = 1
    split_method: str = "rayleigh"
    split_step: float = 1e-2
    split_lr: float = 0.05
    # Rayleigh–Ritz vectors per neuron, at least this many in every layer (hwsplit.splitting.score.splitting_indices
    # ritz_vectors): quality for cost (BENCHMARKS.md, "Splitting core"); 0 = the averaged-iterate estimate
    split_vectors: int = 6
    # "cost": more vectors where one is cheap (small maps), "uniform": split_vectors everywhere
    split_allocation: str = "cost"
    # "full": every training image once per stage; "adaptive": a subsample sized by the error bars of the
    # indices (hwsplit.splitting.ritz.AdaptiveScoring): stop when at most scoring_tolerance × the neurons the
    # knapsack's cut takes are within scoring_z standard errors of it, between scoring_min and scoring_cap
    # (shares of an epoch)
    scoring: str = "full"
    scoring_tolerance: float = 0.05
    scoring_z: float = 2.0
    scoring_min: float = 0.05
    scoring_cap: float = 0.25
    # "all": every λ < 0 is a candidate; "significant": only λ + scoring_z·SE < 0
    split_candidates: str = "all"
    selection: str = "lp"
    max_layer_growth: float | None = None  # cap per layer and stage, as a fraction of its width
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads per process; None: hwsplit.infra.devices.default_threads
    seed: int = 0
    measure: bool | None = None  # measure each stage end to end; None: when there is a profile
    measure_time_s: float = 1.0
    # grow in multiples of N channels per layer and stage (None: one neuron at a time); "auto": the
    # profile's channel_block (hwsplit/splitting/blocks.py, resolve_channel_multiple)
    channel_multiple: int | str | None = None
    val_fraction: float = 0.0  # share of the training images carved out (seeded) for validation
    post_split: str = "restart"  # training policy after a split: hwsplit.training.schedule.POLICIES
    final_epochs: int | None = None  # fine-tune the shipped stage this many epochs at the end (RUN/final/)
    # the shipped network starts from the grown weights ("grown") or from a fresh initialisation of the grown
    # architecture ("fresh"); see FINAL_INITS
    final_init: str = "grown"
    # the selection recipe (hwsplit/splitting/recipe.py, docs/design.md §3): the transform of each neuron's marginal
    # cost the knapsack chooses with (the budget still limits the real cost): hwsplit.splitting.knapsack.PRICES
    price: str = "linear"
    group_budgets: str = "none"  # split the stage budget over layer groups by map size: recipe.GROUP_BUDGETS
    # width ceiling per layer: "standard" (the family's standard widths), "authors" (their max_splitcfg),
    # None (no ceiling) or one whole number per growing layer in graph order
    max_widths: str | list[int] | None = "standard"
    lp_threshold: float | None = None  # keep the LP's β >= this and nothing else (the authors' 0.99); None: rounding
    recipe: str | None = None  # the preset the settings above came from (RECIPES), for the record
    tensorboard: bool = True  # TensorBoard event files in RUN/tb/ (hwsplit/run/tblog.py)

    @property
    def profile(self) -> str | None:
        return self.cost_options.get("profile")

    def __post_init__(self) -> None:
        checks = {
            "model_options": isinstance(self.model_options, dict),
            "cost_options": isinstance(self.cost_options, dict),
            "growth_ratio": _number(self.growth_ratio) and self.growth_ratio > 0,
            "stages": _non_negative_int(self.stages),
            "epochs": _positive_int(self.epochs),
            "split_epochs": _positive_int(self.split_epochs),
            "split_step": _number(self.split_step) and self.split_step >= 0,
            "split_lr": _number(self.split_lr) and self.split_lr > 0,
            "split_vectors": _non_negative_int(self.split_vectors),
            "scoring_tolerance": _number(self.scoring_tolerance) and self.scoring_tolerance >= 0,
            "scoring_z": _number(self.scoring_z) and self.scoring_z > 0,
            "scoring_min": _number(self.scoring_min) and 0 < self.scoring_min <= 1,
            "scoring_cap": _number(self.scoring_cap) and 0 < self.scoring_cap <= 1,
            "batch_size": _positive_int(self.batch_size),
            "budget": self.budget is None or (_number(self.budget) and self.budget > 0),
            "seed_epochs": self.seed_epochs is None or _positive_int(self.seed_epochs),
            "max_layer_growth": self.max_layer_growth is None
            or (_number(self.max_layer_growth) and 0 < self.max_layer_growth <= 1),
            "data_limit": self.data_limit is None or _positive_int(self.data_limit),
            "test_limit": self.test_limit in (None, "auto") or _positive_int(self.test_limit),
            "lr": _number(self.lr) and self.lr > 0,
            "weight_decay": _number(self.weight_decay) and self.weight_decay >= 0,
            "label_smoothing": _number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            "seed": isinstance(self.seed, int) and not isinstance(self.seed, bool),
            "measure_time_s": _number(self.measure_time_s) and self.measure_time_s > 0,
            "val_fraction": _number(self.val_fraction) and 0 <= self.val_fraction < 1,
            "final_epochs": self.final_epochs is None or _positive_int(self.final_epochs),
            "final_init": self.final_init in FINAL_INITS,
            "threads": self.threads is None or _positive_int(self.threads),
            "tensorboard": isinstance(self.tensorboard, bool),
            "device": isinstance(self.device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{name}: invalid value {getattr(self, name)!r}")
        if self.model not in FAMILIES:
            raise ConfigError(f"model: unknown name {self.model!r}; available: {', '.join(sorted(FAMILIES))}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection: expected one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.post_split not in POLICIES:
            raise ConfigError(f"post_split: expected one of {', '.join(POLICIES)}, got {self.post_split!r}")
        if self.split_method not in SPLIT_METHODS:
            raise ConfigError(f"split_method: expected rayleigh or exact, got {self.split_method!r}")
        if self.split_allocation not in RITZ_ALLOCATIONS:
            raise ConfigError(f"split_allocation: expected one of {', '.join(RITZ_ALLOCATIONS)}, "
                              f"got {self.split_allocation!r}")
        if self.scoring not in SCORINGS:
            raise ConfigError(f"scoring: expected one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        if self.split_candidates not in SPLIT_CANDIDATES:
            raise ConfigError(f"split_candidates: expected one of {', '.join(SPLIT_CANDIDATES)}, "
                              f"got {self.split_candidates!r}")
        has_errors = self.split_method == "rayleigh" and self.split_vectors > 0
        if self.scoring == "adaptive" and not (has_errors and self.split_epochs == 1):
            raise ConfigError("scoring: adaptive needs split_method rayleigh with split_vectors >= 1 and "
                              "split_epochs 1 (its error bars come from the Rayleigh-Ritz estimate)")
        if self.scoring == "adaptive" and self.scoring_min > self.scoring_cap:
            raise ConfigError(f"scoring_min: {self.scoring_min} is above scoring_cap {self.scoring_cap}")
        if self.split_candidates == "significant" and not has_errors:
            raise ConfigError("split_candidates: significant needs error bars: split_method rayleigh with "
                              "split_vectors >= 1")
        if self.cost not in COSTS:
            raise ConfigError(f"cost: expected one of {', '.join(COSTS)}, got {self.cost!r}")
        if self.cost in PROFILED_COSTS and not self.profile:
            raise ConfigError(f"cost: {self.cost} needs a device profile (cost_options['profile']; "
                              "--profile PROFILE.json, made with `python cli.py profile`)")
        if self.cost not in PROFILED_COSTS and self.profile is not None:
            raise ConfigError("profile: only used with cost lut or energy")
        self._check_channel_multiple()
        self._check_recipe()

    def _check_recipe(self) -> None:
        if self.price not in PRICES:
            raise ConfigError(f"price: expected one of {', '.join(PRICES)}, got {self.price!r}")
        if self.group_budgets not in GROUP_BUDGETS:
            raise ConfigError(f"group_budgets: expected one of {', '.join(GROUP_BUDGETS)}, got {self.group_budgets!r}")
        w = self.max_widths
        if isinstance(w, tuple):
            self.max_widths = w = list(w)
        if not (w is None or w in CEILINGS or (isinstance(w, list) and w and all(_positive_int(x) for x in w))):
            raise ConfigError(f"max_widths: expected {', '.join(CEILINGS)}, None or a list of whole numbers >= 1 "
                              f"(one per growing layer), got {w!r}")
        t = self.lp_threshold
        if t is not None:
            if not (_number(t) and 0 < t <= 1):
                raise ConfigError(f"lp_threshold: expected a number in (0, 1] or None, got {t!r}")
            if self.selection != "lp":
                raise ConfigError(f"lp_threshold: only used with selection lp (it rounds the LP), not {self.selection}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ConfigError(f"recipe: expected one of {', '.join(RECIPES)} or None, got {self.recipe!r}")

    def _check_channel_multiple(self) -> None:
        n = self.channel_multiple
        if n is None:
            return
        if not (n == "auto" or (_positive_int(n) and n <= MAX_CHANNEL_MULTIPLE)):
            raise ConfigError(f"channel_multiple: expected a whole number 1..{MAX_CHANNEL_MULTIPLE} or 'auto', "
                              f"got {n!r}")
        if n == "auto" and not self.profile:
            raise ConfigError(f"channel_multiple: 'auto' reads the channel block of a device profile, and cost "
                              f"{self.cost} has none; give the number (e.g. --channel-multiple 16) or use "
                              "--cost lut|energy --profile PROFILE.json")
        if self.selection == "random":
            raise ConfigError("channel_multiple: not available with selection random (it draws single neurons)")
        if not supports_channel_multiple(self.model):
            raise ConfigError(f"channel_multiple: the {self.model} family cannot round its seed's widths "
                              "(supported: mobilenet_v1, mobilenet_v1_cifar, mlp)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_config(self, epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, lr=self.lr, weight_decay=self.weight_decay,
                           label_smoothing=self.label_smoothing, schedule=self.schedule)

    def stage_train_config(self, stage: int) -> TrainConfig:
        """The training settings of growth stage ``stage`` (0 = the seed) under ``post_split``."""
        return stage_train_config(self.train_config(self.epochs), self.post_split, stage,
                                  seed_epochs=self.seed_epochs or self.epochs, stage_epochs=self.epochs,
                                  stages=self.stages)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> GrowConfig:
        """A config from a dict (config.json's); ``ValueError`` naming ``source`` and the field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**dict(data))
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None


def stage_epochs_in_all(config: GrowConfig, stage: int) -> int:
    """Training epochs grown stage ``stage`` of a grow run of ``config`` has had: seed epochs + stage × stage
    epochs (``stage = config.stages``: what the run spends on its final network, which the width and pruning
    baselines train for)."""
    return (config.seed_epochs or config.epochs) + stage * config.epochs


def recipe_settings(recipe: str | None, given: Mapping[str, Any], *, selection: str = "lp") -> dict[str, Any]:
    """The selection fields of a run: the preset ``recipe`` (:data:`RECIPES`), then every field in ``given``
    (an option given with the preset overrides it), plus ``recipe`` itself. ``lp_threshold`` comes from a
    preset only with ``selection`` lp. ``ConfigError`` naming ``recipe`` when unknown."""
    if recipe is None:
        return dict(given)
    if recipe not in RECIPES:
        raise ConfigError(f"recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
    preset = {k: v for k, v in RECIPES[recipe].items() if k != "lp_threshold" or selection == "lp"}
    return {**preset, **given, "recipe": recipe}


def resolve_channel_multiple(config: GrowConfig, profile: Mapping[str, Any] | None = None) -> int | None:
    """The channel multiple N a run grows by: ``config.channel_multiple``, or for ``"auto"`` the top-level
    ``channel_block`` of the run's ``profile``, as its cost model loaded it (written by ``profile``;
    :attr:`hwsplit.run.session.Session.profile`: the file is not read again). ``ConfigError``
    naming the profile and the field when it is missing, not loaded or not a positive integer.
    """
    n = config.channel_multiple
    if n != "auto":
        return n
    path = config.profile
    if profile is None:
        raise ConfigError(f"channel_multiple: auto needs the profile {path} loaded (open the run's session first)")
    block = profile.get("channel_block")
    if block is None:
        raise ConfigError(f"channel_multiple: auto needs the field 'channel_block' of the profile {path}, which it "
                          "lacks (a profile made by an older hwsplit); re-profile the device, or give the number, "
                          "e.g. --channel-multiple 16")
    if not (_positive_int(block) and block <= MAX_CHANNEL_MULTIPLE):
        raise ConfigError(f"{path}: channel_block: expected a whole number 1..{MAX_CHANNEL_MULTIPLE}, got {block!r}")
    return int(block)


#: Fields a width baseline's config.json adds to a grow config.
BASELINE_FIELDS = ("baseline", "multipliers", "total_epochs")
#: How many processes wrote the run (config.json; not a setting: a run may resume with another number).
RUN_INFO_WORLD_SIZE = "world_size"
#: The input the run's networks expect (config.json; :func:`hwsplit.training.bundle.preprocessing`; not a setting).
RUN_INFO_PREPROCESSING = "preprocessing"


def read_config(path: str | Path) -> dict[str, Any]:
    """A run directory's config.json as a dict; ``ValueError`` naming the file if absent or malformed."""
    path = Path(path) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"run: {path} does not exist (not an hwsplit run directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"run: {path} is not readable JSON ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"run: {path} does not hold a JSON object")
    return data


#: Fields a pruning baseline's config.json adds to a grow config (hwsplit.run.prune).
PRUNE_FIELDS = ("baseline", "prune")


def load_config(out: str | Path, *, purpose: str = "resume", accept: tuple[str, ...] = ()) -> GrowConfig:
    """The :class:`GrowConfig` of a grow run directory's config.json (``purpose`` prefixes messages).

    ``accept`` names baselines taken too (``("prune",)``: a pruning baseline's settings are its source
    run's, which ``finetune`` reuses); any other baseline is a ``ConfigError``.
    """
    data = read_config(out)
    if data.get("baseline") and data.get("baseline") not in accept:
        raise ConfigError(f"{purpose}: {out} is a {data['baseline']} baseline, not a grow run")
    extra = (RUN_INFO_WORLD_SIZE, RUN_INFO_PREPROCESSING)
    if data.get("baseline") == "prune":
        extra += PRUNE_FIELDS
    data = {**LEGACY_FIELDS, **{k: v for k, v in data.items() if k not in extra}}
    return GrowConfig.from_dict(data, source=f"{purpose}: {Path(out) / 'config.json'}")


def config_like(run: str | Path | None, overrides: Mapping[str, Any]) -> GrowConfig:
    """A config taking every field from the grow run ``run`` (or the defaults), then ``overrides``.

    ``model_options`` given in ``overrides`` are merged into the run's (so ``width_mult`` alone
    keeps its ``config``); any other field replaces the run's.
    """
    base = (load_config(run, purpose="like").to_dict() if run is not None else GrowConfig().to_dict())
    fields = dict(base)
    for key, value in overrides.items():
        if key == "model_options" and run is not None:
            fields[key] = {**base.get(key, {}), **value}
        else:
            fields[key] = value
    return GrowConfig.from_dict(fields)


__all__ = ["COSTS", "FINAL_INITS", "LEGACY_FIELDS", "MAX_CHANNEL_MULTIPLE", "PROFILED_COSTS", "PRUNE_FIELDS", "RECIPES",
           "RUN_INFO_PREPROCESSING", "RUN_INFO_WORLD_SIZE", "GrowConfig", "config_like", "load_config", "parse_budget",
           "read_config", "recipe_settings", "resolve_channel_multiple", "stage_epochs_in_all"]
