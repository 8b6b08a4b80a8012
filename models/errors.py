"""Expected failures of loading and running the model."""

from config.errors import ExpectedError


class ModelError(ExpectedError):
    """Base of the models package's expected failures."""


class ModelLoadError(ModelError):
    """The model, its processor or an adapter could not be loaded."""


class GenerationError(ModelError):
    """The model could not answer for a video (it does not fit in GPU memory even alone)."""
