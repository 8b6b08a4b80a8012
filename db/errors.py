"""Expected failures of the store, each one line for the user."""

from config.errors import ExpectedError


class StoreError(ExpectedError):
    """Base of the store's expected failures."""


class DatabaseUnavailable(StoreError):
    """The database did not answer."""


class ReadOnlyViolation(StoreError):
    """`db query` was asked to change something."""


class QueryError(StoreError):
    """The query itself is wrong (syntax, unknown table...)."""
