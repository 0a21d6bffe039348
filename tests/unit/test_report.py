"""The report's DeiT-Table-3 lines, JSON, Markdown, self-contained HTML and plots, from hand-built sweep results."""
import json
import os

import pytest
from deitlab.cli.app import app
from deitlab.errors import SpecError
from deitlab.report.files import write_report
from deitlab.report.model import METRICS, AblationRow, Stat, SweepReport, teacher_comparison
from deitlab.report.plots import PLOT_FILES
from deitlab.report.tables import to_markdown
from typer.testing import CliRunner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(mode, token, tau, lam, teacher, accs, **heads):
    """An ablation row over seeds 0..n-1; `accs` is the headline acc per seed, `heads` other metrics per seed."""
    values = {"acc": accs, "acc_cls": accs, "acc_dist": accs, "acc_fused": accs, **heads}
    r = AblationRow(mode, token, tau, lam, teacher, seeds=list(range(len(accs))),
                    runs=[f"run-{mode}-{i}" for i in range(len(accs))])
    r.metrics = {m: Stat.of(values.get(m, [])) for m in METRICS}
    return r


def make_report(rows, sweep="abl"):
    return SweepReport(sweep, "parent123", "FINISHED", "sqlite:///mlflow.db", rows, teacher_comparison(rows))


def table3_report(teacher="convnet"):
    return make_report([
        row("none", False, None, None, teacher, [0.80, 0.82, 0.84]),
        row("soft", False, 3.0, 0.1, teacher, [0.90, 0.92, 0.94], acc_teacher=[0.97, 0.97, 0.97]),
        row("hard", False, None, 0.5, teacher, [0.91, 0.93, 0.95], acc_teacher=[0.97, 0.97, 0.97]),
        # one token training: three heads, three Table 3 lines
        row("hard", True, None, 0.5, teacher, [0.95, 0.96, 0.97], acc_cls=[0.93, 0.94, 0.95],
            acc_dist=[0.92, 0.94, 0.96], acc_fused=[0.95, 0.96, 0.97], acc_teacher=[0.97, 0.97, 0.97]),
    ])


def test_stat_mean_and_std_by_hand():
    s = Stat.of([0.90, 0.92, 0.94])
    assert s.mean == pytest.approx(0.92) and s.std == pytest.approx(0.02) and s.n == 3
    assert s.text() == "92.0 ± 2.0"
    assert Stat.of([0.5]).text() == "50.0" and Stat.of([]).text() == "—"


def test_table3_lines_in_deit_order_with_token_heads_expanded():
    lines = table3_report().table3
    assert [line.method for line in lines] == [
        "no distillation", "usual distillation", "hard distillation",
        "DeiT⚗: class embedding", "DeiT⚗: distil. embedding", "DeiT⚗: class+distillation"]
    assert [line.label for line in lines] == ["—", "soft", "hard", "hard", "hard", "hard"]
    assert [line.head for line in lines] == ["acc_cls", "acc_cls", "acc_cls", "acc_cls", "acc_dist", "acc_fused"]
    assert [line.tau for line in lines] == [None, 3.0, None, None, None, None]
    assert [line.lam for line in lines] == [None, 0.1, 0.5, 0.5, 0.5, 0.5]
    assert all(line.seeds == 3 for line in lines)
    # means and stds: (0.80+0.82+0.84)/3 ... and the token heads' own values, not the headline acc
    assert [round(100 * line.acc.mean, 6) for line in lines] == [82.0, 92.0, 93.0, 94.0, 94.0, 96.0]
    assert [round(100 * line.acc.std, 6) for line in lines] == [2.0, 2.0, 2.0, 1.0, 2.0, 1.0]
    assert [line.acc.text() for line in lines][3:] == ["94.0 ± 1.0", "94.0 ± 2.0", "96.0 ± 1.0"]


def test_table3_keeps_teachers_and_soft_token_apart():
    rows = [row("soft", True, 1.0, 0.1, "vit", [0.90, 0.92]), row("soft", True, 1.0, 0.1, "convnet", [0.80, 0.84]),
            row("soft", False, 1.0, 0.1, "vit", [0.70])]
    lines = make_report(rows).table3
    assert [(line.method, line.teacher) for line in lines] == [
        ("usual distillation", "vit"),
        ("DeiT⚗ (soft): class embedding", "convnet"), ("DeiT⚗ (soft): distil. embedding", "convnet"),
        ("DeiT⚗ (soft): class+distillation", "convnet"),
        ("DeiT⚗ (soft): class embedding", "vit"), ("DeiT⚗ (soft): distil. embedding", "vit"),
        ("DeiT⚗ (soft): class+distillation", "vit")]
    assert {line.label for line in lines} == {"soft"}
    assert lines[1].acc.mean == pytest.approx(0.82) and lines[4].acc.mean == pytest.approx(0.91)


def test_to_json_keeps_its_keys_and_adds_table3():
    report = table3_report()
    data = json.loads(json.dumps(report.to_json()))
    assert {"sweep", "parent_run_id", "status", "tracking_uri", "trials", "teachers", "table3"} <= set(data)
    assert data["trials"][0]["acc"]["mean"] == pytest.approx(0.82)
    assert len(data["table3"]) == 6
    fused = data["table3"][5]
    assert fused["method"] == "DeiT⚗: class+distillation" and fused["head"] == "acc_fused"
    assert fused["teacher"] == "convnet" and fused["label"] == "hard" and fused["lambda"] == 0.5
    assert fused["acc"]["mean"] == pytest.approx(0.96) and fused["acc"]["std"] == pytest.approx(0.01)
    assert fused["acc"]["n"] == 3 and fused["seeds"] == 3
    [teacher] = data["teachers"]
    # the best configuration is the token row (headline acc 0.96); over no distillation (0.82): +0.14
    assert teacher["best_acc"] == pytest.approx(0.96) and teacher["gain_over_none"] == pytest.approx(0.14)
    assert teacher["best_stat"]["std"] == pytest.approx(0.01)
    assert teacher["teacher_acc"]["mean"] == pytest.approx(0.97)


def sweep_with_curves(teacher="convnet"):
    """Soft trials at τ 1, 3, 10 (a 10× range) with and without the token, hard at λ 0.5 and 0.9."""
    rows = [row("none", False, None, None, teacher, [0.80, 0.82])]
    for tau, base in ((1.0, 0.85), (3.0, 0.88), (10.0, 0.86)):
        rows.append(row("soft", True, tau, 0.1, teacher, [base, base + 0.02], acc_teacher=[0.95, 0.95]))
        rows.append(row("soft", False, tau, 0.1, teacher, [base - 0.02, base], acc_teacher=[0.95, 0.95]))
    for lam, acc in ((0.5, 0.90), (0.9, 0.87)):
        rows.append(row("hard", True, None, lam, teacher, [acc, acc + 0.01], acc_teacher=[0.95, 0.95]))
    return make_report(rows)


def test_write_report_writes_self_contained_html_with_escaped_names(tmp_path):
    report = sweep_with_curves(teacher="<b>x</b>")
    report.sweep = 'abl"<script>'
    out = tmp_path / "report"
    paths = write_report(report, out)
    names = sorted(str(p.relative_to(out)) for p in paths)
    assert names == sorted(["report.json", "report.md", "report.html"] + [f"plots/{f}" for f in PLOT_FILES.values()])
    for name in PLOT_FILES.values():
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 3
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "abl&quot;&lt;script&gt;" in page
    assert "DeiT⚗ (soft): class+distillation" in page
    assert json.loads((out / "report.json").read_text())["sweep"] == 'abl"<script>'
    # nothing staged is left beside the report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_one_tau_value_skips_the_tau_plot_and_says_so(tmp_path):
    report = table3_report()  # soft only at τ=3; λ has 0.1 and 0.5
    paths = write_report(report, tmp_path / "r", formats=("html", "md"))
    written = {p.name for p in paths}
    assert "accuracy_vs_tau.png" not in written and not (tmp_path / "r" / "plots" / "accuracy_vs_tau.png").exists()
    assert {"accuracy_vs_lambda.png", "teachers.png", "report.html", "report.md"} == written
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    assert "Not drawn: the sweep has 1 τ value (3) among its soft trials" in page


def test_rewriting_removes_a_plot_the_new_report_cannot_draw(tmp_path):
    write_report(sweep_with_curves(), tmp_path, formats=("json",))
    assert (tmp_path / "plots" / "accuracy_vs_tau.png").is_file()
    write_report(table3_report(), tmp_path, formats=("json",))
    assert not (tmp_path / "plots" / "accuracy_vs_tau.png").exists()
    assert json.loads((tmp_path / "report.json").read_text())["table3"][0]["method"] == "no distillation"


def test_markdown_has_the_table3_lines():
    text = to_markdown(table3_report(teacher="a|b"))
    lines = text.splitlines()
    assert "| method | teacher | label | τ | λ | seeds | accuracy |" in lines
    assert "| no distillation | (a\\|b) | — | — | — | 3 | 82.0 ± 2.0 |" in lines
    assert "| usual distillation | a\\|b | soft | 3 | 0.1 | 3 | 92.0 ± 2.0 |" in lines
    assert "| DeiT⚗: distil. embedding | a\\|b | hard | — | 0.5 | 3 | 94.0 ± 2.0 |" in lines
    assert "| DeiT⚗: class+distillation | a\\|b | hard | — | 0.5 | 3 | 96.0 ± 1.0 |" in lines


def test_write_report_refuses_a_file_and_unknown_formats(tmp_path):
    target = tmp_path / "f"
    target.write_text("x")
    with pytest.raises(SpecError, match="exists and is not a directory"):
        write_report(table3_report(), target)
    with pytest.raises(SpecError, match="report format 'pdf'"):
        write_report(table3_report(), tmp_path / "r", formats=("pdf",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize("args,needle", [
    (["--format", "pdf"], "--format 'pdf': expected table, json or html"),
    (["--format", "html", "--out", "{file}"], "exists and is not a directory"),
    (["--out", "{file}/sub"], "is not a directory"),
])
def test_cli_bad_report_options_exit_2_before_mlflow(tmp_path, args, needle):
    file = tmp_path / "taken"
    file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["report", "nosweep", "--workdir", str(empty),
                                      *(a.format(file=file) for a in args)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert "--" in lines[0] and "MLflow" not in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"] and not any(empty.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_cli_refuses_an_out_dir_it_cannot_write(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = CliRunner().invoke(app, ["report", "x", "--workdir", str(tmp_path), "--out", str(locked / "r")])
    assert result.exit_code == 2 and result.output.startswith("error: --out") and "cannot write" in result.output


def test_cli_html_report_from_an_mlflow_store(tmp_path, monkeypatch):
    """Two seeds of a hard token trial and a baseline recorded in MLflow, read back into report.html."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("abl", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="s", tags={"deitlab.sweep": "my sweep", "deitlab.kind": "sweep"})
    for mode, seed, accs in (("none", 0, (0.80, 0.80, 0.80)), ("hard", 0, (0.90, 0.88, 0.92)),
                             ("hard", 1, (0.94, 0.90, 0.96))):
        run = client.create_run(experiment, run_name=f"{mode}-s{seed}",
                                tags={"mlflow.parentRunId": parent.info.run_id})
        params = {"distillation.mode": mode, "distillation.token": "True", "distillation.tau": "3.0",
                  "distillation.lambda": "0.5", "teacher": "convnet", "run.seed": str(seed)}
        metrics = {**dict(zip(("acc_cls", "acc_dist", "acc_fused"), accs)), "acc": accs[2]}
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                         params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run.info.run_id)
    client.set_terminated(parent.info.run_id)

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "my sweep", "--workdir", str(tmp_path), "--format", "html"])
    assert result.exit_code == 0, result.output
    page_path = tmp_path / "deitlab-report-my-sweep" / "report.html"
    assert result.stdout.strip() == str(page_path)
    page = page_path.read_text(encoding="utf-8")
    # the token trial's three heads over seeds 0 and 1: cls (0.90, 0.94), dist (0.88, 0.90), fused (0.92, 0.96)
    for method, acc in (("DeiT⚗: class embedding", "92.0 ± 2.8"), ("DeiT⚗: distil. embedding", "89.0 ± 1.4"),
                        ("DeiT⚗: class+distillation", "94.0 ± 2.8"), ("no distillation", "80.0")):
        assert f'<td class="l">{method}</td>' in page and f'<td class="n">{acc}</td>' in page
    # one λ and one τ value: no curves, and the page says why
    assert "data:image/png" not in page and page.count("Not drawn") == 3


def test_a_failure_while_writing_leaves_no_half_report(tmp_path, monkeypatch):
    import deitlab.report.files

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(deitlab.report.files, "to_html", broken)  # the name write_report calls
    with pytest.raises(SpecError, match="cannot write the report to .*: No space left on device"):
        write_report(sweep_with_curves(), tmp_path / "r")
    assert list(tmp_path.iterdir()) == []  # neither the report nor its staging directory
