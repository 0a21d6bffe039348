"""The `deitlab` command (Typer): one module per group of commands; importing this package registers them all."""
from deitlab.cli import bench, data, quickstart, report, sweep, train  # noqa: F401 - registers the commands
from deitlab.cli.app import app

__all__ = ["app"]
