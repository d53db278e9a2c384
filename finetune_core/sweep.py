"""A sweep: the grid of learning rates x head multipliers the book's exercises ask about.

One run per cell, every other setting as in the recipe, all in one group (so they are followed,
overlaid and stopped together); the result is a table of each cell's score, the accuracy of the
model its run keeps (runs.RunScore): the best validation epoch's validation accuracy when the
recipe holds a validation split out (choosing on the test split would make the test figure
optimistic), else the final test accuracy, as the book does.

    configs = sweep_configs(config, [1e-5, 5e-5, 2e-4], [1, 10, 30], group=new_sweep_group())
    ...queue them (JobManager.submit)...
    grid = sweep_grid(sweep_table(run_paths))
"""
from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import ConfigError, TrainConfig, check_value, default_run_name, settings

MAX_SWEEP_RUNS = 25   # one CPU trains one run at a time: a 5 x 5 grid is already an afternoon
GROUP_PREFIX = "sweep-"
SWEPT = ("lr", "head_lr_mult")
SCORED_STATES = ("completed", "stopped", "diverged")  # a kept model of sorts; failed runs have none


def new_sweep_group() -> str:
    """A fresh group name that marks its runs as one sweep."""
    return f"{GROUP_PREFIX}{uuid.uuid4().hex[:8]}"


def is_sweep_group(group: str) -> bool:
    return bool(group) and group.startswith(GROUP_PREFIX)


def parse_values(text: str, name: str) -> list[float]:
    """The values typed for one swept setting ("1e-5, 5e-5 2e-4": commas or spaces), sorted, each
    checked as the setting checks it. Raises ConfigError({name: message}) that names the setting
    by its label and the value at fault."""
    s = settings()[name]
    parts = [p for p in re.split(r"[,;\s]+", str(text).strip()) if p]
    if not parts:
        raise ConfigError({name: f"{s.label}: give at least one value to sweep (e.g. 1e-4, 1e-3)"})
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ConfigError({name: f"{s.label}: {part!r} is not a number"}) from None
        problem = check_value(s, value)
        if problem:
            raise ConfigError({name: f"{s.label} {problem}"})
        values.append(value)
    return sorted(set(values))


def sweep_configs(config: TrainConfig, lrs, head_lr_mults, group: str,
                  max_runs: int = MAX_SWEEP_RUNS) -> list[TrainConfig]:
    """One validated config per (lr, head multiplier) cell, lr-major, in one group, each named
    after its cell ("resnet18 lr=5e-05 x10"). Raises ConfigError naming the problem: an empty or
    repeated list, more runs than `max_runs`, several multipliers where the multiplier has no
    effect (without parameter groups), or a setting of the recipe itself."""
    lrs, head_lr_mults = list(lrs), list(head_lr_mults)
    errors = {}
    for name, values in (("lr", lrs), ("head_lr_mult", head_lr_mults)):
        label = settings()[name].label
        if not values:
            errors[name] = f"{label}: give at least one value to sweep"
        elif len(set(values)) != len(values):
            errors[name] = f"{label}: a value is repeated in {[f'{v:g}' for v in values]}"
    if errors:
        raise ConfigError(errors)
    if not config.param_groups and len(head_lr_mults) > 1:
        raise ConfigError({"head_lr_mult": f"{settings()['head_lr_mult'].label}: has no effect without parameter "
                                           "groups (one group at lr): sweep one value, or turn parameter groups on"})
    n = len(lrs) * len(head_lr_mults)
    if n > max_runs:
        raise ConfigError({"sweep": f"{len(lrs)} learning rates x {len(head_lr_mults)} multipliers = {n} runs, more "
                                    f"than the limit of {max_runs}: remove some values"})
    base = config.name or default_run_name(config)
    configs = []
    for lr in lrs:
        for mult in head_lr_mults:
            cell = config.replace(lr=float(lr), head_lr_mult=float(mult), group=group,
                                  name=f"{base} lr={lr:g} x{mult:g}")
            configs.append(cell.check())
    return configs


# --------------------------------------------------------------------------------------------
# The result


def sweep_table(run_paths) -> pd.DataFrame:
    """One row per run of a sweep: run_id, name, state, lr, head_lr_mult, accuracy (the accuracy of
    the model the run keeps, runs.RunScore.selection: its best validation epoch's when it held a
    validation split out, else its final test accuracy; empty until the run has finished), split
    ("validation" or "test")."""
    from .runs import RunDir, run_score

    rows = []
    for path in run_paths:
        run = RunDir(path)
        try:
            cfg = run.read_config().get("config", {})
            status = run.read_status(default={})
        except (OSError, ValueError):
            continue  # a damaged or deleted run folder has no cell
        state = status.get("state", "")
        accuracy, split = None, ("validation" if (cfg.get("val_fraction") or 0) > 0 else "test")
        if state in SCORED_STATES:
            accuracy, split = run_score(status).selection()
        rows.append({"run_id": run.id, "name": cfg.get("name", run.id), "state": state, "lr": cfg.get("lr"),
                     "head_lr_mult": cfg.get("head_lr_mult"), "accuracy": accuracy, "split": split})
    return pd.DataFrame(rows, columns=["run_id", "name", "state", "lr", "head_lr_mult", "accuracy", "split"])


@dataclass
class SweepGrid:
    """The sweep as a grid: rows are learning rates, columns head multipliers (both ascending).
    `accuracy[i][j]` is None until that cell's run has finished; `states[i][j]` is its run's state
    ("" for a cell with no run). `best` is the (row, column) of the best finished cell (the first
    of equals in lr-major order), None while none has finished."""
    lrs: list[float]
    head_lr_mults: list[float]
    accuracy: list[list[float | None]]
    states: list[list[str]]
    run_ids: list[list[str]]
    split: str = "test"
    best: tuple[int, int] | None = None
    finished: int = 0
    total: int = 0

    @property
    def label(self) -> str:
        """What each cell's number is, in the words every page uses (runs.selection_label)."""
        from .runs import selection_label

        return selection_label(self.split)

    @property
    def best_values(self) -> tuple[float, float] | None:
        """(lr, head multiplier) of the best cell."""
        if self.best is None:
            return None
        return self.lrs[self.best[0]], self.head_lr_mults[self.best[1]]


def sweep_grid(table: pd.DataFrame) -> SweepGrid:
    """The table of sweep_table as a grid for a heatmap, with the best cell found."""
    lrs = sorted({float(v) for v in table["lr"].dropna()})
    mults = sorted({float(v) for v in table["head_lr_mult"].dropna()})
    accuracy = [[None] * len(mults) for _ in lrs]
    states = [[""] * len(mults) for _ in lrs]
    run_ids = [[""] * len(mults) for _ in lrs]
    best, best_value, finished = None, -math.inf, 0
    for row in table.itertuples(index=False):
        if pd.isna(row.lr) or pd.isna(row.head_lr_mult):
            continue
        i, j = lrs.index(float(row.lr)), mults.index(float(row.head_lr_mult))
        states[i][j], run_ids[i][j] = row.state, row.run_id
        if row.accuracy is not None and not pd.isna(row.accuracy):
            accuracy[i][j] = float(row.accuracy)
            finished += 1
    for i in range(len(lrs)):
        for j in range(len(mults)):
            if accuracy[i][j] is not None and accuracy[i][j] > best_value:
                best, best_value = (i, j), accuracy[i][j]
    split = table["split"].iloc[0] if len(table) else "test"
    return SweepGrid(lrs, mults, accuracy, states, run_ids, split=split, best=best, finished=finished,
                     total=len(table))


def sweep_recipe(run_paths) -> dict:
    """The settings the sweep's cells share (the first cell's config), {} when none can be read."""
    from .runs import RunDir

    for path in run_paths:
        try:
            return RunDir(path).read_config().get("config", {})
        except (OSError, ValueError):
            continue
    return {}


def best_cell_offer(grid: SweepGrid, recipe: dict, form_data: str) -> tuple[str, str]:
    """(the label of the button that puts the best cell into the form, why it may not: "" when it
    may). The label names the dataset and backbone the cell was measured on; a form set to another
    dataset is refused, saying so: the sweep's numbers say nothing about other data."""
    if grid.best_values is None:
        return "", "no cell has finished yet"
    lr, mult = grid.best_values
    data = recipe.get("data", "")
    label = (f"Use the best cell: lr {lr:g}, head x{mult:g} ({recipe.get('backbone', '?')} on "
             f"{Path(data).name or '?'})")
    if not form_data or not data or not _same_folder(data, form_data):
        return label, (f"the best cell was measured on {data or 'an unknown dataset'}, and the form is set to "
                       f"{form_data or 'no dataset'}: choose that dataset in Setup to use it")
    return label, ""


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):
        return a == b
