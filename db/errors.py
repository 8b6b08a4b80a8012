"""Expected failures of the store, each one line for the user."""

from config.errors import ExpectedError


class StoreError(ExpectedError):
    """Base of the store's expected failures."""


class DatabaseUnavailable(StoreError):
    """The database did not answer."""


class DatabaseRefused(StoreError):
    """The database answered but cannot be used as configured (no such database, login
    refused, unknown host name): waiting would not help, so it is not retried."""


class SchemaMismatch(StoreError):
    """The database's schema is not the revision this code needs (older, newer or none):
    only `python -m db upgrade` changes it."""


class ReadOnlyViolation(StoreError):
    """`db query` was asked to change something."""


class QueryError(StoreError):
    """The query itself is wrong (syntax, unknown table...)."""


class BadCondition(StoreError):
    """A --where text is not a condition the condition language (db/conditions.py) reads."""
