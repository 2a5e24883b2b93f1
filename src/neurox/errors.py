"""Errors that end a command with one line for the user rather than a traceback."""


class UserFacingError(Exception):
    """A failure whose message says what happened and what to do."""


class UnreadableRun(UserFacingError, OSError):
    """A prepared run whose frames cannot be read (a damaged or truncated store file). Commands that go over many
    participants leave its participant out with one line and go on; training stops with it."""
