"""The README's promises: CI runs its test command, the run-directory contract it documents is the
one the code writes, and its command-line flags and settings are the ones the code defines."""
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
                 runs.CHECKPOINT_LAST, runs.CHECKPOINT_BEST, runs.OWNER, runs.OWNER_LOCK):
        assert f"`{name}`" in README, name
    for column in runs.METRIC_COLUMNS:
        assert f"`{column}`" in README, column
    for state in runs.STATES:
        assert f"`{state}`" in README, state


def readme_train_flags() -> set[str]:
    """The flags of the README's `train` usage (its lines up to the next command), with
    `--[no-]x` standing for both `--x` and `--no-x`."""
    block = next(b for b in bash_blocks(README) if "python -m finetune_core train" in b)
    lines = block[block.index("python -m finetune_core train"):].splitlines()
    usage = [lines[0]]
    for line in lines[1:]:
        if line.startswith("python -m finetune_core"):
            break
        usage.append(line)
    text = " ".join(usage)
    flags = set(re.findall(r"(?<![\w\]-])--[a-z][a-z0-9-]*", text))
    for name in re.findall(r"--\[no-\]([a-z][a-z0-9-]*)", text):
        flags |= {f"--{name}", f"--no-{name}"}
    return flags


def test_readme_lists_exactly_the_train_commands_flags():
    from finetune_core.__main__ import subcommand_flags

    documented, actual = readme_train_flags(), subcommand_flags("train")
    assert documented == actual, f"missing from the README: {sorted(actual - documented)}; " \
                                 f"not flags: {sorted(documented - actual)}"


def test_readme_documents_every_setting():
    from finetune_core.config import settings

    for name, s in settings().items():
        assert f"| `{name}` |" in README, name
        if s.flag_name:
            assert s.flag_name.removeprefix("--") in README, s.flag_name


def test_every_test_the_readme_names_exists():
    """The fault table (and any other place) cites tests as `tests/FILE.py::NAME`: a renamed or
    deleted test must not leave the README pointing at nothing."""
    cited = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", README))
    assert len(cited) >= 20  # the fault table alone cites more
    for path, name in sorted(cited):
        source = (ROOT / path).read_text()
        assert re.search(rf"def {name}\b", source), f"{path}::{name}"
