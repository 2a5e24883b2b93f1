"""Errors that end a command with one line for the user rather than a traceback."""


class UserFacingError(Exception):
    """A failure whose message says what happened and what to do."""
