"""``http://`` and ``https://``: streamed GET that survives broken connections, streamed PUT.

Reads retry connection errors and 5xx answers with exponential backoff. A body that breaks
mid-way is resumed with ``Range: bytes=N-`` from the first byte not yet delivered; a server that
ignores ranges (answers 200) is read again from the start and the first N bytes are skipped. A
resumption needs a version of the object to hold the server to (a strong ETag, else
Last-Modified, sent as ``If-Range``, and the length): both are checked on every resumption, so
bytes of two different versions are never spliced together; a body that breaks with neither
(say, only a weak ETag) is an error rather than a guess.

Writes are one chunked PUT fed from a bounded queue by a background thread; the object exists
only after the server answers 2xx to the complete body. A PUT or DELETE is never redirected (the
body cannot be sent twice, and a DELETE must not reach another object): a 3xx is an error naming
where the server points. On any failure or abort the writer sends a DELETE for whatever the
server may have stored (tried twice, then a warning).

Credentials in URLs (``http://user:pw@host/``) are sent as Basic auth by requests and never appear
in messages.
"""

import http.client
import io
import logging
import os
import queue
import re
import threading
import time

import requests
import urllib3

from tarproc.errors import StorageError
from tarproc.storage.base import RawReader, Writer, fail

log = logging.getLogger("tarproc.storage")

#: Defaults for the keyword options accepted by the http functions.
DEFAULTS = {
    "connect_timeout": 10.0,  # seconds to establish a connection
    "read_timeout": 60.0,  # seconds of silence from the server before giving up a request
    "retries": 6,  # consecutive failed attempts (without progress) before StorageError
    "backoff": 0.5,  # first retry delay in seconds, doubled each time ...
    "max_backoff": 15.0,  # ... up to this
    "chunk_size": 1 << 20,  # bytes per read from the socket and per PUT chunk
    "queue_chunks": 8,  # PUT chunks buffered between the writer and its sending thread
}

_RETRY_STATUS = {408, 425, 429} | set(range(500, 600)) - {501, 505}  # (those two never change)
_BROKEN = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)
#: Fewer bytes than this in ``read_timeout`` seconds is a stalled body, like silence: a server
#: that drips a byte now and then would otherwise never trip the timeout of a single read.
_MIN_PROGRESS = 1024

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)

_local = threading.local()


def _options(options):
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown http option(s): {', '.join(sorted(unknown))}")
    return {**DEFAULTS, **options}


def _session():
    """This thread's session (connections are reused; never shared with a forked child)."""
    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:
        session = requests.Session()
        session.headers["User-Agent"] = "tarproc"
        _local.session, _local.pid = session, pid
    return _local.session


def _timeout(opts):
    return (opts["connect_timeout"], opts["read_timeout"])


def _delay(opts, failures):
    return min(opts["max_backoff"], opts["backoff"] * 2 ** (failures - 1))


def _reason(exc):
    """A short cause for a network exception (requests nests them several levels deep)."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", text)
    if m:
        return m.group(1).strip().rstrip(":")
    if isinstance(exc, requests.Timeout) or "timed out" in text.lower():
        return "timed out"
    if "IncompleteRead" in text or "Connection broken" in text:
        return "connection broken mid-body"
    if "RemoteDisconnected" in text or "closed connection without response" in text:
        return "server closed the connection without a response"
    text = text or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _status_text(resp):
    return f"HTTP {resp.status_code} {resp.reason or ''}".rstrip()


def _call(method, url, opts, action, **kwargs):
    """One non-streamed request, retried on connection errors and retryable statuses."""
    failures = 0
    while True:
        try:
            resp = _session().request(method, url, timeout=_timeout(opts), **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            cause = _reason(exc)
        except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError) as exc:
            # an unusable URL, too many redirects...: retrying cannot help
            raise fail(action, url, _reason(exc)) from None
        else:
            if resp.status_code not in _RETRY_STATUS:
                return resp
            cause = _status_text(resp)
            resp.close()
        failures += 1
        if failures > opts["retries"]:
            raise fail(action, url, f"{cause} (gave up after {failures} attempts)") from None
        time.sleep(_delay(opts, failures))


class HttpReader(RawReader):
    """The body of a GET, resumed across broken connections without losing or repeating bytes."""

    def __init__(self, url, opts):
        super().__init__(url)
        self.opts = opts
        self.pos = 0  # bytes delivered to the caller
        self.total = None  # object length, when the server says
        self.etag = None  # the object's version (a strong ETag, else Last-Modified), when known
        self.resp = None
        self.failures = 0
        self.done = False
        self.window_start = time.monotonic()  # progress is counted per read_timeout window
        self.window_bytes = 0
        self._connect()

    # -- connection management ----------------------------------------------------------------
    def _failed(self, cause):
        self._drop()
        self.failures += 1
        if self.failures > self.opts["retries"]:
            raise fail(
                "cannot read",
                self.url,
                f"{cause} at byte {self.pos} (gave up after {self.failures} attempts)",
            ) from None
        log.info("retrying %s at byte %d: %s", self.name, self.pos, cause)
        time.sleep(_delay(self.opts, self.failures))

    def _drop(self):
        resp, self.resp = self.resp, None
        if resp is not None:
            try:
                resp.close()
            except Exception:
                pass

    @staticmethod
    def _version(resp):
        """What names this version of the object: a strong ETag, else Last-Modified (a weak
        ETag does not promise the same bytes), else None."""
        etag = resp.headers.get("ETag")
        if etag and not etag.startswith("W/"):
            return etag
        return resp.headers.get("Last-Modified")

    def _check_same_object(self, resp, total):
        etag = self._version(resp)
        if self.pos > 0 and (self.etag is None or etag is None):
            raise fail("cannot read", self.url, f"the connection broke at byte {self.pos} and the "
                       "server names no version of the object (no strong ETag or Last-Modified) "
                       "to resume it safely")
        if self.etag and etag and etag != self.etag:
            raise fail("cannot read", self.url, "the object changed while it was being read")
        if self.total is not None and total is not None and total != self.total:
            raise fail("cannot read", self.url, "the object changed size while it was being read")
        self.etag = self.etag or etag
        if total is not None:
            self.total = total

    def _connect(self):
        """Open a response positioned at ``self.pos``, or set ``done`` at the end of the object."""
        while self.resp is None and not self.done:
            headers = {"Accept-Encoding": "identity"}
            if self.pos > 0:
                headers["Range"] = f"bytes={self.pos}-"
                if self.etag is not None:
                    headers["If-Range"] = self.etag  # changed: the whole new object, 200
            try:
                resp = _session().get(
                    self.url, headers=headers, stream=True, timeout=_timeout(self.opts)
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                self._failed(_reason(exc))
                continue
            except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError) as exc:
                raise fail("cannot read", self.url, _reason(exc)) from None
            code = resp.status_code
            if code in _RETRY_STATUS:
                resp.close()
                self._failed(_status_text(resp))
                continue
            if code == 416 and self.pos > 0:
                resp.close()
                m = re.match(r"\s*bytes\s+\*/(\d+)", resp.headers.get("Content-Range", ""))
                if m and int(m.group(1)) == self.pos:
                    self.done = True
                    return
                raise fail("cannot read", self.url, f"{_status_text(resp)} at byte {self.pos}")
            if code == 200:
                length = resp.headers.get("Content-Length")
                self._check_same_object(resp, int(length) if length else None)
                self.resp = resp
                self.window_start, self.window_bytes = time.monotonic(), 0
                if self.pos > 0 and not self._skip(self.pos):
                    continue
                return
            if code == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != self.pos:
                    resp.close()
                    self._failed(
                        f"bad Content-Range {resp.headers.get('Content-Range')!r} "
                        f"for a request from byte {self.pos}"
                    )
                    continue
                total = None if m.group(3) == "*" else int(m.group(3))
                self._check_same_object(resp, total)
                self.resp = resp
                self.window_start, self.window_bytes = time.monotonic(), 0
                return
            resp.close()
            raise fail("cannot read", self.url, _status_text(resp))

    def _skip(self, count):
        """Discard the first ``count`` bytes of a full response; False if it broke meanwhile."""
        left = count
        try:
            while left > 0:
                data = self.resp.raw.read(min(left, self.opts["chunk_size"]))
                if not data:
                    self._failed(f"connection closed while skipping to byte {count}")
                    return False
                left -= len(data)
        except _BROKEN as exc:
            self._failed(_reason(exc))
            return False
        return True

    # -- io.RawIOBase ---------------------------------------------------------------------------
    def readinto(self, b):
        view = memoryview(b).cast("B")
        if len(view) == 0:
            return 0
        while True:
            if self.done or (self.total is not None and self.pos >= self.total):
                self._drop()
                return 0
            if self.resp is None:
                self._connect()
                continue
            try:
                # read1: what has come, not a full chunk (a dripping body must be seen to drip)
                data = self.resp.raw.read1(min(len(view), self.opts["chunk_size"]))
            except _BROKEN as exc:
                self._failed(_reason(exc))
                continue
            if not data:
                if self.total is not None and self.pos < self.total:
                    self._failed(f"connection closed before byte {self.total}")
                    continue
                self.done = True
                self._drop()
                return 0
            n = len(data)
            view[:n] = data
            self.pos += n
            self.window_bytes += n
            now = time.monotonic()
            if self.window_bytes >= _MIN_PROGRESS:  # real progress: failures are forgiven
                self.failures = 0
                self.window_start, self.window_bytes = now, 0
            elif now - self.window_start > self.opts["read_timeout"]:
                self._failed(f"less than {_MIN_PROGRESS} bytes in {self.opts['read_timeout']:g} s")
                self.window_start, self.window_bytes = time.monotonic(), 0
            return n

    def close(self):
        self._drop()
        super().close()


def open_read(url, **options):
    opts = _options(options)
    return io.BufferedReader(HttpReader(url, opts), buffer_size=opts["chunk_size"])


_END = object()
_ABORT = object()


class _Aborted(Exception):
    """Raised inside the PUT body generator to break the upload off."""


class HttpWriter(Writer):
    """One chunked PUT, streamed from a background thread as data is written."""

    def __init__(self, url, opts):
        super().__init__(url)
        self.opts = opts
        self.buf = bytearray()
        self.queue = queue.Queue(maxsize=opts["queue_chunks"])
        self.error = None
        self.response = None
        self.thread = threading.Thread(target=self._run, name="tarproc-http-put", daemon=True)
        self.thread.start()

    def _body(self):
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted()
            yield item

    def _run(self):
        try:
            resp = _session().put(
                self.url,
                data=self._body(),
                headers={"Content-Type": "application/octet-stream"},
                timeout=_timeout(self.opts),
                allow_redirects=False,  # the body was sent once and cannot be sent again
            )
            resp.close()
            self.response = resp
        except BaseException as exc:  # reported by the writing thread
            self.error = exc

    def _failure(self):
        if self.error is not None and not isinstance(self.error, _Aborted):
            return fail("cannot write", self.url, _reason(self.error))
        if self.response is not None:
            return fail("cannot write", self.url, f"{_status_text(self.response)} before the end")
        return fail("cannot write", self.url, "upload stopped")

    def _push(self, item):
        while True:
            if not self.thread.is_alive():
                raise self._failure()
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                pass

    def _write(self, data):
        chunk = self.opts["chunk_size"]
        if not self.buf and len(data) >= chunk:
            self._push(bytes(data))
            return
        self.buf += data
        if len(self.buf) >= chunk:
            self._push(bytes(self.buf))
            self.buf.clear()

    def _commit(self):
        if self.buf:
            self._push(bytes(self.buf))
            self.buf.clear()
        self._push(_END)
        self.thread.join()
        if self.error is not None:
            raise fail("cannot write", self.url, _reason(self.error))
        if not 200 <= self.response.status_code < 300:
            raise fail("cannot write", self.url, _status_text(self.response) + _elsewhere(self.response))

    def _abort(self):
        if self.thread.is_alive():
            while True:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break
            try:
                self.queue.put_nowait(_ABORT)
            except queue.Full:
                pass
            self.thread.join()
        self.buf.clear()
        # Tried twice, not the reads' seven times: a server that did not take the PUT is most
        # likely not there for the DELETE either, and the error is already on its way.
        opts = dict(self.opts, retries=1)
        try:
            resp = _call("DELETE", self.url, opts, "cannot delete", allow_redirects=False)
            resp.close()
            if resp.status_code >= 300 and resp.status_code not in (404, 410):
                _warn(f"{self.name}: cleanup after a failed write: DELETE answered "
                      f"{_status_text(resp)}; a partial object may be left there")
        except StorageError as exc:
            _warn(f"cleanup after a failed write: {exc}; a partial object may be left there")


def _warn(message):
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _elsewhere(resp):
    """For a redirect answered to a PUT or DELETE: where the server points (never followed)."""
    if 300 <= resp.status_code < 400:
        from tarproc.storage.urls import redact

        where = resp.headers.get("Location")
        return (f" (the server redirects{' to ' + redact(where) if where else ''}; writes and "
                "deletes are not redirected: give the final URL)")
    return ""


def open_write(url, **options):
    return HttpWriter(url, _options(options))


def _head(url, opts, action):
    resp = _call("HEAD", url, opts, action, allow_redirects=True)
    resp.close()
    return resp


def exists(url, **options):
    resp = _head(url, _options(options), "cannot check")
    if 200 <= resp.status_code < 300:
        return True
    if resp.status_code in (404, 410):
        return False
    raise fail("cannot check", url, _status_text(resp))


def committed(url, **options):
    resp = _head(url, _options(options), "cannot check")
    if resp.status_code in (404, 410):
        return False
    if not 200 <= resp.status_code < 300:
        raise fail("cannot check", url, _status_text(resp))
    return resp.headers.get("Content-Length") != "0"


def size(url, **options):
    resp = _head(url, _options(options), "cannot stat")
    if not 200 <= resp.status_code < 300:
        raise fail("cannot stat", url, _status_text(resp))
    length = resp.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None


def remove(url, missing_ok=False, **options):
    resp = _call("DELETE", url, _options(options), "cannot remove", allow_redirects=False)
    resp.close()
    if 200 <= resp.status_code < 300:
        return
    if missing_ok and resp.status_code in (404, 410):
        return
    raise fail("cannot remove", url, _status_text(resp) + _elsewhere(resp))
