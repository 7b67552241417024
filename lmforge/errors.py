"""User-facing errors.

A `UserError` is a mistake the user can fix (a missing file, a bad key, an unknown task). The CLI prints
its message on one line and exits with status 2, never a traceback. Every message names the file, key or
tensor at fault and says what to do about it.
"""


class UserError(Exception):
    """A mistake in the user's input: printed as one line by the CLI, no traceback."""
