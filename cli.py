"""hwsplit command line: grow, baseline (width, prune), finetune, report, export, summary, profile, fit, drift.

Parses, calls the library, prints.

Exit status: 0 success; 1 a run failed (a non-finite loss, a failed write, an ONNX export that does
not match PyTorch) after keeping everything completed so far; 2 bad arguments, missing data,
malformed files or missing hardware (one line, no traceback); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from hwsplit.infra.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, HwsplitError, first_line
from hwsplit.infra.units import fmt_si


class CliError(click.ClickException):
    """A library error shown as one line with its class's exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _show_usage_error(self: click.UsageError, file: Any = None) -> None:
    """A usage error in one line: the message and where to find help (click prints three)."""
    hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
    click.echo(f"Error: {self.format_message()}{hint}", err=True)


click.UsageError.show = _show_usage_error  # every usage error of these commands, one line


def _progress(it: Iterable, desc: str, total: int | None) -> Iterable:
    from tqdm.auto import tqdm

    from hwsplit.infra.distributed import is_main

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None if is_main() else True)


def _main_rank() -> bool:
    """Whether this process prints results (rank 0 of a torchrun launch; always with one process)."""
    from hwsplit.infra.distributed import is_main

    return is_main()


def _on_all_ranks(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run the command on every process torchrun started (:func:`hwsplit.infra.parallel.entry_point`)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from hwsplit.infra.parallel import entry_point

        return entry_point(fn)(*args, **kwargs)

    return wrapper


def _library_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's errors into one-line messages: the exit status of an :class:`HwsplitError`
    comes from its class (hwsplit.infra.errors); other bad inputs (``ValueError``, missing files) exit 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HwsplitError as err:
            raise CliError(first_line(err), err.exit_code) from None
        except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
            raise CliError(first_line(err), EXIT_USAGE) from None
        except OSError as err:  # disk full, I/O errors: the run stopped, what it completed is intact
            raise CliError(first_line(err), EXIT_FAILED) from None
        except RecursionError:
            raise CliError("an input is nested too deeply to be read", EXIT_USAGE) from None
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not print a traceback
            click.echo("\ninterrupted: every file written so far is complete", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if j < len(rows[0]) - 1 else c for j, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _given(name: str) -> bool:
    """Whether the option ``name`` of the current command was given on the command line."""
    return click.get_current_context().get_parameter_source(name) == ParameterSource.COMMANDLINE


def _options(*decorators: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
    def apply(fn: Callable) -> Callable:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """hwsplit: grow small, accurate networks by splitting neurons under a hardware budget."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # a library warning (e.g. a LUT extrapolating beyond its profile) in one line, without Python's source line
    warnings.showwarning = lambda message, category, *args, **kwargs: click.echo(
        f"warning: {message}", err=True)


# --------------------------------------------------------------------------------------------
# options shared by grow and baseline
# --------------------------------------------------------------------------------------------

_MODEL_OPTIONS = _options(
    click.option("--model", default="mobilenet_v1", show_default=True,
                 help="Model family: mobilenet_v1 (picks its seed config from the input resolution), "
                      "mobilenet_v1_cifar, mlp, torchvision:mobilenet_v2 (torchvision's own module; its "
                      "expansion layers grow)."),
    click.option("--config", "model_config", default=None,
                 help="Named seed config of the family (mobilenet_v1: tiny_seed, cifar_seed, standard)."),
    click.option("--width-mult", type=float, default=None, help="Scale the seed's widths."),
    click.option("--activation", default=None, help="Activation of the model family (silu, relu, ...)."),
)
_DATA_OPTIONS = _options(
    click.option("--dataset", default="digits", show_default=True,
                 help="digits (embedded), cifar10, cifar100, npz, imagefolder."),
    click.option("--data-dir", type=click.Path(), default=None, help="Directory of the data set."),
    click.option("--download", is_flag=True, help="Let torchvision download CIFAR into --data-dir."),
    click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N training images."),
    click.option("--test-limit", default="auto", show_default=True,
                 help="Test images: N, 'all', or 'auto' (limit // 5 with --limit, else all)."),
)
_COST_OPTIONS = _options(
    click.option("--cost", type=click.Choice(["flops", "none", "lut", "energy"]), default="flops", show_default=True,
                 help="What a neuron costs: MACs, 1 (vanilla splitting), a measured table, an energy predictor."),
    click.option("--profile", "profile_path", type=click.Path(dir_okay=False), default=None,
                 help="Device profile JSON for --cost lut|energy."),
    click.option("--metric", default=None, help="Profile metric for --cost lut|energy (latency_ms, energy_mj)."),
)
_NO_TENSORBOARD = click.option(
    "--no-tensorboard", is_flag=True,
    help="Write no TensorBoard event files (by default RUN/tb/: per-epoch training, per-stage results).")
_CHANNEL_MULTIPLE = click.option(
    "--channel-multiple", default=None, metavar="N|auto",
    help="Grow every layer by multiples of N channels per stage (seed widths rounded to multiples of N); "
         "auto: the channel block of --profile.")
_SGD_OPTIONS = _options(
    click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True),
    click.option("--weight-decay", type=click.FloatRange(min=0), default=5e-4, show_default=True),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="CPU threads per process for training and scoring (default: 1 on machines with up to 4 "
                      "cores, torch's default on larger ones; OMP_NUM_THREADS is honoured)."),
    click.option("--seed", type=int, default=0, show_default=True),
)


def _cost_options(cost: str, profile_path: str | None, metric: str | None) -> dict[str, Any]:
    """cost_options of a GrowConfig from the command line (GrowConfig checks which combine)."""
    options: dict[str, Any] = {}
    if profile_path is not None:
        options["profile"] = profile_path
    if metric:
        options["metric"] = metric
    return options


def _model_options(model_config: str | None, width_mult: float | None, activation: str | None) -> dict[str, Any]:
    return {key: value for key, value in (("config", model_config), ("width_mult", width_mult),
                                          ("activation", activation)) if value is not None}


def _channel_multiple(text: str | None) -> int | str | None:
    """--channel-multiple as GrowConfig takes it: a whole number, or the text (``auto``; GrowConfig validates)."""
    return int(text) if text is not None and text.strip().isdigit() else text


def _max_widths(text: str | None) -> str | list[int] | None:
    """--max-widths as GrowConfig takes it: ``none`` → None, a comma list → whole numbers, else the name
    (GrowConfig validates; a malformed list is a UsageError naming the option)."""
    if text is None or text.strip().lower() == "none":
        return None
    if "," in text or text.strip().isdigit():
        try:
            return [int(w) for w in text.split(",")]
        except ValueError:
            raise click.BadParameter(f"expected whole numbers separated by commas, got {text!r}",
                                     param_hint="--max-widths") from None
    return text.strip()


def _print_stage(record: dict[str, Any]) -> None:
    if not _main_rank():  # under torchrun rank 0 alone reports
        return
    what = f"width ×{record['width_mult']:g}" if "width_mult" in record else f"stage {record['stage']}"
    if "target_cost" in record:
        what = (f"pruned ({record['method']}) to {record['target_cost']:.4g}, before fine-tuning "
                f"{record['pruned_top1_before_finetune']:.4f}, fine-tuned")
    elif "wide_width_mult" in record:
        what = f"wide network ×{record['wide_width_mult']:g}"
    if "source_stage" in record:
        what = f"{'retrained' if record.get('from_scratch') else 'fine-tuned'} stage {record['source_stage']}"
    cost = record["cost"]
    priced = "" if cost["unit"] == "MACs" else f", {cost['value']:.4g} {cost['unit']}"  # MACs are printed once
    split = "" if "source_stage" in record or "width_mult" in record else \
        f", {record.get('neurons_split', 0)} neurons split"
    click.echo(f"{what}: test top-1 {record['test_top1']:.4f}, {fmt_si(record['macs'])} MACs{priced}{split}",
               err=True)


# --------------------------------------------------------------------------------------------
# grow
# --------------------------------------------------------------------------------------------

@main.command()
@_MODEL_OPTIONS
@_DATA_OPTIONS
@_COST_OPTIONS
@click.option("--growth-ratio", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="Budget of a stage as a fraction of the current network's cost.")
@click.option("--stages", type=click.IntRange(min=0), default=4, show_default=True,
              help="Growth stages after the seed.")
@click.option("--budget", default=None,
              help="Absolute cost limit with its unit, e.g. 4.5ms, 12mJ, 300M (MACs).")
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True, help="Training epochs per stage.")
@click.option("--seed-epochs", type=click.IntRange(min=1), default=None, help="Training epochs of the seed (stage 0).")
@click.option("--split-epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rayleigh-quotient epochs per stage.")
@click.option("--split-method", type=click.Choice(["rayleigh", "exact"]), default="rayleigh", show_default=True)
@click.option("--split-vectors", type=click.IntRange(min=0), default=6, show_default=True,
              help="Rayleigh-Ritz vectors per neuron, at least this many in every layer: fewer score faster "
                   "and rank less like exact scoring (BENCHMARKS.md); 0 = averaged iterate.")
@click.option("--split-allocation", type=click.Choice(["cost", "uniform"]), default="cost", show_default=True,
              help="cost: more Rayleigh-Ritz vectors in layers where one is cheap (small maps); "
                   "uniform: --split-vectors everywhere.")
@click.option("--scoring", type=click.Choice(["full", "adaptive"]), default="full", show_default=True,
              help="full: score on every training image each stage; adaptive: on a subsample that stops when the "
                   "knapsack's choice is decided within the error bars of the indices.")
@click.option("--scoring-tolerance", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="adaptive: undecided neurons allowed, as a share of the neurons the knapsack's cut takes.")
@click.option("--scoring-z", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Error bar of an index in standard errors (adaptive stopping rule, --split-candidates).")
@click.option("--scoring-min", type=click.FloatRange(min=0, max=1, min_open=True), default=0.05, show_default=True,
              help="adaptive: share of an epoch read before the first check.")
@click.option("--scoring-cap", type=click.FloatRange(min=0, max=1, min_open=True), default=0.25, show_default=True,
              help="adaptive: share of an epoch read at most.")
@click.option("--split-candidates", type=click.Choice(["all", "significant"]), default="all", show_default=True,
              help="all: every negative index is a candidate; significant: only those below zero by more than "
                   "--scoring-z standard errors.")
@click.option("--split-step", type=click.FloatRange(min=0), default=1e-2, show_default=True,
              help="Offspring step epsilon (weight units).")
@click.option("--selection", type=click.Choice(["lp", "milp", "greedy", "random"]), default="lp", show_default=True,
              help="Knapsack by LP relaxation, exact MILP or ratio greedy; random: the baseline that splits "
                   "uniformly random neurons under the same budget.")
@click.option("--max-layer-growth", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help="Cap per layer and stage, as a fraction of its width (a layer at most doubles in any case).")
@click.option("--price", type=click.Choice(["linear", "sqrt", "log"]), default=None,
              help="What the knapsack chooses with: each neuron's marginal cost (linear, the default), its square "
                   "root (the authors' CIFAR price) or log(1 + MAC-equivalents); --budget and --growth-ratio "
                   "still limit the real cost.")
@click.option("--group-budgets", type=click.Choice(["none", "authors", "resolution"]), default=None,
              help="Split each stage's budget over layer groups by feature-map size, in proportion to each "
                   "group's price-weighted width: none (one budget, the default), authors (two groups, as their "
                   "code), resolution (one group per map size).")
@click.option("--max-widths", default=None, metavar="standard|authors|none|W1,W2,...",
              help="Width ceiling per growing layer: the family's standard widths (default), the authors' "
                   "max_splitcfg, none, or one number per layer in graph order.")
@click.option("--lp-threshold", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help="Keep the LP's neurons with beta >= this and nothing else (the authors' 0.99); default: "
                   "round the LP and fill greedily.")
@click.option("--recipe", type=click.Choice(["authors"]), default=None,
              help="A preset of the selection options: authors = --price sqrt --group-budgets authors "
                   "--max-layer-growth 1 --max-widths authors --lp-threshold 0.99 (with --selection lp); "
                   "options given with it override it.")
@_CHANNEL_MULTIPLE
@click.option("--val-fraction", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True,
              help="Share of the training images carved out (seeded by --seed) as a validation split; choices "
                   "(the stage to ship) are made on it, never on test.")
@click.option("--post-split", type=click.Choice(["restart", "warm", "continue"]), default="restart",
              show_default=True,
              help="Training after a split: restart (fresh cosine from --lr), warm (0.3 x --lr after a short "
                   "warm-up), continue (one cosine across all stages).")
@click.option("--final-epochs", type=click.IntRange(min=1), default=None,
              help="End the run with a trained network: fine-tune the last stage (with --budget and "
                   "--val-fraction: the best on validation) this many epochs into RUN/final/.")
@click.option("--final-init", type=click.Choice(["grown", "fresh"]), default="grown", show_default=True,
              help="What --final-epochs trains: the grown weights, or the grown architecture from a fresh "
                   "initialisation.")
@click.option("--measure/--no-measure", default=None,
              help="Time each stage's network end to end on the profile's device (latency, or NVML energy) "
                   "[default: with --profile].")
@_NO_TENSORBOARD
@_SGD_OPTIONS
@click.option("--out", type=click.Path(file_okay=False), default="runs/grow", show_default=True,
              help="Run directory (created; a previous run in it is replaced only with --overwrite).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run already in --out: its stages, its final/, finetune/ and retrain/ directories "
                   "and the ONNX files exported from it are deleted.")
@click.option("--resume", type=click.Path(file_okay=False), default=None, metavar="RUN",
              help="Continue the run in RUN after its last completed stage, with the settings of its config.json "
                   "(only --stages may be given with it, to extend the run).")
@_library_errors
@_on_all_ranks
def grow(model: str, model_config: str | None, width_mult: float | None, activation: str | None, dataset: str,
         data_dir: str | None, download: bool, limit: int | None, test_limit: str, cost: str,
         profile_path: str | None, metric: str | None, growth_ratio: float, stages: int, budget: str | None,
         epochs: int,
         seed_epochs: int | None, split_epochs: int, split_method: str, split_vectors: int, split_allocation: str,
         scoring: str, scoring_tolerance: float, scoring_z: float, scoring_min: float, scoring_cap: float,
         split_candidates: str, split_step: float,
         selection: str,
         max_layer_growth: float | None, price: str | None, group_budgets: str | None, max_widths: str | None,
         lp_threshold: float | None, recipe: str | None, channel_multiple: str | None, val_fraction: float,
         post_split: str, final_epochs: int | None, final_init: str, measure: bool | None, no_tensorboard: bool,
         batch_size: int,
         lr: float,
         weight_decay: float, device: str, threads: int | None, seed: int, out: str, overwrite: bool,
         resume: str | None) -> None:
    """Grow a network stage by stage: train, score, price, select, split."""
    from hwsplit.infra.devices import check_device
    from hwsplit.run.grow import grow as run_grow
    from hwsplit.run.options import grow_settings, resume_settings
    from hwsplit.run.rundir import stage_table

    if resume is not None:
        ctx = click.get_current_context()
        given = [p.opts[0] for p in ctx.command.params
                 if p.name not in ("resume", "stages", "threads") and _given(p.name)]
        if given:
            raise click.UsageError(f"--resume continues RUN with the settings of its config.json; "
                                   f"{', '.join(given)} cannot be combined with it (only --stages, to extend the "
                                   "run, and --threads)")
        if _main_rank() and not Path(resume).is_dir():
            raise click.UsageError(f"--resume: {resume} is not a run directory")
        config = resume_settings(resume, stages=stages if _given("stages") else None,
                                 threads=threads if _given("threads") else None)
        check_device(config.device)
        if _main_rank():
            click.echo(f"resuming {resume} ({config.model} on {config.dataset}, cost {config.cost}, "
                       f"{config.stages} stages)", err=True)
        records = run_grow(config, resume, resume=True, progress=_progress, on_stage=_print_stage)
        if _main_rank():
            click.echo(_table(stage_table(records)))
            _print_final(config, resume, records)
            click.echo(f"\nrun directory: {resume} ({_run_status(resume)})")
        return

    check_device(device, field="--device")
    selection_options = {key: value for key, value in (
        ("price", price), ("group_budgets", group_budgets), ("max_widths", _max_widths(max_widths)),
        ("lp_threshold", lp_threshold), ("max_layer_growth", max_layer_growth))
        if value is not None or (key == "max_widths" and max_widths is not None)}
    config, cost_model = grow_settings(dict(
        model=model, model_options=_model_options(model_config, width_mult, activation), dataset=dataset,
        data_dir=data_dir, download=download,
        data_limit=limit, test_limit=_test_limit(test_limit), cost=cost,
        cost_options=_cost_options(cost, profile_path, metric), growth_ratio=growth_ratio, stages=stages,
        epochs=epochs, seed_epochs=seed_epochs, split_epochs=split_epochs,
        split_method=split_method, split_vectors=split_vectors, split_allocation=split_allocation,
        scoring=scoring, scoring_tolerance=scoring_tolerance, scoring_z=scoring_z, scoring_min=scoring_min,
        scoring_cap=scoring_cap, split_candidates=split_candidates,
        split_step=split_step, selection=selection,
        channel_multiple=_channel_multiple(channel_multiple),
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, device=device, threads=threads, seed=seed,
        val_fraction=val_fraction, post_split=post_split, final_epochs=final_epochs, final_init=final_init,
        measure=measure, tensorboard=not no_tensorboard,
    ), budget=budget, recipe=recipe, selection=selection_options)
    if cost in ("lut", "energy") and _main_rank():
        click.echo(f"pricing with {cost_model.name} ({cost_model.unit}) from {profile_path}", err=True)
    records = run_grow(config, out, overwrite=overwrite, progress=_progress, on_stage=_print_stage,
                       cost_model=cost_model)
    if _main_rank():
        click.echo(_table(stage_table(records)))
        _print_final(config, out, records)
        click.echo(f"\nrun directory: {out} ({_run_status(out)})")


def _run_status(run: str) -> str:
    """The run's status line (``stopped: budget reached``, …) as its summary.md says it."""
    from hwsplit.run.rundir import RunDir, run_status

    return run_status(RunDir(run))


def _print_final(config: Any, out: str, records: list[dict[str, Any]]) -> None:
    """With --final-epochs: the shipped network's accuracy next to the seed's."""
    from hwsplit.run.finetune import FINAL_DIR, finetune_dir
    from hwsplit.run.rundir import RunDir

    where = finetune_dir(out, kind=FINAL_DIR)
    final = RunDir(where).records() if config.final_epochs else []
    if not final or not records:
        return
    f, seed = final[-1], records[0]
    how = "retrained from a fresh initialisation" if f.get("from_scratch") else "fine-tuned"
    click.echo(f"\nfinal network (stage {f['source_stage']} {how} {f['epochs']} epochs, "
               f"{f['epochs_in_all']} in all): test top-1 {f['test_top1']:.4f} at {f['macs'] / 1e3:.4g}k MACs; "
               f"seed: {seed['test_top1']:.4f} at {seed['macs'] / 1e3:.4g}k MACs  -> {where}")


# --------------------------------------------------------------------------------------------
# baseline
# --------------------------------------------------------------------------------------------

@main.group()
def baseline() -> None:
    """Baselines written in the run-directory format of grow, for `report` to compare."""


@baseline.command("width")
@click.option("--multipliers", default="0.5,1,1.5,2", show_default=True,
              help="Comma-separated width multipliers of the seed config (1 = the seed grow starts from; "
                   "with --config standard, the MobileNet paper's multipliers).")
@click.option("--like", type=click.Path(file_okay=False), default=None, metavar="RUN",
              help="Take every setting from a grow run's config.json (options given here override it).")
@_MODEL_OPTIONS
@_DATA_OPTIONS
@_COST_OPTIONS
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs of each network (default: what grow spends on its final network, "
                   "seed epochs + stages × stage epochs).")
@click.option("--stages", type=click.IntRange(min=0), default=4, show_default=True,
              help="Stages of the grow run to match (for the default --epochs).")
@click.option("--stage-epochs", type=click.IntRange(min=1), default=15, show_default=True,
              help="Epochs per stage of the grow run to match (for the default --epochs).")
@click.option("--seed-epochs", type=click.IntRange(min=1), default=None,
              help="Seed epochs of the grow run to match (default: --stage-epochs).")
@_CHANNEL_MULTIPLE
@_NO_TENSORBOARD
@_SGD_OPTIONS
@click.option("--out", type=click.Path(file_okay=False), default="runs/width", show_default=True,
              help="Run directory (created; a previous run in it is replaced only with --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out.")
@_library_errors
@_on_all_ranks
def baseline_width(multipliers: str, like: str | None, model: str, model_config: str | None,
                   width_mult: float | None, activation: str | None, dataset: str, data_dir: str | None,
                   download: bool, limit: int | None, test_limit: str, cost: str, profile_path: str | None,
                   metric: str | None,
                   epochs: int | None, stages: int, stage_epochs: int, seed_epochs: int | None,
                   channel_multiple: str | None, no_tensorboard: bool, batch_size: int,
                   lr: float, weight_decay: float, device: str, threads: int | None, seed: int, out: str,
                   overwrite: bool) -> None:
    """Train the family uniformly scaled by width multipliers, from scratch, on grow's schedule."""
    from hwsplit.infra.devices import check_device
    from hwsplit.run.baselines import parse_multipliers, width_baseline
    from hwsplit.run.config import stage_epochs_in_all
    from hwsplit.run.options import width_settings
    from hwsplit.run.rundir import stage_table

    mults = parse_multipliers(multipliers)
    # GrowConfig field ← (its value, the options that set it)
    fields: dict[str, tuple[Any, tuple[str, ...]]] = {
        "model": (model, ("model",)), "dataset": (dataset, ("dataset",)), "data_dir": (data_dir, ("data_dir",)),
        "download": (download, ("download",)), "data_limit": (limit, ("limit",)),
        "test_limit": (_test_limit(test_limit), ("test_limit",)), "stages": (stages, ("stages",)),
        "epochs": (stage_epochs, ("stage_epochs",)), "seed_epochs": (seed_epochs, ("seed_epochs",)),
        "batch_size": (batch_size, ("batch_size",)), "lr": (lr, ("lr",)),
        "weight_decay": (weight_decay, ("weight_decay",)), "device": (device, ("device",)),
        "threads": (threads, ("threads",)), "seed": (seed, ("seed",)),
        "channel_multiple": (_channel_multiple(channel_multiple), ("channel_multiple",)),
        "tensorboard": (not no_tensorboard, ("no_tensorboard",)),
        "model_options": (_model_options(model_config, width_mult, activation),
                          ("model_config", "width_mult", "activation")),
        "cost": (cost, ("cost", "profile_path", "metric")),
        "cost_options": (_cost_options(cost, profile_path, metric), ("cost", "profile_path", "metric")),
    }
    config = width_settings(like, {k: v for k, (v, _) in fields.items()},
                            given={k for k, (_, options) in fields.items() if any(_given(o) for o in options)})
    check_device(config.device)
    total = epochs if epochs is not None else stage_epochs_in_all(config, config.stages)
    if _main_rank():
        click.echo(f"width baseline: {config.model} × {', '.join(f'{m:g}' for m in mults)}, {total} epochs each",
                   err=True)
    records = width_baseline(config, mults, out, epochs=total, overwrite=overwrite, progress=_progress,
                             on_stage=_print_stage)
    if _main_rank():
        click.echo(_table(stage_table(records)))
        click.echo(f"\nrun directory: {out}")


@baseline.command("prune")
@click.option("--like", type=click.Path(file_okay=False, exists=True), required=True, metavar="RUN",
              help="The grow run to compare with: its family, data, cost model, schedule and (by default) targets.")
@click.option("--method", type=click.Choice(["l1", "slimming", "taylor"]), required=True,
              help="Channel importance: l1 (L1 norm of the weights), slimming (BatchNorm scales, trained with "
                   "an L1 penalty on them), taylor (first-order Taylor |w * dL/dw|).")
@click.option("--width-mult", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Width multiplier of RUN's seed for the wide network (default: the smallest multiple of 0.5 "
                   "as wide as every grown stage in every layer).")
@click.option("--train-epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs of the wide network (default: what RUN spends on its final network, "
                   "seed epochs + stages x stage epochs).")
@click.option("--finetune-epochs", type=click.IntRange(min=1), default=None,
              help="Fine-tuning epochs of each pruned network (default: RUN's epochs per stage).")
@click.option("--targets", default=None, metavar="COST,...",
              help="Target costs with their unit in RUN's cost model, e.g. 20k,35k (MACs) or 0.2ms "
                   "(default: the cost of each stage of RUN).")
@click.option("--slimming-l1", type=click.FloatRange(min=0), default=None,
              help="L1 coefficient on the BatchNorm scales while the wide network trains (slimming only; "
                   "default 1e-4).")
@click.option("--max-pruning-ratio", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help="Largest share of a layer's channels (in the wide network) pruning may remove (default 1: "
                   "every layer keeps at least one channel, or the channel multiple).")
@click.option("--from-scratch", is_flag=True,
              help="Also retrain every pruned architecture from a fresh initialisation (into OUT/retrain/).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory (default RUN/prune-METHOD; the same command again continues it).")
@click.option("--overwrite", is_flag=True, help="Replace another pruning run already in --out.")
@_library_errors
def baseline_prune(like: str, method: str, width_mult: float | None, train_epochs: int | None,
                   finetune_epochs: int | None, targets: str | None, slimming_l1: float | None,
                   max_pruning_ratio: float | None, from_scratch: bool,
                   out: str | None, overwrite: bool) -> None:
    """Train a wide network of RUN's family, prune it to each target cost (Torch-Pruning), fine-tune it."""
    from hwsplit.run.finetune import finetune_dir
    from hwsplit.run.prune import DEFAULT_SLIMMING_L1, MAX_PRUNING_RATIO, prune_baseline, prune_dir
    from hwsplit.run.rundir import stage_table

    if slimming_l1 is not None and method != "slimming":
        raise click.UsageError("--slimming-l1 is the L1 penalty of --method slimming only")
    records = prune_baseline(like, method=method, out=out, width_mult=width_mult, train_epochs=train_epochs,
                             finetune_epochs=finetune_epochs, targets=targets, from_scratch=from_scratch,
                             slimming_l1=DEFAULT_SLIMMING_L1 if slimming_l1 is None else slimming_l1,
                             max_pruning_ratio=MAX_PRUNING_RATIO if max_pruning_ratio is None else max_pruning_ratio,
                             overwrite=overwrite, progress=_progress, on_stage=_print_stage)
    dest = out or str(prune_dir(like, method))
    click.echo(_table(stage_table(records)))
    rows = [["stage", "target", "cost", "top-1 pruned", "top-1 fine-tuned", "epochs in all"]]
    for r in records[1:]:
        rows.append([str(r["stage"]), f"{r['target_cost']:.4g}", f"{r['cost']['value']:.4g}",
                     f"{r['pruned_top1_before_finetune']:.4f}", f"{r['test_top1']:.4f}", str(r["epochs_in_all"])])
    click.echo("")
    click.echo(_table(rows))
    click.echo(f"\nrun directory: {dest}" + (f" (retrained: {finetune_dir(dest, from_scratch=True)})"
                                            if from_scratch else ""))


# --------------------------------------------------------------------------------------------
# finetune
# --------------------------------------------------------------------------------------------

@main.command()
@click.argument("run", metavar="RUN", type=click.Path(file_okay=False, exists=True))
@click.option("--stage", "stages", type=click.IntRange(min=0), multiple=True,
              help="A grown stage to fine-tune (repeatable).")
@click.option("--all", "all_stages", is_flag=True, help="Every completed stage (the default when no --stage).")
@click.option("--epochs", type=click.IntRange(min=1), required=True, help="Training epochs of each network.")
@click.option("--from-scratch", is_flag=True,
              help="Retrain each architecture from a fresh initialisation (writes RUN/retrain/).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak lr (default: the run's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: the run's.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None, help="Default: the run's.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: the run's).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per process (default: the run's setting).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output run directory (default RUN/finetune, or RUN/retrain with --from-scratch).")
@click.option("--overwrite", is_flag=True, help="Replace another fine-tuning already in the output directory.")
@_NO_TENSORBOARD
@_library_errors
@_on_all_ranks
def finetune(run: str, stages: tuple[int, ...], all_stages: bool, epochs: int, from_scratch: bool,
             lr: float | None, batch_size: int | None, weight_decay: float | None, device: str | None,
             threads: int | None, out: str | None, overwrite: bool, no_tensorboard: bool) -> None:
    """Fine-tune (or retrain from scratch) grown stages of RUN for the same schedule; resumable."""
    from hwsplit.infra.devices import check_device
    from hwsplit.run.finetune import finetune as run_finetune
    from hwsplit.run.finetune import finetune_dir
    from hwsplit.run.rundir import stage_table

    if all_stages and stages:
        raise click.UsageError("--all and --stage exclude each other")
    overrides = {k: v for k, v in (("lr", lr), ("batch_size", batch_size), ("weight_decay", weight_decay),
                                   ("device", device), ("threads", threads)) if v is not None}
    if no_tensorboard:
        overrides["tensorboard"] = False
    if device is not None:
        check_device(device, field="--device")
    records = run_finetune(run, epochs=epochs, stages=list(stages) or None, from_scratch=from_scratch, out=out,
                           overrides=overrides, overwrite=overwrite, progress=_progress, on_stage=_print_stage)
    if _main_rank():
        click.echo(_table(stage_table(records)))
        dest = out or str(finetune_dir(run, from_scratch=from_scratch))
        click.echo(f"\nrun directory: {dest}")


# --------------------------------------------------------------------------------------------
# report, export
# --------------------------------------------------------------------------------------------

@main.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]")
@click.option("--out", type=click.Path(file_okay=False), default="runs/report", show_default=True,
              help="Directory for table.md and the plots.")
@_library_errors
def report(runs: tuple[str, ...], out: str) -> None:
    """Compare runs stage by stage: table.md, accuracy_vs_macs.png, accuracy_vs_cost.png, widths.png."""
    from hwsplit.run.report import write_report

    result = write_report(list(runs), out)
    click.echo(_table(result["rows"]))
    click.echo("")
    for name, status in result["status"].items():
        click.echo(f"{name}: {status}")
    click.echo("")
    for path in result["files"]:
        click.echo(f"wrote {path}")


@main.command()
@click.argument("run", metavar="RUN")
@click.option("--stage", type=click.IntRange(min=0), default=None,
              help="Stage to export (default: the last completed).")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), required=True, help="ONNX file to write.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest |onnxruntime - torch| accepted on random inputs.")
@click.option("--with-preprocessing", is_flag=True,
              help="Put the data set's normalisation into the graph: the file then takes images as the data set "
                   "stores them (uint8 0..255 for cifar10/npz, float 0..1 for digits/imagefolder; NCHW).")
@_library_errors
def export(run: str, stage: int | None, onnx_path: str, atol: float, with_preprocessing: bool) -> None:
    """Export a stage of a run (or a stage-K.pt) to ONNX, checked against PyTorch with onnxruntime."""
    from hwsplit.run.export import export_run

    info = export_run(run, onnx_path, stage=stage, atol=atol, with_preprocessing=with_preprocessing)
    checkpoint = info["checkpoint"]
    shape = "x".join(str(d) for d in info["input_shape"][1:])
    meta = info["metadata"]
    click.echo(f"wrote {info['path']} from {checkpoint} (stage {info['stage']}, input N x {shape} "
               f"{info['input_dtype']}, dynamic batch, opset {info['opset']})")
    click.echo(f"input: {meta['input']}" + (f"; mean {meta['mean']}, std {meta['std']}" if "mean" in meta else ""))
    click.echo(f"onnxruntime vs torch: max |difference| = {info['max_abs_diff']:.3g} over batches of "
               f"{', '.join(str(b) for b in info['batch_sizes'])} random inputs (tolerance {atol:g})")


def _test_limit(text: str) -> int | str | None:
    """--test-limit: 'auto', 'all' (None) or a positive integer."""
    if text in ("auto", "all"):
        return None if text == "all" else "auto"
    if not text.isdigit() or int(text) < 1:
        raise click.BadParameter(f"expected a positive integer, 'all' or 'auto', got {text!r}",
                                 param_hint="--test-limit")
    return int(text)


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------

@main.command()
@click.argument("model_or_checkpoint", metavar="RUN|CHECKPOINT|MODEL")
@click.option("--resolution", type=click.IntRange(min=1), default=None,
              help="Input height = width (default: the checkpoint's, or 32; 224 for mobilenet_v1 standard).")
@click.option("--in-channels", type=click.IntRange(min=1), default=None)
@_library_errors
def summary(model_or_checkpoint: str, resolution: int | None, in_channels: int | None) -> None:
    """A run directory's stages and status, or the per-layer widths, MACs and params of a stage checkpoint
    (stage-K.pt) or a model name."""
    from hwsplit.run.summary import model_summary, run_summary

    if Path(model_or_checkpoint).is_dir():
        info = run_summary(model_or_checkpoint)
        click.echo(_table(info["rows"]))
        click.echo(f"\n{info['path']}: {info['status']}")
        return

    result = model_summary(model_or_checkpoint, resolution=resolution, in_channels=in_channels)
    click.echo(_table(result["rows"]))
    click.echo(f"\ninput {result['input_shape']}: {result['macs']:,} MACs (conv + linear), "
               f"{result['params']:,} parameters")


# --------------------------------------------------------------------------------------------
# profile, fit
# --------------------------------------------------------------------------------------------

@main.command()
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--backend", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime", show_default=True)
@click.option("--meter", type=click.Choice(["latency", "nvml"]), default="latency", show_default=True,
              help="latency: wall clock; nvml: energy per inference from the NVML counter (NVIDIA GPUs).")
@click.option("--model", "family", type=click.Choice(["mobilenet_v1"]), default="mobilenet_v1", show_default=True,
              help="Model family whose layers are measured.")
@click.option("--resolution", type=click.IntRange(min=8), default=32, show_default=True)
@click.option("--activation", default="silu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime intra-op threads (default 1 on a machine with <= 2 cores, else all).")
@click.option("--time-budget", "time_budget_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds of timed runs per layer (default 1, 0.05 with --quick).")
@click.option("--quick", is_flag=True,
              help="A small grid (about 50 layers, 0.05 s of timed runs each) and 4 calibration networks.")
@click.option("--context-networks", type=click.IntRange(min=0), default=None,
              help="random networks timed node by node for the in-context table (default 96, 6 with --quick).")
@click.option("--networks", type=click.IntRange(min=0), default=None,
              help="Random whole networks measured end to end to calibrate layer sums (default 16, 4 with --quick).")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Profile JSON; an existing one with the same device is resumed.")
@_library_errors
def profile(device: str, backend: str, meter: str, family: str, resolution: int, activation: str,
            threads: int | None, time_budget_s: float | None, quick: bool, networks: int | None, out: str,
            context_networks: int | None = None) -> None:
    """Measure every layer the family can take while it grows into a device cost table."""
    from cost_models.profiling.profiler import profile_family
    from hwsplit.infra.devices import check_device

    check_device(device, field="--device")
    result = profile_family(family=family, resolution=resolution, device=device, backend=backend, meter=meter,
                            out=out, quick=quick, threads=threads, time_budget_s=time_budget_s,
                            activation=activation, progress=_progress, networks=networks,
                            context_networks=context_networks)
    dev = result.get("device", {})
    n_networks = len(result.get("networks", []))
    click.echo(f"{len(result['rows'])} layers and {n_networks} whole networks measured on {dev.get('name')} "
               f"({backend}, {meter}, {dev.get('threads')} threads) -> {out}")
    if "repeatability" in result:
        rep = result["repeatability"]
        click.echo(f"channel block {result.get('channel_block')}; the same network repeats within "
                   f"±{rep['noise_floor_pct']:.1f} % (worst ±{rep['worst_pct']:.1f} %)"
                   f"{' — NOISY: costs record noise' if rep['noisy'] else ''}; "
                   f"{len(result.get('context', {}).get('networks', []))} networks timed node by node")


@main.command()
@click.argument("profile_path", metavar="PROFILE", type=click.Path(dir_okay=False))
@click.option("--metric", default=None, help="latency_ms or energy_mj (default: energy_mj if measured).")
@click.option("--test-size", type=click.FloatRange(0.05, 0.9), default=0.25, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_library_errors
def fit(profile_path: str, metric: str | None, test_size: float, seed: int) -> None:
    """Fit the layer-cost regressor on a profile and report its held-out accuracy."""
    from hwsplit.run.options import fit_profile

    report = fit_profile(profile_path, metric=metric, test_size=test_size, seed=seed)
    click.echo(f"{profile_path}: {report['metric']} ({report['unit']}), {report['n_train']} rows fitted, "
               f"{report['n_test']} held out")
    click.echo(f"  RMSPE          {100 * report['rmspe']:.1f} %")
    click.echo(f"  within ±10 %   {100 * report['within_10pct']:.1f} % of held-out layers")
    click.echo(f"  R²             {report['r2']:.3f}")


@main.command()
@click.argument("profile_path", metavar="PROFILE", type=click.Path(dir_okay=False))
@click.option("--networks", type=click.IntRange(min=1), default=4, show_default=True,
              help="Context networks of the profile timed again (spread over its sizes).")
@click.option("--time-budget", "time_budget_s", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Seconds of timed runs per network.")
@_library_errors
def drift(profile_path: str, networks: int, time_budget_s: float) -> None:
    """Check that this machine still runs as it did when PROFILE was made (exit 1 if it drifted)."""
    from cost_models.profile_io import load_profile
    from cost_models.profiling.profiler import profile_drift

    result = profile_drift(load_profile(profile_path), networks=networks, time_budget_s=time_budget_s)
    for r in result["networks"]:
        change = 100 * (r["now_ms"] / r["then_ms"] - 1)
        kind = "aligned" if r.get("aligned") else "other"
        click.echo(f"  {kind:<7}  then {r['then_ms']:.4f} ms  now {r['now_ms']:.4f} ms  ({change:+.1f} %)")
    verdict = "DRIFTED: profile again for budgets in ms" if result["drifted"] else "within the limit"
    if not result.get("same_device", True):
        click.echo(f"  the profile was made on {result['profile_device']}; this machine is {result['this_device']}: "
                   "another machine, not a drift of the profile's")
    kinds = ", ".join(f"{k} {x:.3f}×" for k, x in result.get("kinds", {}).items())
    click.echo(f"{profile_path}: whole networks run at {result['ratio']:.3f}× the profile's times"
               f"{f' ({kinds})' if kinds else ''} (limit ±{result['limit_pct']:.0f} %): {verdict}")
    if result["drifted"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
