"""Real servers for the tests, all on 127.0.0.1 and started by the tests themselves.

- ``nginx_server``: Debian's nginx with WebDAV PUT/DELETE/MKCOL, autoindex (session scope).
- ``s3_server``: moto's standalone S3 server, with the AWS environment pointing at it.
- ``gcs_server``: the gcp-storage-emulator, with ``STORAGE_EMULATOR_HOST`` pointing at it.
- ``flaky_http_server``: a small Python server that answers 503 and drops connections mid-body
  by a deterministic script, with or without Range support, accepting PUT and DELETE.

Import with ``from servers import *`` in a conftest.py.
"""

import os
import pathlib
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

__all__ = [
    "free_port",
    "wait_for_port",
    "NginxServer",
    "FlakyHTTPServer",
    "nginx_server",
    "s3_server",
    "gcs_server",
    "flaky_http_server",
]

DAV_EXT_MODULE = "/usr/share/nginx/modules/ngx_http_dav_ext_module.so"


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, timeout=10.0, proc=None):
    """Wait until something accepts connections on 127.0.0.1:port; False on timeout or if
    ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


# ---------------------------------------------------------------------------------------------
# nginx with WebDAV


_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
{load_module}
events {{ worker_connections 512; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    client_body_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{
            dav_methods PUT DELETE MKCOL COPY MOVE;
            {dav_ext}
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            client_max_body_size 0;
            autoindex on;
        }}
    }}
}}
"""


class NginxServer:
    """A running nginx: ``url`` (http://127.0.0.1:PORT), ``root`` (the served directory)."""

    def __init__(self, tmp):
        self.tmp = pathlib.Path(tmp)
        self.root = self.tmp / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = None
        self.port = None
        self.url = None

    def error_log(self):
        path = self.tmp / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self):
        exe = shutil.which("nginx") or (
            "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
        )
        if exe is None:
            pytest.fail("nginx is not installed (apt-get install nginx): the http tests need it")
        dav_ext = os.path.exists(DAV_EXT_MODULE)
        for _attempt in range(5):
            self.port = free_port()
            conf = self.tmp / "nginx.conf"
            conf.write_text(
                _NGINX_CONF.format(
                    tmp=self.tmp,
                    root=self.root,
                    port=self.port,
                    load_module=f"load_module {DAV_EXT_MODULE};" if dav_ext else "",
                    dav_ext="dav_ext_methods PROPFIND OPTIONS;" if dav_ext else "",
                )
            )
            stderr = open(self.tmp / "stderr.log", "ab")
            self.proc = subprocess.Popen(
                [exe, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "error.log")],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
            stderr.close()
            if wait_for_port(self.port, proc=self.proc):
                self.url = f"http://127.0.0.1:{self.port}"
                return self
            self.stop()
            if "Address already in use" not in self.error_log():
                break
        log = (self.tmp / "stderr.log").read_text(errors="replace") + self.error_log()
        pytest.fail(f"nginx did not start; its log:\n{log[-3000:]}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def nginx_server(tmp_path_factory):
    """A real nginx with WebDAV on 127.0.0.1; ``.url``, ``.root``, ``.port``."""
    server = NginxServer(tmp_path_factory.mktemp("nginx")).start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# moto S3


class _S3:
    def __init__(self, endpoint, bucket):
        self.endpoint = endpoint
        self.bucket = bucket
        self.url = f"s3://{bucket}"

    def __repr__(self):
        return f"<S3 {self.endpoint} bucket={self.bucket}>"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with the AWS environment pointing at it.

    ``.endpoint`` (http://127.0.0.1:PORT), ``.bucket`` (created, empty), ``.url`` (s3://BUCKET).
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        pytest.fail("moto[server] is not installed: the s3 tests need it")
    tmp = tmp_path_factory.mktemp("s3")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    if not wait_for_port(port):
        pytest.fail(f"moto server did not start on port {port}")
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": str(tmp / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "credentials"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        import boto3

        bucket = "tarproc-test"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        try:
            yield _S3(endpoint, bucket)
        finally:
            server.stop()


# ---------------------------------------------------------------------------------------------
# GCS emulator


@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator on 127.0.0.1 (in memory) with ``STORAGE_EMULATOR_HOST`` set.

    ``.endpoint``, ``.bucket`` (created), ``.url`` (gs://BUCKET).
    """
    try:
        from gcp_storage_emulator.server import create_server
    except ImportError:
        pytest.fail("gcp-storage-emulator is not installed: the gs tests need it")
    import logging

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = free_port()
    bucket = "tarproc-test"
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    if not wait_for_port(port):
        pytest.fail(f"gcp-storage-emulator did not start on port {port}")
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", endpoint)
        mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        try:
            s = _S3(endpoint, bucket)
            s.url = f"gs://{bucket}"
            yield s
        finally:
            server.stop()


# ---------------------------------------------------------------------------------------------
# A deliberately unreliable HTTP server


class _FlakyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "FlakyHTTPServer"

    def log_message(self, format, *args):  # keep test output clean
        pass

    def _path(self):
        rel = self.path.split("?", 1)[0].lstrip("/")
        path = (self.server.root / rel).resolve()
        if self.server.root.resolve() not in path.parents:
            return None
        return path

    def _reply(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self):
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_HEAD(self):
        path = self._path()
        if path is None or not path.is_file():
            return self._reply(404)
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        if self.server.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        action, k = self.server.next_action("GET")
        self.server.record(self, action)
        if action == "503":
            return self._reply(503, b"try later\n")
        if action == "reset":
            return self._drop()
        path = self._path()
        if path is None or not path.is_file():
            return self._reply(404, b"not found\n")
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and self.server.ranges:
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                return self._reply(416, headers=[("Content-Range", f"bytes */{len(data)}")])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        if self.server.etag != "none":
            weak = "W/" if self.server.etag == "weak" else ""
            self.send_header("ETag", f'{weak}"{len(data)}-{int(path.stat().st_mtime)}"')
        if self.server.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if action == "drop":
            cut = min(len(body) - 1, self.server.drop_after + 7919 * k)
            self.wfile.write(body[: max(cut, 0)])
            return self._drop()
        self.wfile.write(body)

    def _body_chunks(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline()
                if not line:
                    raise ConnectionError("client went away")
                n = int(line.split(b";", 1)[0].strip(), 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                data = self.rfile.read(n)
                if len(data) < n:
                    raise ConnectionError("client went away")
                self.rfile.readline()
                yield data
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left > 0:
                data = self.rfile.read(min(left, 1 << 16))
                if not data:
                    raise ConnectionError("client went away")
                left -= len(data)
                yield data

    def _redirect(self):
        """With ``redirect``: answer 307 to where the object "moved" (after the body)."""
        for _ in self._body_chunks() if self.command == "PUT" else ():
            pass
        return self._reply(307, headers=[("Location", "/moved" + self.path)])

    def do_PUT(self):
        action, _k = self.server.next_action("PUT")
        self.server.record(self, action)
        if self.server.redirect and not self.path.startswith("/moved/"):
            return self._redirect()
        path = self._path()
        if path is None:
            return self._reply(403)
        path.parent.mkdir(parents=True, exist_ok=True)
        received = 0
        try:
            # A naive server: writes straight to the final name, so a broken upload leaves a
            # partial file that only the client's DELETE can clean up.
            with open(path, "wb") as f:
                for chunk in self._body_chunks():
                    f.write(chunk)
                    received += len(chunk)
                    if action == "drop" and received >= self.server.drop_after:
                        f.flush()
                        return self._drop()
        except ConnectionError:
            self.close_connection = True
            return
        if action in ("500", "503"):
            return self._reply(int(action), b"failed\n")
        self._reply(201)

    def do_DELETE(self):
        self.server.record(self, "ok")
        if self.server.redirect and not self.path.startswith("/moved/"):
            return self._redirect()
        path = self._path()
        if path is None or not path.is_file():
            return self._reply(404)
        path.unlink()
        self._reply(204)


class FlakyHTTPServer(ThreadingHTTPServer):
    """Serves files under ``root`` and misbehaves by a deterministic script.

    ``get_script`` / ``put_script`` are cycled, one entry per GET / PUT request:
    ``"ok"``; ``"503"`` (GET) or ``"500"``/``"503"`` (PUT, after reading the body); ``"drop"``
    (GET: close the connection after ``drop_after + 7919*k`` body bytes, k = request number;
    PUT: close after receiving ``drop_after`` bytes); ``"reset"`` (GET: close before answering).
    ``ranges`` toggles Range support. ``etag``: ``"strong"``, ``"weak"`` (``W/``) or ``"none"``
    (no ETag, no Last-Modified). ``redirect``: PUT and DELETE outside ``/moved/`` answer 307 to
    ``/moved/...``. ``requests`` records (method, path, Range, action, headers).
    """

    daemon_threads = True

    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.root = pathlib.Path(root)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.port = self.server_address[1]
        self.lock = threading.Lock()
        self.configure()

    def configure(self, get=("ok",), put=("ok",), ranges=True, drop_after=1_000_003, etag="strong",
                  redirect=False):
        """Set the behaviour and reset the counters and the request log."""
        with self.lock:
            self.etag = etag
            self.redirect = redirect
            self.get_script = list(get)
            self.put_script = list(put)
            self.ranges = ranges
            self.drop_after = drop_after
            self.counts = {"GET": 0, "PUT": 0}
            self.requests = []
        return self

    def next_action(self, method):
        with self.lock:
            k = self.counts[method]
            self.counts[method] = k + 1
            script = self.get_script if method == "GET" else self.put_script
            return script[k % len(script)], k

    def record(self, handler, action):
        with self.lock:
            self.requests.append(
                (handler.command, handler.path, handler.headers.get("Range"), action,
                 dict(handler.headers))
            )


@pytest.fixture
def flaky_http_server(tmp_path):
    """A FlakyHTTPServer serving ``tmp_path / "flaky"``; ``.url``, ``.root``, ``.configure()``."""
    root = tmp_path / "flaky"
    root.mkdir()
    server = FlakyHTTPServer(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
