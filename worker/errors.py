"""Expected failures in the worker; each message is the one line stored as the reason."""


class WorkerError(Exception):
    """Base of the worker's expected failures."""


class VideoError(WorkerError):
    """A video cannot be used (not a video, truncated, no decodable frame...)."""


class PathNotAllowed(VideoError):
    """A path lies outside FLEETSCRIBE_VIDEO_ROOTS."""


class EngineError(WorkerError):
    """The model could not describe a video (it does not fit in GPU memory even alone)."""
