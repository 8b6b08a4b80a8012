"""Expected failures of model loading and prompting."""


class ModelError(Exception):
    """Base of the models package's expected failures."""


class ModelLoadError(ModelError):
    """The model, its processor or an adapter could not be loaded."""
