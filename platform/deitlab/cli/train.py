"""`deitlab check`, `train`, `teacher train` and `teacher import`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deitlab.cli.app import (
    RayAddress,
    SetOption,
    TrackingOption,
    WorkdirOption,
    app,
    checked,
    checked_tracking_uri,
    err,
    handled,
    out,
    teacher_app,
    trial_table,
    workdir_overrides,
)
from deitlab.errors import SpecError
from deitlab.orchestration.preflight import check_targets, start_cluster
from deitlab.orchestration.teacher_import import import_teacher, load_data_spec
from deitlab.spec.base import validate
from deitlab.spec.loading import load_experiment, load_sweep, load_teacher_training, parse_set
from deitlab.spec.schema import RunSpec, TeacherSpec
from deitlab.tracking.store import Tracking
from deitlab.units import human_bytes


# ------------------------------------------------------------------------------------------------------ commands
@app.command()
@handled
def check(spec: Path, kind: Annotated[str, typer.Option(help="experiment | sweep | teacher")] = "experiment",
          set_: SetOption = None) -> None:
    """Validate a spec without running anything; print the resolved spec (and a sweep's trials)."""
    overrides = parse_set(set_)
    loaders = {"experiment": load_experiment, "sweep": load_sweep, "teacher": load_teacher_training}
    if kind not in loaders:
        raise SpecError(f"--kind '{kind}': expected one of experiment, sweep, teacher")
    loaded = loaders[kind](spec, overrides)
    if kind == "sweep":
        print_plan(loaded)
    else:
        out.print_json(loaded.model_dump_json(by_alias=True))


def print_plan(sweep) -> None:
    """The plan's trials, their pack, what the teacher-logit cache holds for them, and the values each sets; then each
    cache key's state and what the sweep will write. Names are never cut: a narrow terminal folds them."""
    from rich.table import Table

    from deitlab.orchestration.cache_plan import cache_cell, plan_cache
    from deitlab.orchestration.packs import plan_packs
    from deitlab.orchestration.sweep import planned_trials, trial_name

    points = sweep.trial_overrides()
    names = [trial_name(p) for p in points]
    specs = planned_trials(sweep)
    units = plan_packs(specs, sweep.pack) if sweep.pack > 1 else {name: [name] for name in specs}
    unit_of = {m: unit for unit, members in units.items() for m in members}
    # a trial alone in its group trains as it would unpacked: "—"
    pack_of = {m: unit for unit, members in units.items() if len(members) > 1 for m in members}
    with err.status("reading the teacher cache…"):
        caches = plan_cache(specs, units)
    table = Table(title=f"sweep '{sweep.name}': {len(points)} trials", title_justify="left")
    table.add_column("trial", no_wrap=True, overflow="fold", min_width=max(map(len, names), default=5))
    table.add_column("pack", no_wrap=True, overflow="fold", min_width=max(map(len, pack_of.values()), default=4))
    table.add_column("teacher cache", no_wrap=True)
    keys = sorted({k for p in points for k in p})
    for key in keys:
        table.add_column(key)
    for name, p in zip(names, points):
        cache = caches.get(unit_of.get(name, name))
        cell = "—" if cache is None else "?" if cache.note else f"{cache.key[:8]} {len(cache.held)}/{cache.epochs}"
        table.add_row(name, pack_of.get(name, "—"), cell, *("—" if k not in p else str(p[k]) for k in keys))
    out.print(table)
    if caches:
        where = sweep.experiment.run.cache_storage
        out.print(f"teacher cache at {where} (epochs held / trained; a key is shared by every trial with the same"
                  " teacher, data and batches):", highlight=False)
        for unit, cache in caches.items():
            out.print(f"  {unit}: {cache_cell(cache)}", highlight=False)
        total = sum(c.write_bytes for c in caches.values())
        unknown = " (and what the teachers not loaded write)" if any(c.note for c in caches.values()) else ""
        out.print(f"this sweep writes about {human_bytes(total)} of teacher logits{unknown}", highlight=False)


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
    if run_id and not resume:
        raise SpecError("--run-id is only used with --resume")
    overrides = {**parse_set(set_), **workdir_overrides(workdir)}
    if workers is not None:
        overrides["run.workers"] = workers
    experiment = load_experiment(spec, overrides)
    found = checked([experiment], ray_address, start_ray=False)
    from deitlab.orchestration.train import train_experiment

    if resume:  # a run that cannot be resumed fails before Ray starts
        from deitlab.tracking.store import Tracking

        run_id = Tracking.reader(experiment.run).resumable_run(experiment.name, experiment.flat_params(),
                                                               run_id).id
    start_cluster(ray_address, experiment.run, status=err.status)
    verb = "resuming" if resume else "training"
    with err.status(f"{verb} '{experiment.name}' on {experiment.run.workers} worker(s)…"):
        outcome = train_experiment(experiment, resume=resume, run_id=run_id, checked=found)
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
    overrides = {**parse_set(set_), **workdir_overrides(workdir)}
    loaded = [load_teacher_training(s, overrides) for s in specs]
    _check_teacher_names(loaded)
    train_teachers_live(loaded, checked(loaded, ray_address))


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

    validate(TeacherSpec, {"arch": source, "pretrained": True}, source=source)  # a known name with weights
    if alias is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", alias):
        raise SpecError(f"--alias '{alias}': letters, digits, _ and -, not starting with a digit")
    data_spec = load_data_spec(data) if data else None
    if tracking_uri:
        checked_tracking_uri(tracking_uri)
    run = validate(RunSpec, {k: v for k, v in {"workdir": str(workdir) if workdir else None,
                                               "tracking_uri": tracking_uri}.items() if v}, source="run")
    check_targets(None, run)  # nothing is trained here: where the record goes is all there is to check
    with err.status(f"importing {source}…"):
        imported = import_teacher(source, name, run, data_spec, alias)
    card = imported.card
    accuracy = card.get("accuracy_note") or ""
    version = imported.uri.rsplit("/", 1)[-1]
    if not accuracy:
        from deitlab.tracking.store import Tracking

        tags = Tracking.for_run(run).version(name, version).tags
        accuracy = f"validation accuracy {100 * float(tags['deitlab.accuracy']):.1f}%"
    out.print(f"registered [bold]{imported.uri}[/]{f' (alias {alias})' if alias else ''}: {source},"
              f" sha256 {card['weights_sha256'][:16]}…, {card['params_m']} M params, {accuracy}", highlight=False)


def _check_teacher_names(loaded) -> None:
    names = [t.name for t in loaded]
    if len(set(names)) != len(names):  # each is registered under its name: one would hide the other
        raise SpecError(f"teacher names must differ, got {', '.join(names)}")


def train_teachers_live(loaded, found) -> None:
    """Train the teachers under the live table (`found`: their preflight); print each registered version."""
    from deitlab.orchestration.sweep import train_teachers

    with trial_table("teachers", {t.name: t.optim.epochs for t in loaded}) as table:
        failed = train_teachers(loaded, callbacks=[table], checked=found)
    if failed:
        err.print(f"[red]error:[/] teacher training failed: {', '.join(failed)}")
        raise typer.Exit(1)
    tracking = Tracking.for_run(loaded[0].run)
    for t in loaded:
        version = tracking.latest_version(t.name)
        out.print(f"registered [bold]models:/{t.name}/{version.version}[/]"
                  f"  (validation accuracy {100 * float(version.tags.get('deitlab.accuracy', 'nan')):.1f}%)")
