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

from tarproc.errors import DuplicateKeyError, FormatError, UnsafeNameError
from tarproc.tario import (
    TarioWarning,
    TarWriter,
    compression_for_name,
    encode_samples,
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
        "x.tar.gzip": "gz",
        "x.tar.bzip2": "bz2",
        "x.tar.zstd": "zst",
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


@pytest.mark.parametrize("name", ["../x.txt", "/etc/passwd", "a/../../b.txt", "a\nb.txt", "ok/..\\..x/../y.txt",
                                  "k\udcff.txt"])  # (bytes that are not UTF-8)
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
        data = hostile_tar(["k\udcff" + "z" * 150 + ".txt", "ü" * 60 + ".txt"], fmt)
        with pytest.raises(UnsafeNameError, match=r"evil.tar: member 'k\\udcffz+\.txt'.*\(not UTF-8\)"):
            list(iter_members(io.BytesIO(data), "evil.tar"))
        with pytest.warns(TarioWarning, match="not UTF-8"):
            assert [s["__key__"] for s in iter_samples(io.BytesIO(data), unsafe="skip")] == ["ü" * 60]


@pytest.mark.parametrize("kind", ["link", "noext"])
def test_members_skipped_past_the_warnings_limit_are_tallied(kind):
    """However many members are skipped, the total is said: ten warnings, "further ... not
    reported", then one line with the count."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for i in range(25):
            if kind == "link":
                ti = tarfile.TarInfo(f"l{i:02d}.txt")
                ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
                t.addfile(ti)
            else:
                ti = tarfile.TarInfo(f"noext{i:02d}")
                ti.size = 1
                t.addfile(ti, io.BytesIO(b"x"))
        ti = tarfile.TarInfo("good.txt")
        ti.size = 1
        t.addfile(ti, io.BytesIO(b"g"))
    for read in (iter_samples, iter_members):
        if read is iter_members and kind == "noext":
            continue
        with pytest.warns(TarioWarning) as record:
            got = list(read(io.BytesIO(buf.getvalue()), "many.tar"))
        assert len(got) == 1
        messages = [str(w.message) for w in record]
        assert len(messages) == 12 and "not reported" in messages[10]
        assert messages[11] == ("many.tar: 25 members skipped in all (links, special files, unsafe names)"
                                if kind == "link" else "many.tar: 25 members without extension skipped in all")


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


# ---------------------------------------------------------------- large members: direct reads, writev

from tarproc.tario import reader as _reader  # noqa: E402
from tarproc.tario import writer as _writer  # noqa: E402

BIG = 1 << 16  # values at least this large take the direct-read and writev paths


def mixed_samples(seed=0, n=40):
    """Samples with large and small values in changing patterns: runs of large members, runs of
    more small members than direct mode lasts, sizes at and around 64 KiB and block multiples."""
    rnd = random.Random(seed)
    blob = rnd.randbytes(400_000)
    sizes = [BIG, BIG - 1, BIG + 1, BIG + 511, 3 * BIG, 100_000, 512 * 300, 0, 1, 511, 512, 513, 2048, 2049, 5000]
    out = []
    for i in range(n):
        s = {"__key__": "s%04d" % i, "cls": str(i)}
        if i % 9 < 5:  # a stretch of large samples, then small ones (more than _DIRECT_RUN members)
            size = sizes[i % len(sizes)] if i % 3 else rnd.randrange(BIG, 250_000)
            start = rnd.randrange(len(blob) - size)
            s["jpg"] = blob[start : start + size]
        if i % 4 == 0:
            s["zz.big"] = blob[: BIG + 7 * i]
        out.append(s)
    out.extend({"__key__": "t%04d" % i, "txt": "small %d" % i} for i in range(2 * _reader._DIRECT_RUN + 3))
    # large values under names that need a pax header or are not ASCII
    out.append({"__key__": "long/" + "n" * 120, "jpg": blob[:BIG + 3], "cls": b"1"})
    out.append({"__key__": "ünï", "jpg": blob[:BIG]})
    out.append({"__key__": "last", "jpg": blob[:BIG], "ext\u00e9": blob[: 2 * BIG]})
    return out


def plain(samples):
    """Samples as iter_samples gives them back (bytes values), without __url__."""
    return [{k: (v.encode() if isinstance(v, str) and not k.startswith("__") else v) for k, v in s.items()} for s in samples]


def strip_url(samples):
    return [{k: v for k, v in s.items() if k != "__url__"} for s in samples]


class ShortReads(io.RawIOBase):
    """A stream that returns at most a few (random) bytes per read, like a slow pipe; read only."""

    def __init__(self, data, seed=0, most=7000, readinto=True, policy=None):
        self._data = memoryview(data)
        self._pos = 0
        self._rnd = random.Random(seed)
        self._most = most
        self._policy = policy  # n asked -> n given, instead of random short reads
        self.asked = []
        if not readinto:
            self.readinto = None

    def readable(self):
        return True

    def read(self, n=-1):
        self.asked.append(n)
        if n is None or n < 0:
            n = len(self._data)
        n = self._policy(n) if self._policy else min(n, self._rnd.randint(1, self._most))
        data = self._data[self._pos : self._pos + n].tobytes()
        self._pos += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def test_large_members_read_directly_round_trip(tmp_path):
    samples = mixed_samples()
    data = write_bytes(samples)
    want = plain(samples)
    path = tmp_path / "mixed.tar"
    path.write_bytes(data)
    with open(path, "rb") as f:  # buffered file: the direct reads of the fast path
        got = list(iter_samples(f, "mixed.tar"))
    assert strip_url(got) == want and {s["__url__"] for s in got} == {"mixed.tar"}
    assert all(type(v) is bytes for s in got for k, v in s.items() if not k.startswith("__"))
    with open(path, "rb", buffering=0) as f:  # raw file
        assert strip_url(iter_samples(f)) == want
    assert strip_url(iter_samples(io.BytesIO(data))) == want
    members = list(iter_members(io.BytesIO(data)))
    assert len(members) == sum(len(s) - 1 for s in samples)


@pytest.mark.parametrize("most,readinto", [(1, True), (700, False), (7000, True), (100_000, True)])
def test_large_members_from_short_reads(most, readinto):
    """Streams that return fewer bytes than asked (pipes) at every point of a member."""
    samples = mixed_samples(seed=most, n=25)
    data = write_bytes(samples)
    if most == 1:  # one byte per read: keep it small
        samples = samples[:3] + samples[-3:]
        data = write_bytes(samples)
    assert strip_url(iter_samples(ShortReads(data, most=most, readinto=readinto))) == plain(samples)


def test_large_members_from_unbuffered_pipe():
    samples = mixed_samples(seed=3, n=20)
    data = write_bytes(samples)
    r, w = os.pipe()

    def feed():
        with open(w, "wb", buffering=0) as wf:
            for i in range(0, len(data), 5000):  # small pieces: the reader sees short reads
                wf.write(data[i : i + 5000])

    import threading

    t = threading.Thread(target=feed)
    t.start()
    try:
        with open(r, "rb", buffering=0) as rf:
            got = list(iter_samples(rf, "pipe"))
    finally:
        t.join()
    assert strip_url(got) == plain(samples)


def test_large_members_compressed_input():
    samples = mixed_samples(seed=5, n=20)
    for compression in ("gz", "bz2", "xz", "zst"):
        data = write_bytes(samples, compression)
        assert strip_url(iter_samples(io.BytesIO(data))) == plain(samples), compression
        assert strip_url(iter_samples(ShortReads(data, seed=1, most=3000))) == plain(samples), compression


def test_truncated_large_members_name_member_and_offset():
    big = bytes(range(256)) * 400  # 102,400 bytes: padding follows
    lead = [{"__key__": "l%02d" % i, "bin": big} for i in range(12)]  # more than one read chunk
    data = write_bytes(lead + [{"__key__": "a", "bin": big}, {"__key__": "b", "bin": big + b"x"}, {"__key__": "c", "bin": b"1"}])
    first = 12 * (512 + len(big))  # offset of a's header (big is a block multiple)
    second = first + 512 + len(big)
    # streams: plain, short reads, and reads that give what is asked but at most 100 bytes
    # when little is asked (the padding after a large member comes in pieces)
    streams = [
        lambda d: io.BytesIO(d),
        lambda d: ShortReads(d, most=9000),
        lambda d: ShortReads(d, policy=lambda n: n if n > 2000 else min(n, 100)),
    ]
    for cut, member, offset in [
        (second + 512 + 1000, "b.bin", second),  # inside b's data
        (second + 512 + len(big) + 1 + 3, "b.bin", second),  # inside b's padding
        (second + 512 + len(big) + 1, "b.bin", second),  # right after b's data
        (second - 100, "a.bin", first),  # inside a's data
    ]:
        for stream in streams:
            with pytest.raises(FormatError) as e:
                list(iter_samples(stream(data[:cut]), "cut.tar"))
            assert f"cut.tar: member '{member}' at offset {offset}: truncated archive" in str(e.value)
    # a bad header after a large member: its offset is right
    third = second + 512 + len(big) + 512
    bad = bytearray(data)
    bad[third + 10] ^= 0xFF
    for stream in streams:
        with pytest.raises(FormatError, match=rf"cut.tar: at offset {third} \(after member 'b.bin'\): bad tar header checksum"):
            list(iter_samples(stream(bytes(bad)), "cut.tar"))
        # cut right after a large member's padding: the archive simply ends (no end blocks)
        assert [s["__key__"] for s in iter_samples(stream(data[:third]))][-2:] == ["a", "b"]
        assert [s["__key__"] for s in iter_samples(stream(data))][-3:] == ["a", "b", "c"]


def test_streams_that_return_more_than_asked():
    """A stream whose read ignores how much was asked still reads right (direct mode asks
    for exact amounts)."""
    samples = mixed_samples(seed=21, n=15)
    data = write_bytes(samples)
    stream = ShortReads(data, readinto=False, policy=lambda n: 3000)
    assert strip_url(iter_samples(stream)) == plain(samples)


def test_decompressed_readinto_to_the_end():
    plain_tar = write_bytes(SAMPLES)
    stream = open_decompressed(io.BytesIO(gzip.compress(plain_tar, mtime=0)))
    got = bytearray()
    buf = bytearray(5000)
    view = memoryview(buf)
    while True:
        n = stream.readinto(view[:4096] if len(got) % 2 else buf)
        if not n:
            break
        got += buf[:n]
    assert bytes(got) == plain_tar and stream.readinto(buf) == 0


def test_skipped_large_members_are_read_in_bounded_pieces():
    """A member that is skipped (here: unsafe name) is read in pieces of at most 1 MiB, not
    all at once, in direct mode or not."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, size in [("a.bin", BIG), ("../evil.bin", 3 << 20), ("b.bin", 10), ("../x.bin", 3 << 20), ("c.bin", 1)]:
            ti = tarfile.TarInfo(name)
            ti.size = size
            t.addfile(ti, io.BytesIO(bytes(size)))
    stream = ShortReads(buf.getvalue(), most=1 << 30)
    with pytest.warns(TarioWarning, match="unsafe member name"):
        got = list(iter_members(stream, unsafe="skip"))
    assert [n for n, _ in got] == ["a.bin", "b.bin", "c.bin"]
    assert max(stream.asked) <= 1 << 20


def test_max_member_size_in_direct_mode():
    data = write_bytes([{"__key__": "a", "bin": bytes(BIG)}, {"__key__": "b", "bin": bytes(BIG + 1)}])
    with pytest.raises(FormatError, match=rf"member 'b.bin' at offset {512 + BIG}: member of {BIG + 1} bytes exceeds"):
        list(iter_samples(io.BytesIO(data), max_member_size=BIG))


def test_split_sample_after_many_keys_and_warning_location():
    """The split-sample check, inlined in the reader, still works once its table has grown,
    and its warnings point at the caller as before."""
    names = ["k%05d.txt" % i for i in range(3000)] + ["k02999.json", "k00007.json", "z.txt"]
    data = hostile_tar(names)
    with pytest.warns(TarioWarning) as record:
        samples = list(iter_samples(io.BytesIO(data), "many.tar"))
    assert [s["__key__"] for s in samples[-3:]] == ["k02999", "k00007", "z"]
    assert len(samples) == 3002 and sorted(samples[-3]) == ["__key__", "__url__", "json", "txt"]
    split = [w for w in record if "is split" in str(w.message)]
    assert len(split) == 1 and "'k00007'" in str(split[0].message)
    assert split[0].filename == __file__
    with pytest.raises(FormatError, match="sample 'k00007' is split"):
        list(iter_samples(io.BytesIO(data), "many.tar", strict=True))


# writer


def write_file(path, samples, buffering=-1, prefix=b"", **kw):
    with open(path, "wb", buffering=buffering) as f:
        f.write(prefix)
        with TarWriter(f, **kw) as w:
            for s in samples:
                w.write(s)
        f.write(b"END")
    return path.read_bytes()


def test_writev_to_plain_files_is_byte_identical(tmp_path):
    samples = mixed_samples(seed=7)
    want = write_bytes(samples)
    # open()'s buffered and raw files take the writev path, with what was written before first
    assert write_file(tmp_path / "a.tar", samples, prefix=b"x" * 100) == b"x" * 100 + want + b"END"
    assert write_file(tmp_path / "b.tar", samples, buffering=0, prefix=b"y") == b"y" + want + b"END"
    with open(tmp_path / "c.tar", "wb") as f:
        assert TarWriter(f)._fd == f.fileno()
        assert TarWriter(f, "gz")._fd is None  # compressed: the compressor gets everything
    with open(tmp_path / "c.tar", "w+b") as f:
        assert TarWriter(f)._fd is None  # not open()'s plain writer: the file object's write
    # many small members pending before a large one: more parts than one writev takes
    many = [{"__key__": "m%05d" % i, "txt": b"x"} for i in range(3000)] + [{"__key__": "z", "bin": bytes(range(256)) * 300}]
    assert write_file(tmp_path / "d.tar", many) == write_bytes(many) + b"END"
    # mtime and write_raw large and small on the same path
    raw = write_bytes(samples[:3])[:-1024]
    with open(tmp_path / "e.tar", "wb") as f, TarWriter(f, mtime=123) as w:
        w.write(samples[4])
        w.write_raw(raw, samples=3)
        w.write_raw(memoryview(raw), samples=3)
        w.write_raw(raw[:1024])
        w.write(samples[5])
    ref = io.BytesIO()
    with TarWriter(ref, mtime=123) as w:
        w.write(samples[4])
        w.write_raw(raw, samples=3)
        w.write_raw(memoryview(raw), samples=3)
        w.write_raw(raw[:1024])
        w.write(samples[5])
    assert (tmp_path / "e.tar").read_bytes() == ref.getvalue()


def test_writev_resumes_after_short_writes(tmp_path, monkeypatch):
    samples = mixed_samples(seed=9, n=20)
    calls = []

    def short_writev(fd, bufs):  # writes at most 1000 bytes, at most two buffers' worth
        data = b"".join(bytes(b) for b in bufs[:2])[:1000]
        calls.append(len(bufs))
        return os.write(fd, data)

    monkeypatch.setattr(_writer, "_writev", short_writev)
    assert write_file(tmp_path / "a.tar", samples) == write_bytes(samples) + b"END"
    assert calls
    monkeypatch.setattr(_writer, "_writev", lambda fd, bufs: 0)
    with open(tmp_path / "b.tar", "wb") as f:
        with pytest.raises(OSError, match="wrote nothing"):
            with TarWriter(f) as w:
                w.write({"__key__": "a", "bin": bytes(BIG)})


def test_writev_to_pipe_then_read(tmp_path):
    samples = mixed_samples(seed=11, n=30)
    with subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
        import threading

        out = []
        t = threading.Thread(target=lambda: out.append(p.stdout.read()))
        t.start()
        with TarWriter(p.stdin) as w:  # a BufferedWriter on a pipe: writev, short writes possible
            assert w._fd is not None
            for s in samples:
                w.write(s)
        p.stdin.close()
        t.join()
    assert out[0] == write_bytes(samples)


def test_writer_on_closed_file_raises(tmp_path):
    f = open(tmp_path / "a.tar", "wb")
    w = TarWriter(f)
    w.write({"__key__": "a", "bin": bytes(BIG)})
    f.close()
    with pytest.raises(ValueError):
        w.write({"__key__": "b", "bin": bytes(2 << 20)})


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz", "zst"])
def test_compressed_output_with_large_members(compression, tmp_path):
    samples = mixed_samples(seed=13, n=20)
    data = write_bytes(samples, compression)
    assert data == write_bytes(samples, compression)  # deterministic
    assert write_file(tmp_path / "a", samples, compression=compression)[:-3] == data  # same on a file
    assert strip_url(iter_samples(io.BytesIO(data))) == plain(samples)
    assert open_decompressed(io.BytesIO(data)).read() == write_bytes(samples)


def test_writer_caches_do_not_change_output():
    """Extensions and field orders are remembered per writer; any mix of them, and mappings
    other than dicts, give the bytes a fresh writer gives for each sample alone."""

    class Mapping(dict):
        def __getitem__(self, k):  # what a lazy mapping might do: items() is what counts
            return b"not this"

    samples = [
        {"__key__": "a", "txt": b"1", "cls": b"2"},
        {"__key__": "b", "cls": b"3", "txt": b"4"},  # same fields, another order
        {"__url__": "u", "txt": b"5", "__key__": "c", "cls": b"6"},
        {"__key__": "d", "txt": b"7", "ünï": b"8", "cls": "9"},
        Mapping({"__key__": "e", "txt": b"a", "cls": b"b"}),
        {"__key__": "f" * 97, "txt": b"c", "cls": b"d", "toolong": b"e"},  # a pax name for one
    ] + [{"__key__": "g%d" % i, "e%d" % i: b"x", "f%d" % (i % 70): b"y"} for i in range(300)]
    samples = samples * 2
    alone = b"".join(write_bytes([s])[:-1024] for s in samples) + bytes(1024)
    assert write_bytes(samples) == alone
    got = list(iter_samples(io.BytesIO(write_bytes(samples[:6]))))
    assert got[4]["txt"] == b"a" and got[3]["ünï"] == b"8"
    w = TarWriter(io.BytesIO())
    with pytest.raises(ValueError, match="contains '/'"):
        w.write({"__key__": "h", "txt": b"1", "a/b": b"2"})
    with pytest.raises(UnsafeNameError):
        w.write({"__key__": "h", "x\ny": b"1"})
    with pytest.raises(TypeError):
        w.write({"__key__": "h", 3: b"1"})


def test_decode_raw_sample_with_large_members():
    from tarproc.tario import decode_raw_sample, encode_samples

    sample = {"__key__": "a", "bin": bytes(range(256)) * 300, "cls": b"1", "z": bytes(BIG)}
    raw = encode_samples([sample])
    assert decode_raw_sample(raw, "u") == dict(sample, __url__="u")
    with pytest.raises(FormatError, match="u: member 'a.bin' at offset 5: truncated archive"):
        decode_raw_sample(raw[:512], "u", 5)  # a large member's header ends the raw bytes


def test_writer_file_checks_at_creation(tmp_path):
    f = open(tmp_path / "a", "wb")
    f.detach()
    assert TarWriter(f)._fd is None  # detached: the plain path (which then reports it)
    g = open(tmp_path / "b", "wb")
    g.close()
    assert TarWriter(g)._fd is None
    with open(tmp_path / "b", "rb", buffering=0) as h:
        assert TarWriter(h)._fd is None  # not writable


# identity copies: headers passed through


def copy_bytes(data, compression=None, change=None, **kw):
    """iter_samples -> TarWriter.write, each sample as it is read (change may alter it first)."""
    out = io.BytesIO()
    with TarWriter(out, compression, **kw) as w:
        for s in iter_samples(io.BytesIO(data)):
            if change is not None:
                change(s)
            w.write(s)
    return out.getvalue()


def copy_slowly(data, compression=None, change=None, **kw):
    """The same copy with each sample a fresh dict: TarWriter makes every header itself."""
    def fresh(s):
        if change is not None:
            change(s)
        return dict(s)

    out = io.BytesIO()
    with TarWriter(out, compression, **kw) as w:
        for s in iter_samples(io.BytesIO(data)):
            w.write(fresh(s))
    return out.getvalue()


def test_plain_header_constants_match_writer():
    assert _reader._PLAIN_TAIL == _writer._TAIL_REGULAR
    assert _reader._PLAIN_MODE == _writer._MODE_UID_GID
    assert _reader._PLAIN_MTIME == b"%011o\0" % 0


def copied_with(data, **kw):
    """(output, writer) of an identity copy: the writer's caches tell whether it made any
    header itself (it remembers the extensions and field orders it has seen)."""
    out = io.BytesIO()
    with TarWriter(out, **kw) as w:
        for s in iter_samples(io.BytesIO(data)):
            w.write(s)
    return out.getvalue(), w


def test_identity_copy_passes_headers_through():
    samples = mixed_samples(seed=17)
    plain_ones = [s for s in samples if s["__key__"].isascii() and len(s["__key__"]) < 90 and all(k.isascii() for k in s)]
    data = write_bytes(plain_ones)
    out, w = copied_with(data)
    assert out == data and w._exts == {} and w._orders == {}  # every header passed through
    for compression in ("gz", "zst"):
        out, w = copied_with(data, compression=compression)
        assert out == write_bytes(plain_ones, compression) and w._exts == {}
    out, w = copied_with(data, mtime=5)  # other headers: made again
    assert out == write_bytes(plain_ones, mtime=5) and w._exts != {}
    data = write_bytes(samples)  # with names that need pax headers
    out, w = copied_with(data)
    assert out == data and w._exts != {}


@pytest.mark.parametrize("change", [
    lambda s: s.__setitem__("cls", b"changed"),
    lambda s: s.__setitem__("cls", bytearray(s["cls"])),  # equal content, another object
    lambda s: s.__setitem__("zzz", b"added"),
    lambda s: s.pop("cls"),
    lambda s: s.__setitem__("__key__", s["__key__"] + "x"),
    lambda s: (s.pop("__url__"), s.__setitem__("new", b"v")),
    lambda s: s.__setitem__("cls", s.pop("cls")),  # same value, moved to the end
    lambda s: s.__setitem__("__url__", "elsewhere"),
    lambda s: s.__setitem__("cls2", s.pop("cls")),  # renamed
    lambda s: s.__setitem__("aaa", s.pop("txt")),  # renamed, the values in the same order
])
def test_changed_samples_are_written_as_changed(change):
    samples = [{"__key__": "k%d" % i, "cls": b"%d" % i, "jpg": bytes(BIG + i), "txt": b"t"} for i in range(5)]
    data = write_bytes(samples)
    assert copy_bytes(data, change=change) == copy_slowly(data, change=change)


def test_passthrough_only_for_what_tarwriter_writes_itself():
    """Archives from other writers, or in another order, are copied as TarWriter writes them."""
    def tarfile_bytes(members, fmt=tarfile.USTAR_FORMAT, mtime=0, mode=0o644, uname=""):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
            for name, value in members:
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode, ti.uname = len(value), mtime, mode, uname
                t.addfile(ti, io.BytesIO(value))
        return buf.getvalue()

    members = [("a.cls", b"1"), ("a.jpg", bytes(BIG)), ("b.cls", b"2"), ("b.jpg", b"x")]
    ours = write_bytes([{"__key__": "a", "cls": b"1", "jpg": bytes(BIG)}, {"__key__": "b", "cls": b"2", "jpg": b"x"}])
    cases = [
        tarfile_bytes(members),  # tarfile's ustar headers are TarWriter's here: same bytes
        tarfile_bytes(members, mtime=1234),
        tarfile_bytes(members, mode=0o600),
        tarfile_bytes(members, uname="someone"),
        tarfile_bytes(members, fmt=tarfile.GNU_FORMAT),
        tarfile_bytes(members, fmt=tarfile.PAX_FORMAT),
        tarfile_bytes(members[::-1]),  # members not in extension order
        tarfile_bytes([("a.__x", b"1"), ("a.jpg", b"2"), ("d/é.txt", b"3"), ("_u.a", b"4"), ("_u._b", b"5")]),
        tarfile_bytes([("0.a", b"0"), ("a.__x", b"1"), ("a.jpg", b"2"), ("b._y", b"3"), ("c.a", b"4"), ("c.b.c", b"5"),
                       ("c.b", b"6"), ("d.é", b"7"), ("e.a..b", b"8")]),
        tarfile_bytes([("x" * 98 + ".a", b"1"), ("dir/" + "y" * 98 + ".b", b"2"), ("k.", b"3")]),
        tarfile_bytes(members + [("a.cls", b"again")]),  # a split sample
    ]
    for data in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TarioWarning)
            assert copy_bytes(data) == copy_slowly(data)
    assert copy_bytes(cases[0]) == ours


def test_samples_written_later_or_twice_or_interleaved():
    a = write_bytes(mixed_samples(seed=1, n=10))
    b = write_bytes(mixed_samples(seed=2, n=10))
    kept = list(iter_samples(io.BytesIO(a)))  # written after reading all: no passthrough
    assert write_bytes(kept) == a
    out, again = io.BytesIO(), io.BytesIO()
    with TarWriter(out) as w, TarWriter(again) as w2:
        for s in iter_samples(io.BytesIO(a)):
            w.write(s)
            w2.write(s)  # twice
            with pytest.raises(DuplicateKeyError, match=repr(s["__key__"])):
                w.write(s)  # the same key right after itself: refused, nothing written
            with pytest.raises(DuplicateKeyError):
                w.write(dict(s, other=b"x"))  # (the general path too)
    assert out.getvalue() == again.getvalue() == a
    out1, out2 = io.BytesIO(), io.BytesIO()
    with TarWriter(out1) as w1, TarWriter(out2) as w2:
        for s1, s2 in zip(iter_samples(io.BytesIO(a)), iter_samples(io.BytesIO(b))):
            w2.write(s2)
            w1.write(s1)
    n = min(len(kept), len(list(iter_samples(io.BytesIO(b)))))
    assert out1.getvalue() == write_bytes(kept[:n])
    assert out2.getvalue() == write_bytes(list(iter_samples(io.BytesIO(b)))[:n])


def test_copies_of_read_samples_write_what_they_hold():
    """A copy of the sample just read (dict(s), as htmapper's runner passes to user code) takes the
    header-reuse path only while it holds the very same keys and values in the same order."""
    a = write_bytes(mixed_samples(seed=3, n=12))
    kept = list(iter_samples(io.BytesIO(a)))
    out = io.BytesIO()
    with TarWriter(out) as w:
        for s in iter_samples(io.BytesIO(a)):
            w.write(dict(s))
    assert out.getvalue() == a
    changed = []
    out = io.BytesIO()
    with TarWriter(out) as w:
        for i, s in enumerate(iter_samples(io.BytesIO(a))):
            c = dict(s)
            field = next(k for k in c if not k.startswith("__"))
            if i % 3 == 0:
                c[field] = b"changed"
            elif i % 3 == 1:
                c = dict(reversed(list(c.items())))  # same values, other order
            else:
                c["extra"] = b"x"
            changed.append(c)
            w.write(c)
    assert out.getvalue() == write_bytes(changed)
    assert [x["__key__"] for x in iter_samples(io.BytesIO(out.getvalue()))] == [x["__key__"] for x in kept]


def test_passthrough_record_is_released():
    it = iter_samples(io.BytesIO(write_bytes(SAMPLES[:3])))
    s = next(it)
    assert _reader._last_read[0][0] is s
    next(it)
    it.close()  # abandoned: the last sample is not kept
    assert _reader._last_read[0] is None


def test_read_ahead_between_large_members_follows_changing_patterns(tmp_path):
    """After large members, what lies between them is read ahead once its length repeats; when
    the pattern changes the read-ahead overshoots into a large member, which is still right."""
    big = bytes(range(256)) * 400
    samples = []
    for i in range(40):
        s = {"__key__": "s%03d" % i, "jpg": big[: BIG + 1000 * (i % 3)]}
        if i % 11 < 6:
            s["cls"] = b"%d" % i
        if i % 11 == 7:
            s["a"] = b"x" * 3000
        if 20 <= i < 25:
            s["b"] = b"y" * 700
            s["c"] = b"z" * 5
        samples.append(s)
    data = write_bytes(samples)
    path = tmp_path / "p.tar"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert strip_url(iter_samples(f)) == plain(samples)
    with open(path, "rb") as f:
        assert copy_bytes(data) == data
    for most in (600, 5000, 70000):
        assert strip_url(iter_samples(ShortReads(data, most=most))) == plain(samples)


def with_checksum(header):
    """A tar header block with its checksum field recomputed."""
    header = bytearray(header)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def test_odd_size_fields_after_the_fast_path():
    data = bytearray(write_bytes([{"__key__": "a", "txt": b"x" * 10}, {"__key__": "b", "txt": b"y"}]))
    for field, ok in [(b"00000000012\0", True), (b"0000000001x\0", False), (b"   00000012\0", True), (b"-0000000001\0", False)]:
        d = bytearray(data)
        d[:512] = with_checksum(data[:512][:124] + field + data[:512][136:])
        if ok:
            assert [s["txt"] for s in iter_samples(io.BytesIO(bytes(d)))] == [b"x" * 10, b"y"]
            assert copy_bytes(bytes(d)) == bytes(data)  # written back with TarWriter's own header
        else:
            with pytest.raises(FormatError, match="member 'a.txt' at offset 0: invalid size field"):
                list(iter_samples(io.BytesIO(bytes(d))))
    with pytest.raises(ValueError, match="unsafe must be"):
        next(iter_samples(io.BytesIO(bytes(data)), unsafe="maybe"))


def test_identity_copy_to_files(tmp_path):
    samples = mixed_samples(seed=23)
    data = write_bytes(samples)
    src = tmp_path / "in.tar"
    src.write_bytes(data)
    for buffering in (-1, 0):
        with open(src, "rb") as f, open(tmp_path / "out.tar", "wb", buffering=buffering) as g, TarWriter(g) as w:
            vector = False
            for s in iter_samples(f):
                w.write(s)
                vector |= w._vector  # large values pending for writev, not joined
        assert (tmp_path / "out.tar").read_bytes() == data and vector


# the fast lane of iter_samples against the general member parser


def reference_samples(fileobj, url="-", strict=False, max_member_size=None, unsafe="error"):
    """iter_samples as it was before its fast lane: the grouping over iter_members."""
    from tarproc.tario.names import is_meta_name, split_name

    sample = key = None
    seen = set()
    nsplit = nnokey = 0
    for name, data in iter_members(fileobj, url, max_member_size, unsafe=unsafe):
        if name[:2] == "__" and is_meta_name(name):
            continue
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        k, ext = (name[:dot], name[dot + 1 :]) if dot > slash + 1 else split_name(name)
        if k is None:
            nnokey += 1
            if nnokey <= 10:
                warnings.warn(f"{url}: skipping member {name!r}: no extension, so it belongs to no sample", TarioWarning)
            elif nnokey == 11:
                warnings.warn(f"{url}: further members without extension are not reported", TarioWarning)
            continue
        if k != key:
            if sample is not None:
                yield sample
            if k in seen:
                if strict:
                    raise FormatError(f"{url}: sample {k!r} is split: its members are not consecutive (member {name!r})")
                nsplit += 1
                if nsplit <= 10:
                    warnings.warn(
                        f"{url}: sample {k!r} is split: its members are not consecutive; "
                        f"reading member {name!r} as a separate sample",
                        TarioWarning,
                    )
                elif nsplit == 11:
                    warnings.warn(f"{url}: further split samples are not reported", TarioWarning)
            seen.add(k)
            key = k
            sample = {"__key__": k, "__url__": url}
        if ext in sample:
            raise FormatError(f"{url}: sample {k!r} has extension {ext!r} twice (member {name!r})")
        sample[ext] = data
    if nnokey > 10:
        warnings.warn(f"{url}: {nnokey} members without extension skipped in all", TarioWarning)
    if sample is not None:
        yield sample


def outcome(samples):
    """(samples, warning messages, error) of iterating ``samples`` to its end."""
    got, err = [], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for s in samples:
                got.append(s)
        except (FormatError, UnsafeNameError) as e:
            err = (type(e).__name__, str(e))
    return got, [str(w.message) for w in caught], err


def random_archive(rnd):
    names = []
    key = "k0"
    for i in range(rnd.randint(1, 40)):
        r = rnd.random()
        if r < 0.5:
            key = key if rnd.random() < 0.5 else rnd.choice(["k%d" % i, "d/k%d" % i, "k%d" % (i // 3)])
            name = f"{key}.{rnd.choice(['jpg', 'cls', 'txt', 'a.b', 'JPG', 'x' * 60])}"
        else:
            name = rnd.choice([
                "__meta__/x.txt", "__key__.txt", "_u.txt", "noext", "d.v1/k.c", "a..b.txt", "../up.txt",
                "/abs.txt", "é/ü.txt", "y" * 120 + ".txt", "dir/" + "z" * 99 + ".t", "k.", "k", "d/.x",
            ])
        size = rnd.choice([0, 1, 100, 511, 512, 513, 3000, BIG - 1, BIG, BIG + 600, 150_000])
        kind = rnd.choices(["file", "link", "dir"], [0.9, 0.05, 0.05])[0]
        names.append((name, size, kind))
    blob = rnd.randbytes(200_000)
    r = rnd.random()
    if r < 0.4:  # headers as TarWriter makes them, whatever the names, some a little different
        out = []
        for name, size, kind in names:
            raw = name.encode()[:100]
            variant = rnd.choices(["plain", "mtime", "mode", "spaces", "chk7", "namejunk", "link"], [12, 1, 1, 1, 1, 1, 1])[0]
            size_field = b" %010o\0" % size if variant == "spaces" else b"%011o\0" % size
            header = bytearray(
                raw.ljust(100, b"\0") + (b"0000600\0" if variant == "mode" else _writer._MODE_UID_GID) + size_field
                + (b"%011o\0" % 77 if variant == "mtime" else b"%011o\0" % 0) + b" " * 8
                + (b"2" if variant == "link" else b"0") + _writer._TAIL_REGULAR[1:]
            )
            if variant == "namejunk" and len(raw) < 99:
                header[len(raw) + 1] = 65
            header[148:156] = (b"%07o\0" if variant == "chk7" else b"%06o\0 ") % sum(header)
            out.append(bytes(header))
            if variant != "link":
                out.append(blob[:size] + bytes(-size & 511))
        data = b"".join(out) + bytes(1024 * rnd.randint(0, 2))
    elif r < 0.7:  # TarWriter's own archives
        samples = []
        for name, size, kind in names:
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            if kind == "file" and dot > slash + 1 and not name.startswith(("_", "/")) and ".." not in name:
                samples.append({"__key__": name[:dot], name[dot + 1 :]: blob[:size]})
        # one member a sample, each encoded on its own: consecutive members with one key (which
        # a TarWriter refuses as samples) make a sample of several members, or a repeated one
        data = b"".join(encode_samples([s]) for s in samples) + bytes(1024)
    else:
        buf = io.BytesIO()
        fmt = rnd.choice([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
            for name, size, kind in names:
                ti = tarfile.TarInfo(name)
                ti.mtime = rnd.choice([0, 12345])
                if kind == "file":
                    ti.size = size
                else:
                    ti.type = tarfile.SYMTYPE if kind == "link" else tarfile.DIRTYPE
                    ti.linkname = "target"
                try:
                    t.addfile(ti, io.BytesIO(blob[:size]) if kind == "file" else None)
                except ValueError:  # a name the format cannot hold
                    pass
        data = buf.getvalue()
    damage = rnd.random()
    if damage < 0.2 and len(data) > 1:
        data = data[: rnd.randrange(1, len(data))]
    elif damage < 0.35:
        b = bytearray(data)
        b[rnd.randrange(min(len(b), 20_000))] ^= 1 << rnd.randrange(8)
        data = bytes(b)
    elif damage < 0.4:
        data += b"trailing garbage"
    return data


def test_fast_lane_matches_general_parser(tmp_path):
    rnd = random.Random(2024)
    for n in range(150):
        data = random_archive(rnd)
        kw = rnd.choice([{}, {"strict": True}, {"unsafe": "skip"}, {"max_member_size": BIG}])
        want = outcome(reference_samples(io.BytesIO(data), "r.tar", **kw))
        path = tmp_path / "r.tar"
        path.write_bytes(data)
        for make in (
            lambda: io.BytesIO(data),
            lambda: open(path, "rb"),
            lambda: ShortReads(data, seed=n, most=rnd.choice([700, 9000, 100_000])),
        ):
            stream = make()
            try:
                got = outcome(iter_samples(stream, "r.tar", **kw))
            finally:
                stream.close()
            assert got == want, (n, kw)
        # and copies: headers passed through, or made again, alike (up to any error)
        assert copy_outcome(data, False, **kw) == copy_outcome(data, True, **kw), (n, kw)


def copy_outcome(data, fresh, **kw):
    """What a copy of ``data`` writes, up to its first error, and that error; with ``fresh``
    each sample is written as a new dict (no headers passed through)."""
    out = io.BytesIO()
    err = None
    w = TarWriter(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TarioWarning)
        try:
            for s in iter_samples(io.BytesIO(data), **kw):
                w.write(dict(s) if fresh else s)
        except (FormatError, UnsafeNameError, ValueError) as e:
            err = (type(e).__name__, str(e))
    w.close()
    return out.getvalue(), err


def raw_header(name, size, mode=b"0000644\0", mtime=0, size_field=None, chk_format=b"%06o\0 ", junk=None, typeflag=b"0"):
    """A ustar header as TarWriter makes it, or with one thing changed."""
    raw = name.encode()
    header = bytearray(
        raw.ljust(100, b"\0") + mode + b"0000000\0" * 2 + (size_field or b"%011o\0" % size) + b"%011o\0" % mtime
        + b" " * 8 + typeflag + _writer._TAIL_REGULAR[1:]
    )
    if junk is not None:
        header[junk] = 65
    header[148:156] = chk_format % sum(header)
    return bytes(header)


def raw_member(name, value, **kw):
    return raw_header(name, len(value), **kw) + value + bytes(-len(value) & 511)


@pytest.mark.parametrize("odd", [
    lambda v: raw_member("b.x", v, junk=20),  # junk after the name's NUL
    lambda v: raw_member("b.x", v, mtime=1),
    lambda v: raw_member("b.x", v, mode=b"0000600\0"),
    lambda v: raw_member("b.x", v, size_field=b" %010o\0" % len(v)),
    lambda v: raw_member("b.x", v, chk_format=b"%07o\0"),
    lambda v: raw_member("b._x", v),
    lambda v: raw_member("b.__x", v),
    lambda v: raw_member("b.é", v),
    lambda v: raw_member("b.y", v) + raw_member("b.x", v),  # not in extension order
    lambda v: raw_member("b.x", v, typeflag=b"7"),
    lambda v: raw_member("b.x", v, junk=345),  # a ustar prefix: "A/b.x"
    lambda v: raw_member("d/b.x", v),
])
@pytest.mark.parametrize("size", [1, 600, BIG + 1])
def test_passthrough_needs_exact_headers(odd, size):
    value = bytes(range(256)) * (size // 256) + b"v" * (size % 256)
    plain_ones = raw_member("a.x", b"1") + raw_member("a.y", value)
    data = plain_ones + odd(value) + raw_member("c.x", value) + raw_member("c.y", b"2") + bytes(1024)
    fast, slow = copy_outcome(data, False), copy_outcome(data, True)
    assert fast == slow and fast[1] is None


@pytest.mark.filterwarnings("ignore:.*split")  # the same key again, further on
def test_writer_refuses_consecutive_samples_of_one_key_on_every_path(tmp_path):
    """Two samples of one key in a row would read back as one (webdataset: "duplicate file
    name"): write, write_raw (keys read from the headers, pax names too, or passed in) and
    encode_samples refuse them before writing a byte; SampleWriter names its output."""
    from tarproc.streams import SampleWriter
    from tarproc.tario.writer import chain_keys, first_key, raw_keys

    long = "d/" + "k" * 150  # a pax header holds its members' names
    a, b, c = ({"__key__": k, "txt": k} for k in ("a", long, "c"))
    raw_ab = encode_samples([a, b])
    assert raw_keys(raw_ab) == ("a", long) and first_key(raw_ab) == "a"
    assert raw_keys(b"") == (None, None) and first_key(encode_samples([b])) == long
    assert chain_keys([raw_ab, b"", encode_samples([c])]) == ("a", "c")
    with pytest.raises(DuplicateKeyError, match=repr(long)):
        chain_keys([raw_ab, encode_samples([dict(b, cls="1")])])
    with pytest.raises(DuplicateKeyError, match="'a'"):
        encode_samples([a, dict(a, cls="2")])
    assert encode_samples([a]) + encode_samples([a]) == encode_samples([a]) * 2  # call by call

    out = io.BytesIO()
    w = TarWriter(out)
    w.write_raw(raw_ab, 2)
    assert w.last_key == long
    for bad in (lambda: w.write(dict(b, cls="1")),
                lambda: w.write_raw(encode_samples([b]), 1),
                lambda: w.write_raw(memoryview(encode_samples([b])), 1),
                lambda: w.write_raw(b"x" * 512, 1, keys=(long, "z"))):  # trusted keys
        with pytest.raises(DuplicateKeyError) as e:
            bad()
        assert e.value.key == long
    w.write_raw(encode_samples([c, a]), 2, keys=("c", "a"))
    w.write(b)
    w.close()
    assert [s["__key__"] for s in iter_samples(io.BytesIO(out.getvalue()))] == ["a", long, "c", "a", long]
    assert out.getvalue() == encode_samples([a, b, c, a, b]) + bytes(1024)  # nothing of the refused

    with pytest.raises(DuplicateKeyError, match=r"^.*out\.tar: two consecutive output samples have the key 'a'"):
        with SampleWriter(str(tmp_path / "out.tar")) as sink:
            sink.write(a)
            sink.write_raw_parts([encode_samples([c]), encode_samples([a]), encode_samples([a])], 3)
    assert not (tmp_path / "out.tar").exists()
