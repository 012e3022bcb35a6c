"""Issue 10's cases, in process: every bad input or failure is one line naming the file/field, the exit
status of its class, no traceback, and nothing of an existing run or a user's folder lost.

The malformed inputs are in tests/fixtures/malformed/ (regenerate with its make.py). The same cases
run through a real command line (subprocess, a real full tmpfs, another user) in bench/issue10_cases.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import hwsplit.run.rundir
from cli import main
from cost_models import get_cost_model
from hwsplit.infra.errors import CostOutOfRange
from hwsplit.network.models import build_model
from hwsplit.run.rundir import RunDir

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "malformed"
TINY = ["--model", "mlp", "--stages", "1", "--epochs", "1", "--limit", "200"]


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_one_line(result, exit_code: int, *needles: str) -> str:
    """Exit status, no uncaught exception (a traceback), one ``Error:`` line holding every needle."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in result.output
    for unsafe in ("allow_pickle", "weights_only"):
        assert unsafe not in errors[0]
    return errors[0]


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def made_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("made") / "run"
    result = _invoke("grow", *TINY, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run(made_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(made_run, out)
    return out


# -- 1. data loss: every input is checked before --out is touched ------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--dataset", "npz", "--data-dir", "does-not-exist"], "does-not-exist is not a directory"),
    (["--model", "vgg16"], "model: unknown name 'vgg16'"),
    (["--activation", "nonsense"], "activation:"),
    (["--width-mult", "0"], "width_mult:"),
    (["--dataset", "mnist-nope"], "unknown dataset 'mnist-nope'"),
    (["--model", "mobilenet_v1", "--cost", "lut", "--profile", FIXTURES / "profile_tpu.json"], "device.kind 'tpu'"),
])
def test_a_failing_grow_never_deletes_the_run_it_would_replace(run, args, needle):
    before = _snapshot(run)
    _assert_one_line(_invoke("grow", *TINY, *args, "--overwrite", "--out", run), 2, needle)
    assert _snapshot(run) == before


def test_a_run_is_replaced_only_with_overwrite(run):
    before = _snapshot(run)
    _assert_one_line(_invoke("grow", *TINY, "--out", run), 2, "holds a run", "--overwrite", "--resume")
    assert _snapshot(run) == before


def test_a_folder_that_is_not_a_run_is_never_emptied(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}\n')
    (mine / "summary.md").write_text("# my notes\n")
    before = _snapshot(mine)
    _assert_one_line(_invoke("grow", *TINY, "--overwrite", "--out", mine), 2, "is not an hwsplit run")
    assert _snapshot(mine) == before


# -- 2. one writer per run -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["grow", "resume", "export"])
def test_a_run_being_written_refuses_a_second_writer(run, tmp_path, command):
    argv = {"grow": ["grow", *TINY, "--overwrite", "--out", run], "resume": ["grow", "--resume", run, "--stages", "2"],
            "export": ["export", run, "--onnx", tmp_path / "m.onnx"]}[command]
    before = _snapshot(run)
    with RunDir(run).lock("grow"):  # flock is per open file: this process's second open conflicts too
        _assert_one_line(_invoke(*argv), 2, f"run: {run} is in use by pid {os.getpid()}")
    assert _snapshot(run) == before and not (tmp_path / "m.onnx").exists()


# -- 3. costs that cannot be right -------------------------------------------------------------------------

def test_a_cost_model_pricing_a_network_below_zero_names_the_profile(tmp_path):
    profile = FIXTURES / "profile_negative_offset.json"
    line = _assert_one_line(_invoke("grow", "--cost", "lut", "--profile", profile, "--budget", "0.2ms", *TINY[2:],
                                    "--out", tmp_path / "run"), 2, str(profile), "cannot cost <= 0")
    assert "calibrated on 6 whole networks" in line
    assert not (tmp_path / "run").exists()
    model = build_model("mobilenet_v1", config="tiny_seed", resolution=8, in_channels=1, num_classes=10)
    with pytest.raises(CostOutOfRange, match="profile_negative_offset.json prices a network at -"):
        get_cost_model("lut", profile=str(profile)).total(model, (1, 1, 8, 8))


def test_the_width_baseline_refuses_a_network_priced_below_zero_before_writing(tmp_path):
    profile = FIXTURES / "profile_negative_offset.json"
    _assert_one_line(_invoke("baseline", "width", "--multipliers", "1", "--cost", "lut", "--profile", profile,
                             "--stages", "0", "--stage-epochs", "1", "--limit", "200", "--out", tmp_path / "w"),
                     2, "cannot cost <= 0")
    assert not (tmp_path / "w" / "config.json").exists()


def test_a_network_outside_the_calibrated_range_is_said(caplog):
    model = build_model("mobilenet_v1", config="tiny_seed", resolution=32, in_channels=3, num_classes=10)
    cm = get_cost_model("lut", profile=str(FIXTURES / "profile_negative_offset.json"))
    cal = cm.calibration
    with caplog.at_level("WARNING"):
        try:
            cm.total(model, (1, 3, 32, 32))
        except CostOutOfRange:
            pass
        cm.calibration = type(cal)(scale=cal.scale, offset=0.0, networks=cal.networks, raw_min=cal.raw_min * 1e6,
                                   raw_max=cal.raw_max * 1e6)
        value = cm.total(model, (1, 3, 32, 32))
    assert value > 0
    assert any("below the 6 whole networks the profile measured" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name, needle", [
    ("profile_zero.json", "rows[0].latency_ms.median: expected a positive cost"),
    ("profile_huge.json", "rows[0].latency_ms.median: 1e+308 is beyond any measured cost"),
])
def test_profiles_with_impossible_rows_are_refused_naming_file_and_row(tmp_path, name, needle):
    profile = FIXTURES / name
    _assert_one_line(_invoke("grow", "--cost", "lut", "--profile", profile, *TINY[2:], "--out", tmp_path / "run"),
                     2, str(profile), needle)
    _assert_one_line(_invoke("fit", profile), 2, str(profile), needle)


def test_a_fit_that_fails_numerically_names_the_profile():
    from cost_models.profile_io import ProfileError, fitting

    with pytest.raises(ProfileError, match=r"^p\.json: cannot fit the regressor to this profile \(SVD"):
        with fitting("p.json", "the regressor"):
            raise np.linalg.LinAlgError("SVD did not converge in Linear Least Squares")


@pytest.mark.parametrize("folder, needle", [
    ("npz_label_50000", "has label 50000 but only 5 distinct labels"),
    ("npz_label_2pow31", "has label 2147483647"),
    ("npz_object_array", "holds object arrays"),
])
def test_npz_files_that_cannot_be_right_are_one_line(tmp_path, folder, needle):
    _assert_one_line(_invoke("grow", "--dataset", "npz", "--data-dir", FIXTURES / folder, *TINY,
                             "--out", tmp_path / "run"), 2, str(FIXTURES / folder), needle)


@pytest.mark.parametrize("budget, needle", [("100", "is not above the seed's own cost (3392 MACs)"),
                                            ("1e400", "must be a finite positive number")])
def test_budgets_that_mean_nothing_are_refused(tmp_path, budget, needle):
    _assert_one_line(_invoke("grow", *TINY, "--budget", budget, "--out", tmp_path / "run"), 2, needle)
    assert not (tmp_path / "run").exists()


# -- 4. failures after a run started, and sizes that do not fit ----------------------------------------------

def test_torch_save_on_a_full_disk_is_one_line_and_summary_says_why(tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("stage") == 1:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1408 vs 1302")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 4096))
    out = tmp_path / "run"
    line = _assert_one_line(_invoke("grow", *TINY, "--out", out), 1, "stage 1 failed (write failed)",
                            f"cannot write {out / 'stage-1.pt'}: No space left on device", "stages 0-0")
    assert "enforce fail" not in line
    assert "Status: failed in stage 1 (write failed)" in (out / "summary.md").read_text()
    assert [json.loads(r)["stage"] for r in (out / "stages.jsonl").read_text().splitlines()] == [0]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "config.json", "stage-0.pt", "stages.jsonl", "summary.md", "tb"]


def test_over_long_names_are_refused_up_front(tmp_path, run):
    _assert_one_line(_invoke("grow", *TINY, "--out", tmp_path / ("r" * 300)), 2, "longer than 255 bytes")
    _assert_one_line(_invoke("export", run, "--onnx", tmp_path / ("m" * 245 + ".onnx")), 2, "too long")


def test_a_broken_image_is_one_line_exit_1(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / "img" / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
    broken = tmp_path / "img" / "train" / "a" / "9.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "run"
    _assert_one_line(_invoke("grow", "--dataset", "imagefolder", "--data-dir", tmp_path / "img", *TINY,
                             "--out", out), 1, f"{broken} is not a readable image")
    assert "bad input image" in (out / "summary.md").read_text()


@pytest.mark.parametrize("fixture, needle", [
    ("config_seed_five.json", "seed: invalid value 'five'"),
    ("config_unknown_model.json", "model: unknown name 'resnet9000'"),
    ("config_budget_infinity.json", "budget: invalid value inf"),
    ("config_unknown_field.json", "unknown field(s) colour"),
    ("config_not_json.json", "is not readable JSON"),
])
def test_an_edited_config_json_is_refused_on_resume(run, fixture, needle):
    shutil.copy(FIXTURES / fixture, run / "config.json")
    before = _snapshot(run)
    _assert_one_line(_invoke("grow", "--resume", run, "--stages", "2"), 2, str(run / "config.json"), needle)
    assert _snapshot(run) == before


def test_resume_with_fewer_stages_than_completed_is_refused(run):
    before = _snapshot(run)
    _assert_one_line(_invoke("grow", "--resume", run, "--stages", "0"), 2, "fewer than the 1 growth stage(s)")
    assert _snapshot(run) == before


def test_a_profile_nested_200k_levels_deep(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"schema": ' + "[" * 200_000 + "]" * 200_000 + "}")
    _assert_one_line(_invoke("fit", deep), 2, str(deep), "nested too deeply")


@pytest.mark.parametrize("args, needle", [(["--resolution", "100000"], "resolution: expected an integer in 1..4096"),
                                          (["--in-channels", "100000"], "in_channels: expected an integer")])
def test_summary_of_extreme_sizes(args, needle):
    _assert_one_line(_invoke("summary", "mobilenet_v1_cifar", *args), 2, needle)


def test_export_of_a_checkpoint_with_a_million_wide_layer(run, tmp_path):
    payload = torch.load(run / "stage-1.pt", weights_only=True)
    payload["architecture"]["widths"] = [1_000_000, 38]
    torch.save(payload, run / "stage-1.pt")
    _assert_one_line(_invoke("export", run, "--onnx", tmp_path / "m.onnx"), 2, "1,000,000 is more than hwsplit builds")


# -- 5. messages -----------------------------------------------------------------------------------------------

def test_a_binary_profile_names_the_file():
    _assert_one_line(_invoke("fit", FIXTURES / "profile_binary.json"), 2, "profile_binary.json", "not UTF-8")


def test_a_pickled_checkpoint_never_advises_unsafe_loading(run):
    with open(run / "stage-1.pt", "wb") as f:
        pickle.dump({"format": "hwsplit.checkpoint/1", "x": Path("/")}, f)
    _assert_one_line(_invoke("summary", run / "stage-1.pt"), 2, "never unpickles")


def test_baseline_like_a_baseline_run_says_like(run, tmp_path):
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "baseline": "width", "multipliers": [1], "total_epochs": 1}))
    line = _assert_one_line(_invoke("baseline", "width", "--like", run, "--out", tmp_path / "w"), 2,
                            f"like: {run} is a width baseline, not a grow run")
    assert "resume" not in line


def test_permission_errors_name_the_run_not_a_hidden_file(run, monkeypatch):
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(run)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(hwsplit.run.rundir.os, "open", refuse)
    line = _assert_one_line(_invoke("grow", "--resume", run, "--stages", "2"), 2,
                            f"run: cannot grow {run} (Permission denied)")
    assert ".lock" not in line and ".tmp" not in line


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--bogus"], ["--cost", "magic"]])
def test_usage_errors_take_one_line(args):
    result = _invoke("grow", *args)
    assert result.exit_code == 2
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output


# -- 6. minor -----------------------------------------------------------------------------------------------------

def test_a_relative_data_dir_is_saved_absolute(tmp_path, monkeypatch):
    shutil.copytree(FIXTURES / "npz_label_50000", tmp_path / "data")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data" / "train.npz", x=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
             y=rng.integers(0, 4, 40))
    monkeypatch.chdir(tmp_path)
    result = _invoke("grow", "--dataset", "npz", "--data-dir", "data", *TINY, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"]
    assert saved == str(tmp_path / "data")
