"""The one error type for user mistakes: a setting, a file or the data that the user must change."""


class UserError(Exception):
    """A mistake the user can fix; the message is one line naming the setting (or path) and the fix.

    The entry point prints it as ``error: <message>`` and exits with status 2; any other exception is a bug
    and keeps its traceback."""


class NonFiniteLoss(UserError, FloatingPointError):
    """A NaN or infinite loss (training diverged, or an MRC ascent blew up); the message names the stage
    and the setting to lower."""
