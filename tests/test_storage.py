"""tarproc.storage against real files, processes and servers (nginx, moto, a GCS emulator and a
deliberately flaky HTTP server), all on 127.0.0.1. Fixtures come from tests/servers.py."""

import hashlib
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from tarproc import storage
from tarproc.errors import StorageError

FAST = {"backoff": 0.01, "max_backoff": 0.05}  # http retry timing for tests


def sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def payload():
    """5 MB of random bytes (not a multiple of any buffer size)."""
    return os.urandom(5 * 1024 * 1024 + 12345)


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


# --------------------------------------------------------------------------------------------
# names


def test_scheme_and_is_local():
    assert storage.scheme("data/a.tar") == "file"
    assert storage.scheme("/abs/a.tar") == "file"
    assert storage.scheme("file:///x/a.tar") == "file"
    assert storage.scheme("c:odd-name.tar") == "file"
    assert storage.scheme("-") == "stdio"
    assert storage.scheme("pipe:curl -s http://h/x") == "pipe"
    assert storage.scheme("HTTP://h/x") == "http"
    assert storage.scheme("https://h/x") == "https"
    assert storage.scheme("s3://b/k") == "s3"
    assert storage.scheme("gs://b/k") == "gs"
    assert storage.scheme("gcs://b/k") == "gs"
    assert storage.is_local("a.tar") and storage.is_local("file:///a.tar")
    assert not storage.is_local("-") and not storage.is_local("s3://b/k")
    with pytest.raises(StorageError, match="unsupported scheme 'ftp'"):
        storage.open_read("ftp://user:pw@host/x")


def test_redact():
    r = storage.redact
    assert r("http://user:secret@127.0.0.1:8080/a.tar") == "http://***@127.0.0.1:8080/a.tar"
    assert r("https://token@h/x") == "https://***@h/x"
    assert r("http://h/a.tar") == "http://h/a.tar"
    signed = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc&x=1"
    out = r(signed)
    assert "abc" not in out and "AK" not in out and "x=1" in out
    assert "s3cr" not in r("https://h/x?sig=s3cr&sv=2020")
    assert "qq9" not in r("https://h/x?access_token=qq9")
    out = r("pipe:curl -s https://me:pw@h/x?token=zz | tar x")
    assert "pw" not in out and "zz" not in out and out.startswith("pipe:curl -s https://***@h/x")


# --------------------------------------------------------------------------------------------
# local files


def test_local_roundtrip_creates_dirs(tmp_path):
    target = tmp_path / "a" / "b" / "out.tar"
    with storage.open_write(str(target)) as w:
        w.write(b"hello ")
        w.write(memoryview(b"world"))
        assert w.tell() == 11
        assert not target.exists()  # invisible until commit
    assert target.read_bytes() == b"hello world"
    assert _leftovers(target.parent) == []
    with storage.open_read(str(target)) as f:
        assert f.read(5) == b"hello"
        assert f.read() == b" world"
    assert storage.exists(str(target)) and storage.size(str(target)) == 11
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_local_exception_inside_with_leaves_nothing(tmp_path):
    target = tmp_path / "out.tar"
    with pytest.raises(RuntimeError):
        with storage.open_write(str(target)) as w:
            w.write(b"x" * 100_000)
            assert _leftovers(tmp_path)  # the temp file is there meanwhile
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_local_overwrite_is_atomic_and_abort_keeps_old(tmp_path):
    target = tmp_path / "out.tar"
    target.write_bytes(b"old")
    w = storage.open_write(str(target))
    w.write(b"new content")
    assert target.read_bytes() == b"old"
    w.abort()
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []
    w = storage.open_write(str(target))
    w.write(b"new content")
    w.close()  # close commits, as for a file
    assert target.read_bytes() == b"new content"
    with pytest.raises(ValueError):
        w.write(b"more")


def test_local_garbage_collected_writer_is_aborted(tmp_path):
    target = tmp_path / "out.tar"
    w = storage.open_write(str(target))
    w.write(b"partial")
    del w
    assert not target.exists() and _leftovers(tmp_path) == []


def test_local_fifo_is_written_into_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    # (a daemon: if the FIFO were replaced, the reader would wait on it for ever)
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    with storage.open_write(str(fifo)) as w:
        w.write(b"through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and _leftovers(tmp_path) == []


def test_local_dev_paths_are_written_into_not_replaced(tmp_path):
    """``-o /dev/null``, ``/dev/stdout``: once replaced /dev/null with a regular file."""
    before = os.lstat("/dev/null")
    try:
        with storage.open_write("/dev/null") as w:
            w.write(b"x" * 100_000)
        assert not [n for n in os.listdir("/dev") if n.startswith(".null.tmp-")]
        after = os.lstat("/dev/null")
        assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino
        out = tmp_path / "out"
        code = ("from tarproc import storage\n"
                "with storage.open_write('/dev/stdout') as w:\n    w.write(b'to stdout')\n")
        with open(out, "wb") as f:
            subprocess.run([sys.executable, "-c", code], stdout=f, check=True)
        assert out.read_bytes() == b"to stdout"
        assert os.path.islink("/dev/stdout")
    finally:
        if not stat.S_ISCHR(os.lstat("/dev/null").st_mode):  # never leave the machine broken
            os.unlink("/dev/null")
            os.mknod("/dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            os.chmod("/dev/null", 0o666)


def test_local_symlink_stays_a_link_to_the_new_file(tmp_path):
    real = tmp_path / "data" / "real.tar"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "link.tar"
    link.symlink_to(real)
    with storage.open_write(str(link)) as w:
        w.write(b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["data", "link.tar"] and os.listdir(real.parent) == ["real.tar"]


def test_local_directory_target_is_an_error_before_writing(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(StorageError, match="is a directory"):
        storage.open_write(str(tmp_path / "d"))
    assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == []


def test_file_url_list_glob_remove(tmp_path):
    for name in ("s-0.tar", "s-1.tar", "t-0.tar"):
        (tmp_path / name).write_bytes(name.encode())
    url = f"file://{tmp_path}/s-1.tar"
    with storage.open_read(url) as f:
        assert f.read() == b"s-1.tar"
    with storage.open_write(f"file://{tmp_path}/sub/new.tar") as w:
        w.write(b"n")
    assert (tmp_path / "sub" / "new.tar").read_bytes() == b"n"
    assert storage.listdir(str(tmp_path)) == [
        f"{tmp_path}/{n}" for n in ("s-0.tar", "s-1.tar", "sub", "t-0.tar")
    ]
    assert storage.listdir(f"{tmp_path}/s-") == [f"{tmp_path}/s-0.tar", f"{tmp_path}/s-1.tar"]
    assert storage.glob(f"file://{tmp_path}/s-*.tar") == [
        f"file://{tmp_path}/s-0.tar",
        f"file://{tmp_path}/s-1.tar",
    ]
    storage.remove(url)
    assert not storage.exists(url)
    with pytest.raises(StorageError, match="s-1.tar"):
        storage.remove(url)
    storage.remove(url, missing_ok=True)
    with pytest.raises(StorageError, match="cannot open .*nothere.tar"):
        storage.open_read(str(tmp_path / "nothere.tar"))


def test_stdin_and_stdout():
    code = (
        "import sys\n"
        "from tarproc import storage\n"
        "f = storage.open_read('-')\n"
        "data = f.read()\n"
        "f.close()\n"
        "assert not sys.stdin.closed\n"
        "with storage.open_write('-') as w:\n"
        "    w.write(data[::-1])\n"
        "sys.stdout.buffer.write(b'|ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=b"abc\x00def", capture_output=True, check=True
    )
    assert out.stdout == b"fed\x00cba|ok"


# --------------------------------------------------------------------------------------------
# pipe:


def test_pipe_read_write(tmp_path):
    with storage.open_read("pipe:printf 'hello\\n'; printf world") as f:
        assert f.read() == b"hello\nworld"
    target = tmp_path / "p.bin"
    with storage.open_write(f"pipe:cat > {target}") as w:
        w.write(b"x" * 300_000)
    assert target.read_bytes() == b"x" * 300_000


def test_pipe_read_failing_command_is_an_error():
    with pytest.raises(StorageError, match=r"pipe:cat nonexist.*status 1"):
        with storage.open_read("pipe:cat nonexist 2>/dev/null") as f:
            f.read()
    with pytest.raises(StorageError, match="status 1"):
        with storage.open_read("pipe:false") as f:
            f.read()
    # output first, failure after: still an error once the reader reaches the end
    with storage.open_read("pipe:printf abc; exit 3") as f:
        assert f.read(3) == b"abc"
        with pytest.raises(StorageError, match="status 3"):
            f.read()


def test_pipe_read_early_close_is_not_an_error():
    t0 = time.monotonic()
    with storage.open_read("pipe:yes") as f:
        assert f.read(10) == b"y\ny\ny\ny\ny\n"
    with storage.open_read("pipe:echo hi; sleep 30") as f:
        assert f.read(3) == b"hi\n"
    assert time.monotonic() - t0 < 5


def test_pipe_write_failing_command_is_an_error(tmp_path):
    with pytest.raises(StorageError, match="pipe:false.*status 1"):
        with storage.open_write("pipe:false") as w:
            w.write(b"x")
    with pytest.raises(StorageError, match="status 2"):
        with storage.open_write("pipe:cat > /dev/null; exit 2") as w:
            w.write(b"data")
    with pytest.raises(StorageError):  # stops reading: the writer notices on write or commit
        with storage.open_write("pipe:exit 4") as w:
            for _ in range(100):
                w.write(b"z" * 65536)


def test_pipe_write_abort_kills_command(tmp_path):
    marker = tmp_path / "done"
    w = storage.open_write(f"pipe:cat > /dev/null && touch {marker}")
    w.write(b"partial")
    w.abort()
    time.sleep(0.1)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# http against nginx (WebDAV)


def test_nginx_put_get_exists_size_delete(nginx_server, payload):
    url = f"{nginx_server.url}/dir/sub/shard-0000.tar"
    assert not storage.exists(url)
    with storage.open_write(url) as w:
        for i in range(0, len(payload), 100_000):  # many small writes, a few MB in all
            w.write(payload[i : i + 100_000])
    assert (nginx_server.root / "dir/sub/shard-0000.tar").read_bytes() == payload
    assert storage.exists(url)
    assert storage.size(url) == len(payload)
    with storage.open_read(url) as f:
        head = f.read(1000)
        rest = f.read()
    assert sha(head + rest) == sha(payload)
    storage.remove(url)
    assert not storage.exists(url)
    assert not (nginx_server.root / "dir/sub/shard-0000.tar").exists()
    with pytest.raises(StorageError, match="404"):
        storage.remove(url)
    storage.remove(url, missing_ok=True)


def test_nginx_errors_name_url_without_credentials(nginx_server):
    url = nginx_server.url.replace("http://", "http://user:secret@") + "/missing.tar"
    for call in (storage.open_read, storage.size):
        with pytest.raises(StorageError) as info:
            call(url)
        msg = str(info.value)
        assert "secret" not in msg and "/missing.tar" in msg and "404" in msg
        assert "\n" not in msg
    assert storage.exists(url) is False
    with pytest.raises(StorageError, match="listing not supported"):
        storage.listdir(nginx_server.url + "/")


def test_nginx_aborted_put_leaves_nothing(nginx_server):
    url = f"{nginx_server.url}/aborted/out.tar"
    with pytest.raises(RuntimeError):
        with storage.open_write(url) as w:
            w.write(os.urandom(3_000_000))
            raise RuntimeError("crash mid-upload")
    assert not storage.exists(url)
    assert not (nginx_server.root / "aborted/out.tar").exists()
    # overwriting: until commit, readers see the old object
    (nginx_server.root / "aborted").mkdir(exist_ok=True)
    (nginx_server.root / "aborted/old.tar").write_bytes(b"old")
    w = storage.open_write(f"{nginx_server.url}/aborted/old.tar")
    w.write(b"new" * 1000)
    assert (nginx_server.root / "aborted/old.tar").read_bytes() == b"old"
    w.commit()
    assert (nginx_server.root / "aborted/old.tar").read_bytes() == b"new" * 1000


def test_http_connection_refused():
    from servers import free_port

    url = f"http://user:secret@127.0.0.1:{free_port()}/x.tar"
    with pytest.raises(StorageError) as info:
        storage.open_read(url, retries=1, **FAST)
    assert "secret" not in str(info.value) and "x.tar" in str(info.value)


# --------------------------------------------------------------------------------------------
# http against a flaky server


@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "no-ranges"])
def test_flaky_get_loses_and_duplicates_nothing(flaky_http_server, payload, ranges):
    srv = flaky_http_server
    (srv.root / "big.bin").write_bytes(payload)
    srv.configure(get=["drop", "503", "drop", "reset", "ok"], ranges=ranges, drop_after=700_001)
    with storage.open_read(f"{srv.url}/big.bin", **FAST) as f:
        parts = []
        while True:
            b = f.read(65536 + 7)
            if not b:
                break
            parts.append(b)
    assert sha(b"".join(parts)) == sha(payload)
    gets = [r for r in srv.requests if r[0] == "GET"]
    assert [g[3] for g in gets] == ["drop", "503", "drop", "reset", "ok"]
    if ranges:
        assert gets[0][2] is None
        assert gets[1][2] == "bytes=700001-"  # resumed where the first body stopped
        assert gets[4][2] == f"bytes={700001 + 700001 + 7919 * 2}-"
    else:
        assert all(g[2] is None or g[2].startswith("bytes=") for g in gets)


def test_flaky_get_gives_up_after_bounded_attempts(flaky_http_server):
    srv = flaky_http_server
    (srv.root / "x.bin").write_bytes(b"data")
    srv.configure(get=["503"])
    url = srv.url.replace("http://", "http://u:secret@") + "/x.bin?X-Amz-Signature=hush"
    with pytest.raises(StorageError, match="gave up after 4 attempts") as info:
        storage.open_read(url, retries=3, **FAST)
    assert "secret" not in str(info.value) and "hush" not in str(info.value)
    assert len(srv.requests) == 4


@pytest.mark.parametrize("etag", ["weak", "none"])
def test_broken_get_without_a_version_to_hold_the_server_to_is_not_resumed(flaky_http_server, payload, etag):
    """A weak ETag (or none, and no Last-Modified) does not promise the same bytes: a body that
    breaks is an error, never bytes of two versions spliced together."""
    srv = flaky_http_server.configure(get=("drop", "ok"), etag=etag, drop_after=100_000)
    (srv.root / "obj.tar").write_bytes(payload)
    with pytest.raises(StorageError, match=r"the connection broke at byte \d+ and the server names no "
                                           r"version of the object"):
        with storage.open_read(f"{srv.url}/obj.tar", backoff=0.01) as f:
            f.read()
    srv.configure(get=("drop", "ok"), drop_after=100_000)  # strong ETag: resumed, with If-Range
    with storage.open_read(f"{srv.url}/obj.tar", backoff=0.01) as f:
        assert f.read() == payload
    resumed = [h for (m, _, rng, _, h) in srv.requests if m == "GET" and rng]
    assert resumed and resumed[0].get("If-Range", "").startswith('"')


def test_writes_and_deletes_are_never_redirected(flaky_http_server, payload):
    """A PUT answered with a redirect would be sent again without its body (an empty object and
    success) and a DELETE would reach another object: both are errors saying where the server
    points, and the object at the redirect's target is left alone."""
    srv = flaky_http_server.configure(redirect=True)
    (srv.root / "moved").mkdir()
    (srv.root / "moved" / "out.tar").write_bytes(b"older object")
    with pytest.warns(RuntimeWarning, match="DELETE answered HTTP 307"):
        with pytest.raises(StorageError, match=r"^cannot write http://127.0.0.1:\d+/out.tar: HTTP 307 "
                                               r"Temporary Redirect \(the server redirects to /moved/out.tar;"):
            with storage.open_write(f"{srv.url}/out.tar") as w:
                w.write(payload[:300_000])
    assert (srv.root / "moved" / "out.tar").read_bytes() == b"older object"
    assert [m for m, *_ in srv.requests] == ["PUT", "DELETE"]  # nothing followed
    with pytest.raises(StorageError, match="cannot remove .*HTTP 307"):
        storage.remove(f"{srv.url}/out.tar")
    assert (srv.root / "moved" / "out.tar").read_bytes() == b"older object"


@pytest.mark.parametrize("url, cause", [
    ("http://user:secret@127.0.0.1:99999/x.tar", "Failed to parse"),
    ("http://user:secret@/x.tar", "No host supplied"),
])
def test_unusable_http_urls_are_one_line_errors_without_credentials(url, cause):
    for action in (lambda: storage.open_read(url).read(), lambda: storage.exists(url)):
        with pytest.raises(StorageError) as info:
            action()
        assert cause in str(info.value) and "secret" not in str(info.value)
        assert "\n" not in str(info.value)


@pytest.mark.timeout(60)
def test_a_server_that_drips_bytes_is_a_stalled_read(tmp_path):
    """One byte now and then never trips the timeout of a single read: fewer than 1 KiB in a
    read_timeout is a stall like silence, retried (resumed) and then an error."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def drip(conn):
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nETag: \"v1\"\r\n\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.1)

    def serve():
        try:
            while True:
                conn, _ = server.accept()
                threading.Thread(target=drip, args=(conn,), daemon=True).start()
        except OSError:  # closed at the end of the test
            pass

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/x.tar"
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"less than 1024 bytes in 0.5 s at byte \d+ \(gave up after 2 attempts\)"):
        with storage.open_read(url, read_timeout=0.5, retries=1, backoff=0.01) as f:
            f.read()
    assert time.monotonic() - t0 < 10
    stop.set()
    server.close()


def test_flaky_put_chunked_ok(flaky_http_server, payload):
    srv = flaky_http_server
    with storage.open_write(f"{srv.url}/up/ok.bin") as w:
        w.write(payload)
    assert (srv.root / "up/ok.bin").read_bytes() == payload
    (put,) = srv.requests
    assert put[4].get("Transfer-Encoding") == "chunked" and "Content-Length" not in put[4]


@pytest.mark.parametrize("failure", ["drop", "500"])
def test_flaky_put_failure_leaves_no_object(flaky_http_server, payload, failure):
    srv = flaky_http_server
    srv.configure(put=[failure], drop_after=1_500_000)
    url = f"{srv.url}/up/bad.bin"
    with pytest.raises(StorageError, match="up/bad.bin") as info:
        with storage.open_write(url, **FAST) as w:
            for i in range(0, len(payload), 1 << 16):
                w.write(payload[i : i + (1 << 16)])
    if failure == "500":
        assert "500" in str(info.value)
    assert not (srv.root / "up/bad.bin").exists()  # the client deleted the partial object
    assert [r[0] for r in srv.requests] == ["PUT", "DELETE"]


# --------------------------------------------------------------------------------------------
# s3 (moto) and gs (emulator)


def test_standard_streams_closed_in_python_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(StorageError, match="^cannot read -: standard input is closed$"):
        storage.open_read("-")
    with pytest.raises(StorageError, match="^cannot write -: standard output is closed$"):
        storage.open_write("-")


def test_write_below_a_file_names_the_file(tmp_path):
    (tmp_path / "f.tar").write_bytes(b"x")
    for target in (tmp_path / "f.tar" / "o.tar", tmp_path / "f.tar" / "a" / "b" / "o.tar"):
        with pytest.raises(StorageError, match=f"^cannot write {target}: {tmp_path / 'f.tar'} is not a directory$"):
            storage.open_write(str(target))
    assert (tmp_path / "f.tar").read_bytes() == b"x"


def test_committed_is_a_non_empty_file_or_object(tmp_path, nginx_server, s3_server, gcs_server):
    """What a rerun takes for a finished shard: not a directory, not an empty file."""
    (tmp_path / "dir.tar").mkdir()
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "full.tar").write_bytes(b"x" * 1024)
    for name, want in (("dir.tar", False), ("empty.tar", False), ("full.tar", True), ("none.tar", False)):
        assert storage.committed(str(tmp_path / name)) is want, name
        assert storage.committed(f"file://{tmp_path / name}") is want, name
    assert storage.committed(str(tmp_path / "full.tar" / "below.tar")) is False
    for base in (nginx_server.url, s3_server.url, gcs_server.url):
        for name, data in (("empty.tar", b""), ("full.tar", b"x" * 1024)):
            with storage.open_write(f"{base}/c/{name}") as w:
                w.write(data)
        assert storage.committed(f"{base}/c/full.tar") is True, base
        assert storage.committed(f"{base}/c/empty.tar") is False, base
        assert storage.committed(f"{base}/c/none.tar") is False, base
    with pytest.raises(StorageError, match="not supported for a stream"):
        storage.committed("-")


@pytest.mark.timeout(120)
def test_upload_to_an_endpoint_that_never_answers_gives_up(tmp_path, monkeypatch):
    """An S3 endpoint that accepts connections and never reads: the HTTP client has no timeout
    for sending, so the upload is bounded by our own stall limit (shortened here)."""
    import socket
    import threading

    from tarproc.storage import remote

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept():
        try:
            while True:
                held.append(server.accept()[0])
        except OSError:  # closed at the end of the test
            pass

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(remote, "STALL_SECONDS", 3.0)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"^cannot write s3://bkt/x.tar: the upload stalled: "
                                           r"nothing sent for 3 s"):
        with storage.open_write("s3://bkt/x.tar") as w:
            w.write(b"x" * (3 << 20))
    assert time.monotonic() - t0 < 30
    server.close()


@pytest.fixture(params=["s3", "gs"])
def bucket(request):
    return request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")


def test_object_store_roundtrip(bucket, payload):
    base = f"{bucket.url}/roundtrip"
    url = f"{base}/shard-0000.tar"
    assert not storage.exists(url)
    with storage.open_write(url) as w:
        w.write(payload[:3_000_000])
        w.write(payload[3_000_000:])
    assert storage.exists(url)
    assert storage.size(url) == len(payload)
    with storage.open_read(url) as f:
        assert sha(f.read(12345) + f.read()) == sha(payload)
    with storage.open_write(f"{base}/shard-0001.tar") as w:
        w.write(b"small")
    with storage.open_write(f"{base}/other.tar") as w:
        w.write(b"o")
    shards = [f"{base}/shard-0000.tar", f"{base}/shard-0001.tar"]
    assert storage.listdir(base) == [f"{base}/other.tar"] + shards
    assert storage.listdir(f"{base}/shard-") == shards
    assert storage.glob(f"{base}/shard-*.tar") == shards
    storage.remove(shards[1])
    assert not storage.exists(shards[1])
    with pytest.raises(StorageError, match="not found"):
        storage.open_read(shards[1])
    storage.remove(shards[1], missing_ok=True)


@pytest.mark.parametrize("nbytes", [1000, 20_000_000], ids=["small", "multipart"])
def test_object_store_abort_leaves_nothing(bucket, nbytes):
    # (gcp-storage-emulator cannot cancel a resumable upload: the abort then only warns, and the
    # never-finished upload publishes nothing, which is what this checks)
    url = f"{bucket.url}/aborted/{nbytes}.tar"
    with pytest.raises(RuntimeError):
        with storage.open_write(url) as w:
            w.write(b"\1" * nbytes)
            raise RuntimeError("crash mid-write")
    assert not storage.exists(url)
    assert storage.listdir(f"{bucket.url}/aborted/") == []
    if bucket.url.startswith("s3://"):
        import boto3

        client = boto3.client("s3", endpoint_url=bucket.endpoint)
        assert "Uploads" not in client.list_multipart_uploads(Bucket=bucket.bucket)


def test_a_server_without_put_fails_at_once_not_after_retries(tmp_path):
    """A plain `python -m http.server` answers PUT and DELETE with 501, which no retry changes."""
    from servers import free_port, wait_for_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_port(port, proc=server)
        url = f"http://127.0.0.1:{port}/up.tar"
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"cannot write http://127\.0\.0\.1:\d+/up\.tar: HTTP 501"):
            with storage.open_write(url) as w:
                w.write(b"x" * 100_000)
        assert time.monotonic() - started < 5
        assert os.listdir(tmp_path) == []
    finally:
        server.kill()
        server.wait()
