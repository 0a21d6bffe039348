"""`deitlab quickstart`: two teachers, a 9-trial sweep trained as two packs (one per teacher), the report.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from deitlab.cli.app import RayAddress, SetOption, app, checked, err, handled, out
from deitlab.cli.sweep import run_sweep_live
from deitlab.cli.train import train_teachers_live
from deitlab.spec.loading import load_sweep, load_teacher_training, parse_set
from deitlab.tracking.store import Tracking


@app.command()
@handled
def quickstart(workdir: Annotated[Path, typer.Option(help="where the MLflow store and Ray results go")]
               = Path("deitlab-quickstart"),
               set_: SetOption = None, ray_address: RayAddress = None) -> None:
    """Train two teachers on digits, run a 9-trial distillation sweep as two packs (one Ray Train run per teacher,
    `none` with the convnet's), print the report. About 6 minutes on 2 busy cores (see the README)."""
    # here, not at module level: these import torch, and the CLI imports without it
    from deitlab.orchestration.packs import plan_packs
    from deitlab.orchestration.sweep import planned_trials
    from deitlab.report.model import build_report
    from deitlab.report.tables import render

    start = time.perf_counter()
    workdir = workdir.expanduser().resolve()
    bundled = resources.files("deitlab") / "specs"
    with resources.as_file(bundled) as spec_dir:
        teachers = [load_teacher_training(spec_dir / f"quickstart_teacher_{k}.yaml", {"run.workdir": str(workdir)})
                    for k in ("convnet", "vit")]
        sweep = load_sweep(spec_dir / "quickstart_sweep.yaml",
                           {**parse_set(set_), "experiment.run.workdir": str(workdir)})
    err.print(f"[bold]deitlab quickstart[/] — work directory {workdir}")
    found = checked(teachers, ray_address)  # the sweep's teachers are these: its own preflight comes after them
    err.print("[bold]1/3[/] training two teachers on digits (a small convnet and a small ViT)")
    train_teachers_live(teachers, found)
    units = plan_packs(planned_trials(sweep), sweep.pack)
    packing = f", trained as {len(units)} Ray Train runs: {', '.join(units)}" if sweep.pack > 1 else ""
    trials = sum(map(len, units.values()))
    err.print(f"[bold]2/3[/] sweep '{sweep.name}': {trials} trials, none/soft/hard × τ × λ × teacher{packing}",
              highlight=False)
    run_sweep_live(sweep)
    err.print("[bold]3/3[/] report")
    render(build_report(Tracking.for_run(sweep.experiment.run), sweep.name), out)
    out.print(f"\nfinished in {time.perf_counter() - start:.0f} s. Browse the runs:\n"
              f"  deitlab ui {sweep.name} --workdir {workdir}   (then Group by: deitlab.teacher, chart view)\n"
              f"  deitlab report {sweep.name} --workdir {workdir} --format json")
