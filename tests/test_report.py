"""`report`: a comparison table and plots of several runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from cli import main
from hwsplit.run.report import load_run, write_report

TINY = ["--epochs", "1", "--limit", "300", "--batch-size", "32"]


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A grow run priced in MACs and a vanilla (cost none: neurons) one."""
    base = tmp_path_factory.mktemp("runs")
    _invoke("grow", *TINY, "--stages", "1", "--out", str(base / "flops"))
    _invoke("grow", *TINY, "--stages", "1", "--cost", "none", "--out", str(base / "vanilla"))
    return base / "flops", base / "vanilla"


def _assert_a_real_plot(path: Path, min_width: int = 400) -> None:
    image = imread(path)
    assert image.ndim == 3 and image.shape[1] >= min_width and image.shape[0] >= 300, image.shape
    rgb = image[..., :3]
    assert float(rgb.std()) > 0.02  # not blank
    colours = np.unique((rgb.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
    assert len(colours) >= 8, len(colours)


def test_report_writes_the_table_and_readable_plots(tmp_path, runs):
    out = tmp_path / "report"
    output = _invoke("report", *map(str, runs), "--out", str(out))
    assert {p.name for p in out.iterdir()} == {"table.md", "accuracy_vs_macs.png", "accuracy_vs_cost.png",
                                               "widths.png"}
    for name in ("accuracy_vs_macs.png", "accuracy_vs_cost.png", "widths.png"):
        _assert_a_real_plot(out / name)
    table = (out / "table.md").read_text()
    flops_records = [json.loads(line) for line in (runs[0] / "stages.jsonl").read_text().splitlines()]
    for run in ("flops", "vanilla"):
        assert table.count(f"| {run} |") == 2  # one row per stage
    assert f"{100 * flops_records[1]['test_top1']:.2f}" in table
    assert "neurons" in table and "MACs" in table and "measured latency (ms)" in table
    # the CLI prints the same table
    assert "test top-1 (%)" in output and "vanilla" in output and "wrote" in output
    # the widths panel is one per run: taller with more runs
    assert imread(out / "widths.png").shape[0] > imread(out / "accuracy_vs_macs.png").shape[0]


def test_no_cost_plot_when_every_run_is_priced_in_macs(tmp_path, runs):
    result = write_report([runs[0]], tmp_path / "one")
    assert sorted(Path(f).name for f in result["files"]) == ["accuracy_vs_macs.png", "table.md", "widths.png"]


def test_runs_with_the_same_directory_name_are_told_apart(tmp_path, runs):
    for parent in ("a", "b"):
        shutil.copytree(runs[0], tmp_path / parent / "grow")
    result = write_report([tmp_path / "a" / "grow", tmp_path / "b" / "grow"], tmp_path / "report")
    assert result["runs"] == ["a/grow", "b/grow"]


def test_report_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not a directory" in result.output and "Traceback" not in result.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no completed stage"):
        load_run(tmp_path / "empty")
