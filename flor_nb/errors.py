"""Errors raised on a user's path. Each names the fix; all survive pickling."""


class FlorError(Exception):
    """Base class: a user mistake or an unrecoverable condition, with advice."""

    def __reduce__(self):
        return (type(self), self.args)


class NoLoopError(FlorError):
    """The cell has no loop to treat as the epoch loop."""


class UnknownRunError(FlorError):
    """The run name or version is not in the store."""


class EpochSpecError(FlorError):
    """An epoch specification could not be parsed or is out of range."""


class NoCheckpointError(FlorError):
    """An epoch to replay has no checkpoint to start from."""


class ProbeSyntaxError(FlorError):
    """Probe code does not parse; carries the line number and the line."""

    def __init__(self, message, lineno=None, line=None):
        super().__init__(message, lineno, line)
        self.lineno = lineno
        self.line = line

    def __str__(self):
        return self.args[0]


class ReplayError(FlorError):
    """User code raised inside a replay worker; carries the remote traceback."""

    def __init__(self, message, traceback_text=""):
        super().__init__(message, traceback_text)
        self.traceback_text = traceback_text

    def __str__(self):
        if self.traceback_text:
            return f"{self.args[0]}\n\n{self.traceback_text}"
        return self.args[0]


class NotCapturedWarning(UserWarning):
    """Something the recorded epochs read cannot be captured; replay rebuilds it instead of restoring it."""


class AmbiguousLoopError(FlorError):
    """Two loops could be the step loop; carries their line numbers."""

    def __init__(self, message, lines=()):
        super().__init__(message, list(lines))
        self.lines = list(lines)

    def __str__(self):
        return self.args[0]


class InputError(FlorError):
    """An argument value that flor_nb cannot accept; raised before anything is recorded."""


class StoreError(FlorError):
    """The store cannot be opened, read or written; names the store and what to do."""


class DiskFullError(StoreError):
    """The disk holding the store is full; carries the free bytes."""

    def __init__(self, message, free=None):
        super().__init__(message, free)
        self.free = free

    def __str__(self):
        return self.args[0]


class UntrustedStoreError(FlorError):
    """Checkpoints or recorded cells are not signed with this user's key: replaying them could run any code."""


class DamagedValueWarning(UserWarning):
    """A stored value failed its checksum: it is left out, never returned."""
