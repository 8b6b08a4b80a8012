"""Expected failures of loading and running the model."""

from config.errors import ExpectedError


class ModelError(ExpectedError):
    """Base of the models package's expected failures."""


class ModelLoadError(ModelError):
    """The model, its processor or an adapter could not be loaded."""


class GenerationError(ModelError):
    """The model could not answer for a video (it does not fit in GPU memory even alone)."""


def one_line(error: BaseException) -> str:
    """A failure's reason in one line, for a log that says it once: the error's type and,
    through what it wraps (Dynamo's BackendCompilerFailed keeps the backend's error as
    `inner_exception`), the first line of the root cause."""
    root, names = error, [type(error).__name__]
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
        names.append(type(root).__name__)
    lines = [line for line in str(root).strip().splitlines() if line.strip()]
    return f"{': '.join(names)}: {lines[0] if lines else ''}"
