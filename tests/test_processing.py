"""process_stream's raw path (the parent splits tar members, workers decode/run/encode) against
its dict path, and the tario functions it is built on: same output bytes, counts, warnings and
errors."""

import io
import os
import tarfile
import warnings

import pytest

from tarproc import tario
from tarproc.errors import FormatError, UnsafeNameError
from tarproc import processing
from tarproc.processing import make_runner, process_stream
from tarproc.tario import (
    TarioWarning,
    TarWriter,
    decode_raw_sample,
    encode_samples,
    iter_raw_samples,
    iter_samples,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
SHARDS = sorted(
    os.path.join(DATA, f) for f in os.listdir(DATA) if f.endswith((".tar", ".tgz"))
)

SCRIPTS = {
    "identity": "def process_sample(sample):\n    return sample\n",
    "modify": (
        "def process_sample(sample):\n"
        "    sample['n.txt'] = str(len(sample))\n"
        "    sample['url.txt'] = sample['__url__']\n"
        "    return sample\n"
    ),
    "mutate": (
        "def process_sample(sample):\n"
        "    for k in list(sample):\n"
        "        if not k.startswith('__'):\n"
        "            sample[k] = sample[k] + b'!'\n"
        "    return sample\n"
    ),
    "drop_odd": (
        "def process_sample(sample):\n"
        "    return None if sum(sample['__key__'].encode()) % 2 else sample\n"
    ),
    "split": (
        "def process_sample(sample):\n"
        "    k = sample['__key__']\n"
        "    return [dict(sample, __key__=k + '_a'), {'__key__': k + '_b', 'x': b'y'}]\n"
    ),
    "fail_some": (
        "def process_sample(sample):\n"
        "    if sum(sample['__key__'].encode()) % 3 == 0:\n"
        "        raise ValueError('bad ' + sample['__key__'])\n"
        "    return sample\n"
    ),
    "prints": (
        "import sys\n"
        "def process_sample(sample):\n"
        "    n = sum(sample['__key__'].encode())\n"
        "    if n % 4 == 0:\n"
        "        print('out', sample['__key__'])\n"
        "    if n % 5 == 0:\n"
        "        print('err', sample['__key__'], file=sys.stderr)\n"
        "    if n % 7 == 0:\n"
        "        raise ValueError('bad ' + sample['__key__'])\n"
        "    return sample\n"
    ),
}


@pytest.fixture
def scripts(tmp_path):
    paths = {}
    for name, text in SCRIPTS.items():
        p = tmp_path / f"{name}.py"
        p.write_text(text)
        paths[name] = str(p)
    return paths


def run(inputs, out, script, *, raw, processes=1, printed=False, **kw):
    """process_stream's output bytes, counts, warnings and failures (or the exception); with
    `printed`, also what the script printed: stdout and stderr, with the failures in between."""
    failures = []
    stdout, stderr = io.BytesIO(), io.BytesIO()

    def on_failure(exc):
        failures.append(exc)
        stderr.write(b"[failure %d]" % exc.index)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TarioWarning)
        try:
            result = process_stream(
                inputs, out, make_runner(python=script), processes=processes, raw=raw,
                stdout=stdout, stderr=stderr, on_failure=on_failure, **kw
            )
        except Exception as exc:  # compared as (type, message)
            result = (type(exc), str(exc))
    msgs = [str(w.message) for w in caught if issubclass(w.category, TarioWarning)]
    data = None
    if os.path.exists(out):
        with open(out, "rb") as f:
            data = f.read()
        os.unlink(out)
    if not isinstance(result, tuple):
        result = {k: v for k, v in vars(result).items() if k != "seconds"}
    if printed:
        return data, result, msgs, [str(e) for e in failures], stdout.getvalue(), stderr.getvalue()
    return data, result, msgs, [str(e) for e in failures]


def same_both_ways(tmp_path, inputs, script, suffix=".tar", **kw):
    out = str(tmp_path / f"out{suffix}")
    a = run(inputs, out, script, raw=False, **kw)
    b = run(inputs, out, script, raw=True, **kw)
    assert a == b
    return a


# ------------------------------------------------------------------ raw path == dict path


@pytest.mark.parametrize("shard", SHARDS, ids=os.path.basename)
@pytest.mark.parametrize("script", ["identity", "modify", "mutate", "drop_odd", "split"])
def test_raw_path_gives_the_same_bytes_on_real_shards(tmp_path, scripts, shard, script):
    data, result, _, _ = same_both_ways(tmp_path, [shard], scripts[script])
    assert data and result["inputs"] > 0


@pytest.mark.parametrize("errors", ["skip", "keep"])
def test_failures_skip_and_keep_are_the_same(tmp_path, scripts, errors):
    data, result, _, failures = same_both_ways(tmp_path, SHARDS, scripts["fail_some"], errors=errors)
    assert failures and result[{"skip": "skipped", "keep": "kept"}[errors]] == len(failures)


def test_failure_abort_is_the_same_and_writes_nothing(tmp_path, scripts):
    data, result, _, _ = same_both_ways(tmp_path, SHARDS, scripts["fail_some"])
    assert data is None and result[0].__name__ == "SampleFailed"


def test_parallel_raw_output_equals_sequential(tmp_path, scripts):
    out = str(tmp_path / "o.tar")
    for script in ("identity", "modify", "split", "drop_odd"):
        a = run(SHARDS, out, scripts[script], raw=False)
        b = run(SHARDS, out, scripts[script], raw=None, processes=2)
        assert a == b
    for errors in ("skip", "keep"):
        a = run(SHARDS, out, scripts["fail_some"], raw=False, errors=errors)
        b = run(SHARDS, out, scripts["fail_some"], raw=None, processes=2, errors=errors)
        assert a == b


def test_url_of_each_input_and_count(tmp_path, scripts):
    shards = SHARDS[:3]
    data, result, _, _ = same_both_ways(tmp_path, shards, scripts["modify"])
    urls = {s["url.txt"] for s in iter_samples(io.BytesIO(data))}
    assert urls == {s.encode() for s in shards}
    data, result, _, _ = same_both_ways(tmp_path, shards, scripts["identity"], count=150)
    assert result["inputs"] == 150


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.zst", ".tar.xz"])
def test_compressed_output_is_the_same(tmp_path, scripts, suffix):
    data, _, _, _ = same_both_ways(tmp_path, SHARDS[:2], scripts["identity"], suffix=suffix)
    assert data and tario.compression_for_name("x" + suffix) is not None


def tar_of(members, fmt=tarfile.USTAR_FORMAT):
    """A tar (bytes) of (name, data) members; data None makes a symlink, "dir" a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/passwd"
                t.addfile(info)
            elif data == "dir":
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(data)
                info.mtime = 1234567
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


AWKWARD = [
    ("a.txt", b"1"), ("a.cls", b"2"),
    ("d", "dir"),
    ("b.txt", b"3"), ("b.link", None), ("__meta__", b"m"), ("noext", b"z"), ("b.cls", b"4"),
    ("c.txt", b"5"),
    ("a.more", b"6"),  # split sample
    ("dir/" + "k" * 120 + ".txt", b"long"),
    ("d\u00e9j\u00e0.txt", b"utf8"),
    ("e.big", os.urandom(70_000)),
]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_skips_long_names_pax_and_split_samples_are_the_same(tmp_path, scripts, fmt):
    src = tmp_path / "awk.tar"
    src.write_bytes(tar_of(AWKWARD, fmt))
    for script in ("identity", "modify"):
        data, result, msgs, _ = same_both_ways(tmp_path, [str(src)], scripts[script])
        assert any("split" in m for m in msgs) and any("symbolic link" in m for m in msgs)
        assert any("no extension" in m for m in msgs)
    _, result, _, _ = same_both_ways(tmp_path, [str(src)], scripts["identity"], strict=True)
    assert result[0] is FormatError and "split" in result[1]


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil.txt", "a/../../evil.txt", "bad\x1b.txt"])
def test_hostile_names_are_refused_or_skipped_the_same(tmp_path, scripts, name):
    src = tmp_path / "hostile.tar"
    src.write_bytes(tar_of([("ok.txt", b"1"), (name, b"x"), ("ok2.txt", b"2")]))
    _, result, _, _ = same_both_ways(tmp_path, [str(src)], scripts["identity"])
    assert result[0] is UnsafeNameError and "unsafe member name" in result[1]
    data, result, msgs, _ = same_both_ways(tmp_path, [str(src)], scripts["identity"], errors="skip")
    assert result["inputs"] == 2 and any("unsafe" in m for m in msgs)


def test_damaged_input_is_reported_the_same(tmp_path, scripts):
    good = tar_of([("a.txt", b"1"), ("a.cls", b"2"), ("b.txt", b"3")])
    cases = {
        "truncated": good[:1024 + 100],
        "dup_ext": tar_of([("a.txt", b"1"), ("a.txt", b"2")]),
        "not_tar": b"hello world" * 100,
        "short": b"abc",
    }
    bad = bytearray(good)
    bad[1024 + 10] ^= 1  # second header's name: checksum no longer matches
    cases["checksum"] = bytes(bad)
    for label, blob in cases.items():
        src = tmp_path / f"{label}.tar"
        src.write_bytes(blob)
        out = str(tmp_path / "o.tar")
        a = run([str(src)], out, scripts["identity"], raw=False)
        b = run([str(src)], out, scripts["identity"], raw=True)
        assert a[0] is None and b[0] is None, label
        assert a[1][0] is FormatError and b[1][0] is FormatError, label
        if label == "checksum":  # found by the worker: same url, offset and reason
            assert "bad tar header checksum" in a[1][1] and f"{src}: at offset 1024" in b[1][1]
        else:
            assert a[1] == b[1], label


# ------------------------------------------------------------------ tario raw functions


def raw_roundtrip(blob, url="u"):
    with warnings.catch_warnings(record=True) as w1:
        warnings.simplefilter("always")
        expected = list(iter_samples(io.BytesIO(blob), url))
    with warnings.catch_warnings(record=True) as w2:
        warnings.simplefilter("always")
        raws = list(iter_raw_samples(io.BytesIO(blob), url))
    assert [str(w.message) for w in w1] == [str(w.message) for w in w2]
    got = [decode_raw_sample(raw, url, offset) for offset, raw, _ in raws]
    assert got == expected
    for (offset, raw, nbytes), s in zip(raws, expected):
        assert len(raw) % 512 == 0 and offset % 512 == 0
        assert nbytes == sum(len(v) for k, v in s.items() if not k.startswith("__"))
        assert blob[offset : offset + 512] == raw[:512]  # offset: where its first header is
    return expected, raws


@pytest.mark.parametrize("shard", SHARDS, ids=os.path.basename)
def test_raw_samples_decode_to_iter_samples(shard):
    with open(shard, "rb") as f:
        blob = tario.open_decompressed(f).read()
    raw_roundtrip(blob, shard)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_raw_samples_with_skips_and_extended_headers(fmt):
    members = AWKWARD if fmt != tarfile.USTAR_FORMAT else [
        m for m in AWKWARD if m[0].isascii() and len(m[0]) < 100
    ]
    expected, raws = raw_roundtrip(tar_of(members, fmt))
    assert [s["__key__"] for s in expected][:4] == ["a", "b", "c", "a"]
    assert "link" not in expected[1]  # skipped members are left out of raw


def test_raw_samples_across_chunks_and_large_members():
    samples = [{"__key__": f"s{i:05d}", "txt": b"x" * (i * 37 % 3000), "bin": os.urandom(i % 7)}
               for i in range(3000)]
    samples.insert(1500, {"__key__": "big", "dat": os.urandom(3 << 20)})
    buf = io.BytesIO()
    with TarWriter(buf) as w:
        for s in samples:
            w.write(s)
    expected, raws = raw_roundtrip(buf.getvalue())
    assert len(expected) == len(samples)


def test_encode_samples_and_write_raw_equal_write():
    samples = [{"__key__": "a", "txt": "t\u00e9xt", "cls": b"1"},
               {"__key__": "dir/" + "b" * 200, "x": bytearray(b"2"), "big": os.urandom(70_000)},
               {"__key__": "c", "\u00e9xt": memoryview(b"3")}]
    for compression in (None, "gz", "zst"):
        one, two = io.BytesIO(), io.BytesIO()
        with TarWriter(one, compression) as w:
            for s in samples:
                w.write(s)
        with TarWriter(two, compression) as w:
            w.write_raw(encode_samples(samples[:2]), samples=2)
            w.write_raw(encode_samples([samples[2]]), samples=1)
            w.write_raw(b"", samples=0)
            assert w.samples == 3
        assert one.getvalue() == two.getvalue()
    assert encode_samples([]) == b""
    with pytest.raises(ValueError):
        TarWriter(io.BytesIO()).write_raw(b"x" * 100)
    with pytest.raises(ValueError):
        encode_samples([{"__key__": "a.b", "x": b"1"}])
    assert encode_samples([{"__key__": "a", "x": b"1"}]) == encode_samples([{"__key__": "a", "x": b"1"}])


def test_passthrough_of_decoded_samples_is_exact():
    """encode_samples may return a decoded sample's raw bytes as they are: only when they are
    exactly its encoding."""
    plain = io.BytesIO()
    with TarWriter(plain) as w:
        w.write({"__key__": "a", "txt": b"1", "cls": b"2"})
    odd = tar_of([("a.txt", b"1"), ("a.cls", b"2")])  # mtime, order differ from TarWriter's
    for blob in (plain.getvalue(), odd):
        (offset, raw, _), = iter_raw_samples(io.BytesIO(blob))
        s = decode_raw_sample(raw)
        enc = encode_samples([s])
        assert (enc == raw) == (blob is not odd)
        fresh = io.BytesIO()
        with TarWriter(fresh) as w:
            w.write(dict(s))
        assert enc == fresh.getvalue()[:-1024]
        s2 = decode_raw_sample(raw)
        s2["txt"] = b"changed"
        assert encode_samples([s2]) != enc
        s3 = decode_raw_sample(raw)
        del s3["cls"]
        assert encode_samples([s3]) != enc
        s4 = decode_raw_sample(raw)
        assert encode_samples([dict(s4, extra=b"x")]) != enc
        assert encode_samples([s4], mtime=5) != enc


def test_decode_raw_sample_checks_what_the_parent_does_not():
    blob = bytearray(tar_of([("a.txt", b"1")]))
    blob[10] ^= 1
    with pytest.raises(FormatError, match="u: at offset 4096: bad tar header checksum"):
        decode_raw_sample(bytes(blob[:1024]), "u", 4096)
    two = tar_of([("a.txt", b"1"), ("b.txt", b"2")])
    with pytest.raises(FormatError, match="also holds"):
        decode_raw_sample(two[:2048], "u")
    with pytest.raises(FormatError, match="no member"):
        decode_raw_sample(b"", "u")


def test_plain_input_passes_through_the_same(tmp_path, scripts):
    """Input written by TarWriter: workers answer "same as input" for unchanged samples."""
    src = tmp_path / "plain.tar"
    with open(src, "wb") as f, TarWriter(f) as w:
        for i in range(500):
            w.write({"__key__": f"s{i:04d}", "txt": b"t%d" % i, "cls": b"%d" % (i % 7),
                     "__extra__": b"not written"})
    mixed = tmp_path / "mixed.tar"
    mixed.write_bytes(src.read_bytes()[:-1024] + tar_of([("z.txt", b"odd"), ("z.cls", b"1")]))
    out = str(tmp_path / "o.tar")
    for inputs in ([str(src)], [str(mixed), str(src)]):
        for script in ("identity", "mutate", "drop_odd", "split"):
            a = run(inputs, out, scripts[script], raw=False)
            assert a == run(inputs, out, scripts[script], raw=True)
            assert a == run(inputs, out, scripts[script], raw=None, processes=2)
        for errors in ("skip", "keep"):
            a = run(inputs, out, scripts["fail_some"], raw=False, errors=errors)
            assert a == run(inputs, out, scripts["fail_some"], raw=None, processes=2, errors=errors)
    a = run([str(src)], out, scripts["identity"], raw=None, processes=2)
    assert a[0] == src.read_bytes()


@pytest.mark.parametrize("script", ["identity", "mutate", "drop_odd", "split", "fail_some"])
def test_many_tiny_samples_in_blocks_are_the_same(tmp_path, scripts, script):
    """Thousands of tiny samples: the workers hand clean ones back in blocks, written in one go;
    bytes, counts and failures as sequentially."""
    src = tmp_path / "tiny.tar"
    with open(src, "wb") as f, TarWriter(f) as w:
        for i in range(3000):
            w.write({"__key__": "s%05d" % i, "cls": b"%d" % (i % 7), "txt": b"text %d" % i})
    out = str(tmp_path / "out.tar")
    errors = "skip" if script == "fail_some" else "abort"
    a = run([str(src)], out, scripts[script], raw=False, errors=errors)
    b = run([str(src)], out, scripts[script], raw=None, processes=2, errors=errors)
    assert a == b


# ------------------------------------------------------------------ chunk mode == dict path


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few samples: the test shards are cut in many places."""
    monkeypatch.setattr(processing, "CHUNK_BYTES", 3000)


def same_in_chunks(tmp_path, inputs, script, suffix=".tar", **kw):
    """Chunk mode (in this process, and with a worker) gives what the dict path gives: bytes,
    counts, warnings, failures, errors and what was printed, in the same order."""
    out = str(tmp_path / f"out{suffix}")
    a = run(inputs, out, script, raw=False, printed=True, **kw)
    for processes in (1, 2):
        assert run(inputs, out, script, raw="chunks", processes=processes, printed=True, **kw) == a
    return a


@pytest.mark.parametrize("script", ["identity", "modify", "mutate", "drop_odd", "split", "prints"])
def test_chunks_give_the_same_on_real_shards(tmp_path, scripts, small_chunks, script):
    data, result, _, _, _, _ = same_in_chunks(tmp_path, SHARDS, scripts[script])
    if script == "prints":
        assert result[0].__name__ == "SampleFailed" and data is None
    else:
        assert data and result["inputs"] > 100


@pytest.mark.parametrize("errors", ["skip", "keep"])
def test_chunks_skip_and_keep_failures_the_same(tmp_path, scripts, small_chunks, errors):
    for script in ("fail_some", "prints"):
        _, result, _, failures, out, err = same_in_chunks(tmp_path, SHARDS, scripts[script], errors=errors)
        assert failures and result["failed"] == len(failures)
    assert b"out " in out and b"err " in err and b"[failure " in err


def test_chunks_of_compressed_inputs_and_outputs(tmp_path, scripts, small_chunks):
    tgz = [s for s in SHARDS if s.endswith(".tgz")]
    assert tgz
    for suffix in (".tar", ".tar.gz"):
        data, _, _, _, _, _ = same_in_chunks(tmp_path, tgz + SHARDS[:1], scripts["modify"], suffix=suffix)
        assert data


def test_chunks_with_count_fall_back_to_raw_samples(tmp_path, scripts, small_chunks):
    data, result, _, _, _, _ = same_in_chunks(tmp_path, SHARDS, scripts["identity"], count=150)
    assert result["inputs"] == 150


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_chunks_with_skips_long_names_pax_and_split_samples(tmp_path, scripts, monkeypatch, fmt):
    src = tmp_path / "awk.tar"
    src.write_bytes(tar_of(AWKWARD * 2 + [("c.more", b"7")], fmt))
    for size in (1, 2000, 1 << 20):  # a cut wherever one may be, a few, none
        monkeypatch.setattr(processing, "CHUNK_BYTES", size)
        for script in ("identity", "modify"):
            _, _, msgs, _, _, _ = same_in_chunks(tmp_path, [str(src)], scripts[script])
            assert any("split" in m for m in msgs) and any("symbolic link" in m for m in msgs)
        _, result, _, _, _, _ = same_in_chunks(tmp_path, [str(src)], scripts["identity"], strict=True)
        assert result[0] is FormatError and "split" in result[1]


def test_chunks_notice_a_sample_split_across_chunks(tmp_path, scripts, small_chunks):
    samples = [{"__key__": "k%03d" % i, "txt": b"x" * 600} for i in range(40)]
    samples.append({"__key__": "k005", "cls": b"again"})  # far from its first members
    src = tmp_path / "split.tar"
    with open(src, "wb") as f, TarWriter(f) as w:
        for s in samples:
            w.write(s)
    _, result, msgs, _, _, _ = same_in_chunks(tmp_path, [str(src)], scripts["identity"])
    assert result["inputs"] == 41 and msgs == [
        f"{src}: sample 'k005' is split: its members are not consecutive; reading member 'k005.cls' as a separate sample"]
    _, result, _, _, _, _ = same_in_chunks(tmp_path, [str(src)], scripts["identity"], strict=True)
    assert result[0] is FormatError


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil.txt", "bad\x1b.txt"])
def test_chunks_refuse_or_skip_hostile_names_the_same(tmp_path, scripts, small_chunks, name):
    src = tmp_path / "hostile.tar"
    members = [(f"ok{i}.txt", b"1" * 700) for i in range(10)]
    src.write_bytes(tar_of(members + [(name, b"x")] + members[:3] + [("z.txt", b"2")]))
    _, result, _, _, _, _ = same_in_chunks(tmp_path, [str(src)], scripts["identity"])
    assert result[0] is UnsafeNameError and str(src) in result[1]
    _, result, msgs, _, _, _ = same_in_chunks(tmp_path, [str(src)], scripts["identity"], errors="skip")
    assert result["inputs"] == 14 and any("unsafe" in m for m in msgs)


def test_chunks_report_damaged_input_the_same(tmp_path, scripts, small_chunks):
    members = [(f"m{i}.txt", b"x" * 512) for i in range(20)]
    good = tar_of(members)
    h = 1024 * 15  # a header in the middle
    bad = bytearray(good)
    bad[h + 10] ^= 1  # its checksum no longer matches
    size = bytearray(good)
    size[h + 124 : h + 136] = b"zzzzzzzzzzzz"  # a size nothing can read
    cases = {
        "truncated_member": good[: h + 600],
        "truncated_header": good[: h + 100],
        "checksum": bytes(bad),
        "size": bytes(size),
        "dup_ext": tar_of([("a.txt", b"1"), ("a.txt", b"2")]),
        "not_tar": b"hello world" * 100,
        "short": b"abc",
        "empty": b"",
        "no_end_blocks": good[:-1024 * 5],
        "trailing": good + b"garbage",
    }
    for label, blob in cases.items():
        src = tmp_path / f"{label}.tar"
        src.write_bytes(blob)
        _, result, msgs, _, _, _ = same_in_chunks(tmp_path, [str(src)], scripts["identity"])
        if label == "trailing":
            assert msgs == [f"{src}: data after the end-of-archive block ignored"], label
        elif label not in ("empty", "no_end_blocks"):
            assert isinstance(result, tuple) and issubclass(result[0], FormatError), label
            assert str(src) in result[1], label


def test_chunks_with_a_member_over_max_member_size(tmp_path, scripts, small_chunks):
    src = tmp_path / "big.tar"
    with open(src, "wb") as f, TarWriter(f) as w:
        for i in range(20):
            w.write({"__key__": "s%02d" % i, "txt": b"t" * 700})
        w.write({"__key__": "huge", "bin": bytes(100_000)})
        w.write({"__key__": "z", "txt": b"after"})
    _, result, _, _, _, _ = same_in_chunks(tmp_path, [str(src)], scripts["identity"], max_member_size=50_000)
    assert result[0] is FormatError and "exceeds the limit" in result[1]
    data, result, _, _, _, _ = same_in_chunks(tmp_path, [str(src)], scripts["identity"], max_member_size=200_000)
    assert data == src.read_bytes()


def test_iter_chunks_cuts_between_samples_and_reads_back_the_same():
    samples = [{"__key__": f"d/s{i:04d}", "txt": b"x" * (i * 37 % 3000), "cls": b"%d" % i}
               for i in range(400)]
    buf = io.BytesIO()
    with TarWriter(buf) as w:
        for s in samples:
            w.write(s)
    blob = buf.getvalue()
    for target in (1, 5000, 1 << 20):
        chunks = list(tario.iter_chunks(io.BytesIO(blob).read, "u", target=target))
        assert b"".join(c for _, c, _ in chunks) == blob[:-512]  # up to the first end block
        assert [o for o, _, _ in chunks] == [sum(len(c) for _, c, _ in chunks[:i]) for i in range(len(chunks))]
        assert not any(more for _, _, more in chunks)
        if target == 1:
            assert len(chunks) == len(samples)  # a chunk a sample
        state = tario.StreamState()
        got = [s for o, c, _ in chunks for s in tario.iter_chunk_samples(c, "u", o, state)]
        assert got == list(iter_samples(io.BytesIO(blob), "u"))
        assert state.last == "d/s0399.txt"
    # a member over the limit: the last chunk stops at its header, the stream goes on after it
    chunks = list(tario.iter_chunks(io.BytesIO(blob).read, "u", target=1000, max_member_size=2000))
    assert chunks[-1][2] and not any(more for _, _, more in chunks[:-1])


def test_seen_keys_add_all_adds_all_or_nothing():
    state = tario.StreamState()
    seen = state.seen
    assert seen.add_all(["k%d" % i for i in range(5000)])
    assert not seen.add_all(["new1", "new2", "k17", "new3"])
    assert seen.add_all(["new1", "new2", "new3"])  # none of them was kept by the failed call
    assert all(seen.add("k%d" % i) for i in range(5000)) and seen._count == 5003
    assert not seen.add("other")


def test_chunk_keys_notice_keys_seen_in_any_earlier_chunk():
    state = tario.StreamState()
    keys = processing._ChunkKeys(state)
    assert keys.add("a\nb", True) and keys.add("c\nd", True) and keys.pending  # in order: set aside
    assert not keys.add("d\ne", True)  # d: the last key of the last chunk
    assert not keys.add("x\nb", False) and not keys.pending  # b: in an earlier chunk
    assert keys.add("x\ny", False) and not keys.add("z\nc", True) and not keys.add("y", True)
    assert keys.add("", True) and keys.add("zz", True)
    assert state.seen.add("zz") and not state.seen.add("new")


def test_chunk_items_of_a_plain_file_are_read_there_and_checked(tmp_path, small_chunks):
    src = tmp_path / "plain.tar"
    with open(src, "wb") as f, TarWriter(f) as w:
        for i in range(50):
            w.write({"__key__": "s%02d" % i, "txt": b"t" * 700})
    with open(src, "rb") as raw:
        stream = tario.open_decompressed(raw, str(src))
        path = processing._plain_file(raw, stream)
        assert path == str(src)
        items = list(processing._chunk_items(stream.read, str(src), None, {}, [], path))
    assert len(items) > 10 and all(item.data is None for item in items)
    files = {}
    blob = src.read_bytes()
    assert b"".join(item.read(files) for item in items) == blob[:-512]
    at = items[3].offset  # changed since: not used
    src.write_bytes(blob[:at] + b"x" * 512 + blob[at + 512 : items[-2].offset + 100])
    assert [item.read(files) is None for item in items] == [False] * 3 + [True] + [False] * (len(items) - 6) + [True] * 2
    for fd in files.values():
        os.close(fd)
    gz = [s for s in SHARDS if s.endswith(".tgz")][0]
    with open(gz, "rb") as raw:
        assert processing._plain_file(raw, tario.open_decompressed(raw, gz)) is None


# ------------------------------------------------------------------ what process_sample returns, every way


def _tiny_shard(path, n=30):
    with open(path, "wb") as f, TarWriter(f) as w:
        for i in range(n):
            w.write({"__key__": f"k{i:03d}", "txt": str(i).encode(), "cls": b"1"})
    return str(path)


@pytest.mark.parametrize("processes,raw", [(1, False), (2, False), (2, True), (2, "chunks")])
@pytest.mark.parametrize("returned", ["{}", "{'__key__': s['__key__']}",
                                      "[{'__key__': s['__key__'] + 'a'}, {'__key__': s['__key__'] + 'b'}]",
                                      "{'__key__': s['__key__'] + 'x', '__url__': 'elsewhere'}"])
def test_outputs_without_fields_are_dropped_and_counted_so(tmp_path, processes, raw, returned):
    src = _tiny_shard(tmp_path / "in.tar")
    script = tmp_path / "m.py"
    script.write_text("def process_sample(s):\n"
                      f"    return s if s['__key__'] == 'k007' else {returned}\n")
    out = str(tmp_path / "out.tar")
    result = process_stream([src], out, make_runner(python=str(script)), processes=processes, raw=raw)
    assert (result.inputs, result.outputs, result.dropped) == (30, 1, 29)
    assert [s["__key__"] for s in iter_samples(open(out, "rb"))] == ["k007"]


def test_a_callable_that_calls_sys_exit_fails_its_sample(tmp_path):
    import sys

    from tarproc.errors import SampleFailed

    def fn(sample):
        if sample["__key__"] == "k004":
            sys.exit(5)
        return {} if sample["__key__"] == "k005" else sample

    src = _tiny_shard(tmp_path / "in.tar", 10)
    with pytest.raises(SampleFailed, match="k004: SystemExit: 5") as info:
        process_stream([src], str(tmp_path / "out.tar"), make_runner(process_sample=fn))
    assert info.value.key == "k004" and not os.path.exists(tmp_path / "out.tar")
    failures = []
    result = process_stream([src], str(tmp_path / "out.tar"), make_runner(process_sample=fn), errors="skip",
                            on_failure=failures.append)
    assert (result.outputs, result.dropped, result.skipped) == (8, 1, 1) and len(failures) == 1


@pytest.mark.parametrize("processes", [1, 2])
def test_printing_to_a_closed_stdout_is_an_error_saying_so(tmp_path, monkeypatch, processes):
    """Python sets a closed standard stream to None: what the code printed cannot go there, and
    the job says so (no AttributeError on None, nothing half written)."""
    src = _tiny_shard(tmp_path / "in.tar", 10)
    script = tmp_path / "m.py"
    script.write_text("def process_sample(s):\n    print('hi')\n    return s\n")
    out = str(tmp_path / "out.tar")
    monkeypatch.setattr("sys.stdout", None)
    with pytest.raises(OSError, match="cannot write what the commands printed: standard output is closed"):
        process_stream([src], out, make_runner(python=str(script)), processes=processes)
    assert not os.path.exists(out)
    script.write_text("def process_sample(s):\n    return s\n")
    monkeypatch.setattr("sys.stderr", None)  # (and nothing said: nowhere to say it)
    assert process_stream([src], out, make_runner(python=str(script)), processes=processes).outputs == 10
