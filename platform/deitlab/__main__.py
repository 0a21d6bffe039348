"""`python -m deitlab …`: the CLI, for machines where the console script is not installed (Ray Job entrypoints)."""
from deitlab.cli import app

app(prog_name="deitlab")
