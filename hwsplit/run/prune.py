"""The pruning baseline: train a wide network, prune it to each target cost with Torch-Pruning, fine-tune.

What engineers do today to get a network under a device budget (Torch-Pruning, NNI, NetAdapt), and
what the splitting paper compares its grown networks with (Wang et al. 2019, §5: network slimming
and L1 filter norms). :func:`prune_baseline` takes a grow run ``RUN`` and

1. trains a *wide* network of RUN's family: its seed scaled by a width multiplier chosen so that every
   layer is at least as wide as in every grown stage (:func:`wide_width_mult`), for what a grow run
   spends on its final network unless told otherwise. ``slimming`` adds the L1 penalty
   λ Σ |γ| on every BatchNorm scale to the loss (Liu et al., "Learning Efficient Convolutional Networks
   through Network Slimming", ICCV 2017, eq. 1: L = Σ l(f(x), y) + λ Σ_γ g(γ), g = |·|);
2. prunes a copy of it to each target cost — by default the cost of each stage of RUN, in RUN's own
   cost model (MACs, table latency or energy; the model ``--budget`` is measured with) — with
   ``torch_pruning.pruner.MetaPruner`` (global ranking, the classifier's outputs kept, channel counts
   rounded to RUN's ``channel_multiple`` with its ``round_to``) and the importance of the method:
   ``l1`` group L1 norm of the weights (``MagnitudeImportance(p=1)``; Li et al. 2017), ``slimming``
   the BatchNorm scales (``BNScaleImportance``), ``taylor`` the first-order Taylor term |w · ∂L/∂w|
   (``GroupTaylorImportance``; Molchanov et al. 2019) from gradients on training batches.
   Torch-Pruning's dependency graph removes a pointwise channel together with everything that
   channel feeds: its BatchNorm, the next depthwise convolution's channel (and its BatchNorm) and
   the next pointwise convolution's input column, so a pruned MobileNet stays a MobileNet;
3. fine-tunes every pruned network on RUN's schedule (``finetune_epochs``, default RUN's epochs per
   stage) and, with ``from_scratch``, also retrains every pruned architecture from a fresh
   initialisation into ``OUT/retrain/`` (:func:`hwsplit.run.finetune.finetune`; Liu et al., "Rethinking
   the Value of Network Pruning", ICLR 2019).

**Hitting a target.** Torch-Pruning prunes by ratio. :func:`prune_to_cost` walks from the wide
network in steps that each remove ``STEP_RATIO`` of the prunable channels left (ranked globally,
importance re-estimated after each step) while the result stays above the target, then bisects the
ratio of the last step so that the cost lands at or under the target and, where the channel steps
allow it, within ``TOLERANCE`` (2 %) of it (one channel of a layer on a large feature map can cost
more than that: then the least important channels, one by one in layers cheap enough, make the last fit). A target
below the cost of the network with every prunable layer at its minimum width (1 channel, or the
channel multiple) is a ``ConfigError``.

**Run directory** (:mod:`hwsplit.run.rundir`, so ``report``, ``finetune``, ``export``, ``summary`` and the
plots take it like any other run): ``config.json`` (RUN's settings plus ``"baseline": "prune"`` and
``"prune"``: source, method, wide multiplier, epochs, targets, ...), ``stages.jsonl`` — stage 0 the
trained wide network, stage k the network pruned to target k and fine-tuned — with grow's record
keys plus ``method``, ``wide_width_mult``, ``target_cost``, ``pruned_top1_before_finetune``
(``pruned_val_top1_before_finetune`` with a validation split), ``epochs`` (this record's training),
``epochs_in_all``/``train_samples_in_all`` (everything the path cost: the wide network's training
counts for pruning as growth's scoring counts for splitting) and ``search_epochs``/
``search_train_samples`` (the wide network's share, which a retraining from scratch also carries).
Every stage is durable (checkpoint, then record; a training's state after every epoch); the same command
again after a kill (even SIGKILL) continues after the last completed stage (a training from its last
epoch) with the same weights as an uninterrupted run on the CPU.
See docs/design.md §5.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwsplit.infra.errors import ConfigError, CostOutOfRange
from hwsplit.infra.fsio import check_writable_name
from hwsplit.network.checkpoint import load_checkpoint
from hwsplit.network.models import architecture, model_from_architecture
from hwsplit.run.config import (
    RUN_INFO_PREPROCESSING,
    RUN_INFO_WORLD_SIZE,
    GrowConfig,
    load_config,
    stage_epochs_in_all,
)
from hwsplit.run.finetune import RETRAIN_DIR, finetune
from hwsplit.run.guard import guarded_records, kill_point
from hwsplit.run.rundir import RunDir, continue_or_start, write_summary
from hwsplit.run.session import Session, open_session, stage_seed
from hwsplit.run.stages import record_stage
from hwsplit.training.train import evaluate, seed_everything

log = logging.getLogger(__name__)

#: The default wide network is said to be oversized (a warning) above this multiple of the largest target's cost.
WIDE_WARN_RATIO = 8.0

PRUNE_BASELINE = "prune"
METHODS = ("l1", "slimming", "taylor")
#: Families whose pruned networks hwsplit can describe and rebuild (widths per layer).
PRUNABLE_FAMILIES = ("mobilenet_v1", "mobilenet_v1_cifar", "mlp")
#: Network slimming's default L1 coefficient on the BatchNorm scales (Liu et al. 2017 use 1e-4 to 1e-5).
DEFAULT_SLIMMING_L1 = 1e-4
#: A pruned network's cost lands in [(1 - TOLERANCE) · target, target] where the channel steps allow.
TOLERANCE = 0.02
#: Share of the prunable channels left that one pruning step removes (importance re-estimated after each).
STEP_RATIO = 0.1
#: Largest share of a layer's channels (of the wide network) pruning may remove (Torch-Pruning's
#: ``max_pruning_ratio`` and its default, 1: a layer keeps at least one channel, or the channel multiple).
#: At large reductions global ranking then leaves layers of one or two channels, bottlenecks that
#: fine-tuning may not recover from (l1 and Taylor on digits at 19x fewer MACs, BENCHMARKS.md): a smaller
#: ratio keeps every layer at (1 - ratio) of its wide width.
MAX_PRUNING_RATIO = 1.0
#: Training batches whose gradients the Taylor importance averages at each step.
TAYLOR_BATCHES = 8
_BISECTIONS = 24
# the pruned stages' seeds and data order are far from grow's and finetune's
_SEED_OFFSET = 700


def _importance(method: str) -> Any:
    import torch_pruning as tp

    if method == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if method == "slimming":
        return tp.importance.BNScaleImportance()
    if method == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")


def slimming_loss(model: nn.Module, coefficient: float, *, label_smoothing: float = 0.0) -> Callable:
    """Cross entropy plus ``coefficient`` · Σ |γ| over every BatchNorm scale γ of ``model`` (Liu et al.
    2017, eq. 1); its gradient adds ``coefficient`` · sign(γ), network slimming's sub-gradient step."""
    ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    scales = [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ce(logits, labels) + coefficient * sum(s.abs().sum() for s in scales)

    return loss


def _layer_widths(session: Session, model: nn.Module) -> dict[str, int]:
    return {g.name: g.width for g in session.trace(model) if g.splittable}


def wide_width_mult(session: Session, config: GrowConfig, records: Sequence[dict[str, Any]]) -> float:
    """The smallest multiple of 0.5 above every grown stage's widest layer / seed layer ratio whose seed,
    so scaled (and rounded to the channel multiple), is at least as wide as every stage in every layer."""
    seed = _layer_widths(session, session.seed_network())
    most: dict[str, int] = {}
    for r in records:
        for name, width in (r.get("widths") or {}).items():
            most[name] = max(most.get(name, 0), int(width))
    ratio = max([most[n] / seed[n] for n in most if n in seed] or [1.0])
    mult = math.floor(ratio * 2) / 2 + 0.5
    for _ in range(64):
        wide = _layer_widths(session, session.seed_network(width_mult=mult))
        if all(wide.get(n, 0) >= w for n, w in most.items() if n in seed):
            return mult
        mult += 0.5
    raise ConfigError(f"width_mult: no multiplier up to {mult:g} makes the seed as wide as every stage of the run")


def minimum_widths_model(model: nn.Module, max_pruning_ratio: float, unit: int) -> nn.Module:
    """``model``'s architecture with every prunable layer at its :func:`layer_floor`: the smallest network
    pruning can reach."""
    arch = architecture(model)
    if "stem_width" in arch:
        arch["stem_width"] = layer_floor(arch["stem_width"], max_pruning_ratio, unit)
    arch["widths"] = [layer_floor(w, max_pruning_ratio, unit) for w in arch["widths"]]
    return model_from_architecture(arch)


def _taylor_gradients(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      device: torch.device) -> dict[str, torch.Tensor]:
    """∂L/∂w of the mean cross entropy over ``batches`` (eval mode: BatchNorm at its running statistics)."""
    was = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    ce = nn.CrossEntropyLoss()
    with torch.enable_grad():
        for x, y in batches:
            (ce(model(x.to(device)), y.to(device)) / len(batches)).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.train(was)
    return grads


class _TieBreak:
    """A Torch-Pruning importance with exact ties broken by channel index (lowest index least important,
    by one part in 10⁶), so that equal scores (BatchNorm scales at their initial 1) rank deterministically
    and a global threshold never takes every channel of a layer at once."""

    def __init__(self, importance: Any) -> None:
        self.importance = importance

    def __call__(self, group: Any) -> torch.Tensor | None:
        imp = self.importance(group)
        if imp is None:
            return None
        scale = imp.abs().max().clamp_min(1e-12)
        return imp + 1e-6 * scale * torch.linspace(0, 1, len(imp), device=imp.device, dtype=imp.dtype)


def _copy_with_grads(model: nn.Module, grads: dict[str, torch.Tensor] | None) -> nn.Module:
    out = copy.deepcopy(model).eval()
    if grads is not None:
        for name, p in out.named_parameters():
            p.grad = grads[name].clone() if name in grads else None
    return out


def _rebuilt(pruned: nn.Module, device: torch.device) -> nn.Module:
    """The pruned modules as a plain hwsplit model: its architecture must describe them exactly."""
    pruned.zero_grad(set_to_none=True)
    return model_from_architecture(architecture(pruned), pruned.state_dict()).to(device)


def layer_floor(width: int, max_pruning_ratio: float, unit: int) -> int:
    """The fewest channels pruning leaves a layer of ``width`` (in the wide network): (1 − ratio) · width
    rounded up to a multiple of ``unit`` (the channel multiple, or 1), at least ``unit``, at most ``width``."""
    return min(width, max(unit, math.ceil((1 - max_pruning_ratio) * width / unit) * unit))


def _floors(model: nn.Module, max_pruning_ratio: float, unit: int) -> dict[str, int]:
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: layer_floor(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features, max_pruning_ratio,
                                  unit) for m, _, _ in _prunable_layers(model)}


def _prune_step(model: nn.Module, ratio: float, *, method: str, example: torch.Tensor, round_to: int | None,
                grads: dict[str, torch.Tensor] | None, floors: dict[str, int] | None = None) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of its prunable channels removed by one global Torch-Pruning step,
    no layer below its ``floors`` (by module name; the least important channels of a layer go first)."""
    import torch_pruning as tp

    pruned = _copy_with_grads(model, grads)
    names = {m: n for n, m in pruned.named_modules()}
    classifier = getattr(pruned, "classifier", None)
    score = _TieBreak(_importance(method))
    # a layer at its floor leaves the ranking, or its channels would hold the global threshold down
    full = [m for m, _, _ in _prunable_layers(pruned)
            if (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) <= (floors or {}).get(names[m], 1)]
    pruner = tp.pruner.MetaPruner(pruned, example, importance=score, global_pruning=True,
                                  pruning_ratio=float(ratio), round_to=round_to,
                                  ignored_layers=full + ([classifier] if classifier is not None else []))
    for group in pruner.step(interactive=True):
        dep, idxs = group[0]
        module, fn = dep.target.module, dep.handler
        width = pruner.DG.get_out_channels(module)
        most = width - (floors or {}).get(names.get(module, ""), 1)
        if len(idxs) > most:
            if most <= 0:
                continue
            imp = score(pruner.DG.get_pruning_group(module, fn, list(range(width))))
            idxs = sorted(idxs, key=lambda i: float(imp[i]))[:most]
            group = pruner.DG.get_pruning_group(module, fn, idxs)
        group.prune()
    return _rebuilt(pruned, example.device)


def _prunable_layers(model: nn.Module) -> list[tuple[nn.Module, str, int | None]]:
    """Every layer whose output channels pruning removes: (module, architecture key, index in it)."""
    family = architecture(model)["family"]
    if family == "mobilenet_v1":
        return [(model.stem.conv, "stem_width", None)] + [(b.pw.conv, "widths", i) for i, b in enumerate(model.blocks)]
    if family == "mlp":
        return [(h.fc, "widths", i) for i, h in enumerate(model.hidden)]
    raise ConfigError(f"model: pruning supports {', '.join(PRUNABLE_FAMILIES)}, not {family}")


def _fit_greedily(model: nn.Module, target: float, cost: Callable[[nn.Module], float], *, method: str,
                  example: torch.Tensor, round_to: int | None, grads: dict[str, torch.Tensor] | None,
                  tolerance: float, floors: dict[str, int] | None = None) -> nn.Module | None:
    """The last fit when the global ranking cannot land close enough (one channel of a layer on a large map
    can cost more than the tolerance): from ``model`` (just above ``target``), remove the least important
    channels first (the method's importance, normalised per group as the global ranking is; ``round_to``
    of a layer at a time), skipping a layer for good once its next channels would take the cost under
    ``(1 - tolerance) · target``, until the cost is at or under ``target``; None when it cannot land
    within the tolerance."""
    import torch_pruning as tp

    base = _copy_with_grads(model, grads)
    names = {m: n for n, m in base.named_modules()}
    graph = tp.DependencyGraph().build_dependency(base, example_inputs=example)
    score = _TieBreak(_importance(method))
    arch = architecture(base)
    unit = round_to or 1
    floor = [max(unit, (floors or {}).get(names[m], 1)) for m, _, _ in _prunable_layers(base)]
    layers = []  # (module, pruning function, architecture key, index, channels least important first, importance)
    for module, key, index in _prunable_layers(base):
        fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
        width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        imp = score(graph.get_pruning_group(module, fn, list(range(width))))
        if imp is not None:
            order = torch.argsort(imp)
            layers.append((module, fn, key, index, order.tolist(), imp[order].tolist()))
    removed = [0] * len(layers)
    open_ = set(range(len(layers)))
    current = cost(base)

    def next_unit(i: int) -> float:
        chunk = layers[i][5][removed[i]:removed[i] + unit]
        return sum(chunk) / len(chunk)

    while current > target and open_:
        candidates = [i for i in open_ if len(layers[i][4]) - removed[i] - unit >= floor[i]]
        if not candidates:
            break
        i = min(candidates, key=next_unit)
        _, _, key, index, order, _ = layers[i]
        trial = copy.deepcopy(arch)
        width = len(order) - removed[i] - unit
        if index is None:
            trial[key] = width
        else:
            trial[key][index] = width
        c = cost(model_from_architecture(trial))
        if c < (1 - tolerance) * target:
            open_.discard(i)  # this layer's channels are too dear for what is left: every other one of it too
            continue
        arch, current, removed[i] = trial, c, removed[i] + unit
    if current > target or current < (1 - tolerance) * target:
        return None
    for (module, fn, _, _, order, _), k in zip(layers, removed):
        if k:
            graph.get_pruning_group(module, fn, order[:k]).prune()
    return _rebuilt(base, example.device)


def prune_to_cost(model: nn.Module, target: float, cost: Callable[[nn.Module], float], *, method: str,
                  example: torch.Tensor, round_to: int | None = None,
                  batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                  tolerance: float = TOLERANCE, step_ratio: float = STEP_RATIO,
                  max_pruning_ratio: float = MAX_PRUNING_RATIO) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``model`` (not modified) with Torch-Pruning until ``cost(model)`` ≤ ``target``; the pruned model
    and ``{"cost", "steps", "gradient_samples", "within_tolerance"}``.

    Steps of ``step_ratio`` of the prunable channels left (global ranking by ``method``'s importance,
    re-estimated after every step; ``taylor`` from the gradients of ``batches``) while the result stays
    above the target; then the ratio of the last step is bisected so the cost lands at or under the
    target, as close as the global ranking allows; when that is still more than ``tolerance`` under it,
    the least important channels are removed one by one from the closest network above the target,
    skipping layers whose channels cost too much for what is left (:func:`_fit_greedily`), if that
    lands within it. ``ConfigError`` (naming
    ``targets``) when no step removes anything while the cost is still above the target. No layer loses
    more than ``max_pruning_ratio`` of its channels in ``model`` (:func:`layer_floor`).
    """
    device = example.device
    floors = _floors(model, max_pruning_ratio, round_to or 1)
    current, steps, samples = model, 0, 0
    while True:
        before = cost(current)
        if before <= target:
            break
        grads = None
        if method == "taylor":
            grads = _taylor_gradients(current, batches, device)
            samples += sum(len(y) for _, y in batches)
        ratio = step_ratio
        for _ in range(8):  # a step that would empty a whole layer skips it: smaller steps then
            step = _prune_step(current, ratio, method=method, example=example, round_to=round_to, grads=grads,
                               floors=floors)
            after = cost(step)
            if after < before:
                break
            ratio /= 2
        else:
            raise ConfigError(f"targets: {target:.6g} is below what {method} pruning reaches ({before:.6g}: no "
                              "channel can be removed any more)")
        steps += 1
        if after > target:
            current = step
            continue
        # the last step crossed the target: the smallest ratio of it that still lands at or under it
        lo, hi, best, best_cost, above = 0.0, ratio, step, after, current
        for _ in range(_BISECTIONS):
            if best_cost >= (1 - tolerance / 4) * target or hi - lo < 1e-5:
                break
            mid = (lo + hi) / 2
            candidate = _prune_step(current, mid, method=method, example=example, round_to=round_to, grads=grads,
                                    floors=floors)
            c = cost(candidate)
            if c <= target:
                hi, best, best_cost = mid, candidate, c
            else:
                lo, above = mid, candidate
        if best_cost < (1 - tolerance) * target:  # from the closest network above the target
            if method == "taylor" and above is not current:
                grads = _taylor_gradients(above, batches, device)
                samples += sum(len(y) for _, y in batches)
            fitted = _fit_greedily(above, target, cost, method=method, example=example, round_to=round_to,
                                   grads=grads, tolerance=tolerance, floors=floors)
            if fitted is not None:
                best = fitted
        current = best
        break
    final = cost(current)
    within = final >= (1 - tolerance) * target
    if not within:
        log.warning("pruned to %.6g, %.1f %% under the target %.6g: the channel steps%s allow no closer fit", final,
                    100 * (1 - final / target), target, f" (multiples of {round_to})" if round_to else "")
    return current, {"cost": final, "steps": steps, "gradient_samples": samples, "within_tolerance": within}


def parse_targets(text: str | Sequence[float], unit: str) -> list[float]:
    """``"20k,35k"`` (or numbers) as target costs in the cost model's ``unit``; ``ConfigError`` naming
    ``targets``."""
    from hwsplit.run.config import parse_budget

    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    if not items or any(item == "" for item in items):
        raise ConfigError(f"targets: expected comma-separated costs with their unit, got {text!r}")
    out = []
    for item in items:
        try:
            out.append(parse_budget(item, unit))
        except ValueError as err:
            raise ConfigError(f"targets: {str(err).removeprefix('budget: ')}") from None
    return out


def prune_baseline(run: str | Path, *, method: str, out: str | Path | None = None, width_mult: float | None = None,
                   train_epochs: int | None = None, finetune_epochs: int | None = None,
                   targets: str | Sequence[float] | None = None, from_scratch: bool = False,
                   slimming_l1: float = DEFAULT_SLIMMING_L1, max_pruning_ratio: float = MAX_PRUNING_RATIO,
                   overwrite: bool = False, progress: Callable | None = None,
                   on_stage: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train a wide network of the grow run ``run``'s family, prune it to each target, fine-tune; see the module.

    ``targets``: costs in ``run``'s cost unit, or text with their unit (``"20k,35k"``, ``"0.2ms"``:
    :func:`parse_targets` in the run's cost model; default: each stage's recorded cost). ``out`` defaults to
    ``RUN/prune-METHOD``; an ``out`` holding the same pruning (same config.json) is continued, another is
    replaced only with ``overwrite=True``. Returns the records (stage 0 the wide network). Raises
    ``ConfigError`` before anything is written for a bad method, family, epoch count or target (a
    target at or above the wide network's cost, or below the smallest network pruning can reach) and
    :class:`~hwsplit.run.rundir.StageFailed` when a stage cannot complete.
    """
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    for name, value in (("train_epochs", train_epochs), ("finetune_epochs", finetune_epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    if width_mult is not None and not (isinstance(width_mult, (int, float)) and width_mult > 0):
        raise ConfigError(f"width_mult: expected a positive number, got {width_mult!r}")
    if not (isinstance(max_pruning_ratio, (int, float)) and 0 < max_pruning_ratio <= 1):
        raise ConfigError(f"max_pruning_ratio: expected a number in (0, 1], got {max_pruning_ratio!r}")
    if not (isinstance(slimming_l1, (int, float)) and math.isfinite(slimming_l1) and slimming_l1 >= 0):
        raise ConfigError(f"slimming_l1: expected a finite number >= 0, got {slimming_l1!r}")
    src = RunDir(run)
    config = load_config(src.path, purpose="like")
    if config.model not in PRUNABLE_FAMILIES:
        raise ConfigError(f"model: pruning supports {', '.join(PRUNABLE_FAMILIES)}, not {config.model}")
    source_records = [r for r in src.records() if isinstance(r.get("stage"), int)]
    if not source_records:
        raise ConfigError(f"like: {src.path} has no completed stage to take targets and widths from")
    session = open_session(config)
    unit = session.cost_model.unit
    if isinstance(targets, str):  # in the unit of the run's cost model, built once with the session
        targets = parse_targets(targets, unit)
    round_to = session.channel_multiple
    mult = wide_width_mult(session, config, source_records) if width_mult is None else float(width_mult)
    wide = session.seed_network(width_mult=mult)
    wide_cost = session.cost_model.total(wide, session.input_shape)
    given = targets is not None
    targets = [float(t) for t in (targets if given else [r["cost"]["value"] for r in source_records])]
    if width_mult is None and targets and wide_cost > WIDE_WARN_RATIO * max(targets):
        log.warning("the wide network (width ×%g, by the rule: as wide as every grown stage in every layer) costs "
                    "%.1f× the largest target (%.4g %s): its training is about as many times a target's; give "
                    "--width-mult to prune from a narrower one", mult, wide_cost / max(targets), wide_cost, unit)
    bad = [t for t in targets if not (math.isfinite(t) and 0 < t < wide_cost)]
    if bad:
        raise ConfigError(f"targets: {bad[0]:.6g} {unit} is not below the wide network's cost ({wide_cost:.6g} "
                          f"{unit} at width ×{mult:g}); give a larger --width-mult")
    try:
        floor = session.cost_model.total(minimum_widths_model(wide, max_pruning_ratio, round_to or 1),
                                         session.input_shape)
    except CostOutOfRange:  # a table that cannot price the smallest network: the search says it if needed
        floor = None
    if floor is not None and min(targets) < floor:
        raise ConfigError(f"targets: {min(targets):.6g} {unit} is below what pruning can reach ({floor:.6g} {unit}: "
                          f"every layer at {100 * (1 - max_pruning_ratio):g} % of the wide network's width, at least "
                          f"{round_to or 1} channel(s); see --max-pruning-ratio)")
    epochs_wide = train_epochs if train_epochs is not None else stage_epochs_in_all(config, config.stages)
    epochs_ft = finetune_epochs if finetune_epochs is not None else config.epochs
    dest = RunDir(out if out is not None else prune_dir(src.path, method))
    check_writable_name(dest.summary)
    info = {**config.to_dict(), "baseline": PRUNE_BASELINE, RUN_INFO_WORLD_SIZE: 1,
            "prune": {"source": str(src.path.resolve()), "method": method, "wide_width_mult": mult,
                      "train_epochs": epochs_wide, "finetune_epochs": epochs_ft, "targets": targets,
                      "targets_from": "given" if given else "stages of the source run",
                      "source_stages": None if given else [r["stage"] for r in source_records],
                      "slimming_l1": slimming_l1 if method == "slimming" else None, "round_to": round_to,
                      "max_pruning_ratio": max_pruning_ratio,
                      "tolerance": TOLERANCE, "step_ratio": STEP_RATIO, "torch_pruning": _torch_pruning_version()},
            RUN_INFO_PREPROCESSING: session.preprocessing}
    with dest.lock("prune"):
        records = continue_or_start(dest, info, overwrite=overwrite)
        records = _stages(dest, config, session, records, info["prune"], progress=progress, on_stage=on_stage)
    if from_scratch:
        finetune(dest.path, epochs=epochs_ft, stages=list(range(1, len(records))), from_scratch=True,
                 session=session, progress=progress, on_stage=on_stage, kind=RETRAIN_DIR)
    return records


def prune_dir(run: str | Path, method: str) -> Path:
    """Where :func:`prune_baseline` writes when given no ``out``: ``RUN/prune-METHOD``."""
    return Path(run) / f"prune-{method}"


def _torch_pruning_version() -> str:
    import torch_pruning as tp

    return str(getattr(tp, "__version__", "unknown"))


def _stages(dest: RunDir, config: GrowConfig, session: Session, records: list[dict[str, Any]], prune: dict[str, Any],
            *, progress: Callable | None, on_stage: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    method, mult, targets = prune["method"], prune["wide_width_mult"], prune["targets"]
    n_train = len(session.bundle.train)
    epochs_wide, epochs_ft = prune["train_epochs"], prune["finetune_epochs"]
    title = f"{method} pruning of {config.model} ×{mult:g} to {len(targets)} target(s)"
    common = {"method": method, "wide_width_mult": mult, "split": {}, "neurons_split": 0,
              "search_epochs": epochs_wide}
    index = len(records)
    with guarded_records(dest, config, records, where=lambda: (index, "the wide network" if index == 0 else
                                                                f"target {index}"),
                         noun="stage", resume="run the same command again to continue", title=title):
        if not records:
            kill_point("prune-0:start")
            seed_everything(stage_seed(config, 0))
            wide = session.seed_network(width_mult=mult).to(session.device)
            loss_fn = (slimming_loss(wide, prune["slimming_l1"], label_smoothing=config.label_smoothing)
                       if method == "slimming" else None)
            samples = epochs_wide * n_train
            record_stage(dest, session, wide, 0, records, config=config, epochs=epochs_wide, loader_epoch=0,
                         extra={**common, "epochs": epochs_wide, "epochs_in_all": epochs_wide,
                                "train_samples_in_all": samples, "search_train_samples": samples,
                                **({"slimming_l1": prune["slimming_l1"]} if loss_fn else {})},
                         title=title, loss_fn=loss_fn, progress=progress, on_stage=on_stage)
        payload = load_checkpoint(dest.checkpoint(0))  # every target prunes the wide network as written
        wide = model_from_architecture(payload["architecture"], payload["state_dict"]).to(session.device).eval()
        wide_samples = records[0]["search_train_samples"]
        example = torch.zeros(session.input_shape, device=session.device)
        for index in range(len(records), len(targets) + 1):
            kill_point(f"prune-{index}:start")
            target = targets[index - 1]
            seed_everything(stage_seed(config, _SEED_OFFSET + index))
            batches = _taylor_batches(session, index) if method == "taylor" else []
            pruned, found = prune_to_cost(wide, target, lambda m: session.cost_model.total(m, session.input_shape),
                                          method=method, example=example, round_to=prune["round_to"],
                                          batches=batches, max_pruning_ratio=prune["max_pruning_ratio"])
            before = evaluate(pruned, session.test_loader, device=session.device)
            val = (evaluate(pruned, session.val_loader, device=session.device)
                   if session.val_loader is not None else None)
            if not all(math.isfinite(v) for v in (before["loss"], before["top1"])):
                raise FloatingPointError(f"the network pruned to {target:.6g} gives non-finite outputs")
            search = wide_samples + found["gradient_samples"]
            extra = {**common, "target_cost": target, "within_tolerance": found["within_tolerance"],
                     "pruning_steps": found["steps"],
                     "pruned_top1_before_finetune": before["top1"], "pruned_loss_before_finetune": before["loss"],
                     **({"pruned_val_top1_before_finetune": val["top1"]} if val else {}),
                     **({"target_stage": prune["source_stages"][index - 1]} if prune["source_stages"] else {}),
                     "epochs": epochs_ft, "epochs_in_all": epochs_wide + epochs_ft,
                     "search_train_samples": search, "train_samples_in_all": search + epochs_ft * n_train}

            def announce(record: dict[str, Any], target: float = target, before: dict[str, Any] = before) -> None:
                log.info("%s pruning to %.6g: %.6g (before fine-tuning top-1 %.4f, after %.4f)", method, target,
                         record["cost"]["value"], before["top1"], record["test_top1"])

            record_stage(dest, session, pruned, index, records, config=config, epochs=epochs_ft,
                         loader_epoch=(_SEED_OFFSET + index) * 10_000, extra=extra, title=title, progress=progress,
                         announce=announce, on_stage=on_stage)
    write_summary(dest, config, records, status="done", title=title)
    return records


def _taylor_batches(session: Session, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first :data:`TAYLOR_BATCHES` training batches of a loader epoch derived from ``index``."""
    loader = session.train_loader
    if hasattr(loader, "set_epoch"):
        loader.set_epoch((_SEED_OFFSET + index) * 10_000 + 5_000)
    out = []
    for x, y in loader:
        out.append((x, y))
        if len(out) == TAYLOR_BATCHES:
            break
    return out


__all__ = ["DEFAULT_SLIMMING_L1", "MAX_PRUNING_RATIO", "METHODS", "PRUNABLE_FAMILIES", "PRUNE_BASELINE", "STEP_RATIO",
           "TOLERANCE", "layer_floor", "minimum_widths_model", "parse_targets", "prune_baseline", "prune_dir",
           "prune_to_cost", "slimming_loss", "wide_width_mult"]
