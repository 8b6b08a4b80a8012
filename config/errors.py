"""The base of every expected failure, and the settings' own."""


class ExpectedError(Exception):
    """A failure the user can fix (bad input, bad setting, a service down): its message is
    one readable line, shown without a traceback and stored as a reason."""


class SettingsError(ExpectedError):
    """A FLEETSCRIBE_* variable holds a value that cannot be used."""
