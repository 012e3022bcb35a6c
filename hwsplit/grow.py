"""The stage loop (docs/design.md §5):

    stage 0: train the seed
    stage k: splitting indices → marginal costs on the current architecture → budget
             → selection (by name, hwsplit.select.SELECTIONS) → fit the plan to the budget → split → train

The run directory's format is :mod:`hwsplit.rundir`'s; what a stage shares with the other
commands (session, training and recording, durable writes) is :mod:`hwsplit.stages`'s; the
settings are a :class:`~hwsplit.config.GrowConfig`.

**Determinism and resume.** Each stage starts from the previous stage's weights (in memory, or
read back from ``stage-K.pt``) and re-seeds every random number generator with
:func:`~hwsplit.stages.stage_seed`; its data order comes from loader epochs derived from the stage
number and its Rayleigh-quotient start from ``seed + stage``. Nothing random carries over from one
stage to the next, so a run resumed after a crash at any moment (``grow(..., resume=True)``)
continues after its last completed stage and ends, on the CPU, with the same per-stage
architectures and weights as an uninterrupted run. A checkpoint without a record is redone.

**One trace per stage.** The model's neuron groups are traced once after each split (or for the
seed) and passed to the record, the next stage's scoring and the cost model's marginals, so all
three see the same group names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwsplit.blocks import select_blocks
from hwsplit.checkpoint import load_checkpoint, load_model
from hwsplit.config import RUN_INFO_WORLD_SIZE, GrowConfig, load_config, parse_budget, resolve_channel_multiple
from hwsplit.distributed import all_ranks_true, broadcast_object, is_main, world_size
from hwsplit.errors import ConfigError
from hwsplit.fsio import atomic_write_json, check_writable_name
from hwsplit.models import model_from_architecture
from hwsplit.parallel import on_main
from hwsplit.rundir import RunDir, StageFailed, WriteFailed, stage_table, start_fresh, write_summary
from hwsplit.score import SplitScore, decided, splitting_indices
from hwsplit.select import knapsack_cut, select_by_name
from hwsplit.stages import (
    Progress,
    Session,
    build_seed,
    guarded_records,
    kill_point,
    open_session,
    stage_seed,
    train_and_record,
    write_stage,
)
from hwsplit.surgery import apply_split
from hwsplit.train import evaluate, seed_everything

log = logging.getLogger(__name__)

STOP_STAGES = "stages done"
STOP_NO_NEGATIVE = "no neuron has a negative splitting index"
STOP_BUDGET = "budget reached"


def _resume_preflight(run: RunDir, config: GrowConfig) -> None:
    """Refuse a resume that cannot work, before anything in ``run`` is touched."""
    if not run.config.exists():
        raise ConfigError(f"resume: {run.path} has no config.json (nothing to resume; start a new run)")
    saved = load_config(run.path)
    for f in dataclasses.fields(GrowConfig):
        if f.name != "stages" and getattr(saved, f.name) != getattr(config, f.name):
            raise ConfigError(f"resume: {f.name} differs from {run.config} ({getattr(saved, f.name)!r} there, "
                              f"{getattr(config, f.name)!r} here)")
    done = len(run.records()) - 1  # growth stages completed after the seed
    if config.stages < done:
        raise ConfigError(f"stages: {config.stages} is fewer than the {done} growth stage(s) {run.path} has "
                          "completed (--stages may only extend a run)")


def check_seed_cost(session: Session, model: nn.Module) -> float:
    """The seed's cost under the run's cost model; ``ConfigError`` when it cannot be right or when the
    budget leaves nothing to grow (both before anything is written)."""
    config, cost_model = session.config, session.cost_model
    total = cost_model.total(model, session.input_shape)
    source = f" from the profile {config.profile}" if config.profile else ""
    if not (math.isfinite(total) and total > 0):
        raise ConfigError(f"cost: the {cost_model.name} cost model{source} prices the seed network at {total:.4g} "
                          f"{cost_model.unit}; a network cannot cost <= 0 (the profile does not fit networks "
                          "this small: profile the device again, or use --cost flops)")
    if config.budget is not None and config.budget <= total:
        raise ConfigError(f"budget: {config.budget:.4g} {cost_model.unit} is not above the seed's own cost "
                          f"({total:.4g} {cost_model.unit}{source}); nothing could grow")
    return total


def _check_resume(run: RunDir, config: GrowConfig) -> list[dict[str, Any]]:
    """Make ``run`` consistent for resuming: the records of completed stages, stale files removed."""
    for tmp in run.temporaries():
        log.info("removing %s, left by an interrupted write", tmp.name)
        tmp.unlink()
    records = run.records()
    checkpoints = run.checkpoints()
    kept: list[dict[str, Any]] = []
    for i, r in enumerate(records):
        if r.get("stage") != i or i not in checkpoints:
            break
        kept.append(r)
    if kept:  # the last completed stage's checkpoint is what the run continues from: it must load
        payload = load_checkpoint(checkpoints[len(kept) - 1])
        if payload["architecture"] != kept[-1]["architecture"]:
            raise ValueError(f"resume: {checkpoints[len(kept) - 1]} does not hold the architecture recorded for "
                             f"stage {len(kept) - 1} in {run.stages}")
    if len(kept) != len(records):
        log.warning("resume: keeping %d of the %d records in %s", len(kept), len(records), run.stages)
        run.write_records(kept)
    for k, p in checkpoints.items():
        if k >= len(kept):
            log.info("resume: removing %s (its stage did not complete)", p.name)
            p.unlink()
    return kept


def grow(config: GrowConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
         progress: Progress | None = None,
         on_stage: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run the stage loop, writing the run directory ``out``; returns the stage records.

    ``resume=True`` continues the run in ``out`` after its last completed stage (``config`` must
    equal its config.json except for ``stages``, which may extend it); without it, a previous run
    in ``out`` is replaced only with ``overwrite=True``, and a directory that holds files of the
    run format but no hwsplit run is never touched. Every input (data, model, cost model and
    profile, the seed's cost against the budget, path lengths) is checked before anything in
    ``out`` is written, and ``out`` is locked against a second writer (:class:`~hwsplit.errors.RunLocked`).
    ``progress`` wraps long loops (``progress(iterable, desc, total)``,
    e.g. tqdm); ``on_stage`` is called with each record as soon as the stage is on disk.

    Raises :class:`StageFailed` when a stage cannot complete — a non-finite training or scoring
    loss, or a failed write (disk full, permission) — after writing ``summary.md`` with the
    reason; the completed stages' checkpoints and records stay intact. ``KeyboardInterrupt``
    propagates after the same bookkeeping; no partial file is left behind.
    """
    run = RunDir(out)
    check_writable_name(run.summary)
    if config.data_dir is not None and not resume:  # resumable from any working directory
        config = dataclasses.replace(config, data_dir=str(Path(config.data_dir).resolve()))
    if resume:
        on_main(_resume_preflight, run, config)  # the run directory is rank 0's
    session = open_session(config)  # the data, the model's family and the cost model's profile must load
    resolve_channel_multiple(config)  # "auto" needs the profile's channel_block, before anything is written
    if not resume:
        seed_everything(stage_seed(config, 0))  # stage 0 re-seeds before it builds the same seed
        check_seed_cost(session, build_seed(config, session.bundle))
    # rank 0 alone locks and writes the run directory; the others get its records
    with run.lock("grow") if is_main() else contextlib.nullcontext():
        records = on_main(_prepare, run, config, resume=resume, overwrite=overwrite, share=True)
        return _stages(run, config, session, records, progress=progress, on_stage=on_stage)


def _prepare(run: RunDir, config: GrowConfig, *, resume: bool, overwrite: bool) -> list[dict[str, Any]]:
    """Make the locked ``run`` ready (resumed or fresh), write config.json; the completed stages' records."""
    if resume:
        records = _check_resume(run, config)
    else:
        start_fresh(run, overwrite=overwrite)
        records = []
    try:
        atomic_write_json(run.config, {**config.to_dict(), RUN_INFO_WORLD_SIZE: world_size()})
    except OSError as err:
        raise WriteFailed(f"could not write {run.config} ({err.strerror or err})") from None
    return records


def _stages(run: RunDir, config: GrowConfig, session: Session, records: list[dict[str, Any]], *,
            progress: Progress | None, on_stage: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    """The stage loop proper, on a locked, prepared run directory."""
    device, input_shape, cost_model = session.device, session.input_shape, session.cost_model
    train_loader, test_loader = session.train_loader, session.test_loader
    stop_reason = STOP_STAGES
    stage = len(records)
    multiple = resolve_channel_multiple(config)
    groups: list = []
    if records:  # every rank continues from rank 0's checkpoint (its directory need not be shared)
        payload = on_main(load_checkpoint, run.checkpoint(stage - 1), share=True)
        model = model_from_architecture(payload["architecture"], payload["state_dict"]).eval().to(device)
        groups = session.trace(model)
        log.info("resuming %s after stage %d", run.path, stage - 1)

    def finish_stage(stage: int, extra: dict[str, Any], timings: dict[str, float], epochs: int) -> dict[str, Any]:
        record = train_and_record(session, model, stage, epochs=epochs, loader_epoch=stage * 10_000,
                                  timings=timings, extra=extra, progress=progress, groups=groups,
                                  train_config=config.stage_train_config(stage))
        write_stage(run, session, model, record, records)
        write_summary(run, config, records, status="running")
        log.info("stage %d: test top-1 %.4f, %.4g MACs, %s %.4g %s", stage, record["test_top1"], record["macs"],
                 cost_model.name, record["cost"]["value"], cost_model.unit)
        if on_stage and is_main():
            on_stage(record)
        return record

    with guarded_records(run, config, records, where=lambda: (stage, f"stage {stage}"), noun="stage", prep="in",
                         resume=f"continue with `grow --resume {run.path}`"):
        if stage == 0:
            seed_everything(stage_seed(config, 0))
            model = build_seed(config, session.bundle).to(device)
            groups = session.trace(model)
            finish_stage(0, {"split": {}, "neurons_split": 0}, {}, config.seed_epochs or config.epochs)
            stage = 1

        first = stage
        for stage in range(first, config.stages + 1):
            seed_everything(stage_seed(config, stage))
            kill_point(f"stage-{stage}:start")
            timings: dict[str, float] = {}
            # the prices first: adaptive scoring stops by the knapsack's cut, which needs them
            t0 = time.perf_counter()
            total = cost_model.total(model, input_shape)
            marginal = cost_model.marginal(model, input_shape, groups=groups)
            budget = config.growth_ratio * total
            if config.budget is not None:
                budget = min(budget, config.budget - total)
            caps = config.max_layer_growth
            price_s = time.perf_counter() - t0

            def cut(eigenvalues: dict[str, torch.Tensor], budget: float = budget, marginal: dict = marginal,
                    caps: float | None = caps) -> dict[str, Any]:
                return knapsack_cut(eigenvalues, {k: marginal[k] for k in eigenvalues}, max(budget, 0.0), caps=caps)

            t0 = time.perf_counter()
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(stage * 10_000 - 1)
            scores = splitting_indices(model, train_loader, method=config.split_method, epochs=config.split_epochs,
                                       lr=config.split_lr, ritz_vectors=config.split_vectors,
                                       ritz_allocation=config.split_allocation, seed=config.seed + stage, groups=groups,
                                       progress=progress, adaptive=config.adaptive_scoring(cut))
            timings["score_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            eig = torch.cat([s.eigenvalues for s in scores.values()]) if scores else torch.zeros(0)
            if not bool(torch.isfinite(eig).all()):
                raise FloatingPointError("scoring: some splitting indices are not finite")
            n_negative = int((eig < 0).sum())
            scoring = scoring_record(config, scores, cut)
            raw_scores, n_candidates = scores, n_negative
            if config.split_candidates == "significant":  # λ not below 0 beyond its error bar: not a candidate
                scores = significant_scores(scores, config.scoring_z)
                n_candidates = scoring["significant_negative"]
            if n_candidates == 0 and config.selection != "random":
                stop_reason = STOP_NO_NEGATIVE
                break
            if budget <= 0:
                stop_reason = STOP_BUDGET
                break
            costs = {k: marginal[k] for k in scores}
            # the random baseline drops neurons from an over-budget plan in random order too
            rank = _random_rank([config.seed, stage, 1]) if config.selection == "random" else None
            def increase(p: dict[str, torch.Tensor], m: nn.Module = model, s: dict = scores,
                         t: float = total) -> float:
                return cost_model.total(apply_split(m, p, s, step=0.0), input_shape) - t

            blocks: dict[str, Any] = {}
            if multiple:  # per-layer multiples of N, priced at the widths they reach (hwsplit/blocks.py)
                plan, blocks = select_blocks(model, scores, groups, total=lambda m: cost_model.total(m, input_shape),
                                        current=total, budget=budget, multiple=multiple, caps=caps,
                                        method=config.selection, increase=increase)
            else:
                plan = select_by_name(config.selection, scores, costs, budget, caps=caps, seed=[config.seed, stage])
                if plan:
                    plan = fit_plan_to_budget(plan, scores, marginal, increase, budget, rank=rank)
            plan = _agreed_plan(plan)
            timings["select_s"] = time.perf_counter() - t0 + price_s
            if not plan:
                stop_reason = STOP_BUDGET if n_candidates or config.selection == "random" else STOP_NO_NEGATIVE
                break

            t0 = time.perf_counter()
            before = evaluate(model, test_loader, device=device)["loss"]
            model = apply_split(model, plan, scores, step=config.split_step).to(device)
            groups = session.trace(model)
            # what the split really cost (the cost model's total after minus before), not Σ marginals,
            # which over- or under-states it when costs are not additive (docs/design.md §4)
            realised = cost_model.total(model, input_shape) - total
            after = evaluate(model, test_loader, device=device)["loss"]
            timings["split_s"] = time.perf_counter() - t0
            kill_point(f"stage-{stage}:split")
            chosen = torch.cat([scores[k].eigenvalues[v] for k, v in plan.items()])
            extra = {
                "split": {k: int(v.numel()) for k, v in plan.items()},
                "neurons_split": int(sum(v.numel() for v in plan.values())),
                "selection": config.selection,
                **({"channel_multiple": multiple} if multiple else {}),
                "budget": {"value": budget, "unit": cost_model.unit,
                           "used": float(realised),
                           "marginal_sum": float(sum(marginal[k] * v.numel() for k, v in plan.items())),
                           # block growth: Σ of the chosen options' costs, which the grouped knapsack used
                           **({"option_cost_sum": blocks["cost_used"]} if blocks else {})},
                "eigenvalues": {
                    "min": float(eig.min()), "median": float(eig.median()), "negative": n_negative,
                    "count": int(eig.numel()),
                    "per_layer_min": {k: float(s.eigenvalues.min()) for k, s in raw_scores.items()},
                    "chosen_sum": float(chosen.sum()),
                },
                "scoring_images": scoring["images"],
                "scoring_decided": scoring["decided"],
                "scoring": scoring,
                "loss_before_split": before,
                "loss_after_split": after,
                "predicted_loss_change": 0.5 * config.split_step ** 2 * float(chosen.sum()),
            }
            finish_stage(stage, extra, timings, config.epochs)
            if config.budget is not None and records[-1]["cost"]["value"] >= config.budget * (1 - 1e-9):
                stop_reason = STOP_BUDGET
                break

    write_summary(run, config, records, status=f"stopped: {stop_reason}")
    log.info("stopped: %s", stop_reason)
    if config.final_epochs is not None and records:  # the network to ship, in RUN/final/ (resumable)
        from hwsplit.finetune import final_network

        final_network(run.path, config, session, records, progress=progress)
    return records


def scoring_record(config: GrowConfig, scores: dict[str, SplitScore],
                   cut: Callable[[dict[str, torch.Tensor]], dict[str, Any]]) -> dict[str, Any]:
    """What a stage's record says about its scoring call: the mode, the images it read, why it stopped,
    and, where λ has error bars, how many neurons' side of the knapsack's cut (``cut``) is decided at
    ``scoring_z`` standard errors (|λ − t| > z·SE), how many are not, how many λ are below zero beyond
    their error bar (``significant_negative``) and the largest SE (units of loss)."""
    first = next(iter(scores.values()), None)
    out: dict[str, Any] = {"mode": config.scoring, "images": first.images if first else 0,
                           "stopped": first.stopped if first else None, "z": config.scoring_z,
                           "decided": None, "undecided": None, "significant_negative": None, "stderr_max": None}
    if not scores or any(s.stderr is None for s in scores.values()):
        return out
    thresholds = cut({k: s.eigenvalues for k, s in scores.items()})
    yes = sum(int(decided(s.eigenvalues, s.stderr, torch.as_tensor(thresholds[k], dtype=s.eigenvalues.dtype),
                          config.scoring_z).sum()) for k, s in scores.items())
    count = sum(len(s) for s in scores.values())
    significant = sum(int((s.eigenvalues + config.scoring_z * s.stderr < 0).sum()) for s in scores.values())
    out.update(decided=yes, undecided=count - yes, significant_negative=significant,
               stderr_max=float(max(float(s.stderr.max()) for s in scores.values())))
    return out


def significant_scores(scores: dict[str, SplitScore], z: float) -> dict[str, SplitScore]:
    """``scores`` with λ set to 0 (not a candidate) where λ + z·SE ≥ 0; eigenvectors unchanged."""
    return {k: dataclasses.replace(s, eigenvalues=torch.where(s.eigenvalues + z * s.stderr < 0, s.eigenvalues,
                                                                torch.zeros_like(s.eigenvalues)))
            for k, s in scores.items()}


def _agreed_plan(plan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's plan on every rank (the plan itself with one process).

    Every rank selects from the same reduced scores, so the plans agree; a disagreement (it would
    mean non-deterministic reductions) is logged and rank 0's plan wins, so surgery stays identical.
    """
    if world_size() == 1:
        return plan
    shared = broadcast_object(plan)
    same = sorted((k, v.tolist()) for k, v in plan.items()) == sorted((k, v.tolist()) for k, v in shared.items())
    if not all_ranks_true(same):
        log.warning("the ranks selected different plans; every rank splits rank 0's")
    return shared


def _random_rank(seed: list[int]) -> Callable[[str, int], float]:
    """A random priority per (group, channel), for dropping neurons of a random plan in random order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    table: dict[tuple[str, int], float] = {}

    def rank(name: str, channel: int) -> float:
        if (name, channel) not in table:
            table[(name, channel)] = float(rng.random())
        return table[(name, channel)]

    return rank


def fit_plan_to_budget(plan: dict[str, torch.Tensor], scores: dict[str, Any], marginal: dict[str, float],
                       increase: Callable[[dict[str, torch.Tensor]], float], budget: float,
                       max_rounds: int = 20, rank: Callable[[str, int], float] | None = None,
                       ) -> dict[str, torch.Tensor]:
    """Drop the least valuable chosen neurons until the *actual* cost increase fits the budget.

    The knapsack prices neurons one at a time; splitting neighbouring layers together also adds
    their cross terms (a conv grows in both its input and its output channels), so the real
    increase can exceed the sum of marginals by a few percent. ``increase(plan)`` measures it on
    the architecture the plan would produce; neurons with the worst λ/cost ratio go first, or
    those with the highest ``rank(group, channel)`` when given (the random baseline). Each of the
    first ``max_rounds`` rounds drops neurons worth the excess in marginals, later rounds one neuron
    each; the plan returned is always one whose increase was measured to fit (or the empty plan).
    """
    def value(k: str, j: int) -> float:
        return rank(k, j) if rank is not None else float(scores[k].eigenvalues[j]) / marginal[k]

    items = sorted(((value(k, int(j)), k, int(j)) for k, v in plan.items() for j in v),
                   reverse=True)  # worst (least negative per cost) first
    rounds = 0
    while True:
        over = increase(plan) - budget
        if over <= 1e-9 * max(1.0, abs(budget)) or not items:
            return plan
        drop, freed = [], 0.0
        while items and (not drop or (freed < over and rounds < max_rounds)):
            _, k, j = items.pop(0)
            drop.append((k, j))
            freed += marginal[k]
        dropped: dict[str, set[int]] = {}
        for k, j in drop:
            dropped.setdefault(k, set()).add(j)
        plan = {k: torch.tensor([j for j in v.tolist() if j not in dropped.get(k, ())], dtype=torch.long)
                for k, v in plan.items()}
        plan = {k: v for k, v in plan.items() if v.numel()}
        log.info("dropped %d neurons whose joint cost exceeded the budget by %.4g", len(drop), over)
        rounds += 1


__all__ = ["GrowConfig", "RunDir", "StageFailed", "build_seed", "fit_plan_to_budget", "grow", "load_config",
           "load_model", "parse_budget", "stage_table"]
