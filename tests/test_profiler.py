"""Profiler: the family grid, real onnxruntime/torch measurements on CPU, the profile file, resume."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pytest

from cost_models.profile_io import SCHEMA, load_profile, save_profile, validate_profile
from cost_models.profiling import profiler
from cost_models.profiling.grid import family_grid
from cost_models.profiling.measure import measure_model
from cost_models.profiling.meters import NoGpuError, nvidia_gpu_available
from cost_models.profiling.profiler import DEFAULT_TIME_BUDGET_S, estimate_profile_seconds, profile_family
from hwsplit.network.models import MOBILENET_V1_STANDARD, build_model
from hwsplit.network.specs import LayerSpec

FAST = {"time_budget_s": 0.005, "warmup": 1}


def small_grid() -> list[LayerSpec]:
    """A handful of the quick grid's layers, one of each kind."""
    grid = family_grid(quick=True)
    picked: dict[str, list[LayerSpec]] = {}
    for spec in grid:
        picked.setdefault(spec.kind, [])
        if len(picked[spec.kind]) < 2:
            picked[spec.kind].append(spec)
    return [s for specs in picked.values() for s in specs]


class Spy:
    """Counts (and optionally interrupts) measure_layer calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, interrupt_after: int | None = None) -> None:
        self.calls: list[LayerSpec] = []
        self.real = profiler.measure_layer
        self.interrupt_after = interrupt_after
        monkeypatch.setattr(profiler, "measure_layer", self)

    def __call__(self, spec: LayerSpec, **kw: object):
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append(spec)
        return self.real(spec, **kw)


# -- the grid -------------------------------------------------------------------------------------

def test_quick_grid_is_small_and_full_grid_sensible() -> None:
    quick, full = family_grid(quick=True), family_grid()
    assert 30 <= len(quick) <= 60
    assert 400 <= len(full) <= 800
    assert {s.key() for s in quick} <= {s.key() for s in full}
    minutes = estimate_profile_seconds(len(full), DEFAULT_TIME_BUDGET_S) / 60
    assert 8 <= minutes <= 20
    assert len({s.key() for s in full}) == len(full)


def test_grid_only_holds_what_the_family_can_produce() -> None:
    full = family_grid()
    kinds = Counter(s.kind for s in full)
    assert set(kinds) == {"conv", "dwconv", "pwconv", "linear"}
    stem = [s for s in full if s.kind == "conv"]
    assert {s.in_channels for s in stem} == {3} and {s.height for s in stem} == {32}
    assert min(s.out_channels for s in stem) == 8 and max(s.out_channels for s in stem) == 32
    assert {s.height for s in full if s.kind != "linear"} == {32, 16, 8, 4, 2}
    # pointwise at 32x32 only sees the stem (<= 32 in) and the first block (<= 64 out)
    pw32 = [s for s in full if s.kind == "pwconv" and s.height == 32]
    assert max(s.in_channels for s in pw32) == 32 and max(s.out_channels for s in pw32) == 64
    # the widest layers only at the lowest resolution
    assert max(s.out_channels for s in full if s.height >= 4) == 512
    assert max(s.in_channels for s in full if s.kind == "pwconv" and s.height == 2) == 1024
    dw = [s for s in full if s.kind == "dwconv"]
    assert all(s.groups == s.in_channels == s.out_channels for s in dw)
    assert {(s.height, s.stride) for s in dw} == {(32, 1), (32, 2), (16, 1), (16, 2), (8, 1), (8, 2), (4, 1),
                                                   (4, 2), (2, 1)}
    linear = [s for s in full if s.kind == "linear"]
    assert {s.out_channels for s in linear} == {10}
    assert max(s.in_channels for s in linear) == MOBILENET_V1_STANDARD["blocks"][-1][0]
    # every seed width and every standard width is a grid point of its position
    seed = build_model("mobilenet_v1", config="cifar_seed", resolution=32, num_classes=10)
    standard = build_model("mobilenet_v1", config="standard", resolution=32, num_classes=10)
    from hwsplit.network.graph import layer_specs

    keys = {s.key() for s in full}
    for model in (seed, standard):
        for spec in layer_specs(model, (1, 3, 32, 32)):
            assert spec.key() in keys, spec


def test_grid_validation() -> None:
    with pytest.raises(ValueError, match="family"):
        family_grid("resnet")
    with pytest.raises(ValueError, match="resolution"):
        family_grid(resolution=0)


# -- measuring ------------------------------------------------------------------------------------

def test_quick_profile_with_onnxruntime(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    seen = []

    def progress(iterable, desc, total):
        seen.append({"desc": desc, "total": total})
        return iterable

    profile = profile_family(quick=True, out=out, progress=progress, time_budget_s=0.005, warmup=1)
    assert seen[0]["total"] == len(family_grid(quick=True)) and "cpu" in seen[0]["desc"]
    # then whole networks, measured end to end for calibration
    assert seen[1] == {"desc": "profile whole networks", "total": 4}
    assert len(profile["networks"]) == 4 and all(n["latency_ms"]["median"] > 0 for n in profile["networks"])
    # then the channel block, the repeatability check and 6 networks timed node by node (issue 11)
    assert seen[2] == {"desc": "profile networks node by node", "total": 6}
    assert profile["channel_block"] == profile["blocks"]["channel_block"] >= 1
    assert profile["repeatability"]["networks"] == 6 and profile["repeatability"]["rounds"] == 5
    context = profile["context"]["networks"]
    assert len(context) == 6 and sum(n["architecture"]["stem_width"] % profile["channel_block"] == 0
                                     for n in context) >= 3
    for net in context:  # every layer got its nodes, and the nodes of a network are all accounted for
        assert len(net["layers"]) == 28 and all(x["nodes"] >= 1 and x["latency_ms"] > 0 for x in net["layers"])
        assert sum(x["nodes"] for x in net["layers"]) == net["nodes"]
        assert sum(x["latency_ms"] for x in net["layers"]) == pytest.approx(net["node_sum_ms"])
    loaded = load_profile(out)
    assert loaded == json.loads(json.dumps(profile))
    assert loaded["schema"] == SCHEMA and loaded["backend"] == "onnxruntime" and loaded["meter"] == "latency"
    assert loaded["batch"] == 1 and loaded["family"] == "mobilenet_v1" and loaded["resolution"] == 32
    assert loaded["activation"] == "silu" and loaded["created"][:2] == "20"
    device = loaded["device"]
    assert device["name"] and device["threads"] >= 1 and device["runtime"]["onnxruntime"]
    assert device["runtime"]["torch"] and device["runtime"]["onnx"]
    assert "hostname" not in json.dumps(device)
    host = socket.gethostname()
    if len(host) >= 6:
        assert host not in out.read_text()
    assert loaded["overhead"]["latency_ms"]["median"] > 0
    assert len(loaded["rows"]) == len(family_grid(quick=True))
    for row in loaded["rows"]:
        LayerSpec.from_dict(row["layer"])
        lat = row["latency_ms"]
        assert 0 < lat["p25"] <= lat["median"] <= lat["p75"] and lat["n"] >= 5
        assert "energy_mj" not in row


def test_kill_and_resume_measures_only_missing_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = small_grid()
    out = tmp_path / "p.json"
    spy = Spy(monkeypatch)
    profile_family(layers=grid, out=out, max_rows=3, **FAST)
    assert len(spy.calls) == 3 and len(load_profile(out)["rows"]) == 3
    first_rows = load_profile(out)["rows"]
    # "killed" mid-run: an interrupt after two more rows still leaves a valid file with 5 rows
    spy.interrupt_after = 5
    with pytest.raises(KeyboardInterrupt):
        profile_family(layers=grid, out=out, save_every=100, **FAST)
    assert len(load_profile(out)["rows"]) == 5
    spy.interrupt_after = None
    profile_family(layers=grid, out=out, **FAST)
    assert len(spy.calls) == len(grid)  # every layer measured exactly once over the three runs
    assert Counter(s.key() for s in spy.calls) == Counter(s.key() for s in grid)
    final = load_profile(out)
    assert final["rows"][:3] == first_rows
    assert sorted(LayerSpec.from_dict(r["layer"]).key() for r in final["rows"]) == sorted(s.key() for s in grid)
    # truncating the file's rows (as if it had been saved early) resumes the same way
    final["rows"] = final["rows"][:2]
    save_profile(final, out)
    profile_family(layers=grid, out=out, **FAST)
    assert len(spy.calls) == 2 * len(grid) - 2
    # nothing left to do: no measurement at all
    profile_family(layers=grid, out=out, **FAST)
    assert len(spy.calls) == 2 * len(grid) - 2


def test_resume_refuses_another_device_backend_or_meter(tmp_path: Path) -> None:
    grid = small_grid()[:2]
    out = tmp_path / "p.json"
    profile_family(layers=grid, out=out, **FAST)
    data = load_profile(out)
    for field, value in (("backend", "torch"), ("meter", "nvml"), ("activation", "relu")):
        changed = dict(data, **{field: value})
        save_profile(changed, out)
        with pytest.raises(ValueError, match=field):
            profile_family(layers=grid, out=out, **FAST)
    changed = dict(data, device=dict(data["device"], name="Some Other CPU"))
    save_profile(changed, out)
    with pytest.raises(ValueError, match="device.name"):
        profile_family(layers=grid, out=out, **FAST)
    save_profile(data, out)
    with pytest.raises(ValueError, match="backend"):
        profile_family(layers=grid, out=out, backend="torch", **FAST)


def test_torch_backend(tmp_path: Path) -> None:
    profile = profile_family(layers=small_grid()[:3], backend="torch", out=tmp_path / "t.json", threads=1, **FAST)
    assert profile["backend"] == "torch" and profile["device"]["threads"] == 1
    assert all(r["latency_ms"]["median"] > 0 for r in profile["rows"])
    validate_profile(load_profile(tmp_path / "t.json"))


def test_profile_family_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        profile_family(backend="tvm", out=tmp_path / "x.json")
    with pytest.raises(ValueError, match="meter"):
        profile_family(meter="joules", out=tmp_path / "x.json")
    with pytest.raises(ValueError, match="device"):
        profile_family(device="gpu0", out=tmp_path / "x.json")
    with pytest.raises(ValueError, match="threads"):
        profile_family(threads=0, out=tmp_path / "x.json")
    with pytest.raises(ValueError, match="activation"):
        profile_family(activation="swishy", out=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_nvml_meter_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    if nvidia_gpu_available():
        pytest.skip("this machine has an NVIDIA GPU")
    with pytest.raises(NoGpuError, match="NVIDIA GPU.*only latency"):
        profile_family(meter="nvml", device="cuda:0", quick=True, out=tmp_path / "e.json")
    with pytest.raises(NoGpuError):
        measure_model(build_model("mlp"), (1, 64), meter="nvml", device="cuda:0")


def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    import onnxruntime as ort
    import torch

    model = build_model("mlp", in_features=8, widths=[4])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="CUDAExecutionProvider"):
            measure_model(model, (1, 8), device="cuda:0", time_budget_s=0.001)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            measure_model(model, (1, 8), device="cuda:0", backend="torch", time_budget_s=0.001)


def test_measure_model_seed_network() -> None:
    model = build_model("mobilenet_v1", config="cifar_seed", resolution=32, num_classes=10)
    model.train()
    result = measure_model(model, (1, 3, 32, 32), time_budget_s=0.02, warmup=2)
    assert set(result) == {"latency_ms", "energy_mj"}
    assert result["energy_mj"] is None
    lat = result["latency_ms"]
    assert 0 < lat["p25"] <= lat["median"] <= lat["p75"] and lat["n"] >= 5
    assert model.training, "measure_model must not change the caller's model"
    torch_result = measure_model(model, (1, 3, 32, 32), backend="torch", threads=1, time_budget_s=0.02, warmup=2)
    assert torch_result["latency_ms"]["median"] > 0
    with pytest.raises(ValueError, match="input_shape"):
        measure_model(model, (1, 3, 0, 32))


# -- the profile file -----------------------------------------------------------------------------

def _valid_profile() -> dict:
    stats = {"median": 1.0, "p25": 0.9, "p75": 1.1, "n": 10}
    return {"schema": SCHEMA, "device": {"name": "cpu"}, "backend": "onnxruntime", "meter": "latency",
            "batch": 1, "created": "2025-01-01T00:00:00+00:00",
            "rows": [{"layer": LayerSpec("pwconv", 8, 8, height=4, width=4).to_dict(), "latency_ms": stats}]}


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(schema="hwsplit.profile/9"), "unknown schema version"),
    (lambda p: p.pop("schema"), "missing field 'schema'"),
    (lambda p: p.pop("rows"), "missing field 'rows'"),
    (lambda p: p.pop("device"), "missing field 'device'"),
    (lambda p: p.update(backend="tvm"), "backend"),
    (lambda p: p.update(batch=0), "batch"),
    (lambda p: p["rows"][0].pop("latency_ms"), r"rows\[0\].*latency_ms"),
    (lambda p: p["rows"][0]["latency_ms"].pop("median"), r"rows\[0\].latency_ms: missing field 'median'"),
    (lambda p: p["rows"][0]["latency_ms"].update(median=-1), r"rows\[0\].latency_ms.median"),
    (lambda p: p["rows"][0]["layer"].update(kind="pool"), r"rows\[0\].layer: kind"),
    (lambda p: p["rows"][0]["layer"].update(colour="red"), r"rows\[0\].layer: unknown fields"),
])
def test_load_profile_errors_are_one_line(tmp_path: Path, mutate, message: str) -> None:
    data = _valid_profile()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as err:
        load_profile(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_profile_malformed_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"schema": "hwsplit.profile/1", "rows": [')
    with pytest.raises(ValueError, match="malformed JSON") as err:
        load_profile(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="no such profile"):
        load_profile(tmp_path / "absent.json")
    good = tmp_path / "good.json"
    save_profile(_valid_profile(), good)
    assert load_profile(good)["rows"][0]["latency_ms"]["n"] == 10
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
