"""The one error type users see: a bad spec, option, path, URI or file. Its message is a single line."""


class SpecError(ValueError):
    """A bad input. The CLI prints the message and exits 2."""


class TrainingDiverged(RuntimeError):
    """A run stopped because its loss became NaN or infinite. Its MLflow run is FAILED with the reason as a tag."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most `limit` characters (its type's name when it has no message)."""
    text = " ".join(str(err).split())
    return text[:limit] if text else type(err).__name__
