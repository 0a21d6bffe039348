"""The report's plots: accuracy along τ and λ, and each teacher's accuracy against its students'.
"""
from __future__ import annotations

from pathlib import Path

from deitlab.core import modes
from deitlab.report.model import AblationRow, Stat, SweepReport, baseline_acc

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
