"""The `deitlab` command. Every bad input ends in one `error: …` line and exit code 2, never a traceback."""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import SpecError, TrainingDiverged, one_line

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
                _error(e.format_message().rstrip(".") + where)
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


def _error(message: str) -> None:
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
            _error(str(e))
            raise typer.Exit(2) from None
        except TrainingDiverged as e:
            _error(f"training diverged: {e}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
    return wrapper


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _workdir_overrides(workdir: Optional[Path], prefix: str = "run.") -> dict:
    return {f"{prefix}workdir": str(workdir)} if workdir else {}


def _ray(address: Optional[str], *runs) -> None:
    """Check where the runs go and the cluster's address (_check_targets), then start or join Ray."""
    _check_targets(address, *runs)
    _start_ray(address)


def _start_ray(address: Optional[str]) -> None:
    what = "--ray-address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")

    from .ray_train import ensure_ray

    with err.status("starting Ray…" if not address else "connecting to Ray…"):
        try:
            ensure_ray(address)
        except (ConnectionError, TimeoutError, ValueError) as e:  # what ray.init raises for a cluster it cannot join
            raise SpecError(f"{what} '{address}': cannot join a Ray cluster there ({one_line(e, 200)})") from None


def _check_targets(address: Optional[str], *runs) -> None:
    """Each run's storage can be written and its S3 credentials are complete, its tracking server answers and takes
    the credentials, and the Ray cluster's address answers: checked without writing anything (a bad one fails in one
    line before Ray starts or a folder is made)."""
    from .checkpoints import Storage, check_aws_credentials
    from .tracking import check_tracking_server

    for run in runs:
        Storage.probe(run.resolved_storage)
        check_tracking_server(run.resolved_tracking_uri)
        if (run.artifacts or "").startswith("s3://"):  # MLflow's boto3 needs them; it would fail only at the end
            check_aws_credentials(f"run.artifacts '{run.artifacts}'")
    if address or os.environ.get("RAY_ADDRESS"):
        _check_ray_address(address or os.environ["RAY_ADDRESS"], "--ray-address" if address else "RAY_ADDRESS")
    _leave_ray_job_dir(runs)


_RAY_JOB_DIRS = f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}"


def _leave_ray_job_dir(runs) -> None:
    """Under `ray job submit --working-dir DIR`, this process starts in Ray's unpacked copy of DIR, a temporary folder
    Ray owns and removes (cache clean-up, a new session) — reported removed under a running job on a two-node
    cluster, where MLflow's client then failed in os.getcwd(). Records kept there would be lost with it: a run whose MLflow
    store, checkpoints or artifacts would land inside is refused (a relative --workdir does that). Then the process
    moves to a folder that stays; every path it uses was made absolute when its spec was loaded."""
    try:
        cwd = Path.cwd()
    except FileNotFoundError:
        return
    if _RAY_JOB_DIRS not in f"{cwd}{os.sep}":
        return
    for run in runs:
        local = {"the MLflow store": "" if run.tracking_uri else str(run.workdir_path / "mlflow.db"),
                 "checkpoints": run.resolved_storage,
                 "artifacts": run.artifacts or ("" if run.tracking_uri else str(run.workdir_path / "mlartifacts"))}
        paths = {what: Path(uri.removeprefix("file://")) for what, uri in local.items()
                 if uri and "://" not in uri.removeprefix("file://")}
        lost = [(what, path) for what, path in paths.items() if path.resolve().is_relative_to(cwd)]
        if lost:
            what, path = lost[0]
            raise SpecError(f"{what} would be kept in {path}, inside this Ray job's temporary working_dir, which Ray"
                            " deletes: give an absolute --workdir outside it (or run.tracking_uri and run.storage)")
    os.chdir(Path.home() if Path.home().is_dir() else Path("/"))


def _check_ray_address(address: str, what: str) -> None:
    """A Ray cluster address that can be joined: HEAD:6379 (the GCS) or ray://HEAD:10001 (Ray Client), with something
    listening. ray.init would retry an address where nothing listens for minutes, printing a warning every few
    seconds; a dashboard URL (what `sweep submit --address` takes) is the usual mix-up."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise SpecError(f"{what} '{address}': that is a dashboard URL (for `sweep submit --address`); give the"
                        " cluster's GCS address, HEAD:6379, or ray://HEAD:10001")
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host = port = None
    if parts.scheme not in ("gcs", "ray") or not host or port is None:
        raise SpecError(f"{what} '{address}': expected HEAD:PORT (the GCS, e.g. 10.0.0.5:6379) or ray://HEAD:10001")
    try:
        socket.create_connection((host, port), timeout=5).close()
    except TimeoutError:
        raise SpecError(f"{what} '{address}': no Ray cluster answers there (no answer within 5 s)") from None
    except OSError as e:  # refused, unknown host, unreachable network
        raise SpecError(f"{what} '{address}': no Ray cluster answers there ({e.strerror or type(e).__name__})"
                        ) from None


def _preflight(*specs) -> None:
    """What the driver can check on this machine before anything starts or is written: every image of an image
    folder decodes; local teacher checkpoints and `init_from` files load and fit the data (architecture, classes,
    channels). Ray Train's own preflight repeats the teacher checks later, also for MLflow model URIs. `specs` are
    experiments (a sweep's trials) or teacher trainings; each data set, file and teacher is checked once. Missing,
    truncated and foreign files fail before torch is imported."""
    from .checkpoints import model_file, student_file
    from .shards import check_readable

    data_sets: list = []  # (data spec, its loaded bundle or None)
    done: list = []  # init_from files and (teacher, data) pairs already checked

    def bundle(data):
        from .data import load_data

        index = next(i for i, (known, _) in enumerate(data_sets) if known == data)
        if data_sets[index][1] is None:
            data_sets[index] = (data, load_data(data))
        return data_sets[index][1]

    for spec in specs:
        if all(known != spec.data for known, _ in data_sets):
            if spec.data.path:  # digits and synthetic data have nothing to check
                with err.status(f"checking the {spec.data.dataset} data at {spec.data.path}…"):
                    check_readable(spec.data)  # an image folder: every image is decoded once
            data_sets.append((spec.data, None))
        init_from = getattr(spec, "init_from", None)
        # runs:/ and models:/ need MLflow: Ray Train's preflight has them
        if init_from and not init_from.startswith(("runs:/", "models:/")) and init_from not in done:
            student_file(init_from)
            from .models import student_weights

            student_weights(init_from)  # loads, and refuses weights that are not a DeiT student's
            done.append(init_from)
        teacher = getattr(spec, "teacher", None)
        if teacher is not None and teacher.checkpoint and (teacher, spec.data) not in done:
            try:
                model_file(teacher.checkpoint)
                from .models import load_teacher

                fitted = bundle(spec.data)
                load_teacher(teacher.checkpoint, num_classes=fitted.num_classes, in_chans=fitted.in_chans,
                             arch=teacher.arch, model_kwargs=teacher.model_kwargs)
            except SpecError as e:  # say whose file it is: a sweep's teachers have names
                raise SpecError(f"teacher '{teacher.name}': {e}" if teacher.name else f"teacher: {e}") from None
            done.append((teacher, spec.data))
        if teacher is not None and teacher.pretrained and (teacher, spec.data) not in done:
            from .models import load_pretrained_teacher

            fitted = bundle(spec.data)
            with err.status(f"loading the pretrained teacher {teacher.arch}…"):
                try:
                    load_pretrained_teacher(teacher.arch, num_classes=fitted.num_classes, in_chans=fitted.in_chans,
                                            model_kwargs=teacher.model_kwargs)
                except SpecError as e:
                    raise SpecError(f"teacher '{teacher.name}': {e}" if teacher.name else f"teacher: {e}") from None
            done.append((teacher, spec.data))
        if getattr(spec, "pretrained", False) and spec.arch not in done:  # a teacher fine-tuned from hub weights
            from .pretrained import create_pretrained

            with err.status(f"loading the pretrained weights of {spec.arch}…"):
                create_pretrained(spec.arch)
            done.append(spec.arch)


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
    from .spec import load_experiment, parse_set

    if run_id and not resume:
        raise SpecError("--run-id is only used with --resume")
    overrides = {**parse_set(set_), **_workdir_overrides(workdir)}
    if workers is not None:
        overrides["run.workers"] = workers
    experiment = load_experiment(spec, overrides)
    _check_targets(ray_address, experiment.run)  # before Ray Train and MLflow are imported: a few seconds sooner
    _preflight(experiment)
    from .ray_train import train_experiment

    if resume:  # a run that cannot be resumed fails before Ray starts
        from .tracking import Tracking

        run_id = Tracking.for_run(experiment.run).resumable_run(experiment.name, experiment.flat_params(),
                                                                run_id).id
    _start_ray(ray_address)
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
    _check_teacher_names(loaded)
    _check_targets(ray_address, *(t.run for t in loaded))
    _preflight(*loaded)
    _start_ray(ray_address)
    _train_teachers(loaded)


@teacher_app.command("import")
@handled
def teacher_import(source: Annotated[str, typer.Argument(metavar="NAME", help="timm model with a pretrained tag"
                                                          " (regnety_160.deit_in1k) or hf-hub:ORG/NAME")],
                   name: Annotated[str, typer.Option("--name", help="registered model name, e.g. regnety-16gf")],
                   data: Annotated[Optional[Path], typer.Option(help="a spec whose data section (or a data spec)"
                                                                     " the weights are evaluated on")] = None,
                   alias: Annotated[Optional[str], typer.Option(help="registry alias moved to the new version")] = None,
                   workdir: WorkdirOption = None, tracking_uri: TrackingOption = None) -> None:
    """Fetch pretrained weights once (here, through timm and the Hugging Face hub cache) and register them in MLflow;
    sweeps then name models:/NAME@ALIAS and workers read them from MLflow, never from the hub."""
    import re

    from .spec import RunSpec, TeacherSpec, validate
    from .teacher_import import import_teacher, load_data_spec

    validate(TeacherSpec, {"arch": source, "pretrained": True}, source=source)  # a known name with weights
    if alias is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", alias):
        raise SpecError(f"--alias '{alias}': letters, digits, _ and -, not starting with a digit")
    data_spec = load_data_spec(data) if data else None
    if tracking_uri:
        _checked_tracking_uri(tracking_uri)
    run = validate(RunSpec, {k: v for k, v in {"workdir": str(workdir) if workdir else None,
                                               "tracking_uri": tracking_uri}.items() if v}, source="run")
    _check_targets(None, run)
    with err.status(f"importing {source}…"):
        imported = import_teacher(source, name, run, data_spec, alias)
    card = imported.card
    accuracy = card.get("accuracy_note") or ""
    version = imported.uri.rsplit("/", 1)[-1]
    if not accuracy:
        from .tracking import Tracking

        tags = Tracking.for_run(run).version(name, version).tags
        accuracy = f"validation accuracy {100 * float(tags['deitlab.accuracy']):.1f}%"
    out.print(f"registered [bold]{imported.uri}[/]{f' (alias {alias})' if alias else ''}: {source},"
              f" sha256 {card['weights_sha256'][:16]}…, {card['params_m']} M params, {accuracy}", highlight=False)


def _check_teacher_names(loaded) -> None:
    names = [t.name for t in loaded]
    if len(set(names)) != len(names):  # each is registered under its name: one would hide the other
        raise SpecError(f"teacher names must differ, got {', '.join(names)}")


def _train_teachers(loaded) -> None:
    from .sweep import train_teachers
    from .tracking import Tracking

    with _table("teachers", {t.name: t.optim.epochs for t in loaded}) as table:
        failed = train_teachers(loaded, callbacks=[table])
    if failed:
        err.print(f"[red]error:[/] teacher training failed: {', '.join(failed)}")
        raise typer.Exit(1)
    tracking = Tracking.for_run(loaded[0].run)
    for t in loaded:
        version = tracking.latest_version(t.name)
        out.print(f"registered [bold]models:/{t.name}/{version.version}[/]"
                  f"  (validation accuracy {100 * float(version.tags.get('deitlab.accuracy', 'nan')):.1f}%)")


def _table(title: str, epochs: dict[str, int], metric: str = "acc", mode: str = "max", states=None):
    from .progress import TrialTable

    return TrialTable(err, title, epochs, metric, mode, states)


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
    """Run a sweep here: one Ray Tune trial (one Ray Train run, one MLflow child run) per trial of the plan."""
    from .spec import load_sweep, parse_set

    loaded = load_sweep(sweep, {**parse_set(set_), **_workdir_overrides(workdir, "experiment.run.")})
    _check_targets(ray_address, loaded.experiment.run)
    _preflight(*(spec for _, spec in loaded.trial_specs()))
    _start_ray(ray_address)
    _run_sweep(loaded)


def _run_sweep(loaded):
    from .sweep import planned_trials, run_sweep

    return _drive(loaded, planned_trials(loaded), f"sweep {loaded.name}", None,
                  lambda callbacks: run_sweep(loaded, callbacks=callbacks))


def _drive(sweep, specs: dict, title: str, states, start):
    """Run `start(callbacks)` under the live table of the planned trials `specs`; then the summary. Exit 1 when
    trials failed."""
    from .sweep import SweepInterrupted

    shown = {s.name: (s.state, s.epoch, s.value) for s in states or []}
    epochs = {name: spec.optim.epochs for name, spec in specs.items()}
    try:
        with _table(title, epochs, sweep.metric, sweep.mode, shown) as table:
            outcome = start([table])
    except SweepInterrupted as e:
        err.print(f"[yellow]stopped:[/] {e}", highlight=False)
        raise typer.Exit(130) from None
    from .report import log_summary
    from .tracking import Tracking

    with err.status("logging the summary report on the parent run…"):
        log_summary(Tracking.for_run(sweep.experiment.run), sweep.name, outcome.parent_run_id)
    _print_summary(sweep, outcome.states, outcome.parent_run_id)
    if outcome.failed:
        err.print(f"[red]error:[/] {len(outcome.failed)} of {len(outcome.states)} trials failed:"
                  f" {', '.join(outcome.failed)}", highlight=False)
        raise typer.Exit(1)
    return outcome


def _print_summary(sweep, states, parent_id: str) -> None:
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    scored = [s for s in states if s.state == "finished" and s.best is not None]
    line = f"sweep [bold]{sweep.name}[/] (MLflow parent run {parent_id}): " + \
        ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    out.print(line, highlight=False)
    if scored:
        best = (max if sweep.mode == "max" else min)(scored, key=lambda s: s.best)
        out.print(f"best trial: [bold]{best.name}[/]  best {sweep.metric} {best.best:.4f}"
                  f" (last epoch {best.value:.4f}), MLflow run {best.run_id}", highlight=False)


def _located(sweep: str, workdir: Optional[Path], tracking_uri: Optional[str], experiment: Optional[str]):
    """(name, Tracking) of a sweep given as a spec file or a name (then in the work directory's MLflow store)."""
    from .spec import RunSpec, load_sweep
    from .tracking import Tracking

    loaded = None
    if sweep.endswith((".yaml", ".yml", ".json")) or Path(sweep).is_file():
        loaded = load_sweep(sweep, _workdir_overrides(workdir, "experiment.run."))
        name, run = loaded.name, loaded.experiment.run
    else:
        name, run = sweep, RunSpec(workdir=str(workdir)) if workdir else RunSpec()
    if tracking_uri:
        _checked_tracking_uri(tracking_uri)
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


def _checked_tracking_uri(uri: str) -> str:
    from .spec import check_tracking_uri
    from .tracking import check_tracking_server

    try:
        checked = check_tracking_uri(uri)
    except ValueError as err:
        raise SpecError(f"--tracking-uri: {err}") from None
    check_tracking_server(checked)
    return checked


SweepArg = Annotated[str, typer.Argument(help="a sweep name, or its spec file")]


@sweep_app.command("resume")
@handled
def sweep_resume(sweep: SweepArg, workdir: WorkdirOption = None, tracking_uri: TrackingOption = None,
                 experiment: ExperimentOption = None, ray_address: RayAddress = None,
                 retry_errored: Annotated[bool, typer.Option("--retry-errored", help="also rerun failed trials,"
                                                             " from scratch")] = False) -> None:
    """Continue a sweep whose driver died or was stopped; finished trials are not run again."""
    from .sweep import plan_resume

    name, tracking = _located(sweep, workdir, tracking_uri, experiment)
    start = plan_resume(tracking, name, retry_errored)
    _continue(start, f"resuming sweep '{name}': {len(start.todo)} trial(s) to run"
              + (" (restoring its Tune run)" if start.restore else ""), "resumed", ray_address)


def _continue(start, message: str, how: str, ray_address: Optional[str]) -> None:
    """Run a resume or extend plan under the live table, with the states MLflow has for the trials already run."""
    from .records import trial_states
    from .sweep import continue_sweep

    err.print(message, highlight=False, soft_wrap=True)
    _ray(ray_address, start.sweep.experiment.run)
    _drive(start.sweep, start.specs, f"sweep {start.sweep.name} ({how})",
           trial_states(start.tracking, start.parent, list(start.specs)),
           lambda callbacks: continue_sweep(start, callbacks))


@sweep_app.command("extend")
@handled
def sweep_extend(sweep: SweepArg, set_: SetOption = None, workdir: WorkdirOption = None,
                 tracking_uri: TrackingOption = None, experiment: ExperimentOption = None,
                 ray_address: RayAddress = None) -> None:
    """Add seeds, grid points or samples to an ended sweep (--set seeds=[0,1,2,3]); runs only the new trials."""
    from .spec import parse_set
    from .sweep import plan_extend

    name, tracking = _located(sweep, workdir, tracking_uri, experiment)
    start = plan_extend(tracking, name, parse_set(set_))
    _continue(start, f"extending sweep '{name}' by {len(start.todo)} trial(s): {', '.join(start.todo)}", "extended",
              ray_address)


@sweep_app.command("status")
@handled
def sweep_status(sweep: SweepArg, workdir: WorkdirOption = None, tracking_uri: TrackingOption = None,
                 experiment: ExperimentOption = None,
                 address: Annotated[Optional[str], typer.Option(help="Ray dashboard URL: also show the sweep's Ray"
                                                                     " Jobs there")] = None) -> None:
    """The trials of a sweep and their states (from MLflow), its driver, and its Ray Jobs."""
    from rich.table import Table

    from .records import driver_state, trial_states
    from .sweep import planned_trials, recorded_sweep
    from .tracking import DRIVER_TAG, JOB_TAG

    name, tracking = _located(sweep, workdir, tracking_uri, experiment)
    parent, recorded = recorded_sweep(tracking, name)
    states = trial_states(tracking, parent, list(planned_trials(recorded)), recorded.metric, recorded.mode,
                          history=True)
    driver = driver_state(parent)
    out.print(f"sweep [bold]{name}[/]: MLflow parent run {parent.id} {parent.status}"
              + (f", driver {parent.tags.get(DRIVER_TAG, '?')} {driver}" if parent.status == "RUNNING"
                 else "")
              + (f", Ray job {parent.tags[JOB_TAG]}" if JOB_TAG in parent.tags else ""), highlight=False)
    if address:
        from .jobs import sweep_jobs

        for job in sweep_jobs(address, name, running_only=False):
            out.print(f"  Ray job {job.submission_id}: {job.status.value}", highlight=False)
    table = Table(title_justify="left")
    for column in ("trial", "state", "epoch", recorded.metric, f"best {recorded.metric}", "MLflow run", "note"):
        table.add_column(column, justify="right" if column in ("epoch",) or recorded.metric in column else "left")
    for s in states:
        table.add_row(s.name, s.state, "—" if s.epoch is None else str(s.epoch),
                      "—" if s.value is None else f"{s.value:.4f}", "—" if s.best is None else f"{s.best:.4f}",
                      s.run_id or "—", s.note[:60])
    out.print(table)
    if parent.status == "RUNNING" and driver == "gone":
        out.print(f"the driver is gone: continue with `deitlab sweep resume {name}`", highlight=False)


@sweep_app.command("stop")
@handled
def sweep_stop(sweep: SweepArg, workdir: WorkdirOption = None, tracking_uri: TrackingOption = None,
               experiment: ExperimentOption = None,
               address: Annotated[Optional[str], typer.Option(help="Ray dashboard URL of a cluster the sweep was"
                                                                   " submitted to")] = None) -> None:
    """Stop a running sweep: its Ray Job (--address), or its driver on this machine. `sweep resume` continues it."""
    import signal

    from .records import driver_state
    from .tracking import DRIVER_TAG

    if address:
        from .jobs import check_dashboard_url, stop_jobs
        from .spec import load_sweep

        check_dashboard_url(address)
        name = load_sweep(sweep).name if sweep.endswith((".yaml", ".yml", ".json")) else sweep
        stopped = stop_jobs(address, name)
        if not stopped:
            raise SpecError(f"no running Ray job of sweep '{name}' at {address}")
        out.print(f"stopping Ray job(s) {', '.join(stopped)}", highlight=False)
        return
    name, tracking = _located(sweep, workdir, tracking_uri, experiment)
    parent = tracking.sweep_parent(name)
    state = driver_state(parent)
    if state != "alive":
        where = parent.tags.get(DRIVER_TAG, "?")
        raise SpecError(f"sweep '{name}' has no running driver on this machine (parent run {parent.status},"
                        f" driver {where} {state}); for a submitted sweep give --address")
    os.kill(int(parent.tags[DRIVER_TAG].rpartition(":")[2]), signal.SIGINT)  # Tune saves its state and stops
    with err.status(f"stopping sweep '{name}'…"):
        for _ in range(240):
            if tracking.run(parent.id).status != "RUNNING":
                break
            time.sleep(0.5)
    out.print(f"stopped sweep '{name}'; continue it with `deitlab sweep resume {name}`", highlight=False)


@sweep_app.command("submit")
@handled
def sweep_submit(sweep: Path,
                 address: Annotated[str, typer.Option(help="the Ray cluster's dashboard URL, e.g. http://HEAD:8265")],
                 set_: SetOption = None, workdir: Annotated[Optional[Path], typer.Option(help="work directory")] = None,
                 no_wait: Annotated[bool, typer.Option("--no-wait", help="print the job id and return")] = False
                 ) -> None:
    """Submit a sweep to a Ray cluster as a Ray Job (entrypoint: the same `sweep run`) and follow its log."""
    from .jobs import check_dashboard_url, connect, follow, submit_sweep
    from .spec import load_sweep, parse_set

    check_dashboard_url(address)
    loaded = load_sweep(sweep, {**parse_set(set_), **_workdir_overrides(workdir, "experiment.run.")})
    connect(address)
    run = loaded.experiment.run
    local = [what for what, value in (("run.tracking_uri", run.resolved_tracking_uri), ("run.storage",
                                                                                       run.resolved_storage))
             if not value.startswith(("http://", "https://", "s3://", "postgresql", "mysql"))]
    if local:
        err.print(f"note: {' and '.join(local)} are paths on this machine; the cluster writes there on its own"
                  " nodes. Use an MLflow server and s3:// storage for a remote cluster.", highlight=False, soft_wrap=True)
    job_id = submit_sweep(loaded, address)
    out.print(f"submitted sweep '{loaded.name}' as Ray job [bold]{job_id}[/]", highlight=False)
    if no_wait:
        out.print(f"follow it: deitlab sweep status {loaded.name} --address {address}", highlight=False)
        return
    try:
        status = follow(address, job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    except KeyboardInterrupt:
        err.print(f"detached; the job keeps running. Stop it: deitlab sweep stop {loaded.name} --address {address}")
        raise typer.Exit(130) from None
    if status != "SUCCEEDED":
        err.print(f"[red]error:[/] Ray job {job_id} ended {status}", highlight=False)
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------------------- data
def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@data_app.command("pack")
@handled
def data_pack(src: Annotated[Path, typer.Argument(help="image folder: train/ and val/, one sub-folder per class")],
              dest: Annotated[str, typer.Argument(help="a folder, or s3://bucket/prefix (endpoint from"
                                                       " AWS_ENDPOINT_URL or ?endpoint_override=HOST:PORT&scheme=http)")],
              shard_rows: Annotated[Optional[int], typer.Option(help="images per Parquet file (default 2048)")] = None,
              overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a pack already at DEST")] = False
              ) -> None:
    """Pack an image folder into Parquet shards of JPEG bytes, read by `data: {dataset: parquet, path: DEST}`.

    JPEGs are stored as they are; other formats are re-encoded as JPEG (quality 95). Every file is decoded once
    first: nothing is written if one fails. meta.json, written last, marks the pack complete."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .shards import DEFAULT_SHARD_ROWS, pack_imagefolder

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:  # no stray line in logs
        task = bar.add_task("scanning", total=None)
        result = pack_imagefolder(src, dest, shard_rows=DEFAULT_SHARD_ROWS if shard_rows is None else shard_rows,
                                  overwrite=overwrite, progress=lambda stage, done, total: bar.update(
                                      task, description=stage, completed=done, total=total))
    for split, written in result["splits"].items():
        out.print(f"{split}: {written['rows']} images in {written['shards']} shard(s), {_bytes(written['bytes'])}",
                  highlight=False)
    note = f", {result['reencoded']} re-encoded as JPEG" if result["reencoded"] else ""
    out.print(f"packed {result['classes']} classes into {dest}{note}; meta.json written last", highlight=False,
              soft_wrap=True)


@app.command()
@handled
def report(sweep: Annotated[str, typer.Argument(help="a sweep spec file, or a sweep name")],
           format: Annotated[str, typer.Option("--format", "-f", help="table | json | html")] = "table",
           out_dir: Annotated[Optional[Path], typer.Option("--out", metavar="DIR", help="also write the report"
                                                           " files and plots/*.png here (html: default"
                                                           " ./deitlab-report-SWEEP)")] = None,
           workdir: Annotated[Optional[Path], typer.Option(help="work directory of the default MLflow store")] = None,
           tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI")] = None,
           experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment name")] = None) -> None:
    """The ablation table (DeiT Table 3 shape), the teacher comparison and plots of a sweep, from MLflow."""
    import re

    # options first: a bad one fails in one line before MLflow is opened (or imported)
    written_as = {"table": ("md",), "json": ("json",), "html": ("html",)}
    if format not in written_as:
        raise SpecError(f"--format '{format}': expected table, json or html")
    if tracking_uri:
        _checked_tracking_uri(tracking_uri)
    from .report import build_report, check_out_dir, render, write_report

    if out_dir is not None:
        out_dir = check_out_dir(out_dir, "--out")
    name, tracking = _located(sweep, workdir, tracking_uri, experiment)
    if format == "html" and out_dir is None:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "sweep"  # a sweep name may hold / or spaces
        out_dir = check_out_dir(Path(f"deitlab-report-{safe}"), "default report directory (choose one with --out)")
    result = build_report(tracking, name)
    if format == "json":
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    elif format == "table":
        render(result, out)
    if out_dir is None:
        return
    paths = write_report(result, out_dir, written_as[format])
    if format == "html":
        sys.stdout.write(f"{paths[-1]}\n")  # the page; its plots are embedded (and also in plots/ beside it)
    else:  # stdout keeps the table or the JSON
        err.print(f"wrote {', '.join(str(p.relative_to(out_dir)) for p in paths)} to {out_dir}", highlight=False,
                  soft_wrap=True)


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


def _bench_spec(spec: Optional[Path], set_: list[str] | None):
    """The benchmark's experiment: the given spec, or the bundled bench_overhead.yaml; --set applied."""
    from .spec import load_experiment, parse_set

    overrides = parse_set(set_)
    if spec is not None:
        return load_experiment(spec, overrides)
    with resources.as_file(resources.files("deitlab") / "specs" / "bench_overhead.yaml") as bundled:
        return load_experiment(bundled, overrides)


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

    loaded = _bench_spec(spec, set_)
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


@bench_app.command("step", add_help_option=False,
                   context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_step(ctx: typer.Context) -> None:
    """Images/s of the official DeiT step, the lean step, packed students and the GPU data path; --help for options.

    The same benchmark runs as `python -m deitlab.step_bench` on boxes with only torch and timm: one parser for both.
    """
    from .step_bench import main

    raise typer.Exit(main(list(ctx.args)))


@bench_app.command("logging")
@handled
def bench_logging(spec: Annotated[Optional[Path], typer.Argument(help="experiment spec (default: the bundled"
                                                                       " bench_overhead.yaml)")] = None,
                  set_: SetOption = None,
                  tracking_uri: Annotated[Optional[str], typer.Option(help="an MLflow server to log to (default: a"
                                                                           " fresh SQLite store)")] = None,
                  every: Annotated[int, typer.Option(min=1, help="log step metrics every N steps")] = 1,
                  repeats: Annotated[int, typer.Option(min=1, help="runs with and without logging, alternated")] = 3,
                  json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the figures here")]
                  = None) -> None:
    """What MLflow logging costs a training step: the bare loop with and without rank 0's metric logger."""
    from rich.table import Table

    from .bench import measure_logging

    loaded = _bench_spec(spec, set_)
    if tracking_uri:
        from .tracking import Tracking

        # an unreachable server is one line, before any work
        Tracking(_checked_tracking_uri(tracking_uri), "deitlab-bench-logging").experiment_id()
    with err.status(f"{repeats}× with and without logging, {loaded.optim.epochs} epochs per run…"):
        result = measure_logging(loaded, tracking_uri, every, repeats)
    table = Table(title=f"MLflow logging cost on {result.device}, store: {result.tracking}", title_justify="left")
    for column in ("path", "step (ms)"):
        table.add_column(column)
    table.add_row("no logging", f"{result.plain_step_ms:.3f}")
    table.add_row(f"step metrics every {result.every} step(s) + epoch metrics", f"{result.logged_step_ms:.3f}")
    out.print(table)
    out.print(f"per-step overhead: {100 * result.overhead:+.2f}% (steady epochs, median of {result.repeats} runs);"
              f" log() on the training thread: {result.log_call_us:.1f} µs per call ="
              f" {100 * result.call_share:.3f}% of a step; delivered {result.delivered} of {result.logged} values")
    if json_out:
        json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
