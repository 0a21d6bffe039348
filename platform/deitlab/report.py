"""Ablation and teacher-comparison tables, read back from MLflow (the record of truth, not Ray's result files).

Trials that differ only in seed are one row: each accuracy is shown as mean ± std over the seeds. `table3` restates
the rows in the shape of DeiT's Table 3; `write_report` writes JSON, Markdown, one self-contained HTML file and PNG
plots (also logged to the sweep's MLflow parent run).
"""
from __future__ import annotations

import base64
import html
import json
import logging
import os
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import modes
from .distill import ACCURACY_KEYS
from .errors import SpecError, one_line
from .redact import scrub
from .tracking import STOPPED_TAG, Tracking

log = logging.getLogger("deitlab.report")

CONFIG_PARAMS = {"mode": "distillation.mode", "token": "distillation.token", "tau": "distillation.tau",
                 "lambda": "distillation.lambda", "teacher": "teacher"}
METRICS = (*ACCURACY_KEYS, "acc", "best_acc")


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        if not values:
            return cls(None, None, 0)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def text(self) -> str:
        if self.mean is None:
            return "—"
        return f"{100 * self.mean:.1f}" + (f" ± {100 * self.std:.1f}" if self.n > 1 else "")


@dataclass
class AblationRow:
    mode: str
    token: bool
    tau: float | None
    lam: float | None
    teacher: str
    seeds: list[int]
    runs: list[str]
    metrics: dict[str, Stat] = field(default_factory=dict)
    status: str = "FINISHED"
    stopped: int = 0  # trials ASHA stopped early: not in the statistics


@dataclass
class TeacherRow:
    teacher: str
    teacher_acc: Stat
    trials: int
    best_config: str
    best_acc: float | None
    mean_acc: Stat
    agreement: Stat
    gain_over_none: float | None
    best_stat: Stat | None = None  # the best configuration's accuracy over its seeds (best_acc is its mean)


# DeiT Table 3's method names. Without the token the student has only the class head (all three head metrics are the
# same), so its line reads acc_cls; with the token one training gives three lines: class, distillation, fused head.
TOKEN_HEADS = (("acc_cls", "class embedding"), ("acc_dist", "distil. embedding"), ("acc_fused", "class+distillation"))


@dataclass
class Table3Line:
    method: str
    teacher: str  # for "no distillation": the reference teacher agreement is measured against ("none" if none)
    label: str  # the label type the student learns from the teacher: "—", "soft" or "hard"
    tau: float | None
    lam: float | None
    seeds: int
    head: str  # the metric shown: acc_cls, acc_dist or acc_fused
    acc: Stat
    status: str = "FINISHED"


def _table3_order(row: AblationRow) -> tuple:
    # DeiT's order: none, usual, hard (the modes' registration order), then the token lines in the same order
    token = row.token and modes.describe(row.mode).needs_teacher
    return token, modes.order(row.mode), row.teacher, row.tau or 0, row.lam or 0


def table3_lines(rows: list[AblationRow]) -> list[Table3Line]:
    """One line per method in DeiT Table 3's shape; a token row expands to its three heads."""
    lines = []
    for r in sorted(rows, key=_table3_order):
        mode = modes.describe(r.mode)
        if r.token and mode.needs_teacher:
            heads = [(f"{mode.token_method}: {name}", key) for key, name in TOKEN_HEADS]
        else:
            heads = [(mode.method, "acc_cls")]
        for method, key in heads:
            lines.append(Table3Line(method, r.teacher, mode.label_column, r.tau, r.lam,
                                    len(r.seeds), key, r.metrics.get(key, Stat(None, None, 0)), r.status))
    return lines


@dataclass
class SweepReport:
    sweep: str
    parent_run_id: str
    status: str
    tracking_uri: str
    rows: list[AblationRow]
    teachers: list[TeacherRow]

    @property
    def table3(self) -> list[Table3Line]:
        return table3_lines(self.rows)

    def to_json(self) -> dict[str, Any]:
        def stat(s: Stat | None) -> dict[str, Any] | None:
            return None if s is None else {"mean": s.mean, "std": s.std, "n": s.n}

        return {
            "sweep": self.sweep, "parent_run_id": self.parent_run_id, "status": self.status,
            "tracking_uri": scrub(self.tracking_uri),
            "trials": [{"mode": r.mode, "token": r.token, "tau": r.tau, "lambda": r.lam, "teacher": r.teacher,
                        "seeds": r.seeds, "run_ids": r.runs, "status": r.status, "stopped_early": r.stopped,
                        **{k: stat(v) for k, v in r.metrics.items()}} for r in self.rows],
            "teachers": [{**{k: v for k, v in asdict(t).items() if not isinstance(v, dict)},
                          "teacher_acc": stat(t.teacher_acc), "mean_acc": stat(t.mean_acc),
                          "agreement": stat(t.agreement), "best_stat": stat(t.best_stat)} for t in self.teachers],
            "table3": [{"method": line.method, "teacher": line.teacher, "label": line.label, "tau": line.tau,
                        "lambda": line.lam, "seeds": line.seeds, "head": line.head, "acc": stat(line.acc),
                        "status": line.status} for line in self.table3],
        }


def _number(text: str | None) -> float | None:
    try:
        return None if text in (None, "None") else float(text)
    except ValueError:
        return None


def _one_per_trial(children: list) -> list:
    """A retried trial has several runs: count its finished one, else its newest."""
    chosen: dict[str, Any] = {}
    for run in sorted(children, key=lambda r: r.start_time or 0):
        name = run.name
        if name not in chosen or chosen[name].status != "FINISHED":
            chosen[name] = run
    return list(chosen.values())


def build_report(tracking: Tracking, sweep: str) -> SweepReport:
    parent, children = tracking.sweep_runs(sweep)
    groups: dict[tuple, AblationRow] = {}
    values: dict[tuple, dict[str, list[float]]] = {}
    for run in _one_per_trial(children):
        p = run.params
        mode = p.get(CONFIG_PARAMS["mode"], "?")
        facts = modes.describe(mode)
        key = (mode, p.get(CONFIG_PARAMS["token"]) == "True",
               _number(p.get(CONFIG_PARAMS["tau"])) if facts.uses_tau else None,
               _number(p.get(CONFIG_PARAMS["lambda"])) if facts.uses_lambda else None,
               p.get(CONFIG_PARAMS["teacher"], "none"))
        row = groups.setdefault(key, AblationRow(*key, seeds=[], runs=[]))
        if STOPPED_TAG in run.tags:  # ASHA cut it short: its partial metrics would bias the row
            row.stopped += 1
            continue
        row.seeds.append(int(_number(p.get("run.seed")) or 0))
        row.runs.append(run.id)
        if run.status != "FINISHED":
            row.status = run.status
        for metric in METRICS:
            if metric in run.metrics:
                values.setdefault(key, {}).setdefault(metric, []).append(run.metrics[metric])
    for key, row in groups.items():
        row.metrics = {m: Stat.of(values.get(key, {}).get(m, [])) for m in METRICS}
    rows = sorted(groups.values(), key=lambda r: (modes.order(r.mode), r.teacher, r.tau or 0, r.lam or 0))
    return SweepReport(sweep, parent.id, parent.status, tracking.tracking_uri, rows,
                       teacher_comparison(rows))


def teacher_comparison(rows: list[AblationRow]) -> list[TeacherRow]:
    """Per teacher: its accuracy, its best and mean student, agreement, and the gain over no distillation."""
    none_acc = baseline_acc(rows)
    out = []
    distilled = [r for r in rows if _distilled(r)]
    for teacher in sorted({r.teacher for r in distilled}):
        mine = [r for r in distilled if r.teacher == teacher and r.metrics["acc"].mean is not None]
        if not mine:
            continue
        best = max(mine, key=lambda r: r.metrics["acc"].mean)
        config = best.mode + ("" if best.token else " (cls only)") + \
            (f" τ={best.tau:g}" if best.tau is not None else "") + (f" λ={best.lam:g}" if best.lam is not None else "")
        accs = [r.metrics["acc"].mean for r in mine]
        teacher_accs = [r.metrics["acc_teacher"].mean for r in mine if r.metrics["acc_teacher"].mean is not None]
        agreements = [r.metrics["agreement"].mean for r in mine if r.metrics["agreement"].mean is not None]
        out.append(TeacherRow(teacher, Stat.of(teacher_accs[:1]), len(mine), config, best.metrics["acc"].mean,
                              Stat.of(accs), Stat.of(agreements),
                              None if none_acc is None else best.metrics["acc"].mean - none_acc, best.metrics["acc"]))
    return out


def baseline_acc(rows: list[AblationRow]) -> float | None:
    """The no-distillation accuracy the teachers are compared with (mean over 'none' rows)."""
    values = [r.metrics["acc"].mean for r in rows if not _distilled(r) and r.metrics["acc"].mean is not None]
    return statistics.fmean(values) if values else None


def _distilled(row: AblationRow) -> bool:
    return modes.describe(row.mode).needs_teacher


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
                     r.teacher if _distilled(r) else _reference(r.teacher), str(len(r.seeds)), m["acc_cls"].text(),
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


# ------------------------------------------------------------------------------------------------------------ plots
PLOT_FILES = {"tau": "accuracy_vs_tau.png", "lambda": "accuracy_vs_lambda.png", "teachers": "teachers.png"}
MARKERS = ("D", "o", "s", "^", "v", "P", "X")  # by the mode's registration order: soft o, hard s as before
PLOT_TITLES = {"tau": "Accuracy vs τ", "lambda": "Accuracy vs λ", "teachers": "Teacher vs student accuracy"}


def _mpl(text: str) -> str:
    """Names from MLflow as literal plot text: a `$` would start matplotlib's math mode."""
    return text.replace("$", r"\$")


def _draw_curves(ax, report: SweepReport, x: str, plotted: tuple[str, ...], symbol: str) -> str | None:
    """Accuracy (mean ± std over seeds) along τ or λ; returns why the plot is skipped, or None."""
    other, other_symbol = ("lam", "λ") if x == "tau" else ("tau", "τ")
    rows = [r for r in report.rows if r.mode in plotted and getattr(r, x) is not None
            and r.metrics["acc"].mean is not None]
    values = sorted({getattr(r, x) for r in rows})
    if len(values) < 2:
        shown = f" ({', '.join(f'{v:g}' for v in values)})" if values else ""
        return (f"the sweep has {len(values)} {symbol} value{'' if len(values) == 1 else 's'}{shown} among its"
                f" {' or '.join(plotted)} trials; a curve needs at least 2")
    # One line per teacher, mode and token. Where the other parameter has several values, each point is the best
    # of them, and is labelled with it: one curve per (τ, λ) pair would bury the plot.
    lines: dict[tuple, dict[float, AblationRow]] = {}
    others: dict[tuple, set] = {}
    for r in rows:
        key, at = (r.teacher, r.mode, r.token), getattr(r, x)
        points = lines.setdefault(key, {})
        others.setdefault(key, set()).add(getattr(r, other))
        if at not in points or r.metrics["acc"].mean > points[at].metrics["acc"].mean:
            points[at] = r
    teachers = sorted({key[0] for key in lines})
    several_modes = len({key[1] for key in lines}) > 1
    for key in sorted(lines, key=lambda k: (teachers.index(k[0]), k[1], not k[2])):
        teacher, mode, token = key
        line = [lines[key][at] for at in sorted(lines[key])]
        picked = len(others[key]) > 1
        label = ", ".join([_mpl(teacher)] + ([mode] if several_modes else [])
                          + ["token" if token else "class token only"]
                          + ([f"best {other_symbol} per point"] if picked else []))
        color = f"C{teachers.index(teacher) % 10}"
        xs, means = [getattr(r, x) for r in line], [100 * r.metrics["acc"].mean for r in line]
        ax.errorbar(xs, means, yerr=[100 * (r.metrics["acc"].std or 0.0) for r in line], capsize=3, color=color,
                    marker=MARKERS[modes.order(mode) % len(MARKERS)], linestyle="-" if token else "--", label=label)
        if picked:
            for r, px, py in zip(line, xs, means):
                ax.annotate(f"{other_symbol}={getattr(r, other):g}", (px, py), textcoords="offset points",
                            xytext=(5, 5), fontsize="x-small", color=color)
    if x == "tau" and values[-1] / values[0] >= 10:
        ax.set_xscale("log")
    if len(values) <= 8:  # the sweep's own values as ticks (also on the log axis: 1, 3, 10 instead of 10⁰, 10¹)
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
    ax.set_xlabel(f"{symbol} ({'temperature' if x == 'tau' else 'distillation weight'})")
    ax.set_ylabel("student top-1 accuracy % (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return None


def _draw_tau(ax, report: SweepReport) -> str | None:
    return _draw_curves(ax, report, "tau", tuple(m for m in _modes(report) if modes.describe(m).uses_tau), "τ")


def _draw_lambda(ax, report: SweepReport) -> str | None:
    return _draw_curves(ax, report, "lam", tuple(m for m in _modes(report) if modes.describe(m).uses_lambda), "λ")


def _modes(report: SweepReport) -> list[str]:
    """Every registered mode, and those of the report's rows that are not registered here."""
    return modes.names() + sorted({r.mode for r in report.rows} - set(modes.names()))


def _draw_teachers(ax, report: SweepReport) -> str | None:
    shown = [t for t in report.teachers if t.teacher_acc.mean is not None and t.best_acc is not None]
    if not shown:
        return "no teacher has a recorded accuracy (acc_teacher) and a finished student"
    for i, t in enumerate(shown):
        x, color, name = 100 * t.teacher_acc.mean, f"C{i % 10}", _mpl(t.teacher)
        best = t.best_stat or Stat(t.best_acc, 0.0, 1)
        ax.errorbar([x], [100 * best.mean], yerr=[100 * (best.std or 0.0)], capsize=3, color=color, marker="^",
                    linestyle="none", label=f"{name}: best student (± std over seeds)")
        ax.errorbar([x], [100 * t.mean_acc.mean], yerr=[100 * (t.mean_acc.std or 0.0)], capsize=3, color=color,
                    marker="o", mfc="none", linestyle="none", label=f"{name}: mean over configurations")
        ax.annotate(name, (x, 100 * best.mean), textcoords="offset points", xytext=(6, 4), fontsize="small")
    baseline = baseline_acc(report.rows)
    if baseline is not None:
        ax.axhline(100 * baseline, color="grey", linestyle=":", label=f"no distillation ({100 * baseline:.1f})")
    ax.margins(x=0.3, y=0.15)
    ax.set_xlabel("teacher top-1 accuracy %")
    ax.set_ylabel("student top-1 accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return None


def plot_report(report: SweepReport, directory: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Write the PNG plots into `directory`: ({kind: path} written, {kind: why skipped}). Kinds: PLOT_FILES."""
    # The object API with the Agg canvas: no pyplot, so no global backend or figure state in a long-lived driver
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written, skipped = {}, {}
    for kind, draw in (("tau", _draw_tau), ("lambda", _draw_lambda), ("teachers", _draw_teachers)):
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        reason = draw(ax, report)
        if reason:
            skipped[kind] = reason
            continue
        ax.set_title(f"{_mpl(report.sweep)}: {PLOT_TITLES[kind]}")
        directory.mkdir(parents=True, exist_ok=True)
        written[kind] = directory / PLOT_FILES[kind]
        fig.savefig(written[kind], format="png", dpi=110)
    return written, skipped


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
