"""The one exception type for mistakes a user can make and fix."""

_LINE_BREAKS = {c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}  # what str.splitlines splits on


class DpoLeanError(Exception):
    """A user-fixable problem: bad config, bad data, wrong path, stale cache.

    The message is one line that names the key, file or row and says what to do.
    The CLI prints it without a traceback and exits non-zero.
    """

    def __init__(self, message: str = "") -> None:
        # Text quoted from the data or a file name can hold line breaks or lone surrogates (e.g. "\ud800"), which
        # would break the line or make it unprintable: such characters are shown as their escapes.
        text = str(message).translate(str.maketrans(_LINE_BREAKS))
        super().__init__(text.encode("utf-8", "backslashreplace").decode("utf-8"))


class Interrupted(DpoLeanError):
    """The user stopped the run (Ctrl-C): the message says what was kept and how to go on; exit status 130."""
