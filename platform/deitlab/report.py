"""Ablation and teacher-comparison tables, read back from MLflow (the record of truth, not Ray's result files).

Trials that differ only in seed are one row: each accuracy is shown as mean ± std over the seeds.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from .distill import ACCURACY_KEYS
from .tracking import STOPPED_TAG, Tracking

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


@dataclass
class SweepReport:
    sweep: str
    parent_run_id: str
    status: str
    tracking_uri: str
    rows: list[AblationRow]
    teachers: list[TeacherRow]

    def to_json(self) -> dict[str, Any]:
        def stat(s: Stat) -> dict[str, Any]:
            return {"mean": s.mean, "std": s.std, "n": s.n}

        return {
            "sweep": self.sweep, "parent_run_id": self.parent_run_id, "status": self.status,
            "tracking_uri": self.tracking_uri,
            "trials": [{"mode": r.mode, "token": r.token, "tau": r.tau, "lambda": r.lam, "teacher": r.teacher,
                        "seeds": r.seeds, "run_ids": r.runs, "status": r.status, "stopped_early": r.stopped,
                        **{k: stat(v) for k, v in r.metrics.items()}} for r in self.rows],
            "teachers": [{**{k: v for k, v in asdict(t).items() if not isinstance(v, dict)},
                          "teacher_acc": stat(t.teacher_acc), "mean_acc": stat(t.mean_acc),
                          "agreement": stat(t.agreement)} for t in self.teachers],
        }


def _number(text: str | None) -> float | None:
    try:
        return None if text in (None, "None") else float(text)
    except ValueError:
        return None


def _one_per_trial(children: list) -> list:
    """A retried trial has several runs: count its finished one, else its newest."""
    chosen: dict[str, Any] = {}
    for run in sorted(children, key=lambda r: r.info.start_time or 0):
        name = run.info.run_name
        if name not in chosen or chosen[name].info.status != "FINISHED":
            chosen[name] = run
    return list(chosen.values())


def build_report(tracking: Tracking, sweep: str) -> SweepReport:
    parent, children = tracking.sweep_runs(sweep)
    groups: dict[tuple, AblationRow] = {}
    values: dict[tuple, dict[str, list[float]]] = {}
    for run in _one_per_trial(children):
        p = run.data.params
        mode = p.get(CONFIG_PARAMS["mode"], "?")
        key = (mode, p.get(CONFIG_PARAMS["token"]) == "True", _number(p.get(CONFIG_PARAMS["tau"])) if mode == "soft"
               else None, _number(p.get(CONFIG_PARAMS["lambda"])) if mode != "none" else None,
               p.get(CONFIG_PARAMS["teacher"], "none"))
        row = groups.setdefault(key, AblationRow(*key, seeds=[], runs=[]))
        if STOPPED_TAG in run.data.tags:  # ASHA cut it short: its partial metrics would bias the row
            row.stopped += 1
            continue
        row.seeds.append(int(_number(p.get("run.seed")) or 0))
        row.runs.append(run.info.run_id)
        if run.info.status != "FINISHED":
            row.status = run.info.status
        for metric in METRICS:
            if metric in run.data.metrics:
                values.setdefault(key, {}).setdefault(metric, []).append(run.data.metrics[metric])
    for key, row in groups.items():
        row.metrics = {m: Stat.of(values.get(key, {}).get(m, [])) for m in METRICS}
    rows = sorted(groups.values(), key=lambda r: (["none", "soft", "hard"].index(r.mode) if r.mode in
                                                  ("none", "soft", "hard") else 9, r.teacher, r.tau or 0, r.lam or 0))
    return SweepReport(sweep, parent.info.run_id, parent.info.status, tracking.tracking_uri, rows,
                       teacher_comparison(rows))


def teacher_comparison(rows: list[AblationRow]) -> list[TeacherRow]:
    """Per teacher: its accuracy, its best and mean student, agreement, and the gain over no distillation."""
    baseline = [r.metrics["acc"].mean for r in rows if r.mode == "none" and r.metrics["acc"].mean is not None]
    none_acc = statistics.fmean(baseline) if baseline else None
    out = []
    for teacher in sorted({r.teacher for r in rows if r.mode != "none"}):
        mine = [r for r in rows if r.teacher == teacher and r.mode != "none" and r.metrics["acc"].mean is not None]
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
                              None if none_acc is None else best.metrics["acc"].mean - none_acc))
    return out


def render(report: SweepReport, console) -> None:
    from rich.table import Table

    table = Table(title=f"sweep '{report.sweep}' — ablation (accuracy %, mean ± std over seeds)", title_justify="left")
    for col in ("mode", "token", "τ", "λ", "teacher", "seeds", "cls head", "dist head", "fused", "teacher acc",
                "agreement"):
        table.add_column(col, justify="right" if col not in ("mode", "teacher") else "left")
    for r in report.rows:
        teacher = f"({r.teacher})" if r.mode == "none" else r.teacher
        m = r.metrics
        table.add_row(r.mode + ("" if r.status == "FINISHED" else f" [{r.status}]")
                      + (f" ({r.stopped} stopped early)" if r.stopped else ""),
                      "yes" if r.token else "no", "—" if r.tau is None else f"{r.tau:g}",
                      "—" if r.lam is None else f"{r.lam:g}", teacher, str(len(r.seeds)),
                      m["acc_cls"].text(), m["acc_dist"].text(), m["acc_fused"].text(), m["acc_teacher"].text(),
                      m["agreement"].text())
    console.print(table)
    if report.teachers:
        comp = Table(title="teachers side by side (student accuracy on the headline head)", title_justify="left")
        for col in ("teacher", "teacher acc", "trials", "best student", "best config", "mean student", "agreement",
                    "vs. no distillation"):
            comp.add_column(col, justify="left" if col in ("teacher", "best config") else "right")
        for t in report.teachers:
            gain = "—" if t.gain_over_none is None else f"{100 * t.gain_over_none:+.1f}"
            comp.add_row(t.teacher, t.teacher_acc.text(), str(t.trials),
                         "—" if t.best_acc is None else f"{100 * t.best_acc:.1f}", t.best_config, t.mean_acc.text(),
                         t.agreement.text(), gain)
        console.print(comp)
    console.print("(teacher) in a 'none' row: the reference teacher that agreement is measured against; it does not"
                  " take part in training.", style="dim")
