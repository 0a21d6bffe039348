"""The one error type users see: a bad spec, option, path, URI or file. Its message is a single line."""


class SpecError(ValueError):
    """A bad input. The CLI prints the message and exits 2."""


class TrainingDiverged(RuntimeError):
    """A run stopped because its loss became NaN or infinite. Its MLflow run is FAILED with the reason as a tag."""
