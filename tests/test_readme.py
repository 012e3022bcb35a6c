"""Every shell example in README.md parses against the CLI; the cheap ones, and the Python that uses a
grown network, run (issue 29: a README that is true)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def _commands() -> list[list[str]]:
    """The arguments after ``cli.py`` of every ``python cli.py …`` / ``torchrun … cli.py …`` in a bash block
    (continued lines joined, comments dropped, ``a && b`` split)."""
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            segment: list[str] = []
            for token in [*tokens, "&&"]:
                if token != "&&":
                    segment.append(token)
                    continue
                if "cli.py" in segment:
                    out.append(segment[segment.index("cli.py") + 1:])
                segment = []
    return out


COMMANDS = _commands()


def test_the_readme_has_examples_of_every_command():
    assert len(COMMANDS) > 25
    used = {args[0] for args in COMMANDS}
    assert set(main.commands) <= used, set(main.commands) - used


def _parse(args: list[str]) -> click.Context:
    """Parse ``args`` as the command line would, down to the subcommand, without running anything."""
    command: click.Command = main
    ctx = command.make_context("cli.py", list(args))
    while isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args]  # what click's Group.invoke resolves the subcommand from
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_every_shell_example_parses_against_the_cli(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # arguments that must exist (finetune's RUN) exist here, empty
    for run in ("runs/grow", "runs/grow4"):
        (tmp_path / run).mkdir(parents=True, exist_ok=True)
    ctx = _parse(args)
    assert ctx.command.name in args


def test_summary_of_the_standard_mobilenet_prints_the_readme_figure():
    assert ["summary", "mobilenet_v1"] in COMMANDS
    result = CliRunner().invoke(main, ["summary", "mobilenet_v1"])
    assert result.exit_code == 0, result.output
    assert "568,740,352 MACs" in result.output and "568,740,352" in README


def test_running_the_main_command_twice_is_as_the_readme_says(tmp_path, monkeypatch):
    """Again: a one-line error naming --resume and --overwrite; --overwrite replaces the run; then the
    README's export and its Python on a raw image run (on a tiny version of the main job)."""
    monkeypatch.chdir(tmp_path)
    tiny = ["--stages", "1", "--epochs", "1", "--limit", "200", "--batch-size", "32"]
    main_job = ["grow", "--cost", "flops", "--final-epochs", "15"]
    assert main_job in COMMANDS
    first = CliRunner().invoke(main, [*main_job[:-1], "1", *tiny])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, [*main_job[:-1], "1", *tiny])
    assert again.exit_code == 2 and "--resume" in again.output and "--overwrite" in again.output
    assert [*main_job, "--overwrite"] in COMMANDS
    replaced = CliRunner().invoke(main, [*main_job[:-1], "1", *tiny, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    export = ["export", "runs/grow/final", "--with-preprocessing", "--onnx", "model.onnx"]
    assert export in COMMANDS
    result = CliRunner().invoke(main, export)
    assert result.exit_code == 0, result.output
    snippets = [b for b in _blocks("python") if "model.onnx" in b or "load_model(" in b]
    assert len(snippets) == 2
    for code in snippets:
        exec(compile(code, "README.md", "exec"), {})


def test_every_python_example_compiles():
    for code in _blocks("python"):
        compile(code, "README.md", "exec")
