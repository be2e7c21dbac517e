"""The one exception type for mistakes a user can make and fix, and the two ways a run is stopped by a signal."""

import signal

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
    """The run was stopped by a signal (Ctrl-C, or SIGTERM from a scheduler) after saving what it could: the message
    says what was kept and how to go on; exit status 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


class Stopped(KeyboardInterrupt):
    """A signal that stops the run at once: SIGTERM where there is nothing to save, or a second Ctrl-C or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
