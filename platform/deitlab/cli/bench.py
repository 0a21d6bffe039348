"""`deitlab bench overhead | step | logging`.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer

from deitlab.bench.overhead import measure_logging, measure_overhead
from deitlab.cli.app import RayAddress, SetOption, bench_app, checked, checked_tracking_uri, err, handled, out
from deitlab.spec.loading import load_experiment, parse_set


def _bench_spec(spec: Optional[Path], set_: list[str] | None):
    """The benchmark's experiment: the given spec, or the bundled bench_overhead.yaml; --set applied."""
    overrides = parse_set(set_)
    if spec is not None:
        return load_experiment(spec, overrides)
    with resources.as_file(resources.files("deitlab") / "specs" / "bench_overhead.yaml") as bundled:
        return load_experiment(bundled, overrides)


@bench_app.command("overhead")
@handled
def bench_overhead(spec: Annotated[Optional[Path], typer.Argument(help="experiment spec (default: the bundled"
                                                                        " bench_overhead.yaml)")] = None,
                   set_: SetOption = None, ray_address: RayAddress = None,
                   repeats: Annotated[int, typer.Option(min=1, help="bare and Ray runs, alternated, of each")] = 2,
                   json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the figures here")]
                   = None) -> None:
    """The Ray Train path against the bare loop: same spec, device and data; one worker."""
    from rich.table import Table


    loaded = _bench_spec(spec, set_)
    checked([loaded], ray_address)
    with err.status(f"bare loop and Ray Train, {repeats}× each, {loaded.optim.epochs} epochs per run…"):
        result = measure_overhead(loaded, repeats)
    table = Table(title=f"Ray Train overhead on {result.device}", title_justify="left")
    for column in ("path", "steady epoch (s)", "total (s)"):
        table.add_column(column)
    table.add_row("bare Engine", f"{result.bare_epoch_s:.3f}", f"{result.bare_total_s:.1f}")
    table.add_row("Ray Train, 1 worker", f"{result.ray_epoch_s:.3f}", f"{result.ray_total_s:.1f}")
    out.print(table)
    out.print(f"per-epoch overhead: {100 * result.epoch_overhead:+.1f}%  (median of {result.repeats} runs ×"
              f" {result.epochs - 1} epochs per path, first epochs excluded; Ray's start-up is in the total)")
    if json_out:
        json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")


@bench_app.command("step", add_help_option=False,
                   context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_step(ctx: typer.Context) -> None:
    """Images/s of the official DeiT step, the lean step, packed students and the GPU data path; --help for options.

    The same benchmark runs as `python -m deitlab.step_bench` on boxes with only torch and timm: one parser for both.
    """
    from deitlab.bench.step import main

    raise typer.Exit(main(list(ctx.args)))


@bench_app.command("topk", add_help_option=False,
                   context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_topk(ctx: typer.Context) -> None:
    """What top-k cached teacher logits cost against full ones: KL and student accuracy over seeds; --help for options."""
    from deitlab.bench.topk import main

    raise typer.Exit(main(list(ctx.args)))


@bench_app.command("logging")
@handled
def bench_logging(spec: Annotated[Optional[Path], typer.Argument(help="experiment spec (default: the bundled"
                                                                       " bench_overhead.yaml)")] = None,
                  set_: SetOption = None,
                  tracking_uri: Annotated[Optional[str], typer.Option(help="an MLflow server to log to (default: a"
                                                                           " fresh SQLite store)")] = None,
                  every: Annotated[int, typer.Option(min=1, help="log step metrics every N steps")] = 1,
                  repeats: Annotated[int, typer.Option(min=1, help="runs with and without logging, alternated")] = 3,
                  json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the figures here")]
                  = None) -> None:
    """What MLflow logging costs a training step: the bare loop with and without rank 0's metric logger."""
    from rich.table import Table


    loaded = _bench_spec(spec, set_)
    if tracking_uri:
        from deitlab.tracking.store import Tracking

        # an unreachable server is one line, before any work
        Tracking(checked_tracking_uri(tracking_uri), "deitlab-bench-logging").experiment_id()
    with err.status(f"{repeats}× with and without logging, {loaded.optim.epochs} epochs per run…"):
        result = measure_logging(loaded, tracking_uri, every, repeats)
    table = Table(title=f"MLflow logging cost on {result.device}, store: {result.tracking}", title_justify="left")
    for column in ("path", "step (ms)"):
        table.add_column(column)
    table.add_row("no logging", f"{result.plain_step_ms:.3f}")
    table.add_row(f"step metrics every {result.every} step(s) + epoch metrics", f"{result.logged_step_ms:.3f}")
    out.print(table)
    out.print(f"per-step overhead: {100 * result.overhead:+.2f}% (steady epochs, median of {result.repeats} runs);"
              f" log() on the training thread: {result.log_call_us:.1f} µs per call ="
              f" {100 * result.call_share:.3f}% of a step; delivered {result.delivered} of {result.logged} values")
    if json_out:
        json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
