"""The `deitlab` command (Typer): one module per group of commands; importing this package registers them all, in the
order `deitlab --help` lists them."""
# isort: skip_file
from deitlab.cli import train, cache, sweep, data, report, ui, quickstart, bench  # noqa: F401 - registers the commands
from deitlab.cli.app import app

__all__ = ["app"]
