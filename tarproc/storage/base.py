"""Shared pieces of the storage backends: the Writer contract and error messages."""

import io

from tarproc.errors import StorageError
from tarproc.storage.urls import redact


def fail(action, url, cause):
    """A StorageError naming the action, the redacted URL and the cause, on one line."""
    if isinstance(cause, BaseException):
        text = str(cause) or type(cause).__name__
        if isinstance(cause, OSError) and cause.strerror:
            text = cause.strerror  # the URL is named already; a different file is added
            if cause.filename and str(cause.filename) not in str(url):
                text += f": {cause.filename}"

    else:
        text = str(cause)
    text = redact(" ".join(text.split()))
    return StorageError(f"{action} {redact(url)}: {text}")


class Writer:
    """A write stream to a storage location that appears there only once committed.

    ``write`` bytes, then ``commit()`` to publish the object under its final name, or ``abort()``
    to drop everything written. Used as a context manager, a clean exit commits and an exception
    aborts. ``close()`` on an open writer commits, as for a file; a writer that is garbage
    collected without either is aborted, so a partial object is never published by accident.
    """

    def __init__(self, url):
        self.url = url
        self.name = redact(url)
        self.state = "open"  # "open" -> "committed" | "aborted"
        self._pos = 0

    # -- subclasses implement these ------------------------------------------------------------
    def _write(self, data):
        raise NotImplementedError

    def _commit(self):
        raise NotImplementedError

    def _abort(self):
        raise NotImplementedError

    # -- public file-like surface --------------------------------------------------------------
    @property
    def closed(self):
        """True once the writer has been committed or aborted."""
        return self.state != "open"

    def writable(self):
        return True

    def readable(self):
        return False

    def seekable(self):
        return False

    def tell(self):
        """Number of bytes written so far."""
        return self._pos

    def flush(self):
        """Nothing to do: data is pushed on write and published on commit."""
        if self.state != "open":
            raise ValueError(f"flush on a {self.state} writer ({self.name})")

    def write(self, data):
        """Append ``data`` (any bytes-like object); returns its length."""
        if self.state != "open":
            raise ValueError(f"write to a {self.state} writer ({self.name})")
        n = memoryview(data).nbytes
        if n:
            try:
                self._write(data)
            except BaseException:
                self.abort()
                raise
            self._pos += n
        return n

    def commit(self):
        """Publish everything written under the final name. A no-op once committed."""
        if self.state == "committed":
            return
        if self.state == "aborted":
            raise StorageError(f"commit {self.name}: the write was already aborted")
        try:
            self._commit()
        except BaseException:
            self.state = "aborted"
            try:
                self._abort()
            except Exception:
                pass
            raise
        self.state = "committed"

    def abort(self):
        """Drop everything written; nothing is left under the final name. Idempotent."""
        if self.state != "open":
            return
        self.state = "aborted"
        self._abort()

    def close(self):
        """Commit if still open (the meaning ``close`` has for an ordinary file)."""
        if self.state == "open":
            self.commit()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False

    def __del__(self):
        if getattr(self, "state", None) == "open":
            try:
                self.abort()
            except Exception:
                pass

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} {self.state}>"


class RawReader(io.RawIOBase):
    """Base for unbuffered readers that io.BufferedReader wraps; carries a redacted name."""

    def __init__(self, url):
        super().__init__()
        self.url = url
        self.name = redact(url)

    def readable(self):
        return True

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"
