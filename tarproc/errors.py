"""Exceptions of tarproc.

Library code raises these with enough context (which URL, which member or key) that the
command-line layer can print ``str(exc)`` as a single line and exit non-zero, never a traceback.
"""


class TarprocError(Exception):
    """Base class: an error whose message is complete enough to show a user as one line."""


class FormatError(TarprocError):
    """The input is not a readable tar stream (not a tar, truncated, corrupt compression, ...)."""


class UnsafeNameError(FormatError):
    """A member name that could escape a directory (``..``, absolute, control characters)."""


class DuplicateKeyError(TarprocError, ValueError):
    """An output sample has the same key as the one written just before it.

    Readers group consecutive members by key, so the two would read back as one sample
    (webdataset refuses it: "duplicate file name"); writers refuse it instead.
    """

    retry = False  # the same samples give it again: a job does not retry the task

    def __init__(self, message, key=None, url=None):
        super().__init__(message)
        self.key = key
        self.url = url  # of the output, once the message names it


class StorageError(TarprocError):
    """Opening, reading, writing or committing a storage URL failed."""


class PatternError(TarprocError):
    """A shard pattern is malformed or matches nothing."""


class SampleFailed(TarprocError):
    """Processing one sample failed (non-zero exit, timeout, exception in user code)."""

    def __init__(self, message, key=None, status=None, stderr_tail=""):
        super().__init__(message)
        self.key = key
        self.status = status
        self.stderr_tail = stderr_tail
