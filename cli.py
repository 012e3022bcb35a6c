"""hwsplit command line: grow, summary, profile, fit. Parses, calls the library, prints."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

EXIT_USAGE = 2


class HwsplitError(click.ClickException):
    """A user-facing error: one line, exit status 2, no traceback."""

    exit_code = EXIT_USAGE


def _progress(it: Iterable, desc: str, total: int | None) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)


def _library_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's documented errors into one-line messages with exit status 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
            raise HwsplitError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
        except RuntimeError as err:
            if type(err).__name__ in ("NoGpuError", "DeviceUnavailableError"):
                raise HwsplitError(str(err)) from None
            raise
        except KeyboardInterrupt:
            click.echo("\ninterrupted: every file written so far is complete", err=True)
            sys.exit(130)

    return wrapper


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if j < len(rows[0]) - 1 else c for j, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """hwsplit: grow small, accurate networks by splitting neurons under a hardware budget."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------------------------
# grow
# --------------------------------------------------------------------------------------------

@main.command()
@click.option("--model", default="mobilenet_v1", show_default=True,
              help="Model family (mobilenet_v1, mobilenet_v1_cifar, mlp). mobilenet_v1 picks its seed "
                   "config from the input resolution.")
@click.option("--config", "model_config", default=None,
              help="Named seed config of the family (mobilenet_v1: tiny_seed, cifar_seed, standard).")
@click.option("--width-mult", type=float, default=None, help="Scale the seed's widths.")
@click.option("--activation", default=None, help="Activation of the model family (silu, relu, ...).")
@click.option("--dataset", default="digits", show_default=True,
              help="digits (embedded), cifar10, cifar100, npz, imagefolder.")
@click.option("--data-dir", type=click.Path(), default=None, help="Directory of the data set.")
@click.option("--download", is_flag=True, help="Let torchvision download CIFAR into --data-dir.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N training images.")
@click.option("--cost", type=click.Choice(["flops", "none", "lut", "energy"]), default="flops", show_default=True,
              help="What a neuron costs: MACs, 1 (vanilla splitting), a measured table, an energy predictor.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False), default=None,
              help="Device profile JSON for --cost lut|energy.")
@click.option("--metric", default=None, help="Profile metric for --cost lut|energy (latency_ms, energy_mj).")
@click.option("--growth-ratio", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="Budget of a stage as a fraction of the current network's cost.")
@click.option("--stages", type=click.IntRange(min=0), default=4, show_default=True, help="Growth stages after the seed.")
@click.option("--budget", default=None,
              help="Absolute cost limit with its unit, e.g. 4.5ms, 12mJ, 300M (MACs).")
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True, help="Training epochs per stage.")
@click.option("--seed-epochs", type=click.IntRange(min=1), default=None, help="Training epochs of the seed (stage 0).")
@click.option("--split-epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rayleigh-quotient epochs per stage.")
@click.option("--split-method", type=click.Choice(["rayleigh", "exact"]), default="rayleigh", show_default=True)
@click.option("--split-step", type=click.FloatRange(min=0), default=1e-2, show_default=True,
              help="Offspring step epsilon (weight units).")
@click.option("--selection", type=click.Choice(["lp", "milp", "greedy"]), default="lp", show_default=True)
@click.option("--max-layer-growth", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help="Cap per layer and stage, as a fraction of its width.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=5e-4, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="runs/grow", show_default=True,
              help="Run directory (created).")
@_library_errors
def grow(model: str, model_config: str | None, width_mult: float | None, activation: str | None, dataset: str,
         data_dir: str | None, download: bool, limit: int | None, cost: str, profile_path: str | None,
         metric: str | None, growth_ratio: float, stages: int, budget: str | None, epochs: int,
         seed_epochs: int | None, split_epochs: int, split_method: str, split_step: float, selection: str,
         max_layer_growth: float | None, batch_size: int, lr: float, weight_decay: float, device: str, seed: int,
         out: str) -> None:
    """Grow a network stage by stage: train, score, price, select, split."""
    import cost_models
    from hwsplit.grow import GrowConfig, parse_budget, stage_table
    from hwsplit.grow import grow as run_grow

    _check_device(device)
    cost_options: dict[str, Any] = {}
    if cost in ("lut", "energy"):
        if profile_path is None:
            raise click.UsageError(f"--cost {cost} needs --profile PROFILE.json (make one with `python cli.py profile`)")
        cost_options["profile"] = profile_path
        if metric:
            cost_options["metric"] = metric
    elif profile_path is not None:
        raise click.UsageError("--profile is only used with --cost lut or --cost energy")
    cost_model = cost_models.get_cost_model(cost, **cost_options)
    budget_value = parse_budget(budget, cost_model.unit) if budget is not None else None
    model_options: dict[str, Any] = {}
    for key, value in (("config", model_config), ("width_mult", width_mult), ("activation", activation)):
        if value is not None:
            model_options[key] = value
    if cost in ("lut", "energy"):
        click.echo(f"pricing with {cost_model.name} ({cost_model.unit}) from {profile_path}", err=True)
    config = GrowConfig(
        model=model, model_options=model_options, dataset=dataset, data_dir=data_dir, download=download,
        data_limit=limit, cost=cost, cost_options=cost_options, growth_ratio=growth_ratio, stages=stages,
        budget=budget_value, epochs=epochs, seed_epochs=seed_epochs, split_epochs=split_epochs,
        split_method=split_method, split_step=split_step, selection=selection, max_layer_growth=max_layer_growth,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, device=device, seed=seed,
    )

    def on_stage(record: dict[str, Any]) -> None:
        click.echo(f"stage {record['stage']}: test top-1 {record['test_top1']:.4f}, "
                   f"{record['macs'] / 1e6:.4g}M MACs, {record['cost']['value']:.4g} {record['cost']['unit']}, "
                   f"{record.get('neurons_split', 0)} neurons split", err=True)

    records = run_grow(config, out, progress=_progress, on_stage=on_stage)
    click.echo(_table(stage_table(records)))
    click.echo(f"\nrun directory: {out}")


def _check_device(device: str) -> None:
    import torch

    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise click.BadParameter(f"expected cpu, cuda or cuda:N, got {device!r}", param_hint="--device")
    if not torch.cuda.is_available():
        raise HwsplitError(f"--device {device}: no CUDA GPU is available on this machine (use --device cpu)")


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------

@main.command()
@click.argument("model_or_checkpoint")
@click.option("--resolution", type=click.IntRange(min=1), default=None,
              help="Input height = width (default: the checkpoint's, or 32; 224 for mobilenet_v1 standard).")
@click.option("--in-channels", type=click.IntRange(min=1), default=None)
@_library_errors
def summary(model_or_checkpoint: str, resolution: int | None, in_channels: int | None) -> None:
    """Per-layer widths, MACs and params of a model name or a stage checkpoint (stage-K.pt)."""
    import torch

    from hwsplit.checkpoint import load_checkpoint, load_model
    from hwsplit.graph import find_neuron_groups, layer_specs
    from hwsplit.models import build_model

    path = Path(model_or_checkpoint)
    if path.suffix == ".pt" or path.is_file():
        payload = load_checkpoint(path)
        model = load_model(path)
        shape = payload.get("extra", {}).get("input_shape")
        if shape is None:
            shape = [1, in_channels or 3, resolution or 32, resolution or 32]
        shape = [1, in_channels or shape[1], resolution or shape[2], resolution or shape[3]]
    else:
        options: dict[str, Any] = {}
        if resolution is not None:
            options["resolution"] = resolution
        if in_channels is not None:
            options["in_channels"] = in_channels
        model = build_model(model_or_checkpoint, **options)
        res = resolution or (224 if model_or_checkpoint == "mobilenet_v1" else 32)
        shape = [1, in_channels or 3, res, res]
        if model_or_checkpoint == "mlp":
            shape = [1, model.spec.in_features]
    specs = layer_specs(model, tuple(shape))
    groups = {g.name: g for g in find_neuron_groups(model, torch.zeros(shape))}
    rows = [["layer", "kind", "in", "out", "k", "s", "input", "MACs", "params", "splittable"]]
    for s in specs:
        g = groups.get(s.name)
        rows.append([s.name, s.kind, str(s.in_channels), str(s.out_channels), str(s.kernel), str(s.stride),
                     f"{s.height}x{s.width}", f"{s.macs:,}", f"{s.params:,}",
                     "yes" if g is not None and g.splittable else "" if g is None else f"no: {g.reason}"])
    click.echo(_table(rows))
    total_params = sum(p.numel() for p in model.parameters())
    click.echo(f"\ninput {tuple(shape)}: {sum(s.macs for s in specs):,} MACs (conv + linear), "
               f"{total_params:,} parameters")


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
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option("--time-budget", "time_budget_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds of timed runs per layer (default 1, 0.05 with --quick).")
@click.option("--quick", is_flag=True, help="A small grid (about 50 layers, under a minute).")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Profile JSON; an existing one with the same device is resumed.")
@_library_errors
def profile(device: str, backend: str, meter: str, family: str, resolution: int, activation: str,
            threads: int | None, time_budget_s: float | None, quick: bool, out: str) -> None:
    """Measure every layer the family can take while it grows into a device cost table."""
    from cost_models.profiler import profile_family

    if device != "cpu" and not device.startswith("cuda"):
        raise click.BadParameter(f"expected cpu, cuda or cuda:N, got {device!r}", param_hint="--device")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    result = profile_family(family=family, resolution=resolution, device=device, backend=backend, meter=meter,
                            out=out, quick=quick, threads=threads, time_budget_s=time_budget_s,
                            activation=activation, progress=_progress)
    dev = result.get("device", {})
    click.echo(f"{len(result['rows'])} layers measured on {dev.get('name')} ({backend}, {meter}, "
               f"{dev.get('threads')} threads) -> {out}")


@main.command()
@click.argument("profile_path", metavar="PROFILE", type=click.Path(dir_okay=False))
@click.option("--metric", default=None, help="latency_ms or energy_mj (default: energy_mj if measured).")
@click.option("--test-size", type=click.FloatRange(0.05, 0.9), default=0.25, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_library_errors
def fit(profile_path: str, metric: str | None, test_size: float, seed: int) -> None:
    """Fit the layer-cost regressor on a profile and report its held-out accuracy."""
    from cost_models.predictor import fit_report
    from cost_models.profile_io import load_profile

    data = load_profile(profile_path)
    if metric is None:
        metric = "energy_mj" if any("energy_mj" in r for r in data["rows"]) else "latency_ms"
    report = fit_report(data, metric, test_size=test_size, seed=seed)
    click.echo(f"{profile_path}: {report['metric']} ({report['unit']}), {report['n_train']} rows fitted, "
               f"{report['n_test']} held out")
    click.echo(f"  RMSPE          {100 * report['rmspe']:.1f} %")
    click.echo(f"  within ±10 %   {100 * report['within_10pct']:.1f} % of held-out layers")
    click.echo(f"  R²             {report['r2']:.3f}")


if __name__ == "__main__":
    main()
