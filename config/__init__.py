"""What every fleetscribe process shares, below all other packages.

- `settings`: the one settings object (env prefix ``FLEETSCRIBE_``), read by each entry point.
- `errors`: `ExpectedError`, the base of every failure a user can fix (a bad file, a bad
  setting, a service down); each package derives its own named errors from it.
- `cli`: the command-line contract: an expected error prints one line `error: ...`, exit 2.

Imports nothing of fleetscribe, and nothing heavier than pydantic, click and rich.
"""
