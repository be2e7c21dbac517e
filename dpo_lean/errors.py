"""The one exception type for mistakes a user can make and fix."""


class DpoLeanError(Exception):
    """A user-fixable problem: bad config, bad data, wrong path, stale cache.

    The message is one line that names the key, file or row and says what to do.
    The CLI prints it without a traceback and exits non-zero.
    """

    def __init__(self, message: str = "") -> None:
        # Text from the data (a lone surrogate such as "\ud800") or an undecodable file name would make the
        # message unprintable; such characters are shown as their escapes.
        super().__init__(str(message).encode("utf-8", "backslashreplace").decode("utf-8"))
