"""The hardware side of the CLI: profile, fit, grow --cost lut|energy, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "profiles" / "cpu-amd-epyc-1t-onnxruntime.json"
TINY = ["--stages", "1", "--epochs", "1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> list[str]:
    """A small npz data set shaped like CIFAR-10 (32×32×3): the geometry the shipped profile measured."""
    import numpy as np

    root = tmp_path_factory.mktemp("cifar_like")
    rng = np.random.default_rng(0)
    for split, n in (("train", 160), ("test", 40)):
        y = rng.integers(0, 10, n)
        x = (rng.integers(0, 60, (n, 32, 32, 3)) + 19 * y[:, None, None, None]).astype(np.uint8)
        np.savez(root / f"{split}.npz", x=x, y=y)
    return ["--dataset", "npz", "--data-dir", str(root), "--model", "mobilenet_v1_cifar"]


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_the_shipped_profile_is_a_full_valid_profile_of_this_kind_of_machine():
    from cost_models.profile_io import load_profile

    profile = load_profile(SHIPPED)
    assert profile["backend"] == "onnxruntime" and profile["meter"] == "latency" and profile["batch"] == 1
    assert not profile.get("quick") and len(profile["rows"]) >= 500
    assert profile["device"]["threads"] == 1  # 1 thread repeats on a 2-core VM, 2 do not (README)
    assert profile["channel_block"] >= 1 and len(profile["context"]["networks"]) >= 48
    rep = profile["repeatability"]  # recorded, and flagged exactly when above the limit
    assert rep["noisy"] == (rep["noise_floor_pct"] > rep["limit_pct"])


def test_grow_with_the_lookup_table_of_the_shipped_profile(tmp_path, cifar_like):
    out = tmp_path / "run"
    result = _invoke("grow", "--cost", "lut", "--profile", str(SHIPPED), "--out", str(out), *TINY, *cifar_like)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert records[-1]["cost"]["unit"] == "ms" and records[-1]["cost"]["name"] == "lut"
    # each stage holds the predicted cost and the network measured end to end, side by side
    for r in records:
        assert r["cost"]["value"] > 0
        assert r["measured"]["latency_ms"]["median"] > 0
        assert r["measured"]["backend"] == "onnxruntime"
    assert "measured ms" in result.output


def test_measure_flag_turns_end_to_end_measurement_off_and_on(tmp_path, cifar_like):
    """``--no-measure`` skips the end-to-end timing a profile turns on; ``--measure`` times a MAC-priced run."""
    off, on = tmp_path / "off", tmp_path / "on"
    result = _invoke("grow", "--cost", "lut", "--profile", str(SHIPPED), "--no-measure", "--out", str(off),
                     *TINY, *cifar_like)
    assert result.exit_code == 0, result.output
    assert json.loads((off / "config.json").read_text())["measure"] is False
    assert all("measured" not in json.loads(line) for line in (off / "stages.jsonl").read_text().splitlines())
    result = _invoke("grow", "--cost", "flops", "--measure", "--out", str(on), *TINY, *cifar_like)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (on / "stages.jsonl").read_text().splitlines()]
    assert all(r["measured"]["latency_ms"]["median"] > 0 for r in records)


def test_grow_against_an_absolute_latency_budget_stops_at_it(tmp_path, cifar_like):
    from cost_models import get_cost_model
    from hwsplit.network.models import build_model

    seed_ms = get_cost_model("lut", profile=SHIPPED).total(build_model("mobilenet_v1_cifar"), (1, 3, 32, 32))
    budget = seed_ms * 1.2
    out = tmp_path / "run"
    result = _invoke("grow", "--cost", "lut", "--profile", str(SHIPPED), "--budget", f"{budget:.6f}ms",
                     "--stages", "2", "--epochs", "1", "--batch-size", "32", "--out", str(out), *cifar_like)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert all(r["cost"]["value"] <= budget * (1 + 1e-6) for r in records)
    assert records[-1]["cost"]["value"] > records[0]["cost"]["value"]


def test_a_budget_already_spent_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    result = _invoke("grow", "--cost", "flops", "--budget", "1k", "--stages", "3", "--epochs", "1", "--limit", "200",
                     "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "seed's own cost" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_fit_prints_the_accuracy_report():
    result = _invoke("fit", str(SHIPPED))
    assert result.exit_code == 0, result.output
    assert "RMSPE" in result.output and "±10 %" in result.output and "R²" in result.output


def test_quick_profile_then_resume(tmp_path):
    out = tmp_path / "new" / "quick.json"  # its folder is made
    result = _invoke("profile", "--quick", "--time-budget", "0.005", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) > 20
    result = _invoke("profile", "--quick", "--time-budget", "0.005", "--out", str(out))
    assert result.exit_code == 0
    assert len(json.loads(out.read_text())["rows"]) == len(rows)  # nothing measured twice


def test_malformed_profile(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _assert_one_line_error(_invoke("grow", "--cost", "lut", "--profile", str(bad)), str(bad))
    _assert_one_line_error(_invoke("fit", str(bad)), str(bad))


def test_unknown_schema_version(tmp_path):
    data = json.loads(SHIPPED.read_text())
    data["schema"] = "hwsplit.profile/99"
    path = tmp_path / "future.json"
    path.write_text(json.dumps(data))
    _assert_one_line_error(_invoke("grow", "--cost", "lut", "--profile", str(path)), "schema")


def test_energy_cost_with_a_latency_only_profile_says_how_to_measure_energy():
    _assert_one_line_error(_invoke("grow", "--cost", "energy", "--profile", str(SHIPPED)), "energy_mj", "nvml")


def test_nvml_meter_without_an_nvidia_gpu(tmp_path):
    from cost_models.profiling.meters import nvidia_gpu_available

    if nvidia_gpu_available():
        pytest.skip("this machine has an NVIDIA GPU")
    result = _invoke("profile", "--device", "cpu", "--meter", "nvml", "--quick", "--out", str(tmp_path / "p.json"))
    _assert_one_line_error(result, "NVIDIA")


def test_budget_unit_must_match_the_cost_model():
    _assert_one_line_error(_invoke("grow", "--cost", "lut", "--profile", str(SHIPPED), "--budget", "12mJ"),
                           "does not match", "ms")
    _assert_one_line_error(_invoke("grow", "--cost", "flops", "--budget", "3ms"), "does not match", "MACs")


def test_profile_from_another_device_is_allowed_and_said(tmp_path, caplog, cifar_like):
    data = json.loads(SHIPPED.read_text())
    data["device"]["name"] = "Some Other CPU"
    data["device"]["cpu"] = "Some Other CPU"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        result = _invoke("grow", "--cost", "lut", "--profile", str(path), "--out", str(out), "--stages", "0",
                         "--epochs", "1", *cifar_like)
    assert result.exit_code == 0, result.output
    assert "Some Other CPU" in caplog.text
    record = json.loads((out / "stages.jsonl").read_text().splitlines()[0])
    assert record["measured"]["same_device_as_profile"] is False


def test_drift_prints_the_ratio_and_exits_1_when_the_machine_drifted(monkeypatch) -> None:
    import cost_models.profiling.profiler as profiler

    profile = str(Path(__file__).resolve().parents[1] / "profiles" / "cpu-intel-xeon-1t-onnxruntime.json")
    for ratio, drifted, code in ((1.02, False, 0), (0.7, True, 1)):
        fake = {"ratio": ratio, "drifted": drifted, "limit_pct": 10.0,
                "networks": [{"then_ms": 0.1, "now_ms": 0.1 * ratio}]}
        monkeypatch.setattr(profiler, "profile_drift", lambda p, fake=fake, **kw: fake)
        result = CliRunner().invoke(main, ["drift", profile])
        assert result.exit_code == code, result.output
        assert f"{ratio:.3f}×" in result.output and ("DRIFTED" in result.output) == drifted
        assert "another machine" not in result.output
    fake = {"ratio": 0.87, "drifted": True, "limit_pct": 10.0, "networks": [], "same_device": False,
            "profile_device": "Intel(R) Xeon(R) Processor", "this_device": "AMD EPYC"}
    monkeypatch.setattr(profiler, "profile_drift", lambda p, **kw: fake)
    result = CliRunner().invoke(main, ["drift", profile])
    assert "made on Intel(R) Xeon(R) Processor; this machine is AMD EPYC: another machine" in result.output
