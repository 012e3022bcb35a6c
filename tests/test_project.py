"""The project's own promises: CI runs what the README says."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(python -m venv [^\n]+)\n```", text)


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert re.search(r"python cli.py grow --cost flops( --final-epochs \d+)?$", commands[0])
    assert "pytest" in commands[1]


def test_ci_installs_and_tests_as_the_readme_says():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = _readme_commands()[1]
    install = re.search(r"pip install [^&]+", test_command).group(0).strip()
    run = test_command.split("&&")[-1].strip()
    assert install in ci
    assert run in ci
    assert "python3 -m venv" in ci
