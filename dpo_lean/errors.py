"""The one exception type for mistakes a user can make and fix."""


class DpoLeanError(Exception):
    """A user-fixable problem: bad config, bad data, wrong path, stale cache.

    The message is one line that names the key, file or row and says what to do.
    The CLI prints it without a traceback and exits non-zero.
    """
