"""Expected failures of the producer CLI."""

from config.errors import ExpectedError


class ProducerError(ExpectedError):
    """Base of the producer's expected failures."""


class NoInputs(ProducerError):
    """Nothing to enqueue was found."""


class BrokerUnavailable(ProducerError):
    """The broker did not accept the messages."""
