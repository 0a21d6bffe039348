"""`deitlab report`: a sweep's tables and plots, from MLflow.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from deitlab.cli.app import app, checked_tracking_uri, err, handled, located_sweep, out
from deitlab.errors import SpecError


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
        checked_tracking_uri(tracking_uri)
    from deitlab.report.files import check_out_dir, write_report
    from deitlab.report.model import build_report
    from deitlab.report.tables import render

    if out_dir is not None:
        out_dir = check_out_dir(out_dir, "--out")
    name, tracking = located_sweep(sweep, workdir, tracking_uri, experiment)
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
