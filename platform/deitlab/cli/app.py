"""The `deitlab` command's frame: the Typer apps, the consoles, the shared options, and the rule that every bad
input ends in one `error: …` line and exit code 2, never a traceback.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from deitlab.errors import SpecError, TrainingDiverged
from deitlab.orchestration.preflight import preflight
from deitlab.spec.loading import load_sweep
from deitlab.spec.schema import RunSpec, check_tracking_uri
from deitlab.tracking.store import Tracking, check_tracking_server


class _OneLineUsageErrors(typer.Typer):
    """The console script: click's own usage errors (an unknown option, a missing argument, a value of the wrong type)
    end in one `error: …` line and exit 2 too, like every other bad input, instead of click's usage box."""

    def __call__(self, *args, **kwargs):
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as e:  # click's errors as Typer raises them; usage errors have exit code 2
            if type(e).__name__ != "NoArgsIsHelpError":  # `deitlab sweep` alone printed its help: nothing to add
                ctx = getattr(e, "ctx", None)
                where = f"; see `{ctx.command_path} --help`" if ctx is not None and e.exit_code == 2 else ""
                print_error(e.format_message().rstrip(".") + where)
            sys.exit(e.exit_code)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # what click's standalone mode does


app = _OneLineUsageErrors(help="DeiT-style distillation experiments on Ray, tracked in MLflow.",
                          no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


teacher_app = typer.Typer(help="Train and register teachers.", no_args_is_help=True)


sweep_app = typer.Typer(help="Plan and run sweeps.", no_args_is_help=True)


data_app = typer.Typer(help="Data packs: image folders as Parquet shards for the GPU data path.", no_args_is_help=True)


bench_app = typer.Typer(help="Benchmarks: figures for the README, never timed tests.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
app.add_typer(sweep_app, name="sweep")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


# Results (tables, JSON). Piped output gets room for the wide ablation table instead of rich's 80 columns.
out = Console() if sys.stdout.isatty() else Console(width=160)


err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)  # progress and errors


SetOption = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                        help="Override a spec field, e.g. distillation.tau=3")]


WorkdirOption = Annotated[Optional[Path], typer.Option(help="work directory of the default MLflow store")]


TrackingOption = Annotated[Optional[str], typer.Option(help="MLflow tracking URI")]


ExperimentOption = Annotated[Optional[str], typer.Option(help="MLflow experiment name")]


RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS or"
                                                                         " a local Ray)")]


def _quiet_environment() -> None:
    """Keep the terminal for our progress: MLflow's INFO logs and progress bars, Ray Tune's tables."""
    for key, value in {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                       "RAY_AIR_NEW_OUTPUT": "0", "RAY_TRAIN_V2_ENABLED": "1", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
                       "RAY_DEDUP_LOGS": "1", "PYTHONWARNINGS": "ignore"}.items():
        os.environ.setdefault(key, value)


def print_error(message: str) -> None:
    """One `error: …` line on stderr, whatever the message holds (newlines, [brackets] rich would read as markup)."""
    from rich.markup import escape

    err.print(f"[red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def handled(fn):
    """Turn SpecError into one line + exit 2; keep Ctrl-C quiet."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_environment()
        signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop`, `kill`: end like Ctrl-C, runs closed in MLflow
        try:
            return fn(*args, **kwargs)
        except SpecError as e:
            print_error(str(e))
            raise typer.Exit(2) from None
        except TrainingDiverged as e:
            print_error(f"training diverged: {e}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
    return wrapper


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def workdir_overrides(workdir: Optional[Path], prefix: str = "run.") -> dict:
    return {f"{prefix}workdir": str(workdir)} if workdir else {}


def checked(specs: list, address: Optional[str] = None, start_ray: bool = True):
    """The preflight (orchestration.preflight) with the terminal's spinner: everything checked before anything is
    started or written; then Ray is up, unless `start_ray` is False."""
    return preflight(specs, address, status=err.status, start_ray=start_ray)


def trial_table(title: str, epochs: dict[str, int], metric: str = "acc", mode: str = "max", states=None):
    from deitlab.orchestration.progress import TrialTable

    return TrialTable(err, title, epochs, metric, mode, states)


def located_sweep(sweep: str, workdir: Optional[Path], tracking_uri: Optional[str], experiment: Optional[str]):
    """(name, Tracking) of a sweep given as a spec file or a name (then in the work directory's MLflow store)."""
    loaded = None
    if sweep.endswith((".yaml", ".yml", ".json")) or Path(sweep).is_file():
        loaded = load_sweep(sweep, workdir_overrides(workdir, "experiment.run."))
        name, run = loaded.name, loaded.experiment.run
    else:
        name, run = sweep, RunSpec(workdir=str(workdir)) if workdir else RunSpec()
    if tracking_uri:
        checked_tracking_uri(tracking_uri)
    run = run.model_copy(update={k: v for k, v in {"tracking_uri": tracking_uri, "experiment": experiment}.items()
                                 if v})
    if not run.tracking_uri and not (run.workdir_path / "mlflow.db").is_file():
        raise SpecError(f"no MLflow store at {run.workdir_path / 'mlflow.db'} (give --workdir or --tracking-uri)")
    tracking = Tracking.for_run(run)
    if not experiment and not loaded:  # a bare name: whichever experiment holds it
        found = tracking.sweep_experiment(name)
        if found:
            tracking = Tracking.for_run(run.model_copy(update={"experiment": found}))
    return name, tracking


def checked_tracking_uri(uri: str) -> str:
    try:
        checked = check_tracking_uri(uri)
    except ValueError as err:
        raise SpecError(f"--tracking-uri: {err}") from None
    check_tracking_server(checked)
    return checked


SweepArg = Annotated[str, typer.Argument(help="a sweep name, or its spec file")]
