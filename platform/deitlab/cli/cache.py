"""`deitlab teacher cache list | rm`: the teacher-logit caches under a storage location.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from deitlab.cli.app import err, handled, out, teacher_app
from deitlab.errors import SpecError
from deitlab.units import human_bytes

cache_app = typer.Typer(help="The teacher-logit cache: what it holds, and removing keys.", no_args_is_help=True)
teacher_app.add_typer(cache_app, name="cache")

StorageOption = Annotated[Optional[str], typer.Option(
    help="where the cache lives (run.teacher_cache.storage or run.storage): a folder or s3://bucket/prefix;"
         " default WORKDIR/ray_results")]
CacheWorkdir = Annotated[Path, typer.Option(help="work directory whose ray_results/ holds the cache")]


def _storage(storage: str | None, workdir: Path):
    from deitlab.core.checkpoints import Storage
    from deitlab.spec.schema import RunSpec

    if storage is None:
        storage = RunSpec(workdir=str(workdir)).resolved_storage
        if not Path(storage).is_dir():
            raise SpecError(f"no teacher cache in '{workdir}': it has no ray_results/ folder; give --workdir or"
                            " --storage")
    return Storage.open(storage, create=False, what="--storage")


@cache_app.command("list")
@handled
def cache_list(storage: StorageOption = None, workdir: CacheWorkdir = Path("deitlab-work")) -> None:
    """Every cached key: teacher, data, layout, epochs held, size and when it was last used."""
    from rich.table import Table

    from deitlab.core.teacher_cache import list_caches

    store = _storage(storage, workdir)
    entries = list_caches(store)
    table = Table(title=f"teacher cache at {store.uri}: {len(entries)} key(s)", title_justify="left")
    for column in ("key", "teacher", "data", "layout", "epochs", "val", "size", "last used"):
        table.add_column(column, no_wrap=column == "key", justify="right" if column in ("size",) else "left")
    for e in entries:
        f = e.facts
        data = (f"{f.get('dataset', '?')} ({f.get('data_fingerprint', '?')}), batch"
                f" {f.get('data', {}).get('batch_size', '?')} × {f.get('world_size', '?')}, seed {f.get('seed', '?')}")
        epochs = _ranges(e.epochs) if e.epochs else "—"
        table.add_row(e.key, str(f.get("teacher", "?")), data, str(f.get("layout", "?")),
                      epochs if e.foreign is None else f"not read: {e.foreign}", "yes" if e.val else "no",
                      human_bytes(e.bytes), e.last_used or "—")
    out.print(table)


def _ranges(epochs: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    spans: list[list[int]] = []
    for epoch in epochs:
        if spans and epoch == spans[-1][1] + 1:
            spans[-1][1] = epoch
        else:
            spans.append([epoch, epoch])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


@cache_app.command("rm")
@handled
def cache_rm(key: Annotated[Optional[str], typer.Argument(help="the key to remove (see `teacher cache list`)")] = None,
             older_than: Annotated[Optional[float], typer.Option(
                 help="remove every key last used more than this many days ago")] = None,
             storage: StorageOption = None, workdir: CacheWorkdir = Path("deitlab-work")) -> None:
    """Remove one key, or every key not used for --older-than DAYS. Runs then compute those logits again."""
    from deitlab.core.teacher_cache import list_caches, remove_cache

    if (key is None) == (older_than is None):
        raise SpecError("give a KEY or --older-than DAYS (one of them)")
    if older_than is not None and older_than < 0:
        raise SpecError(f"--older-than {older_than:g}: expected a number of days >= 0")
    store = _storage(storage, workdir)
    entries = list_caches(store)
    if key is not None:
        chosen = [e for e in entries if e.key == key]
        if not chosen:
            known = ", ".join(e.key for e in entries[:5]) or "none"
            raise SpecError(f"no teacher cache key '{key}' at {store.uri} (keys there: {known})")
    else:
        cutoff = time.time() - older_than * 86400
        chosen = [e for e in entries if _epoch_seconds(e.last_used) < cutoff]
    for entry in chosen:
        remove_cache(store, entry.key)
        err.print(f"removed {entry.key} ({entry.facts.get('teacher', '?')}, {human_bytes(entry.bytes)})",
                  highlight=False)
    if not chosen:
        err.print(f"nothing last used more than {older_than:g} days ago", highlight=False)


def _epoch_seconds(stamp: str | None) -> float:
    import calendar

    try:
        return float(calendar.timegm(time.strptime(stamp or "", "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return 0.0  # no record of use: as old as can be
