"""Expected failures of sending messages."""

from config.errors import ExpectedError


class BrokerUnavailable(ExpectedError):
    """The broker did not accept the messages."""
