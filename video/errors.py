"""Expected failures of reading a video; each message is the one line stored as the reason."""

from config.errors import ExpectedError


class VideoError(ExpectedError):
    """A video cannot be used (not a video, truncated, no decodable frame...)."""


class PathNotAllowed(VideoError):
    """A path lies outside FLEETSCRIBE_VIDEO_ROOTS."""
