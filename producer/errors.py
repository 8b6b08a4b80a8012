"""Expected failures of the producer CLI."""

from config.errors import ExpectedError


class ProducerError(ExpectedError):
    """Base of the producer's expected failures."""


class NoInputs(ProducerError):
    """Nothing to enqueue was found."""


class BrokerUnavailable(ProducerError):
    """The broker did not accept the messages."""


class NoSuchBatch(ProducerError):
    """--batch names a batch that does not exist."""


class MissingInputs(ProducerError):
    """Every input given to enqueue names a file that does not exist."""
