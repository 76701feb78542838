"""Open any storage location as a stream: local paths, ``file://``, ``-``, ``http(s)://``,
``pipe:COMMAND``, ``s3://`` and ``gs://``.

Reading gives a buffered binary file object; writing gives a :class:`Writer` whose data appears
under the final name only when committed (a ``with`` block commits on a clean exit and aborts on
an exception). Every failure is a :class:`~tarproc.errors.StorageError` whose one-line message
names the location with credentials removed (see :func:`redact`).

Example::

    from tarproc import storage
    with storage.open_read("http://127.0.0.1:8080/shard-0000.tar") as src, \\
         storage.open_write("s3://bucket/copy-0000.tar") as dst:
        shutil.copyfileobj(src, dst)

The http backend takes keyword options (timeouts, retries, backoff: see
``tarproc.storage.http.DEFAULTS``); the other backends take none.
"""

from tarproc.errors import StorageError
from tarproc.storage.base import Writer
from tarproc.storage.urls import is_local, local_path, redact, scheme

__all__ = [
    "StorageError",
    "Writer",
    "committed",
    "exists",
    "glob",
    "is_local",
    "listdir",
    "local_path",
    "open_read",
    "open_write",
    "redact",
    "remove",
    "scheme",
    "size",
]


def _backend(url, action):
    """The module implementing ``url``'s scheme (imported on first use, to keep startup fast)."""
    kind = scheme(url)
    if kind in ("file", "stdio"):
        from tarproc.storage import local as backend
    elif kind in ("http", "https"):
        from tarproc.storage import http as backend
    elif kind == "pipe":
        from tarproc.storage import pipe as backend
    elif kind in ("s3", "gs"):
        from tarproc.storage import remote as backend
    else:
        raise StorageError(f"{action} {redact(url)}: unsupported scheme {kind!r}")
    return kind, backend


def _no_options(url, options):
    if options:
        raise TypeError(f"options {sorted(options)} apply to http(s) URLs only, not {redact(url)}")


def open_read(url, **options):
    """Open ``url`` for streaming binary reading; use it as a context manager.

    ``-`` is standard input (closing the returned object leaves stdin open). For ``pipe:CMD``
    the end of the stream checks the command's exit status.
    """
    kind, backend = _backend(url, "cannot open")
    if kind != "http" and kind != "https":
        _no_options(url, options)
    if kind == "stdio":
        return backend.open_stdin()
    if kind in ("http", "https"):
        return backend.open_read(url, **options)
    return backend.open_read(url)


def open_write(url, **options):
    """Open ``url`` for writing; returns a :class:`Writer` to ``commit()`` or ``abort()``.

    Local files may take ``fsync=True`` to make a commit durable before it returns.
    """
    kind, backend = _backend(url, "cannot write")
    if kind == "file":
        return backend.LocalWriter(url, fsync=bool(options.pop("fsync", False)))
    if kind in ("http", "https"):
        return backend.open_write(url, **options)
    _no_options(url, options)
    if kind == "stdio":
        return backend.StdoutWriter()
    if kind == "pipe":
        return backend.PipeWriter(url)
    return backend.RemoteWriter(url)


def _stream_only(url, action):
    kind, backend = _backend(url, action)
    if kind in ("stdio", "pipe"):
        raise StorageError(f"{action} {redact(url)}: not supported for a stream")
    return kind, backend


def exists(url):
    """True if an object or file exists at ``url`` (HEAD for http)."""
    return _stream_only(url, "cannot check")[1].exists(url)


def committed(url):
    """True if ``url`` holds what a committed write of a shard leaves: a regular file or an object,
    not empty (tarproc never commits an empty shard: even one without samples has its end
    blocks). A rerun skips an output only then: a directory or an empty file standing where the
    output belongs (made by hand or by another tool) is no finished shard."""
    return _stream_only(url, "cannot check")[1].committed(url)


def size(url):
    """Size in bytes of the object at ``url``; None when the server does not say."""
    return _stream_only(url, "cannot stat")[1].size(url)


def remove(url, missing_ok=False):
    """Delete the object at ``url`` (DELETE for http); a missing one is an error unless
    ``missing_ok``."""
    kind, backend = _stream_only(url, "cannot remove")
    if kind == "file":
        if missing_ok and not backend.exists(url):
            return
        return backend.remove(url)
    return backend.remove(url, missing_ok=missing_ok)


def listdir(url):
    """Full URLs of the entries of a directory, or of the objects whose name starts with
    ``url`` when it is not a directory (a prefix such as ``s3://b/shard-``), sorted.

    Local, s3 and gs only: HTTP has no standard listing.
    """
    kind, backend = _stream_only(url, "cannot list")
    if kind in ("http", "https"):
        raise StorageError(f"cannot list {redact(url)}: listing not supported over {kind}")
    return backend.listdir(url)


def glob(pattern):
    """Sorted URLs matching a shell pattern (``*``, ``?``, ``[...]``): local, s3 and gs."""
    kind, backend = _stream_only(pattern, "cannot list")
    if kind in ("http", "https"):
        raise StorageError(f"cannot list {redact(pattern)}: listing not supported over {kind}")
    return backend.glob(pattern)
