"""``s3://`` and ``gs://`` through fsspec (s3fs / gcsfs, imported only when used).

The usual environment applies: AWS credentials and ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for S3-compatible servers; Google credentials and
``STORAGE_EMULATOR_HOST`` for GCS emulators (anonymous access unless credentials are configured).
Listings are not cached, so ``exists`` right after a commit sees the new object.
"""

import io
import logging
import os

from tarproc.storage.base import RawReader, Writer, fail
from tarproc.storage.urls import remote_path, scheme

BLOCK_SIZE = 8 << 20  # read-ahead and multipart part size (S3 parts must be >= 5 MiB)

#: The longest one write or commit of an upload may take (one part of BLOCK_SIZE, or the last
#: one and the completion) before the upload counts as stalled: the HTTP client under s3fs/gcsfs
#: has timeouts for connecting and reading but none for sending, so an endpoint that accepts
#: the connection and never reads would hold a write forever.
STALL_SECONDS = 600.0

log = logging.getLogger("tarproc.storage")

_PACKAGES = {"s3": ("s3fs", "tarproc[s3]"), "gs": ("gcsfs", "tarproc[gcs]")}


def _quiet_libraries():
    """Keep the cloud libraries' own log records (gcsfs logs a whole traceback when it gives up
    cancelling an upload) off stderr: what goes wrong reaches the user as one StorageError.
    Only Python's last-resort output is silenced; a handler the caller configures still sees
    them."""
    import logging

    for name in ("gcsfs", "s3fs", "fsspec", "aiobotocore", "botocore"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())


def filesystem(url):
    """The fsspec filesystem for ``url``'s scheme, configured from the environment."""
    kind = scheme(url)
    module, extra = _PACKAGES[kind]
    try:
        __import__(module)
        import fsspec
    except ImportError as exc:
        raise fail("cannot open", url, f"{module} is not installed (pip install {extra})") from exc
    _quiet_libraries()
    options = {"use_listings_cache": False}
    if kind == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        # Bounded waits: botocore's own retries times s3fs's would keep a write to an endpoint
        # that accepts connections and never answers going for over 20 minutes; this way a
        # request gives up after ~3 x 2 x 60 s at worst, as the http backend's reads do.
        options["config_kwargs"] = {"connect_timeout": 10, "read_timeout": 60,
                                    "retries": {"max_attempts": 3, "mode": "standard"}}
        fs = fsspec.filesystem("s3", **options)
        fs.retries = 2  # s3fs's own loop around botocore's (5 by default)
        return fs
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        if not emulator.startswith(("http://", "https://")):
            emulator = "http://" + emulator
        options["endpoint_url"] = emulator
        if not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            options["token"] = "anon"
        # gcsfs's default class may probe Google's gRPC control plane for the bucket layout,
        # which no emulator serves (a minute-long timeout per bucket): use the plain JSON-API one.
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(**options)
    return fsspec.filesystem("gcs", **options)


def _url_of(url, path):
    return f"{url.split('://', 1)[0]}://{path}"


class RemoteReader(RawReader):
    """An fsspec file opened for reading, with its errors turned into StorageError."""

    def __init__(self, url):
        super().__init__(url)
        try:
            self.file = filesystem(url).open(
                remote_path(url), "rb", block_size=BLOCK_SIZE, cache_type="readahead"
            )
        except Exception as exc:
            raise fail("cannot open", url, _cause(exc)) from exc

    def readinto(self, b):
        try:
            return self.file.readinto(b)
        except Exception as exc:
            raise fail("cannot read", self.url, _cause(exc)) from exc

    def close(self):
        if not self.closed:
            try:
                self.file.close()
            finally:
                super().close()


def open_read(url):
    return io.BufferedReader(RemoteReader(url), buffer_size=1 << 20)


class RemoteWriter(Writer):
    """An fsspec upload (multipart for big objects); the object appears only on commit."""

    def __init__(self, url):
        super().__init__(url)
        try:
            self.file = filesystem(url).open(remote_path(url), "wb", block_size=BLOCK_SIZE)
        except Exception as exc:
            raise fail("cannot write", url, _cause(exc)) from exc
        self.stalled = False  # a write or commit gave up waiting (see STALL_SECONDS)

    def _bounded(self, fn, *args):
        """``fn(*args)`` (a call that may send a part), given up after STALL_SECONDS: the call
        goes on in a daemon thread, which the end of the process takes with it."""
        import threading

        box = []
        done = threading.Event()

        def run():
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                box.append((False, exc))
            finally:
                done.set()

        threading.Thread(target=run, name="tarproc-upload", daemon=True).start()
        if not done.wait(STALL_SECONDS):
            self.stalled = True
            raise fail("cannot write", self.url, f"the upload stalled: nothing sent for "
                       f"{STALL_SECONDS:.0f} s (the endpoint does not answer)")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _write(self, data):
        try:
            self._bounded(self.file.write, data)
        except Exception as exc:
            if self.stalled:
                raise
            raise fail("cannot write", self.url, _cause(exc)) from exc

    def _commit(self):
        try:
            self._bounded(self.file.close)
        except Exception as exc:
            if self.stalled:
                raise
            raise fail("cannot write", self.url, _cause(exc)) from exc

    def _abort(self):
        f = self.file
        if self.stalled:  # cancelling would wait on the same silent endpoint
            f.closed = True
            return
        try:
            if not f.closed:
                f.discard()
        except Exception as exc:
            # An upload that is never completed publishes nothing (S3 multipart, GCS resumable):
            # failing to cancel it only leaves an invisible session behind until it expires.
            log.warning("cannot cancel the upload of %s: %s", self.name, _cause(exc))
        finally:
            f.closed = True  # close() must never publish what was written
            f.buffer = None


def _cause(exc):
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def exists(url):
    try:
        return filesystem(url).exists(remote_path(url))
    except Exception as exc:
        raise fail("cannot check", url, _cause(exc)) from exc


def committed(url):
    try:
        info = filesystem(url).info(remote_path(url))
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise fail("cannot check", url, _cause(exc)) from exc
    return info.get("type") == "file" and bool(info.get("size"))


def size(url):
    try:
        info = filesystem(url).info(remote_path(url))
    except Exception as exc:
        raise fail("cannot stat", url, _cause(exc)) from exc
    return info.get("size")


def remove(url, missing_ok=False):
    fs = filesystem(url)
    path = remote_path(url)
    try:
        if missing_ok and not fs.exists(path):
            return
        if not fs.isfile(path):
            raise FileNotFoundError(path)
        fs.rm_file(path)
    except Exception as exc:
        raise fail("cannot remove", url, _cause(exc)) from exc


def listdir(url):
    """Objects and "directories" directly under ``url``, or those whose key starts with it."""
    fs = filesystem(url)
    path = remote_path(url).rstrip("/")
    try:
        if "/" in path and not url.endswith("/") and not fs.isdir(path):
            parent, _, base = path.rpartition("/")
            names = [p for p in fs.ls(parent, detail=False) if p.rpartition("/")[2].startswith(base)]
        else:
            names = fs.ls(path, detail=False)
    except FileNotFoundError:
        names = []
    except Exception as exc:
        raise fail("cannot list", url, _cause(exc)) from exc
    return sorted(_url_of(url, p.rstrip("/")) for p in names)


def glob(pattern):
    try:
        paths = filesystem(pattern).glob(remote_path(pattern))
    except Exception as exc:
        raise fail("cannot list", pattern, _cause(exc)) from exc
    return sorted(_url_of(pattern, p) for p in paths)
