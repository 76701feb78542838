"""Naming of storage locations: which scheme a URL belongs to, and how to show it safely.

Kept free of heavy imports so that every layer can classify and redact URLs cheaply.
"""

import os
import re

from tarproc.errors import StorageError

#: Schemes that :func:`scheme` reports.
SCHEMES = ("file", "stdio", "http", "https", "pipe", "s3", "gs")

_ALIASES = {"gcs": "gs", "s3a": "s3"}
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# user:password@ (or token@) inside any URL embedded in a string, e.g. in a pipe: command.
_USERINFO_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s?#]*@")

# Query parameters whose values are secrets (AWS/GCS presigned URLs, Azure SAS, API tokens).
_SECRET_PARAM = (
    r"[^=&#\s?]*(?:signature|token|secret|passw|credential|api[_-]?key|access[_-]?key|auth)"
    r"[^=&#\s]*|sig|key|code"
)
_QUERY_RE = re.compile(r"([?&;](?:" + _SECRET_PARAM + r")=)[^&#\s]*", re.IGNORECASE)


def scheme(url):
    """The kind of location ``url`` names.

    One of ``"file"`` (a local path or ``file://``), ``"stdio"`` (``-``), ``"http"``, ``"https"``,
    ``"pipe"``, ``"s3"``, ``"gs"``, or the lower-cased scheme of any other ``NAME://`` URL (which
    the open functions then refuse). A string without ``://`` is a local path, so names such as
    ``c:data.tar`` or ``a:b`` stay files; ``pipe:`` is the one scheme written without slashes.
    """
    url = os.fspath(url)
    if url == "-":
        return "stdio"
    if url.startswith("pipe:"):
        return "pipe"
    m = _URL_RE.match(url)
    if not m:
        return "file"
    name = m.group(1).lower()
    return _ALIASES.get(name, name)


def is_local(url):
    """True for locations on the local filesystem (plain paths and ``file://`` URLs)."""
    return scheme(url) == "file"


def local_path(url):
    """The filesystem path of a local location (``file:///x`` -> ``/x``, paths unchanged)."""
    url = os.fspath(url)
    if not url.startswith(("file:", "FILE:")) or scheme(url) != "file":
        return url
    from urllib.parse import unquote, urlsplit  # (~3 ms of imports only file: URLs need)

    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(f"{redact(url)}: file URL names a remote host {parts.netloc!r}")
    return unquote(parts.path)


def redact(url):
    """``url`` with credentials removed, fit for messages and logs.

    Replaces the ``user:password@`` part of every URL in the string (also URLs inside a
    ``pipe:`` command) and the values of secret-bearing query parameters (``X-Amz-Signature``,
    ``X-Goog-Credential``, ``sig``, ``token``, ``key``, ...) by ``***``.
    """
    text = os.fspath(url)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    text = _USERINFO_RE.sub(r"\1***@", text)
    return _QUERY_RE.sub(r"\1***", text)


def remote_path(url):
    """``s3://bucket/key`` / ``gs://bucket/key`` -> ``bucket/key`` (the fsspec path)."""
    url = os.fspath(url)
    return url.split("://", 1)[1]
