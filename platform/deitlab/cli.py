"""The `deitlab` command. Every bad input ends in one `error: …` line and exit code 2, never a traceback."""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import SpecError, TrainingDiverged

app = typer.Typer(help="DeiT-style distillation experiments on Ray, tracked in MLflow.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
teacher_app = typer.Typer(help="Train and register teachers.", no_args_is_help=True)
sweep_app = typer.Typer(help="Plan and run sweeps.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: figures for the README, never timed tests.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
app.add_typer(sweep_app, name="sweep")
app.add_typer(bench_app, name="bench")

# Results (tables, JSON). Piped output gets room for the wide ablation table instead of rich's 80 columns.
out = Console() if sys.stdout.isatty() else Console(width=160)
err = Console(stderr=True)  # progress and errors

SetOption = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                        help="Override a spec field, e.g. distillation.tau=3")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS or"
                                                                         " a local Ray)")]


def _quiet_environment() -> None:
    """Keep the terminal for our progress: MLflow's INFO logs and progress bars, Ray Tune's tables."""
    for key, value in {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                       "RAY_AIR_NEW_OUTPUT": "0", "RAY_TRAIN_V2_ENABLED": "1", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
                       "RAY_DEDUP_LOGS": "1", "PYTHONWARNINGS": "ignore"}.items():
        os.environ.setdefault(key, value)


def handled(fn):
    """Turn SpecError into one line + exit 2; keep Ctrl-C quiet."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_environment()
        try:
            return fn(*args, **kwargs)
        except SpecError as e:
            err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except TrainingDiverged as e:
            err.print(f"[red]error:[/] training diverged: {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
    return wrapper


def _workdir_overrides(workdir: Optional[Path], prefix: str = "run.") -> dict:
    return {f"{prefix}workdir": str(workdir)} if workdir else {}


def _ray(address: Optional[str], *runs) -> None:
    """Check each run's storage (a bad URI fails in one line before Ray starts), then start or join Ray."""
    from .checkpoints import Storage
    from .ray_train import ensure_ray

    for run in runs:
        Storage.open(run.resolved_storage)

    with err.status("starting Ray…" if not (address or os.environ.get("RAY_ADDRESS")) else "connecting to Ray…"):
        ensure_ray(address)


# ------------------------------------------------------------------------------------------------------ commands
@app.command()
@handled
def check(spec: Path, kind: Annotated[str, typer.Option(help="experiment | sweep | teacher")] = "experiment",
          set_: SetOption = None) -> None:
    """Validate a spec without running anything; print the resolved spec (and a sweep's trials)."""
    from . import spec as specs

    overrides = specs.parse_set(set_)
    loaders = {"experiment": specs.load_experiment, "sweep": specs.load_sweep, "teacher": specs.load_teacher_training}
    if kind not in loaders:
        raise SpecError(f"--kind '{kind}': expected one of experiment, sweep, teacher")
    loaded = loaders[kind](spec, overrides)
    if kind == "sweep":
        _print_plan(loaded)
    else:
        out.print_json(loaded.model_dump_json(by_alias=True))


def _print_plan(sweep) -> None:
    from rich.table import Table

    from .sweep import trial_name

    points = sweep.trial_overrides()
    table = Table(title=f"sweep '{sweep.name}': {len(points)} trials", title_justify="left")
    table.add_column("trial")
    keys = sorted({k for p in points for k in p})
    for key in keys:
        table.add_column(key)
    for p in points:
        table.add_row(trial_name(p), *("—" if k not in p else str(p[k]) for k in keys))
    out.print(table)


@app.command()
@handled
def train(spec: Path, workers: Annotated[Optional[int], typer.Option(help="Ray Train workers")] = None,
          workdir: Annotated[Optional[Path], typer.Option(help="work directory (MLflow store, Ray results)")] = None,
          set_: SetOption = None, ray_address: RayAddress = None,
          resume: Annotated[bool, typer.Option("--resume", help="continue the newest unfinished run of this spec"
                                                                 " from its last complete checkpoint")] = False,
          run_id: Annotated[Optional[str], typer.Option(help="with --resume: the MLflow run to continue")] = None
          ) -> None:
    """Train one student (or baseline) with Ray Train; metrics and checkpoints every epoch."""
    from .ray_train import train_experiment
    from .spec import load_experiment, parse_set

    if run_id and not resume:
        raise SpecError("--run-id is only used with --resume")
    overrides = {**parse_set(set_), **_workdir_overrides(workdir)}
    if workers is not None:
        overrides["run.workers"] = workers
    experiment = load_experiment(spec, overrides)
    if resume:  # a run that cannot be resumed fails before Ray starts
        from .tracking import Tracking

        run_id = Tracking.for_run(experiment.run).resumable_run(experiment.name, experiment.flat_params(),
                                                                run_id).info.run_id
    _ray(ray_address, experiment.run)
    verb = "resuming" if resume else "training"
    with err.status(f"{verb} '{experiment.name}' on {experiment.run.workers} worker(s)…"):
        outcome = train_experiment(experiment, resume=resume, run_id=run_id)
    _print_metrics(experiment.name, outcome.metrics, outcome.run_id)


def _print_metrics(name: str, metrics: dict, run_id: str) -> None:
    shown = {k: metrics[k] for k in ("epoch", "acc", "acc_cls", "acc_dist", "acc_fused", "acc_teacher", "agreement")
             if k in metrics}
    out.print(f"[bold]{name}[/] (MLflow run {run_id}): " +
              "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))


@teacher_app.command("train")
@handled
def teacher_train(specs: list[Path],
                  workdir: Annotated[Optional[Path], typer.Option(help="work directory")] = None,
                  set_: SetOption = None, ray_address: RayAddress = None) -> None:
    """Train teachers (several at once) and register each as a new MLflow model version."""
    from .spec import load_teacher_training, parse_set

    overrides = {**parse_set(set_), **_workdir_overrides(workdir)}
    loaded = [load_teacher_training(s, overrides) for s in specs]
    _ray(ray_address, *(t.run for t in loaded))
    _train_teachers(loaded)


def _train_teachers(loaded) -> None:
    from .sweep import train_teachers
    from .tracking import Tracking

    names = [t.name for t in loaded]
    if len(set(names)) != len(names):
        raise SpecError(f"teacher names must differ, got {', '.join(names)}")
    with _progress(len(loaded), "teachers", max(t.optim.epochs for t in loaded)) as progress:
        failed = train_teachers(loaded, callbacks=[progress])
    if failed:
        err.print(f"[red]error:[/] teacher training failed: {', '.join(failed)}")
        raise typer.Exit(1)
    tracking = Tracking.for_run(loaded[0].run)
    for t in loaded:
        version = tracking.latest_version(t.name)
        out.print(f"registered [bold]models:/{t.name}/{version.version}[/]"
                  f"  (validation accuracy {100 * float(version.tags.get('deitlab.accuracy', 'nan')):.1f}%)")


def _progress(total: int, label: str, epochs: int):
    from .progress import TuneProgress

    return TuneProgress(err, total, label, epochs)


@sweep_app.command("plan")
@handled
def sweep_plan(sweep: Path, set_: SetOption = None) -> None:
    """Show the trials a sweep would run (after collapsing meaningless combinations)."""
    from .spec import load_sweep, parse_set

    _print_plan(load_sweep(sweep, parse_set(set_)))


@sweep_app.command("run")
@handled
def sweep_run(sweep: Path, workdir: Annotated[Optional[Path], typer.Option(help="work directory")] = None,
              set_: SetOption = None, ray_address: RayAddress = None) -> None:
    """Run a sweep: one Ray Tune trial (one Ray Train run, one MLflow child run) per grid point."""
    from .spec import load_sweep, parse_set

    loaded = load_sweep(sweep, {**parse_set(set_), **_workdir_overrides(workdir, "experiment.run.")})
    _ray(ray_address, loaded.experiment.run)
    _run_sweep(loaded)


def _run_sweep(loaded):
    from .sweep import run_sweep

    with _progress(len(loaded.trial_overrides()), f"sweep {loaded.name}", loaded.experiment.optim.epochs) as progress:
        outcome = run_sweep(loaded, callbacks=[progress])
    if outcome.failed:
        err.print(f"[red]error:[/] {len(outcome.failed)} of {len(outcome.trials)} trials failed:"
                  f" {', '.join(outcome.failed)}")
        raise typer.Exit(1)
    return outcome


@app.command()
@handled
def report(sweep: Annotated[str, typer.Argument(help="a sweep spec file, or a sweep name")],
           format: Annotated[str, typer.Option("--format", "-f", help="table | json")] = "table",
           workdir: Annotated[Optional[Path], typer.Option(help="work directory of the default MLflow store")] = None,
           tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI")] = None,
           experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment name")] = None) -> None:
    """The ablation table and the teacher comparison of a sweep, from MLflow."""
    from .report import build_report, render
    from .spec import RunSpec, load_sweep
    from .tracking import Tracking

    if format not in ("table", "json"):
        raise SpecError(f"--format '{format}': expected table or json")
    if sweep.endswith((".yaml", ".yml")) or Path(sweep).is_file():
        loaded = load_sweep(sweep, _workdir_overrides(workdir, "experiment.run."))
        name, run = loaded.name, loaded.experiment.run
    else:
        name, run = sweep, RunSpec(workdir=str(workdir)) if workdir else RunSpec()
    run = run.model_copy(update={k: v for k, v in {"tracking_uri": tracking_uri, "experiment": experiment}.items()
                                 if v})
    if not run.tracking_uri and not (run.workdir_path / "mlflow.db").is_file():
        raise SpecError(f"no MLflow store at {run.workdir_path / 'mlflow.db'} (give --workdir or --tracking-uri)")
    result = build_report(Tracking.for_run(run), name)
    if format == "json":
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        render(result, out)


@app.command()
@handled
def quickstart(workdir: Annotated[Path, typer.Option(help="where the MLflow store and Ray results go")]
               = Path("deitlab-quickstart"),
               set_: SetOption = None, ray_address: RayAddress = None) -> None:
    """Train two teachers on digits, run a 9-trial distillation sweep, print the report. 4 to 8 minutes on 2 cores."""
    from .report import build_report, render
    from .spec import load_sweep, load_teacher_training, parse_set
    from .tracking import Tracking

    start = time.perf_counter()
    workdir = workdir.expanduser().resolve()
    bundled = resources.files("deitlab") / "specs"
    with resources.as_file(bundled) as spec_dir:
        teachers = [load_teacher_training(spec_dir / f"quickstart_teacher_{k}.yaml", {"run.workdir": str(workdir)})
                    for k in ("convnet", "vit")]
        sweep = load_sweep(spec_dir / "quickstart_sweep.yaml",
                           {**parse_set(set_), "experiment.run.workdir": str(workdir)})
    err.print(f"[bold]deitlab quickstart[/] — work directory {workdir}")
    _ray(ray_address, sweep.experiment.run)
    err.print("[bold]1/3[/] training two teachers on digits (a small convnet and a small ViT)")
    _train_teachers(teachers)
    err.print(f"[bold]2/3[/] sweep '{sweep.name}': {len(sweep.trial_overrides())} trials, none/soft/hard × τ × λ × teacher")
    _run_sweep(sweep)
    err.print("[bold]3/3[/] report")
    render(build_report(Tracking.for_run(sweep.experiment.run), sweep.name), out)
    out.print(f"\nfinished in {time.perf_counter() - start:.0f} s. Browse the runs:\n"
              f"  mlflow ui --backend-store-uri {sweep.experiment.run.resolved_tracking_uri}\n"
              f"  deitlab report {sweep.name} --workdir {workdir} --format json")


@bench_app.command("overhead")
@handled
def bench_overhead(spec: Annotated[Optional[Path], typer.Argument(help="experiment spec (default: the bundled"
                                                                        " bench_overhead.yaml)")] = None,
                   set_: SetOption = None, ray_address: RayAddress = None,
                   repeats: Annotated[int, typer.Option(min=1, help="bare and Ray runs, alternated, of each")] = 2,
                   json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the figures here")]
                   = None) -> None:
    """The Ray Train path against the bare loop: same spec, device and data; one worker."""
    from rich.table import Table

    from .bench import measure_overhead
    from .spec import load_experiment, parse_set

    overrides = parse_set(set_)
    if spec is None:
        with resources.as_file(resources.files("deitlab") / "specs" / "bench_overhead.yaml") as bundled:
            loaded = load_experiment(bundled, overrides)
    else:
        loaded = load_experiment(spec, overrides)
    _ray(ray_address, loaded.run)
    with err.status(f"bare loop and Ray Train, {repeats}× each, {loaded.optim.epochs} epochs per run…"):
        result = measure_overhead(loaded, repeats)
    table = Table(title=f"Ray Train overhead on {result.device}", title_justify="left")
    for column in ("path", "steady epoch (s)", "total (s)"):
        table.add_column(column)
    table.add_row("bare Engine", f"{result.bare_epoch_s:.3f}", f"{result.bare_total_s:.1f}")
    table.add_row("Ray Train, 1 worker", f"{result.ray_epoch_s:.3f}", f"{result.ray_total_s:.1f}")
    out.print(table)
    out.print(f"per-epoch overhead: {100 * result.epoch_overhead:+.1f}%  (median of {result.repeats} runs ×"
              f" {result.epochs - 1} epochs per path, first epochs excluded; Ray's start-up is in the total)")
    if json_out:
        json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
