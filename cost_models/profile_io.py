"""The profile JSON schema (docs/design.md §4): validation, loading and atomic saving.

A profile is data, never code::

    {"schema": "hwsplit.profile/1",
     "device": {"name", "kind", "driver", "threads", "runtime": {...}, ...},
     "backend": "onnxruntime" | "torch", "meter": "latency" | "nvml", "batch": 1,
     "created": ISO-8601 date, "family": "mobilenet_v1", "resolution": 32, "activation": "silu",
     "overhead": {"latency_ms": {stats}, "energy_mj": {stats}?},
     "rows": [{"layer": {LayerSpec fields}, "latency_ms": {stats}, "energy_mj": {stats}?}, ...],
     "networks": [{"architecture", "input_shape", "latency_ms": {stats}}, ...]?,
     "channel_block": 16?, "blocks": {"channel_block", "depthwise_multiple", "evidence"}?,
     "repeatability": {"noise_floor_pct", "worst_pct", "noisy", ...}?,
     "context": {"networks": [{"architecture", "latency_ms": {stats}, "layers": [{"layer", "latency_ms": ms,
                                "nodes": n}, ...]}, ...]}?}

with ``{stats} = {"median", "p25", "p75", "n"}``. Every problem is reported as one ``ValueError``
line naming the file (or ``<profile>`` for an in-memory dict) and the offending field.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hwsplit.infra.errors import ConfigError
from hwsplit.infra.fsio import atomic_write
from hwsplit.network.specs import LayerSpec

SCHEMA = "hwsplit.profile/1"
METRICS = ("latency_ms", "energy_mj")
BACKENDS = ("onnxruntime", "torch")
METERS = ("latency", "nvml")
REQUIRED_FIELDS = ("schema", "device", "backend", "meter", "batch", "rows")
STATS_FIELDS = ("median", "p25", "p75", "n")
#: Largest cost a row may record, in its metric's unit (1e9 ms is 11 days, 1e9 mJ a megajoule per
#: inference): beyond it the numbers are not measurements, and sums of them overflow the fits.
MAX_COST = 1e9


class ProfileError(ConfigError):
    """A profile file or dict that does not follow the schema (one line: source and problem)."""


def _check_stats(data: Any, where: str, source: str, *, positive: bool = False) -> None:
    """Stats fields present, finite and >= 0; with ``positive`` the median must be > 0 (a layer or
    network measured at zero cost is a broken measurement, and would let the knapsack split for free)."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: {where}: expected an object with {', '.join(STATS_FIELDS)}")
    for field in STATS_FIELDS:
        if field not in data:
            raise ProfileError(f"{source}: {where}: missing field {field!r}")
        value = data[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ProfileError(f"{source}: {where}.{field}: expected a finite non-negative number, got {value!r}")
        if field != "n" and value > MAX_COST:
            raise ProfileError(f"{source}: {where}.{field}: {value!r} is beyond any measured cost (at most "
                               f"{MAX_COST:g})")
    if positive and not data["median"] > 0:
        raise ProfileError(f"{source}: {where}.median: expected a positive cost, got {data['median']!r} "
                           "(a measurement of zero cost cannot be right)")


def validate_profile(data: Any, source: str = "<profile>") -> dict[str, Any]:
    """Check ``data`` against the schema; return it unchanged. Raises ``ValueError`` (one line)."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}")
    if "schema" not in data:
        raise ProfileError(f"{source}: missing field 'schema' (expected {SCHEMA!r}); is this an hwsplit profile?")
    if data["schema"] != SCHEMA:
        raise ProfileError(f"{source}: unknown schema version {data['schema']!r}; this hwsplit reads {SCHEMA!r}")
    for field in REQUIRED_FIELDS:
        if field not in data:
            raise ProfileError(f"{source}: missing field {field!r}")
    if not isinstance(data["device"], dict):
        raise ProfileError(f"{source}: device: expected an object")
    if data["backend"] not in BACKENDS:
        raise ProfileError(f"{source}: backend: expected one of {BACKENDS}, got {data['backend']!r}")
    if data["meter"] not in METERS:
        raise ProfileError(f"{source}: meter: expected one of {METERS}, got {data['meter']!r}")
    if isinstance(data["batch"], bool) or not isinstance(data["batch"], int) or data["batch"] < 1:
        raise ProfileError(f"{source}: batch: expected a positive integer, got {data['batch']!r}")
    overhead = data.get("overhead")
    if overhead is not None:
        if not isinstance(overhead, dict):
            raise ProfileError(f"{source}: overhead: expected an object")
        for metric in METRICS:
            if metric in overhead:
                _check_stats(overhead[metric], f"overhead.{metric}", source)
    rows = data["rows"]
    if not isinstance(rows, list):
        raise ProfileError(f"{source}: rows: expected a list")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ProfileError(f"{source}: rows[{i}]: expected an object")
        if "layer" not in row:
            raise ProfileError(f"{source}: rows[{i}]: missing field 'layer'")
        if not isinstance(row["layer"], dict):
            raise ProfileError(f"{source}: rows[{i}].layer: expected an object")
        try:
            LayerSpec.from_dict(row["layer"])
        except (TypeError, ValueError) as err:
            detail = str(err).removeprefix("layer: ")
            raise ProfileError(f"{source}: rows[{i}].layer: {detail}") from None
        present = [m for m in METRICS if m in row]
        if not present:
            raise ProfileError(f"{source}: rows[{i}]: missing field 'latency_ms' (no metric measured)")
        for metric in present:
            _check_stats(row[metric], f"rows[{i}].{metric}", source, positive=True)
    block = data.get("channel_block", 1)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ProfileError(f"{source}: channel_block: expected a positive integer, got {block!r}")
    context = data.get("context", {"networks": []})
    if not isinstance(context, dict) or not isinstance(context.get("networks"), list):
        raise ProfileError(f"{source}: context: expected an object with a list of networks")
    for i, net in enumerate(context["networks"]):
        if not isinstance(net, dict) or not isinstance(net.get("layers"), list) or "latency_ms" not in net:
            raise ProfileError(f"{source}: context.networks[{i}]: expected an object with latency_ms and layers")
        _check_stats(net["latency_ms"], f"context.networks[{i}].latency_ms", source, positive=True)
    networks = data.get("networks", [])
    if not isinstance(networks, list):
        raise ProfileError(f"{source}: networks: expected a list")
    for i, net in enumerate(networks):
        if not isinstance(net, dict) or not isinstance(net.get("architecture"), dict) \
                or not isinstance(net.get("input_shape"), list):
            raise ProfileError(f"{source}: networks[{i}]: expected an object with architecture and input_shape")
        for metric in METRICS:
            if metric in net:
                _check_stats(net[metric], f"networks[{i}].{metric}", source, positive=True)
    return data


def channel_block(profile: dict[str, Any]) -> int:
    """The backend's channel block recorded in ``profile`` (top-level ``"channel_block"``, detected
    by :func:`cost_models.profiling.channel_block.detect_channel_block`); 1 (no block) for a profile without one."""
    return int(profile.get("channel_block", 1))


def depthwise_multiple(profile: dict[str, Any]) -> int:
    """Channel multiple a depthwise conv needs to stay blocked (``blocks.depthwise_multiple``); 0 if unknown."""
    return int((profile.get("blocks") or {}).get("depthwise_multiple", 0))


def runtime_overhead(profile: dict[str, Any], metric: str) -> float | None:
    """The per-inference runtime overhead to subtract from every single-layer row (``overhead``'s
    median); where it is not below the smallest row, half the smallest row instead: an empty model
    can cost more than the smallest layers (onnxruntime copies an identity's input), and subtracting
    it would zero them. None when the profile has no overhead for ``metric``."""
    stats = (profile.get("overhead") or {}).get(metric)
    if stats is None:
        return None
    rows = [float(r[metric]["median"]) for r in profile.get("rows", []) if metric in r]
    overhead = float(stats["median"])
    return 0.5 * min(rows) if rows and overhead >= min(rows) else overhead


def load_profile(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a profile file. Raises ``ValueError`` naming the path and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not a profile (not UTF-8 JSON text)") from None
    except OSError as err:
        raise ProfileError(f"{path}: cannot read the profile ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ProfileError(f"{path}: malformed JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise ProfileError(f"{path}: malformed profile (JSON nested too deeply)") from None
    return validate_profile(data, str(path))


def resolve_profile(profile: str | os.PathLike[str] | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A profile given as a path or an already-loaded dict → (validated dict, name for messages)."""
    if isinstance(profile, dict):
        name = str(profile.get("source", "<profile>"))
        return validate_profile(profile, name), name
    if isinstance(profile, (str, os.PathLike)):
        return load_profile(profile), str(profile)
    raise ValueError(f"profile: expected a path or a dict, got {type(profile).__name__}")


def save_profile(profile: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``profile`` atomically (:func:`hwsplit.infra.fsio.atomic_write`), creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: (json.dump(profile, fh, indent=1), fh.write("\n")))


@contextlib.contextmanager
def fitting(source: str, what: str) -> Iterator[None]:
    """Turn a numerical failure while fitting ``what`` to a profile (numpy's "SVD did not converge",
    scikit-learn's "Input contains NaN") into a :class:`ProfileError` naming the profile."""
    import numpy as np

    try:
        with np.errstate(all="ignore"):
            yield
    except (np.linalg.LinAlgError, ArithmeticError, ValueError) as err:
        if isinstance(err, ProfileError):
            raise
        detail = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise ProfileError(f"{source}: cannot fit {what} to this profile ({detail}); its rows are degenerate "
                           "(too few distinct layers, or values that overflow)") from None


def metric_unit(metric: str) -> str:
    if metric == "latency_ms":
        return "ms"
    if metric == "energy_mj":
        return "mJ"
    raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")


def missing_metric_message(source: str, metric: str) -> str:
    if metric == "energy_mj":
        return (f"profile {source} has no energy_mj: measure one with "
                "`python cli.py profile --meter nvml --device cuda:0` on an NVIDIA GPU")
    return f"profile {source} has no {metric}: measure one with `python cli.py profile`"
