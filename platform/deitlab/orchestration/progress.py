"""Live progress of Tune runs on the driver: a table of trials (state, epoch, metric, best), one line per ended trial,
and a closing summary with the best trial. In a packed sweep the rows are the member trials, not the packs Tune runs:
a pack reports each member's epoch, value and state (train.MEMBERS_KEY), so a member stopped by ASHA's rule or
diverged shows as stopped or failed while the rest of its pack trains. On a terminal the table redraws in place; in
logs (Ray Job logs, CI) the lines appear as trials end and the table is printed once at the end.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from deitlab.orchestration.train import MEMBERS_KEY

MAX_ROWS = 30  # beyond this the table shows running trials, the latest ended ones and a count of the rest
STYLE = {"running": "cyan", "finished": "green", "stopped": "yellow", "failed": "red", "interrupted": "magenta",
         "pending": "dim"}

ENDED = ("finished", "stopped", "failed")

_ACTIVE: list[TrialTable] = []  # the display shown now; a callback restored by Tune re-attaches to it


@dataclass
class Row:
    state: str = "pending"
    epoch: int | None = None
    value: float | None = None
    best: float | None = None
    ended: float = 0.0


class TrialTable(Callback):
    """A Tune callback and a context manager: `with TrialTable(...) as table: tuner.fit()`."""

    def __init__(self, console: Console, title: str, epochs: dict[str, int], metric: str = "acc",
                 mode: str = "max", states: dict[str, tuple[str, int | None, float | None]] | None = None):
        # epochs: each trial's planned epochs (trials of one sweep may differ), keyed by trial name, in table order
        self.console, self.title, self.epochs, self.metric, self.mode = console, title, epochs, metric, mode
        self.rows = {n: Row() for n in epochs}
        self.units: dict[str, list[str]] = {}  # packs → members (on_packs); a trial alone is its own row
        for name, (state, epoch, value) in (states or {}).items():
            self.rows[name] = Row(state, epoch, value, value)
        self.started = time.monotonic()
        self.live = Live(console=console, refresh_per_second=2, get_renderable=self.render,
                         auto_refresh=console.is_terminal)

    # Tune pickles its callbacks with the experiment state; a terminal display does not travel. A restored copy
    # attaches to whichever table is shown in the process that restores it.
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__dict__["_restored"] = True

    def _target(self) -> TrialTable | None:
        if "_restored" in self.__dict__:
            return _ACTIVE[-1] if _ACTIVE else None
        return self

    def __enter__(self):
        _ACTIVE.append(self)
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        result = self.live.__exit__(*exc)
        if not self.console.is_terminal:  # in logs the table is printed once, without a final newline
            self.console.line()
        return result

    # ------------------------------------------------------------------------------------------- packs
    def on_packs(self, units: dict[str, list[str]]) -> None:
        """The sweep's Tune trials → their member trials (orchestration/packs.py): a pack's events fill its members'
        rows; the pack itself has no row."""
        if (table := self._target()) is not None:
            table.units = {unit: members for unit, members in units.items() if members != [unit]}

    def _members(self, trial) -> list[str]:
        name = trial.config.get("trial", trial.trial_id)
        return self.units.get(name, [name])

    # ------------------------------------------------------------------------------------------- Tune events
    def on_trial_start(self, iteration, trials, trial, **info):
        if (table := self._target()) is None:
            return
        for name in table._members(trial):
            row = table.rows.setdefault(name, Row())
            if row.state not in ENDED:  # a resumed pack's members that ended before stay ended
                row.state = "running"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if (table := self._target()) is None:
            return
        members = result.get(MEMBERS_KEY)
        if not isinstance(members, dict):  # a trial alone: its own values
            members = {trial.config.get("trial", trial.trial_id): {**result, "state": "running"}}
        for name, values in members.items():
            row = table.rows.setdefault(name, Row())
            if row.state in ENDED:
                continue
            row.epoch = values.get("epoch", row.epoch)
            value = values.get(table.metric)
            if isinstance(value, (int, float)):
                row.value = value
                better = max if table.mode == "max" else min
                row.best = value if row.best is None else better(row.best, value)
            if values.get("state") in ("stopped", "failed"):  # stopped by ASHA's rule, diverged: the pack goes on
                table._end(name, values["state"], trial)
            else:
                row.state = "running"

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (table := self._target()) is None:
            return
        for name in table._members(trial):
            row = table.rows.setdefault(name, Row())
            if row.state in ENDED:
                continue
            planned = table.epochs.get(name)
            stopped = row.epoch is not None and planned is not None and row.epoch < planned
            table._end(name, "stopped" if stopped else "finished", trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        if (table := self._target()) is None:
            return
        for name in table._members(trial):
            if table.rows.setdefault(name, Row()).state not in ENDED:
                table._end(name, "failed", trial)

    def _end(self, name: str, state: str, trial) -> None:
        """A member trial (or a trial alone) ended: its row, and one line that names it."""
        row = self.rows.setdefault(name, Row())
        row.state, row.ended = state, time.monotonic()
        mark = {"finished": "[green]✓[/]", "stopped": "[yellow]■[/]", "failed": "[red]✗[/]"}[state]
        detail = f"{self.metric} {self._fmt(row.value)}" if row.value is not None else ""
        if state == "stopped":
            detail += f"  stopped early at epoch {row.epoch}/{self.epochs.get(name, '?')}"
        elif state == "failed":
            detail += f"  failed (logs: {trial.local_path or 'Ray session logs'})"
        self.live.console.print(f"  {mark} {name:<28} {detail}", highlight=False)
        if self.console.is_terminal:
            self.live.refresh()

    # ------------------------------------------------------------------------------------------- rendering
    def _fmt(self, value: float | None) -> str:
        if value is None:
            return "—"
        return f"{100 * value:.1f}%" if self.metric.startswith(("acc", "best_acc", "agreement")) else f"{value:.4f}"

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row.state] = counts.get(row.state, 0) + 1
        return counts

    def render(self) -> Table:
        elapsed = time.monotonic() - self.started
        summary = ", ".join(f"{n} {s}" for s, n in sorted(self.counts().items()))
        table = Table(title=f"{self.title}: {summary}  ({elapsed:.0f} s)", title_justify="left")
        for column in ("trial", "state", "epoch", self.metric, f"best {self.metric}"):
            table.add_column(column, justify="left" if column in ("trial", "state") else "right")
        rows = list(self.rows.items())
        if len(rows) > MAX_ROWS:  # running first, then the latest ended; pending ones only counted
            running = [r for r in rows if r[1].state == "running"]
            ended = sorted((r for r in rows if r[1].state not in ("running", "pending")), key=lambda r: -r[1].ended)
            rows = (running + ended)[:MAX_ROWS]
        for name, row in rows:
            table.add_row(name, f"[{STYLE.get(row.state, '')}]{row.state}[/]",
                          "—" if row.epoch is None else f"{row.epoch}/{self.epochs.get(name, '?')}",
                          self._fmt(row.value),
                          self._fmt(row.best))
        return table
