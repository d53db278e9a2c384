"""The README's promises: CI runs its test command, and the run-directory contract it documents
is the one the code writes."""
from __future__ import annotations

import re

from conftest import ROOT
from finetune_core import runs

README = (ROOT / "README.md").read_text()


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readmes_test_command():
    test_command = next(b for b in bash_blocks(README) if b.endswith("python -m pytest"))
    assert "\n" not in test_command  # one line
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_start_command_runs_the_dashboard():
    start = next(b for b in bash_blocks(README) if b.endswith("python serve.py"))
    assert "\n" not in start and "pip install -r requirements.txt" in start


def test_readme_documents_every_run_file_and_metric_column():
    for name in (runs.CONFIG, runs.STATUS, runs.METRICS, runs.PREDICTIONS, runs.LOG, runs.META,
                 runs.CHECKPOINT_LAST, runs.CHECKPOINT_BEST):
        assert f"`{name}`" in README, name
    for column in runs.METRIC_COLUMNS:
        assert f"`{column}`" in README, column
    for state in runs.STATES:
        assert f"`{state}`" in README, state
