"""Live progress for Tune runs on the driver: a rich progress bar and one line per finished trial."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from ray.tune import Callback


class TuneProgress(Callback):
    """The bar counts finished trials; its text shows the latest epoch. Use the object as a context manager."""

    def __init__(self, console: Console, total: int, label: str, epochs: int):
        self.epochs = epochs
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[latest]}"), TimeElapsedColumn(),
                                 console=console)
        self.task = self.progress.add_task(label, total=total, latest="starting Ray workers…")

    def __getstate__(self):  # Tune pickles its callbacks for restore; a terminal display does not travel
        return {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def _live(self) -> bool:
        return "progress" in self.__dict__

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._live():
            self.progress.update(self.task, latest=f"{trial.config.get('trial', trial.trial_id)}: epoch"
                                 f" {result.get('epoch', '?')}/{self.epochs} acc {100 * result.get('acc', 0):.1f}%")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self._live():
            return
        result = trial.last_result or {}
        extra = ""
        if "agreement" in result:
            extra = f"  teacher {100 * result['acc_teacher']:.1f}%  agreement {100 * result['agreement']:.1f}%"
        self.progress.console.print(f"  [green]✓[/] {trial.config.get('trial', trial.trial_id):<24}"
                                    f" acc {100 * result.get('acc', 0):5.1f}%{extra}", highlight=False)
        self.progress.advance(self.task)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self._live():
            self.progress.console.print(f"  [red]✗[/] {trial.config.get('trial', trial.trial_id)}: failed"
                                        f" (logs: {trial.local_path or 'Ray session logs'})", highlight=False)
            self.progress.advance(self.task)
