"""The report's three tables, built once as plain strings and drawn by rich (the terminal), Markdown and HTML.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass

from deitlab.report.model import SweepReport, is_distilled
from deitlab.report.plots import PLOT_FILES, PLOT_TITLES
from deitlab.tracking.redact import scrub


# ------------------------------------------------------------------------------------------------ the three tables
# Each table is built once as plain strings (title, columns, cells) and then drawn by rich, Markdown and HTML alike.
@dataclass
class _Grid:
    title: str
    columns: list[str]
    rows: list[list[str]]
    left: tuple[str, ...]  # columns aligned left; the numbers are right-aligned


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _reference(teacher: str) -> str:
    """A 'none' row's teacher only measures agreement: shown in parentheses."""
    return "—" if teacher == "none" else f"({teacher})"


def _status(status: str, stopped: int = 0) -> str:
    return ("" if status == "FINISHED" else f" [{status}]") + (f" ({stopped} stopped early)" if stopped else "")


def _table3_grid(report: SweepReport) -> _Grid:
    rows = [[line.method + _status(line.status), _reference(line.teacher) if line.label == "—" else line.teacher,
             line.label, _num(line.tau), _num(line.lam), str(line.seeds), line.acc.text()] for line in report.table3]
    return _Grid("DeiT Table 3 shape (top-1 accuracy %, mean ± std over seeds)",
                 ["method", "teacher", "label", "τ", "λ", "seeds", "accuracy"], rows, ("method", "teacher", "label"))


def _ablation_grid(report: SweepReport) -> _Grid:
    rows = []
    for r in report.rows:
        m = r.metrics
        rows.append([r.mode + _status(r.status, r.stopped), "yes" if r.token else "no", _num(r.tau), _num(r.lam),
                     r.teacher if is_distilled(r) else _reference(r.teacher), str(len(r.seeds)), m["acc_cls"].text(),
                     m["acc_dist"].text(), m["acc_fused"].text(), m["acc_teacher"].text(), m["agreement"].text()])
    return _Grid("all trials (accuracy %, mean ± std over seeds)",
                 ["mode", "token", "τ", "λ", "teacher", "seeds", "cls head", "dist head", "fused", "teacher acc",
                  "agreement"], rows, ("mode", "teacher"))


def _teacher_grid(report: SweepReport) -> _Grid:
    rows = []
    for t in report.teachers:
        best = t.best_stat.text() if t.best_stat is not None else _percent(t.best_acc)
        rows.append([t.teacher, t.teacher_acc.text(), str(t.trials), best, t.best_config, t.mean_acc.text(),
                     t.agreement.text(), "—" if t.gain_over_none is None else f"{100 * t.gain_over_none:+.1f}"])
    return _Grid("teachers side by side (student accuracy % on the headline head)",
                 ["teacher", "teacher acc", "trials", "best student", "best config", "mean student", "agreement",
                  "vs. no distillation"], rows, ("teacher", "best config"))


REFERENCE_NOTE = ("(teacher) in a 'none' row: the reference teacher that agreement is measured against; it does not"
                  " take part in training.")


def render(report: SweepReport, console) -> None:
    from rich.table import Table
    from rich.text import Text

    grids = [_table3_grid(report), _ablation_grid(report)] + ([_teacher_grid(report)] if report.teachers else [])
    for grid in grids:
        # Text cells: names from MLflow are printed as they are, never read as rich markup
        table = Table(title=Text(f"sweep '{report.sweep}' — {grid.title}" if grid is grids[0] else grid.title),
                      title_justify="left")
        for col in grid.columns:
            table.add_column(col, justify="left" if col in grid.left else "right")
        for cells in grid.rows:
            table.add_row(*(Text(c) for c in cells))
        console.print(table)
    console.print(REFERENCE_NOTE, style="dim", markup=False)


# ----------------------------------------------------------------------------------------------- Markdown and HTML
def _md_cell(text: str) -> str:
    # a pipe would end the cell, a newline the row; < would start HTML in most renderers
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def _md_table(grid: _Grid) -> str:
    head = "| " + " | ".join(grid.columns) + " |"
    rule = "|" + "|".join(":---" if c in grid.left else "---:" for c in grid.columns) + "|"
    body = ["| " + " | ".join(_md_cell(c) for c in cells) + " |" for cells in grid.rows]
    return "\n".join([f"### {grid.title}", "", head, rule, *body])


def to_markdown(report: SweepReport, plots: dict[str, str] | None = None,
                skipped: dict[str, str] | None = None) -> str:
    """The report as Markdown: Table 3 shape, teachers, all trials; `plots` are {kind: relative image path}."""
    parts = [f"# Sweep {_md_cell(report.sweep)}", "",
             f"MLflow parent run {_md_cell(report.parent_run_id)} ({_md_cell(report.status)}), tracking URI"
             f" {_md_cell(scrub(report.tracking_uri))}. Accuracies are top-1 %, mean ± std over seeds; trials"
             " ASHA stopped early are not in the statistics.", "",
             _md_table(_table3_grid(report)), ""]
    if report.teachers:
        parts += [_md_table(_teacher_grid(report)), ""]
    parts += [_md_table(_ablation_grid(report)), "", REFERENCE_NOTE, ""]
    for kind in PLOT_FILES:
        if plots and kind in plots:
            parts += [f"![{PLOT_TITLES[kind]}]({plots[kind]})", ""]
        elif skipped and kind in skipped:
            parts += [f"*{PLOT_TITLES[kind]}: not drawn — {_md_cell(skipped[kind])}.*", ""]
    return "\n".join(parts)


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.7em; }
th { background: #f4f4f4; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.l, th.l { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.note { color: #666; font-style: italic; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _html_table(grid: _Grid) -> str:
    def cls(col: str) -> str:
        return "l" if col in grid.left else "n"

    head = "".join(f'<th class="{cls(c)}">{html.escape(c)}</th>' for c in grid.columns)
    body = "\n".join("<tr>" + "".join(f'<td class="{cls(col)}">{html.escape(cell)}</td>'
                                      for col, cell in zip(grid.columns, cells)) + "</tr>" for cells in grid.rows)
    return (f"<table>\n<caption>{html.escape(grid.title)}</caption>\n<thead><tr>{head}</tr></thead>\n"
            f"<tbody>\n{body}\n</tbody>\n</table>")


def to_html(report: SweepReport, images: dict[str, bytes], skipped: dict[str, str] | None = None) -> str:
    """One self-contained page: inline CSS, the PNGs `images` ({kind: bytes}) as data URIs, no scripts or links."""
    e = html.escape

    def figure(kind: str) -> str:
        if kind in images:
            data = base64.b64encode(images[kind]).decode("ascii")
            return f'<img alt="{e(PLOT_TITLES[kind])}" src="data:image/png;base64,{data}">'
        why = (skipped or {}).get(kind, "no data")
        return f'<p class="note">Not drawn: {e(why)}.</p>'

    body = [f"<h1>Sweep <code>{e(report.sweep)}</code></h1>",
            f"<p>MLflow parent run <code>{e(report.parent_run_id)}</code> ({e(report.status)}); tracking URI"
            f" <code>{e(scrub(report.tracking_uri))}</code>. Accuracies are top-1 %, mean ± std over seeds;"
            " trials ASHA stopped early are not in the statistics.</p>",
            "<h2>Ablation in the shape of DeiT Table 3</h2>", _html_table(_table3_grid(report)),
            "<h2>Teachers</h2>",
            _html_table(_teacher_grid(report)) if report.teachers else '<p class="note">No distilled trials.</p>',
            figure("teachers"),
            f"<h2>{e(PLOT_TITLES['tau'])}</h2>", figure("tau"),
            f"<h2>{e(PLOT_TITLES['lambda'])}</h2>", figure("lambda"),
            "<h2>All trials</h2>", _html_table(_ablation_grid(report)), f'<p class="note">{e(REFERENCE_NOTE)}</p>']
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>deitlab report — {e(report.sweep)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
