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
}


@pytest.fixture
def scripts(tmp_path):
    paths = {}
    for name, text in SCRIPTS.items():
        p = tmp_path / f"{name}.py"
        p.write_text(text)
        paths[name] = str(p)
    return paths


def run(inputs, out, script, *, raw, processes=1, **kw):
    """process_stream's output bytes, counts, warnings and failures (or the exception)."""
    failures = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TarioWarning)
        try:
            result = process_stream(
                inputs, out, make_runner(python=script), processes=processes, raw=raw,
                stdout=io.BytesIO(), stderr=io.BytesIO(), on_failure=failures.append, **kw
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
