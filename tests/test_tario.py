"""tarproc.tario: reading real shards, interop with webdataset and GNU tar, compression,
determinism, hostile and damaged input, bounded memory, pipes."""

import bz2
import gzip
import io
import lzma
import os
import random
import shutil
import subprocess
import tarfile
import warnings

import pytest
import zstandard

from tarproc.errors import FormatError, UnsafeNameError
from tarproc.tario import (
    TarioWarning,
    TarWriter,
    compression_for_name,
    iter_members,
    iter_samples,
    open_decompressed,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
TAR = shutil.which("tar") or "/usr/bin/tar"

wds = pytest.importorskip("webdataset")


def read_samples(path, **kw):
    with open(path, "rb") as f:
        return list(iter_samples(f, path, **kw))


def wds_samples(path):
    """Samples as webdataset's own reader gives them, without decoding."""
    out = []
    for s in wds.WebDataset(path, shardshuffle=False):
        s = dict(s)
        s.pop("__local_path__", None)
        out.append(s)
    return out


def as_bytes(sample):
    """A sample with str field values encoded, as webdataset's writer without an encoder needs."""
    return {k: (v.encode() if isinstance(v, str) and not k.startswith("__") else v) for k, v in sample.items()}


def write_bytes(samples, compression=None, **kw):
    buf = io.BytesIO()
    with TarWriter(buf, compression, **kw) as w:
        for s in samples:
            w.write(s)
    return buf.getvalue()


def headers(tar_bytes):
    """(name field, typeflag, size) of every header block in an uncompressed tar we wrote."""
    out = []
    pos = 0
    while pos + 512 <= len(tar_bytes):
        block = tar_bytes[pos : pos + 512]
        if block == bytes(512):
            break
        size = int(block[124:136].rstrip(b"\0 ") or b"0", 8)
        out.append((block[:100].rstrip(b"\0"), block[156:157], size))
        pos += 512 + (size + 511) // 512 * 512
    return out


SAMPLES = [
    {"__key__": "%05d" % i, "cls": str(i % 7), "txt": "sample %d" % i, "bin": bytes([i % 256]) * (i * 37)}
    for i in range(50)
]

# ---------------------------------------------------------------- real data


@pytest.mark.parametrize(
    "name,count,first_key,exts",
    [
        ("wds-sample.tgz", 90, "10", {"png", "cls"}),
        ("tarproc-sample.tar", 90, "10", {"png", "cls"}),
        ("wds-testgz.tar", 1000, "71671c5e285c455c892fb565330233ba", {"txt.gz"}),
        ("wds-compressed.tar", 3, "compressed/0001", {"txt.gz"}),
        ("wds-mpdata.tar", 100, "000000", {"mp"}),
        ("wds-tendata.tar", 100, "000000", {"ten"}),
    ],
)
def test_real_shards_match_webdataset(name, count, first_key, exts):
    path = os.path.join(DATA, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TarioWarning)  # a directory member is skipped silently
        ours = read_samples(path)
    assert len(ours) == count
    assert ours[0]["__key__"] == first_key
    assert all(set(s) - {"__key__", "__url__"} == exts for s in ours)
    assert all(s["__url__"] == path for s in ours)
    assert len({s["__key__"] for s in ours}) == count
    assert ours == wds_samples(path)


def test_real_member_data():
    with open(os.path.join(DATA, "wds-sample.tgz"), "rb") as f:
        members = list(iter_members(f))
    assert len(members) == 180
    assert members[0] == ("10.cls", b"7") or members[0][0] in ("10.cls", "10.png")
    assert all(d.startswith(b"\x89PNG") for n, d in members if n.endswith(".png"))
    with open(os.path.join(DATA, "wds-testgz.tar"), "rb") as f:
        for name, data in iter_members(f):
            assert gzip.decompress(data)  # every member is itself a complete gzip file


# ---------------------------------------------------------------- interop: webdataset


def test_read_webdataset_tarwriter_output(tmp_path):
    path = str(tmp_path / "w.tar")
    with wds.TarWriter(path, encoder=False) as w:
        for s in SAMPLES:
            w.write(as_bytes(s))
    ours = read_samples(path)
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in SAMPLES]
    for got, want in zip(ours, SAMPLES):
        assert got["txt"] == want["txt"].encode() and got["bin"] == want["bin"]
    assert ours == wds_samples(path)


def test_read_webdataset_shardwriter_output(tmp_path):
    pattern = str(tmp_path / "shard-%03d.tar.gz")
    with wds.ShardWriter(pattern, maxcount=20, encoder=False) as w:
        for s in SAMPLES:
            w.write(as_bytes(s))
    paths = sorted(str(p) for p in tmp_path.glob("shard-*.tar.gz"))
    assert len(paths) == 3
    keys = []
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(2) == b"\x1f\x8b"
        ours = read_samples(p)
        assert ours == wds_samples(p)
        keys += [s["__key__"] for s in ours]
    assert keys == [s["__key__"] for s in SAMPLES]


def test_our_output_reads_identically_in_webdataset(tmp_path):
    samples = SAMPLES + [
        {"__key__": "dir/sub/" + "k" * 120, "txt": b"long key"},
        {"__key__": "d/" + "p" * 140 + "/short", "json": b"{}"},  # fits with the ustar prefix
        {"__key__": "ünïcødé/ключ", "txt": "non-ascii"},
        {"__key__": "multi", "seg.png": b"x", "jpg": b"y"},
    ]
    for compression, suffix in [(None, ".tar"), ("gz", ".tar.gz"), ("bz2", ".tar.bz2"), ("xz", ".tar.xz")]:
        path = str(tmp_path / ("out" + suffix))
        with open(path, "wb") as f:
            with TarWriter(f, compression) as w:
                for s in samples:
                    w.write(s)
        theirs = wds_samples(path)
        ours = read_samples(path)
        assert ours == theirs
        assert [s["__key__"] for s in ours] == [s["__key__"] for s in samples]
        for got, want in zip(ours, samples):
            for k, v in want.items():
                if not k.startswith("__"):
                    assert got[k] == (v.encode() if isinstance(v, str) else v)


# ---------------------------------------------------------------- interop: GNU tar


def make_tree(root):
    """Files with short, long (> 100 bytes) and non-ASCII names, plus a symlink and a hard link."""
    files = {
        "a/0001.jpg": os.urandom(3000),
        "a/0001.json": b'{"x": 1}',
        "a/0002.jpg": os.urandom(10),
        "a/0002.json": b"{}",
        "a/" + "L" * 130 + ".txt": b"long name",
        "a/" + "d" * 110 + "/x.cls": b"7",
        "a/ünï/çødé.txt": "non-ascii".encode(),
    }
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    os.symlink("0001.jpg", os.path.join(root, "a/zzlink.jpg"))
    os.link(os.path.join(root, "a/0002.json"), os.path.join(root, "a/zzhard.json"))
    return files


@pytest.mark.parametrize("fmt", ["gnu", "pax", "posix"])
def test_read_gnu_tar_archives(tmp_path, fmt):
    root = tmp_path / "tree"
    root.mkdir()
    files = make_tree(str(root))
    archive = str(tmp_path / "t.tar")
    subprocess.run([TAR, "cf", archive, "--sort=name", f"--format={fmt}", "-C", str(root), "a"], check=True)
    with pytest.warns(TarioWarning) as record:
        with open(archive, "rb") as f:
            members = dict(iter_members(f, archive))
    assert members == files  # directories, the symlink and the hard link are left out
    messages = [str(w.message) for w in record]
    assert any("zzlink.jpg" in m and "symbolic link" in m and archive in m for m in messages)
    assert any("zzhard.json" in m and "hard link" in m and archive in m for m in messages)
    with pytest.warns(TarioWarning):
        samples = read_samples(archive)
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["a/0001"] == {"__key__": "a/0001", "__url__": archive, "jpg": files["a/0001.jpg"], "json": b'{"x": 1}'}
    assert by_key["a/ünï/çødé"]["txt"] == b"non-ascii"
    assert by_key["a/" + "L" * 130]["txt"] == b"long name"


def test_our_archives_list_and_extract_with_gnu_tar(tmp_path):
    samples = [
        {"__key__": "s/%03d" % i, "jpg": os.urandom(i * 100), "cls": str(i)} for i in range(20)
    ] + [
        {"__key__": "x" * 150, "txt": b"pax needed"},
        {"__key__": "p" * 120 + "/q", "txt": b"ustar prefix"},
        {"__key__": "ünï", "txt": b"pax for non-ascii"},
    ]
    for compression, flag in [(None, "-f"), ("gz", "-zf"), ("bz2", "-jf"), ("xz", "-Jf"), ("zst", "--zstd")]:
        archive = tmp_path / f"o-{compression}.tar"
        archive.write_bytes(write_bytes(samples, compression))
        args = [flag, str(archive)] if flag != "--zstd" else [flag, "-f", str(archive)]
        if compression == "zst" and subprocess.run([TAR, "--zstd", "--version"], capture_output=True).returncode:
            continue
        listing = subprocess.run([TAR, "-tv"] + args, capture_output=True)
        assert listing.returncode == 0 and listing.stderr == b""
        lines = listing.stdout.decode().splitlines()
        assert len(lines) == 43
        assert all(line.startswith("-rw-r--r-- 0/0") for line in lines)
        dest = tmp_path / f"x-{compression}"
        dest.mkdir()
        ex = subprocess.run([TAR, "-x", "-C", str(dest)] + args, capture_output=True)
        assert ex.returncode == 0 and ex.stderr == b""
        for s in samples:
            for ext, v in s.items():
                if ext.startswith("__"):
                    continue
                v = v.encode() if isinstance(v, str) else v
                assert (dest / f"{s['__key__']}.{ext}").read_bytes() == v


def test_read_python_tarfile_formats():
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
            for name, data in [("k1.txt", b"a"), ("k1.json", b"{}"), ("dir/" + "n" * 200 + ".bin", b"b" * 1000)]:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
        names = [n for n, _ in iter_members(io.BytesIO(buf.getvalue()))]
        assert names == ["k1.txt", "k1.json", "dir/" + "n" * 200 + ".bin"]


def test_base256_size_field():
    data = write_bytes([{"__key__": "big", "bin": b"z" * 1000}])
    block = bytearray(data[:512])
    block[124:136] = b"\x80" + (1000).to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    data = bytes(block) + data[512:]
    assert list(iter_members(io.BytesIO(data))) == [("big.bin", b"z" * 1000)]


def test_gnu_long_name_and_global_pax_header():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as t:
        ti = tarfile.TarInfo("a.txt")
        ti.size = 3
        t.addfile(ti, io.BytesIO(b"abc"))
    assert list(iter_members(io.BytesIO(buf.getvalue()))) == [("a.txt", b"abc")]


# ---------------------------------------------------------------- compression


@pytest.mark.parametrize("compression", [None, "gz", "bz2", "xz", "zst"])
def test_compression_round_trip_and_determinism(compression):
    data = write_bytes(SAMPLES, compression)
    assert data == write_bytes(SAMPLES, compression)  # byte-identical
    magic = {None: SAMPLES[0]["__key__"].encode(), "gz": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ", "zst": b"\x28\xb5\x2f\xfd"}
    assert data.startswith(magic[compression])
    back = list(iter_samples(io.BytesIO(data), "mem"))
    assert [s["__key__"] for s in back] == [s["__key__"] for s in SAMPLES]
    for got, want in zip(back, SAMPLES):
        assert got == {
            "__key__": want["__key__"],
            "__url__": "mem",
            "cls": want["cls"].encode(),
            "txt": want["txt"].encode(),
            "bin": want["bin"],
        }


@pytest.mark.parametrize("command", [["gzip", "-c"], ["bzip2", "-c"], ["xz", "-c"], ["zstd", "-q", "-c"]])
def test_externally_compressed(command):
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} not installed")
    plain = write_bytes(SAMPLES)
    packed = subprocess.run(command, input=plain, capture_output=True, check=True).stdout
    assert open_decompressed(io.BytesIO(packed)).read() == plain
    assert list(iter_samples(io.BytesIO(packed))) == list(iter_samples(io.BytesIO(plain)))


def test_multi_member_and_multi_frame_streams():
    plain = write_bytes(SAMPLES)
    cut = len(plain) // 3
    for compress in (gzip.compress, bz2.compress, lzma.compress, zstandard.ZstdCompressor().compress):
        packed = compress(plain[:cut]) + compress(plain[cut:])
        assert open_decompressed(io.BytesIO(packed)).read() == plain
    # gzip members padded with zeros (tape blocking) are fine too
    assert open_decompressed(io.BytesIO(gzip.compress(plain) + bytes(700))).read() == plain


def test_compression_for_name():
    cases = {
        "x.tar": None,
        "x": None,
        "dir.tgz/x.tar": None,
        "x.tar.gz": "gz",
        "x.tgz": "gz",
        "x.tar.bz2": "bz2",
        "x.tar.xz": "xz",
        "x.tar.zst": "zst",
        "x.TAR.GZ": "gz",
        "https://h/p/x.tar.gz?sig=abc": "gz",
        "s3://b/x-000.tar.zst": "zst",
    }
    for name, want in cases.items():
        assert compression_for_name(name) == want, name


# ---------------------------------------------------------------- writer format


def test_plain_ustar_headers_for_short_ascii_names():
    data = write_bytes(SAMPLES)
    hs = headers(data)
    assert len(hs) == 150 and {t for _, t, _ in hs} == {b"0"}
    assert len(data) == sum(512 + (s + 511) // 512 * 512 for _, _, s in hs) + 1024
    block = data[:512]
    assert block[257:265] == b"ustar\x0000"
    assert block[100:108] == b"0000644\0" and block[136:148] == b"%011o\0" % 0
    # members are written in sorted extension order
    assert [n for n, _, _ in hs[:3]] == [b"00000.bin", b"00000.cls", b"00000.txt"]


def test_pax_only_where_needed():
    data = write_bytes(
        [
            {"__key__": "short", "txt": b"1"},
            {"__key__": "y" * 120, "txt": b"2"},
            {"__key__": "a" * 100 + "/" + "b" * 90, "txt": b"3"},
            {"__key__": "ünï", "txt": b"4"},
        ]
    )
    types = [t for _, t, _ in headers(data)]
    assert types == [b"0", b"x", b"0", b"0", b"x", b"0"]
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert t.getnames() == ["short.txt", "y" * 120 + ".txt", "a" * 100 + "/" + "b" * 90 + ".txt", "ünï.txt"]


def test_mtime_option_and_str_values():
    data = write_bytes([{"__key__": "k", "txt": "héllo", "raw": bytearray(b"ab"), "mv": memoryview(b"cd")}], mtime=1700000000)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        infos = t.getmembers()
        assert {i.mtime for i in infos} == {1700000000}
        assert {(i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, "", "", 0o644)}
    assert list(iter_samples(io.BytesIO(data)))[0]["txt"] == "héllo".encode()


def test_writer_rejects_bad_samples():
    w = TarWriter(io.BytesIO())
    for bad in ["../x", "/etc/passwd", "a/../../b", "a\nb"]:
        with pytest.raises(UnsafeNameError):
            w.write({"__key__": bad, "txt": b"x"})
    for bad in [None, "", "a.b", "dir/"]:
        with pytest.raises(ValueError):
            w.write({"__key__": bad, "txt": b"x"})
    with pytest.raises(ValueError):
        w.write({"__key__": "k", "a/b": b"x"})
    with pytest.raises(TypeError):
        w.write({"__key__": "k", "n": 3})
    w.close()
    with pytest.raises(ValueError):
        w.write({"__key__": "k", "txt": b"x"})


def test_close_keeps_file_open_and_is_idempotent():
    buf = io.BytesIO()
    with TarWriter(buf, "gz") as w:
        w.write({"__key__": "k", "txt": b"x"})
    w.close()
    assert not buf.closed
    assert w.samples == 1 and w.members == 1
    assert len(gzip.decompress(buf.getvalue())) == 512 * 4


def test_large_member_round_trip():
    big = os.urandom(3 * (1 << 20) + 5)
    samples = [{"__key__": "a", "bin": b"x"}, {"__key__": "b", "bin": big}, {"__key__": "c", "bin": b"y"}]
    for compression in (None, "gz"):
        back = list(iter_samples(io.BytesIO(write_bytes(samples, compression))))
        assert [s["bin"] for s in back] == [b"x", big, b"y"]


# ---------------------------------------------------------------- bad input


def hostile_tar(names, fmt=tarfile.USTAR_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name in names:
            ti = tarfile.TarInfo(name)
            ti.size = 3
            t.addfile(ti, io.BytesIO(b"abc"))
    return buf.getvalue()


def test_not_a_tar():
    random_bytes = random.Random(1).randbytes(20000)
    jpeg_like = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + random_bytes[:5000] + b"\xff\xd9"
    for data in (random_bytes, jpeg_like, b"short"):
        with pytest.raises(FormatError, match="in.bin: not a tar archive"):
            list(iter_samples(io.BytesIO(data), "in.bin"))


def test_empty_input_and_missing_end_blocks():
    assert list(iter_members(io.BytesIO(b""))) == []
    data = write_bytes(SAMPLES[:3])
    assert len(list(iter_samples(io.BytesIO(data[:-1024])))) == 3  # as GNU tar accepts it


def test_truncated_archives():
    data = write_bytes(SAMPLES[:5])
    hs = headers(data)
    # offset of the 4th member's header, its data, and a cut inside the header
    off = sum(512 + (s + 511) // 512 * 512 for _, _, s in hs[:3])
    name = hs[3][0].decode()
    with pytest.raises(FormatError) as e:
        list(iter_members(io.BytesIO(data[: off + 512 + 10]), "cut.tar"))
    assert "cut.tar" in str(e.value) and name in str(e.value) and f"offset {off}" in str(e.value)
    assert "truncated" in str(e.value)
    with pytest.raises(FormatError) as e:
        list(iter_members(io.BytesIO(data[: off + 100]), "cut.tar"))
    assert "cut.tar" in str(e.value) and f"offset {off}" in str(e.value) and "inside a header" in str(e.value)
    assert hs[2][0].decode() in str(e.value)  # names the last member read
    # a cut in the padding after the data is a truncation too
    with pytest.raises(FormatError, match="truncated"):
        list(iter_members(io.BytesIO(data[: off + 512 + hs[3][2] + 1]), "cut.tar"))


def test_truncated_compressed_streams():
    plain = write_bytes(SAMPLES)
    for compression in ("gz", "bz2", "xz", "zst"):
        packed = write_bytes(SAMPLES, compression)
        for cut in (len(packed) // 2, len(packed) - 4):
            with pytest.raises(FormatError, match="cut.tar"):
                list(iter_members(io.BytesIO(packed[:cut]), "cut.tar"))
    assert plain


def test_corrupt_gzip():
    packed = bytearray(write_bytes(SAMPLES, "gz"))
    mid = len(packed) // 2
    for i in range(mid, mid + 16):
        packed[i] ^= 0xFF
    with pytest.raises(FormatError, match="bad.tgz: corrupt gz data"):
        list(iter_samples(io.BytesIO(bytes(packed)), "bad.tgz"))


def test_corrupt_header_checksum():
    data = bytearray(write_bytes(SAMPLES[1:4]))
    data[1024 + 5] ^= 0x01  # second header (first member's data is one block)
    with pytest.raises(FormatError, match=r"x.tar: at offset 1024 \(after member '00001.bin'\): bad tar header checksum"):
        list(iter_members(io.BytesIO(bytes(data)), "x.tar"))


def test_member_larger_than_limit():
    data = write_bytes([{"__key__": "a", "txt": b"x" * 100}, {"__key__": "b", "txt": b"x" * 5000}])
    with pytest.raises(FormatError) as e:
        list(iter_samples(io.BytesIO(data), "lim.tar", max_member_size=1000))
    msg = str(e.value)
    assert "lim.tar" in msg and "'b.txt'" in msg and "offset 1024" in msg and "5000" in msg
    assert len(list(iter_samples(io.BytesIO(data), max_member_size=5000))) == 2


@pytest.mark.parametrize("name", ["../x.txt", "/etc/passwd", "a/../../b.txt", "a\nb.txt", "ok/..\\..x/../y.txt"])
def test_unsafe_names(name):
    data = hostile_tar(["good.txt", name, "after.txt"])
    with pytest.raises(UnsafeNameError) as e:
        list(iter_samples(io.BytesIO(data), "evil.tar"))
    assert "evil.tar" in str(e.value) and repr(name) in str(e.value)
    assert isinstance(e.value, FormatError)
    with pytest.warns(TarioWarning, match="unsafe member name"):
        samples = list(iter_samples(io.BytesIO(data), "evil.tar", unsafe="skip"))
    assert [s["__key__"] for s in samples] == ["good", "after"]


def test_unsafe_pax_and_gnu_names():
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        data = hostile_tar(["../" + "z" * 150 + ".txt"], fmt)
        with pytest.raises(UnsafeNameError, match="evil.tar"):
            list(iter_members(io.BytesIO(data), "evil.tar"))


def test_trailing_garbage_warns():
    data = write_bytes(SAMPLES[:2]) + b"garbage"
    with pytest.warns(TarioWarning, match="after the end-of-archive"):
        assert len(list(iter_samples(io.BytesIO(data)))) == 2


# ---------------------------------------------------------------- grouping


def test_split_sample_warns_and_strict_raises():
    data = hostile_tar(["a.txt", "b.txt", "a.json", "c.txt"])
    with pytest.warns(TarioWarning) as record:
        samples = list(iter_samples(io.BytesIO(data), "split.tar"))
    assert [s["__key__"] for s in samples] == ["a", "b", "a", "c"]
    assert any("'a'" in str(w.message) and "split.tar" in str(w.message) for w in record)
    with pytest.raises(FormatError, match=r"split.tar: sample 'a' is split"):
        list(iter_samples(io.BytesIO(data), "split.tar", strict=True))


def test_duplicate_extension_raises():
    data = hostile_tar(["a.txt", "a.txt"])
    with pytest.raises(FormatError, match=r"dup.tar: sample 'a' has extension 'txt' twice"):
        list(iter_samples(io.BytesIO(data), "dup.tar"))


def test_grouping_rules():
    data = hostile_tar(["d.v1/k.a.b", "d.v1/k.c", "noext", "__meta__/x.txt", "K.JPG"])
    with pytest.warns(TarioWarning, match="noext"):
        samples = list(iter_samples(io.BytesIO(data)))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("d.v1/k", ["a.b", "c"]),
        ("K", ["JPG"]),  # extension case is kept
    ]


# ---------------------------------------------------------------- streams and memory


class GeneratedTar(io.RawIOBase):
    """A readable stream whose bytes come from a generator, never all in memory."""

    def __init__(self, chunks):
        self._chunks = chunks
        self._buf = b""

    def readable(self):
        return True

    def read(self, n=-1):
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return b""
        if n is None or n < 0 or n >= len(self._buf):
            data, self._buf = self._buf, b""
        else:
            data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def tiny_tar_chunks(nsamples):
    sink = io.BytesIO()
    w = TarWriter(sink)
    for i in range(nsamples):
        w.write({"__key__": "%07d" % i, "cls": b"1", "txt": b"t"})
        if sink.tell() > 1 << 20:
            yield sink.getvalue()
            sink.seek(0)
            sink.truncate()
    w.close()
    yield sink.getvalue()


def test_memory_stays_flat():
    """200,000 members; Python's tarfile would hold about 200 MB of headers by the end."""
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    n = 100_000
    count = 0
    growth = 0
    start = None
    for sample in iter_samples(GeneratedTar(tiny_tar_chunks(n))):
        count += 1
        if count % 5000 == 0:
            rss = proc.memory_info().rss
            if start is None:
                start = rss
            growth = max(growth, rss - start)
    assert count == n
    assert growth < 20 << 20, growth


def test_read_from_pipe():
    path = os.path.join(DATA, "wds-sample.tgz")
    with subprocess.Popen(["cat", path], stdout=subprocess.PIPE) as p:
        samples = list(iter_samples(p.stdout, "pipe:cat"))
    assert len(samples) == 90 and samples[0]["__url__"] == "pipe:cat"
    plain = write_bytes(SAMPLES)
    with subprocess.Popen(["xz", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
        p.stdin.write(plain)
        p.stdin.close()
        assert [s["__key__"] for s in iter_samples(p.stdout)] == [s["__key__"] for s in SAMPLES]
    # unbuffered pipe: short reads of any size
    r, w = os.pipe()
    with open(w, "wb") as wf:
        wf.write(write_bytes(SAMPLES[:3]))
    with open(r, "rb", buffering=0) as rf:
        assert len(list(iter_samples(rf))) == 3


def test_write_to_pipe_then_gnu_tar():
    with subprocess.Popen([TAR, "-tzf", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        with TarWriter(p.stdin, "gz") as w:
            for s in SAMPLES[:4]:
                w.write(s)
        p.stdin.close()
        out, err = p.stdout.read(), p.stderr.read()
    assert p.returncode == 0 and err == b""
    assert out.decode().split() == [f"{s['__key__']}.{e}" for s in SAMPLES[:4] for e in ("bin", "cls", "txt")]


def test_small_fields_after_a_large_one_are_written():
    """A field of 64 KiB or more is passed through unjoined; the fields after it must not be lost."""
    import io as _io

    from tarproc.tario import TarWriter, iter_samples as _iter

    big = bytes(range(256)) * 500  # 128,000 bytes
    sample = {"__key__": "k", "a.small": b"1", "jpg": big, "zzz.txt": b"after", "zzz2": b"x" * 70000,
              "zzz3": b"last"}
    buf = _io.BytesIO()
    with TarWriter(buf) as writer:
        writer.write(sample)
        writer.write(dict(sample, __key__="k2"))
    got = list(_iter(_io.BytesIO(buf.getvalue())))
    assert [s["__key__"] for s in got] == ["k", "k2"]
    for s in got:
        assert {k: v for k, v in s.items() if not k.startswith("__")} == {
            k: v for k, v in sample.items() if not k.startswith("__")}
