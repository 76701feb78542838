"""tarshow, tarsplit, tarcat and size parsing, on real shards (tests/data, generated ImageNet-like
shards), through stdin and through a real nginx server."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tarproc import streams
from tarproc.errors import TarprocError
from tarproc.tarutils import describe, parse_size

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable


def run(cmd, *args, input=None, cwd=None, check=True):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([PYTHON, "-m", f"tarproc.cli.{cmd}", *map(str, args)], input=input,
                          capture_output=True, cwd=cwd, env=env, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} {args} exited {proc.returncode}: {proc.stderr.decode()}")
    return proc


def samples_of(source):
    return [{k: v for k, v in s.items() if k != "__url__"} for s in streams.iter_samples(source)]


@pytest.mark.parametrize("text,value", [
    ("1GB", 10**9), ("500MB", 500 * 10**6), ("1e9", 10**9), ("64k", 64000), ("2GiB", 2 * 2**30),
    ("1_000_000", 10**6), ("1.5 MB", 1_500_000), ("100", 100), (4096, 4096), ("10kib", 10240),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "1XB", "-5MB", "0", "1e-9", "ten"])
def test_parse_size_rejects(text):
    with pytest.raises(TarprocError):
        parse_size(text)


def test_tarshow_lists_keys_and_sizes(testdata):
    out = run("tarshow", testdata / "wds-sample.tgz").stdout.decode().splitlines()
    expected = samples_of(str(testdata / "wds-sample.tgz"))
    assert len(out) == len(expected) == 90
    assert out == [describe(s) for s in expected]
    key, *fields = out[0].split("\t")
    assert key == expected[0]["__key__"]
    assert {f.split(" ")[0] for f in fields} == {"cls", "png"}
    assert f"png {len(expected[0]['png'])}" in fields


def test_tarshow_count_field_and_stdin(testdata):
    data = (testdata / "tarproc-sample.tar").read_bytes()
    out = run("tarshow", "-", "-n", "3", "-f", "cls", input=data).stdout.decode().splitlines()
    expected = samples_of(str(testdata / "tarproc-sample.tar"))[:3]
    assert len(out) == 6
    assert out[1] == f"  cls: {expected[0]['cls'].decode().strip()}"
    assert out[0].startswith(expected[0]["__key__"] + "\t")
    # binary content is not dumped on a terminal, but --raw writes it exactly
    shown = run("tarshow", "-n", "1", "-f", "png", input=data).stdout.decode()
    assert "bytes of binary data" in shown
    raw = run("tarshow", "-n", "2", "-f", "png", "--raw", input=data).stdout
    assert raw == expected[0]["png"] + expected[1]["png"]


def test_tarshow_skip_urls_and_patterns(imagenet_dir):
    pattern = str(imagenet_dir / "imagenet_train-{0000..0001}.tgz")
    out = run("tarshow", pattern, "--skip", "8", "-n", "4", "-u").stdout.decode().splitlines()
    assert len(out) == 4
    assert out[0].startswith(str(imagenet_dir / "imagenet_train-0000.tgz") + "\t")
    assert out[2].startswith(str(imagenet_dir / "imagenet_train-0001.tgz") + "\t")


def test_tarshow_errors_are_one_line(tmp_path):
    proc = run("tarshow", tmp_path / "missing.tar", check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tarshow: error:") and "missing.tar" in err[0]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    proc = run("tarshow", bad, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr.decode()


def test_tarsplit_by_count_with_manifest(imagenet_dir, tmp_path):
    src = str(imagenet_dir / "imagenet_train-{0000..0003}.tgz")
    run("tarsplit", src, "-o", tmp_path / "part-%04d.tar", "--maxcount", "7",
        "--manifest", tmp_path / "m.json")
    parts = sorted(tmp_path.glob("part-*.tar"))
    assert [p.name for p in parts] == [f"part-{i:04d}.tar" for i in range(6)]
    counts = [len(samples_of(str(p))) for p in parts]
    assert counts == [7, 7, 7, 7, 7, 5]
    assert samples_of(str(tmp_path / "part-{0000..0005}.tar")) == samples_of(src)
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == counts
    for entry, part in zip(manifest["shards"], parts):
        assert entry["sha256"] == hashlib.sha256(part.read_bytes()).hexdigest()
        assert entry["bytes"] == part.stat().st_size


def test_tarsplit_by_size_from_stdin_braces_pattern(testdata, tmp_path):
    data = (testdata / "wds-tendata.tar").read_bytes()   # 100 samples of ~13 kB
    run("tarsplit", "-", "-o", tmp_path / "t-{:03d}.tgz", "--maxsize", "100kB", "-q", input=data)
    parts = sorted(tmp_path.glob("t-*.tgz"))

    def size(sample):
        return sum(len(v) for k, v in sample.items() if k != "__key__")

    sizes = [[size(s) for s in samples_of(str(p))] for p in parts]
    for i, p in enumerate(parts):
        assert p.read_bytes()[:2] == b"\x1f\x8b"
        assert sum(sizes[i]) <= 100_000
        if i + 1 < len(parts):                            # a shard is closed only when full
            assert sum(sizes[i]) + sizes[i + 1][0] > 100_000
    assert samples_of([str(p) for p in parts]) == samples_of(str(testdata / "wds-tendata.tar"))


def test_tarsplit_needs_a_limit_and_a_numbered_pattern(testdata, tmp_path):
    proc = run("tarsplit", testdata / "wds-sample.tgz", "-o", tmp_path / "x-%03d.tar", check=False)
    assert proc.returncode == 1 and "--maxcount" in proc.stderr.decode()
    proc = run("tarsplit", testdata / "wds-sample.tgz", "-o", tmp_path / "x.tar", "--maxcount", "5",
               check=False)
    assert proc.returncode == 1 and "has no number field" in proc.stderr.decode()
    for pattern, limit, said in [("x-%02d-%02d.tar", "5", "has 2 number fields"),
                                 ("x-{}-{}.tar", "5", "has 2 number fields"),
                                 ("x-%03d.tar", "-1", "at least 1, not -1"),
                                 ("x-%03d.tar", "0", "at least 1, not 0")]:
        proc = run("tarsplit", testdata / "wds-sample.tgz", "-o", tmp_path / pattern,
                   "--maxcount", limit, check=False)
        usage = limit in ("-1", "0")  # a bad option value: a usage error, exit 2
        assert proc.returncode == (2 if usage else 1) and said in proc.stderr.decode()
        assert "Traceback" not in proc.stderr.decode() and "ShardWriter" not in proc.stderr.decode()
    assert not list(tmp_path.iterdir())


def test_tarcat_recompresses_by_name_and_counts(imagenet_dir, tmp_path):
    src = str(imagenet_dir / "imagenet_train-{0000..0007}.tgz")
    proc = run("tarcat", src, "-o", tmp_path / "all.tar.gz", "-v")
    assert "80 samples" in proc.stderr.decode()
    data = (tmp_path / "all.tar.gz").read_bytes()
    assert data[:2] == b"\x1f\x8b"
    gzip.decompress(data)
    assert samples_of(str(tmp_path / "all.tar.gz")) == samples_of(src)
    run("tarcat", src, "--skip", "5", "--count", "12", "-o", tmp_path / "some.tar")
    assert (tmp_path / "some.tar").read_bytes()[257:262] == b"ustar"
    assert samples_of(str(tmp_path / "some.tar")) == samples_of(src)[5:17]


def test_tarcat_streams_stdin_to_stdout_and_mixed_inputs(testdata, tmp_path):
    a = (testdata / "tarproc-sample.tar").read_bytes()
    out = run("tarcat", "-", testdata / "wds-mpdata.tar", input=a).stdout
    (tmp_path / "joined.tar").write_bytes(out)
    joined = samples_of(str(tmp_path / "joined.tar"))
    assert len(joined) == 190
    assert joined[:90] == samples_of(str(testdata / "tarproc-sample.tar"))
    # a pipe of two utilities
    shown = run("tarshow", "-n", "2", input=run("tarcat", testdata / "wds-sample.tgz").stdout)
    assert len(shown.stdout.decode().splitlines()) == 2


def test_tarcat_to_and_from_http(nginx_server, imagenet_dir):
    url = f"{nginx_server.url}/tarcat/joined.tgz"
    src = str(imagenet_dir / "imagenet_train-{0000..0002}.tgz")
    run("tarcat", src, "-o", url)
    assert (nginx_server.root / "tarcat" / "joined.tgz").exists()
    assert samples_of(url) == samples_of(src)
    out = run("tarshow", url, "-n", "1").stdout.decode()
    assert out.startswith(samples_of(src)[0]["__key__"])


def test_tarcat_failure_leaves_no_output(testdata, tmp_path):
    proc = run("tarcat", testdata / "wds-sample.tgz", tmp_path / "nope.tar", "-o", tmp_path / "out.tar",
               check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("tarcat: error:")
    assert not (tmp_path / "out.tar").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_tarcat_refuses_a_key_repeated_at_the_seam(imagenet_dir, tmp_path):
    """tarcat of a shard and a copy of its last sample: two samples of one key in a row, which
    readers would merge: refused in one line naming the output and the key, nothing written."""
    src = imagenet_dir / "imagenet_train-0000.tgz"
    last = samples_of(str(src))[-1]
    streams.write_samples(str(tmp_path / "last.tar"), [last])
    proc = run("tarcat", src, tmp_path / "last.tar", "-o", tmp_path / "out.tar", check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.startswith("tarcat: error:") and len(err.splitlines()) == 1
    assert f"out.tar: two consecutive output samples have the key {last['__key__']!r}" in err
    assert not (tmp_path / "out.tar").exists()
