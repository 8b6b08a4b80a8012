"""Expected failures of loading and running the model, and how a failed compiled path
gives way to its eager twin."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from config.errors import ExpectedError

T = TypeVar("T")


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


class CompilerFallback:
    """A compiled path (torch.compile: Dynamo, Inductor, Triton) beside an eager twin that
    computes the same: `run` takes the compiled one until it fails once, then the twin for
    good. The reason is kept (`failure`, one line) and logged once, on the caller's `log`,
    as "`what` failed (...); `instead` from now on". Out of memory is the caller's, as in
    eager."""

    def __init__(self, log: logging.Logger, what: str, instead: str = "eager"):
        self.log, self.what, self.instead = log, what, instead
        self.failure: str | None = None

    def run(self, compiled: Callable[[], T], eager: Callable[[], T]) -> T:
        import torch

        if self.failure is None:
            try:
                return compiled()
            except torch.OutOfMemoryError:
                raise
            except Exception as e:
                self.failure = one_line(e)
                self.log.warning(
                    "%s failed (%s); %s from now on", self.what, self.failure, self.instead
                )
        return eager()
