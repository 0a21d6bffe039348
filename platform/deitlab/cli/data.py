"""`deitlab data pack`: an image folder as Parquet shards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deitlab.cli.app import data_app, err, handled, out
from deitlab.units import human_bytes


# ---------------------------------------------------------------------------------------------------------- data
@data_app.command("pack")
@handled
def data_pack(src: Annotated[Path, typer.Argument(help="image folder: train/ and val/, one sub-folder per class")],
              dest: Annotated[str, typer.Argument(help="a folder, or s3://bucket/prefix (endpoint from"
                                                       " AWS_ENDPOINT_URL or ?endpoint_override=HOST:PORT&scheme=http)")],
              shard_rows: Annotated[Optional[int], typer.Option(help="images per Parquet file (default 2048)")] = None,
              overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a pack already at DEST")] = False
              ) -> None:
    """Pack an image folder into Parquet shards of JPEG bytes, read by `data: {dataset: parquet, path: DEST}`.

    JPEGs are stored as they are; other formats are re-encoded as JPEG (quality 95). Every file is decoded once
    first: nothing is written if one fails. meta.json, written last, marks the pack complete."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from deitlab.data.shards import DEFAULT_SHARD_ROWS, pack_imagefolder

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:  # no stray line in logs
        task = bar.add_task("scanning", total=None)
        result = pack_imagefolder(src, dest, shard_rows=DEFAULT_SHARD_ROWS if shard_rows is None else shard_rows,
                                  overwrite=overwrite, progress=lambda stage, done, total: bar.update(
                                      task, description=stage, completed=done, total=total))
    for split, written in result["splits"].items():
        out.print(f"{split}: {written['rows']} images in {written['shards']} shard(s), {human_bytes(written['bytes'])}",
                  highlight=False)
    note = f", {result['reencoded']} re-encoded as JPEG" if result["reencoded"] else ""
    out.print(f"packed {result['classes']} classes into {dest}{note}; meta.json written last", highlight=False,
              soft_wrap=True)
