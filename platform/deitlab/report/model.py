"""A sweep's results as the report shows them, read from its MLflow runs: the ablation rows (one per
configuration, mean and std over seeds), DeiT Table 3's lines, and the teacher comparison.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from deitlab.core import modes
from deitlab.core.distill import ACCURACY_KEYS
from deitlab.tracking.names import STOPPED_TAG
from deitlab.tracking.redact import scrub
from deitlab.tracking.store import Tracking

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
        # a run without distillation names the teacher its agreement is measured against as reference_teacher
        # (runs recorded before logged it as teacher)
        teacher = p.get(CONFIG_PARAMS["teacher"]) if facts.needs_teacher else p.get("reference_teacher") or \
            p.get(CONFIG_PARAMS["teacher"])
        key = (mode, p.get(CONFIG_PARAMS["token"]) == "True",
               _number(p.get(CONFIG_PARAMS["tau"])) if facts.uses_tau else None,
               _number(p.get(CONFIG_PARAMS["lambda"])) if facts.uses_lambda else None,
               teacher or "none")
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
    distilled = [r for r in rows if is_distilled(r)]
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
    values = [r.metrics["acc"].mean for r in rows if not is_distilled(r) and r.metrics["acc"].mean is not None]
    return statistics.fmean(values) if values else None


def is_distilled(row: AblationRow) -> bool:
    return modes.describe(row.mode).needs_teacher
