"""Writing a report: report.json / .md / .html and plots/*.png, whole or not at all; and the summary a sweep's
parent run carries.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from deitlab.errors import SpecError, one_line
from deitlab.report.model import SweepReport, build_report
from deitlab.report.plots import PLOT_FILES, plot_report
from deitlab.report.tables import to_html, to_markdown
from deitlab.tracking.store import Tracking

log = logging.getLogger("deitlab.report")


# --------------------------------------------------------------------------------------------------------- writing
REPORT_FORMATS = {"json": "report.json", "md": "report.md", "html": "report.html"}


def check_out_dir(out: Path, name: str = "report directory") -> Path:
    """The absolute `out` if a report can be written there (a directory, or creatable); else SpecError."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise SpecError(f"{name} '{out}' exists and is not a directory")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise SpecError(f"{name} '{out}' is not writable")
    # the files are staged beside `out`, so its parent (or the first ancestor that exists) must take new entries
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SpecError(f"{name} '{out}': '{ancestor}' is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SpecError(f"{name} '{out}': cannot write in '{ancestor}'")
    return out


def write_report(report: SweepReport, out: Path, formats=("json", "html", "md")) -> list[Path]:
    """Write report.json / report.md / report.html (as `formats` asks) and plots/*.png into `out`; return the paths.

    Everything is made in a temporary directory beside `out` first and moved in only when complete, so a failure
    leaves no half-written report. Plots the sweep cannot draw are not written (stale ones are removed)."""
    unknown = [f for f in formats if f not in REPORT_FORMATS]
    if unknown:
        raise SpecError(f"report format '{unknown[0]}': expected one of {', '.join(REPORT_FORMATS)}")
    out = check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            plots, skipped = plot_report(report, stage / "plots")
            texts = {}
            if "json" in formats:
                texts["json"] = json.dumps(report.to_json(), indent=2) + "\n"
            if "md" in formats:
                texts["md"] = to_markdown(report, {k: f"plots/{p.name}" for k, p in plots.items()}, skipped)
            if "html" in formats:
                texts["html"] = to_html(report, {k: p.read_bytes() for k, p in plots.items()}, skipped)
            for kind, text in texts.items():
                (stage / REPORT_FORMATS[kind]).write_text(text, encoding="utf-8")

            out.mkdir(exist_ok=True)
            written = []
            for kind, filename in PLOT_FILES.items():
                target = out / "plots" / filename
                if kind in plots:
                    target.parent.mkdir(exist_ok=True)
                    os.replace(plots[kind], target)
                    written.append(target)
                else:  # a plot from an earlier report that this one cannot draw would mislead
                    target.unlink(missing_ok=True)
            for kind in texts:  # the reports last: they refer to the plots
                os.replace(stage / REPORT_FORMATS[kind], out / REPORT_FORMATS[kind])
                written.append(out / REPORT_FORMATS[kind])
            return written
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    except OSError as e:
        raise SpecError(f"cannot write the report to '{out}': {e.strerror or e}") from None


def log_summary(tracking: Tracking, sweep: str, parent_id: str) -> None:
    """The sweep's report (table 3 shape, teacher comparison, plots; HTML, Markdown, JSON) as artifacts of its parent
    run, so the MLflow UI shows the summary. A failure here is a warning: the runs themselves are recorded."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_report(build_report(tracking, sweep), Path(tmp)):
                relative = path.relative_to(tmp)
                tracking.log_artifact(parent_id, path, str(Path("summary", *relative.parts[:-1])))
    except Exception as err:
        log.warning("sweep '%s': the summary report was not logged (%s)", sweep, one_line(err, 200))
