"""Deterministic tar writer for WebDataset samples.

Plain ustar headers wherever they suffice (ASCII names up to 100 bytes, or up to 256 with the
ustar prefix field, members under 8 GiB), and a pax header only for the members that need one:
webdataset and the original tarproc put a pax header on every member, which doubles the size of
shards of small samples. Owner, group, mode and mtime are fixed, members of a sample are written
in sorted extension order, and compressed output carries no timestamp, so the same samples always
give byte-identical archives.

Speed: values of 64 KiB and more are never joined to other bytes (on a plain file, one writev
writes them with what is pending), and a sample ``iter_samples`` yielded, written unchanged, keeps
the member headers it was read with when they are exactly those this writer makes (mtime 0).
"""

import io
import os
import struct
from operator import is_

from tarproc.errors import DuplicateKeyError, UnsafeNameError

from .compress import make_compressor
from .names import split_name, unsafe_reason
from .reader import _header_name, _header_size, _last_plain, _last_read, _parse_pax

__all__ = ["TarWriter", "encode_samples", "first_key", "raw_keys", "chain_keys"]

_FLUSH = 1 << 20  # buffered output before a write to the file object
_BIG = 1 << 16  # values at least this large are passed through without joining
_PADS = [bytes(n) for n in range(512)]  # padding of n zero bytes, made once
_MAX_OCTAL_SIZE = 8**11  # an 11-digit octal size field holds sizes below 8 GiB

_MODE_UID_GID = b"0000644\x00" + b"0000000\x00" + b"0000000\x00"
# linkname, magic "ustar\0", version "00", uname, gname, devmajor, devminor
_AFTER_TYPE = bytes(100) + b"ustar\x0000" + bytes(64) + b"0000000\x00" + b"0000000\x00"
_PAD12 = bytes(12)
_TAIL_REGULAR = b"0" + _AFTER_TYPE + bytes(155) + _PAD12  # typeflag to end, empty prefix
# A plain header: name (NUL-padded), mode/uid/gid, size, mtime, checksum, typeflag to end.
_HEADER = struct.Struct("100s24s12s12s8s356s")
_SMALL = 2048  # values up to this size are packed into one bytes object with header and padding
_member_structs = {}  # padded size -> Struct of a plain header followed by that much data
_EXT_CACHE_MAX = 256  # extensions remembered as checked, per writer
_ORDERS_MAX = 64  # field orders remembered, per writer
_writev = getattr(os, "writev", None)


def _member_struct(padded):
    st = _member_structs[padded] = struct.Struct("100s24s12s12s8s356s%ds" % padded)
    return st


try:
    _IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16


def _writev_all(fd, bufs):
    """Write the buffers ``bufs`` (bytes-like) to ``fd`` in order, all of them: in batches the
    system accepts, resuming after short writes (pipes, signals)."""
    for i in range(0, len(bufs), _IOV_MAX):
        batch = bufs[i : i + _IOV_MAX] if len(bufs) > _IOV_MAX else bufs
        batch = [b if b.__class__ is bytes else memoryview(b).cast("B") for b in batch]
        n = _writev(fd, batch)
        total = sum(map(len, batch))
        while n < total:
            if n <= 0:
                raise OSError(f"write to file descriptor {fd} wrote nothing")
            total -= n
            rest = []
            for b in batch:
                if n >= len(b):
                    n -= len(b)
                    continue
                rest.append(memoryview(b)[n:] if n else b)
                n = 0
            batch = rest
            n = _writev(fd, batch)


class TarWriter:
    """Write samples (dicts) as tar members ``KEY.EXT`` to a binary file object.

    ``compression`` is None, "gz", "bz2", "xz" or "zst" (see ``compression_for_name``); ``level``
    overrides the compression level. ``mtime`` is the modification time stamped on every member.
    ``close()`` (or leaving a ``with`` block) ends the archive and flushes the compressor but
    leaves ``fileobj`` open: whoever opened it commits or closes it.

    A sample with the key of the sample written just before it raises DuplicateKeyError and
    writes nothing: readers group consecutive members by key, so the two would read back as
    one (webdataset fails on it). ``last_key`` is the key of the last sample written.
    """

    def __init__(self, fileobj, compression=None, *, mtime=0, level=None):
        mtime = int(mtime)
        if not 0 <= mtime < 8**11:
            raise ValueError(f"mtime {mtime} does not fit a tar header")
        self._fileobj = fileobj
        self._compressor = None if compression is None else make_compressor(compression, level)
        # Large values go to a plain file's descriptor with writev, next to what is pending,
        # without being joined to it or copied into a buffer. Only for the exact io classes
        # of open(): a subclass or wrapper may do anything in its write.
        self._fd = None
        if self._compressor is None and _writev is not None:
            tf = type(fileobj)
            try:
                if (tf is io.FileIO or (tf is io.BufferedWriter and type(fileobj.raw) is io.FileIO)) and fileobj.writable():
                    self._fd = fileobj.fileno()
            except (OSError, ValueError):  # closed or detached: the plain path reports it
                pass
        self._exts = {}  # ext -> (UTF-8 bytes, their byte sum) of checked plain ASCII extensions
        self._orders = {}  # a sample's keys (tuple, in dict order) -> its extensions, sorted
        self._parts = []
        self._pending = 0
        self._vector = False  # _parts holds large values to write with writev (see _big)
        self._closed = False
        self._mtime_field = b"%011o\x00" % mtime
        self._mid = _MODE_UID_GID
        # Header checksum of everything but name, prefix and size, with the checksum field
        # counted as spaces.
        self._const_sum = {
            t: sum(_MODE_UID_GID) + sum(self._mtime_field) + 8 * 32 + t[0] + sum(_AFTER_TYPE)
            for t in (b"0", b"x")
        }
        self._const0 = self._const_sum[b"0"]
        self._mtime0 = mtime == 0  # headers as the reader's plain ones (see write)
        self.samples = 0  #: samples written so far
        self.last_key = None  #: key of the last sample written (None before the first)
        self.members = 0  #: members written so far (pax headers not counted)
        self.bytes = 0  #: uncompressed bytes of tar stream produced so far

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write(self, sample):
        """Write one sample: a member ``KEY.EXT`` for each field not starting with ``__``.

        Values must be bytes-like or str (written as UTF-8). Raises ValueError for a missing or
        unusable key or extension (one that would not read back as the same sample),
        UnsafeNameError for names that could escape a directory, TypeError for other values;
        then nothing of the sample is written. A sample without fields writes nothing and is
        not counted (nor is its key: what comes next is judged against the last key written).
        """
        if self._closed:
            raise ValueError("write to a closed TarWriter")
        known = _last_read[0]
        if (
            known is not None
            and (known[0] is sample or sample.__class__ is dict)  # or a copy of it (htmapper's)
            and self._mtime0
            and len(sample) == len(known[1])
            and all(map(is_, sample, known[1]))
            and all(map(is_, sample.values(), known[2]))
        ):
            # A sample iter_samples yielded (or a copy), unchanged: the same key and value objects
            # in the same order. Its members' headers, as they were read,
            # are exactly those this writer would make; the same bytes, flushed alike.
            values = known[2]  # key, url, then the members' data in order
            if values[0] == self.last_key:
                raise _duplicate(values[0])
            self.last_key = values[0]
            parts = self._parts
            vector = self._fd is not None
            added = 0
            i = 2
            for block in known[3]:
                value = values[i]
                i += 1
                size = len(value)
                pad = -size & 511
                parts.append(block)
                if size >= _BIG and not vector:
                    self._big(value, pad)
                    parts = self._parts
                    self.bytes += 512 + size + pad
                    self.members += 1
                    continue
                parts.append(value)
                if pad:
                    parts.append(_PADS[pad])
                if size >= _BIG:
                    self._vector = True
                added += 512 + size + pad
                self.members += 1
            self._end_sample(added)
            return
        key = sample.get("__key__")
        if not isinstance(key, str) or not key:
            raise ValueError(f"sample has no usable __key__: {key!r}")
        slash = key.rfind("/")
        if slash == len(key) - 1 or key.find(".", slash + 1) >= 0:
            raise ValueError(
                f"key {key!r}: the part after the last '/' must be non-empty and have no '.', "
                "or the members would not read back as this sample"
            )
        # Printable ASCII without ".." and a leading "/" is safe; anything else is checked fully.
        if not (key.isascii() and key.isprintable()) or ".." in key or key[0] == "/":
            reason = unsafe_reason(key)
            if reason is not None:
                raise UnsafeNameError(f"key {key!r}: unsafe member name ({reason})")
        # With a key like that, "KEY.EXT" splits back into KEY and EXT for any EXT without '/',
        # and is safe if KEY is and EXT has no control characters.
        # The extensions in sorted order. Samples read from one shard mostly have the same keys
        # in the same order, so the order is remembered, keyed by the dict's keys in order.
        values = sample
        names = tuple(sample) if sample.__class__ is dict else None
        order = None if names is None else self._orders.get(names)
        if order is None:
            fields = [(k, v) for k, v in sample.items() if k[:2] != "__"]
            fields.sort()
            order = tuple([k for k, _ in fields])
            if names is None:
                values = dict(fields)  # what items() gave, whatever the mapping's [] gives
            elif all(k.__class__ is str for k in names):
                if len(self._orders) >= _ORDERS_MAX:
                    self._orders.clear()
                self._orders[names] = order
        try:
            key_raw = key.encode("utf-8") + b"."
        except UnicodeEncodeError:
            raise ValueError(f"key {key!r} is not valid Unicode text") from None
        exts = self._exts
        # Every field is checked (and made bytes) before any member is written: a sample
        # refused half-way would leave its first fields behind, to read back as a sample.
        fields = []
        for ext in order:
            value = values[ext]
            if ext not in exts:
                if "/" in ext:
                    raise ValueError(f"key {key!r}: extension {ext!r} contains '/'")
                if not ext.isprintable() and unsafe_reason(ext) is not None:
                    raise UnsafeNameError(f"key {key!r}: unsafe extension {ext!r} ({unsafe_reason(ext)})")
            tv = type(value)
            if tv is not bytes:
                if tv is str:
                    try:
                        value = value.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ValueError(f"key {key!r}: value of {ext!r} is not valid Unicode text") from None
                elif tv is bytearray:
                    value = bytes(value)
                elif tv is memoryview:
                    value = value.tobytes()
                else:
                    raise TypeError(
                        f"key {key!r}: value of {ext!r} is {tv.__name__}, not bytes or str"
                    )
            fields.append((ext, value))
        if not fields:
            return
        if key == self.last_key:
            raise _duplicate(key)
        parts = self._parts
        const = self._const0 + sum(key_raw)
        room = 100 - len(key_raw) if key_raw.isascii() else -1  # longest extension of a plain name
        mid = self._mid
        mtime_field = self._mtime_field
        vector = self._fd is not None
        added = 0
        for ext, value in fields:
            known = exts.get(ext)
            size = len(value)
            if known is None:
                ext_raw = ext.encode("utf-8", "surrogatepass")
                if ext_raw.isascii() and ext.__class__ is str:
                    if len(exts) >= _EXT_CACHE_MAX:
                        exts.clear()
                    known = exts[ext] = (ext_raw, sum(ext_raw))
                else:
                    self._add(f"{key}.{ext}", value)
                    parts = self._parts  # _add may have flushed: it starts a new list
                    continue
            ext_raw, ext_sum = known
            if len(ext_raw) > room or size >= _MAX_OCTAL_SIZE:
                self._add(f"{key}.{ext}", value)
                parts = self._parts
                continue
            # The common case, inline: a plain ustar header.
            size_field = b"%011o\x00" % size
            checksum = b"%06o\x00 " % (const + ext_sum + sum(size_field))
            pad = -size & 511
            if size <= _SMALL:
                # header, value and padding as one bytes object
                st = _member_structs.get(size + pad) or _member_struct(size + pad)
                parts.append(st.pack(key_raw + ext_raw, mid, size_field, mtime_field, checksum, _TAIL_REGULAR, value))
            else:
                parts.append(_HEADER.pack(key_raw + ext_raw, mid, size_field, mtime_field, checksum, _TAIL_REGULAR))
                if size >= _BIG and not vector:
                    self._big(value, pad)
                    parts = self._parts
                    self.bytes += 512 + size + pad
                    self.members += 1
                    continue
                # A large value on a plain file is kept by reference for writev: see _big.
                parts.append(value)
                if pad:
                    parts.append(_PADS[pad])
                if size >= _BIG:
                    self._vector = True
            added += 512 + size + pad
            self.members += 1
        self.last_key = key
        self._end_sample(added)

    def _end_sample(self, added):
        """Count a sample whose members added ``added`` bytes to the buffer; flush when full."""
        self.samples += 1
        if added:
            self.bytes += added
            self._pending += added
            if self._pending >= _FLUSH:
                self._flush()

    def write_raw(self, data, samples=0, members=0, keys=None):
        """Append tar members already encoded (by ``encode_samples``, or the ``raw`` bytes of
        ``iter_raw_samples``): whole 512-byte blocks, no end-of-archive blocks. They are
        compressed like everything else; ``samples`` and ``members`` are added to the counts.

        ``keys``: ``(first, last)``, the keys of the first and the last sample in ``data``, from
        a caller that knows them and that no two consecutive samples in it share a key (as
        ``encode_samples`` ensures); else ``raw_keys`` reads them in the headers.
        """
        if self._closed:
            raise ValueError("write to a closed TarWriter")
        n = len(data)
        if n & 511:
            raise ValueError(f"raw tar data of {n} bytes is not a whole number of 512-byte blocks")
        if n:
            first, last = keys if keys is not None else raw_keys(data)
            if first is not None:
                if first == self.last_key:
                    raise _duplicate(first)
                self.last_key = last
        self.samples += samples
        self.members += members
        if not n:
            return
        self.bytes += n
        if n >= _BIG:
            self._big(data, 0)
            return
        self._parts.append(data)
        self._pending += n
        if self._pending >= _FLUSH:
            self._flush()

    def _add(self, name, data):
        try:
            raw = name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"member name {name!r} is not valid Unicode text") from None
        size = len(data)
        parts = self._parts
        if size < _MAX_OCTAL_SIZE and raw.isascii() and len(raw) <= 100:
            parts.append(self._header(raw, b"", size, b"0"))
        else:
            split = self._ustar_split(raw) if (size < _MAX_OCTAL_SIZE and raw.isascii()) else None
            if split is not None:
                parts.append(self._header(split[1], split[0], size, b"0"))
            else:
                records = _pax_record("path", raw)
                if size >= _MAX_OCTAL_SIZE:
                    records += _pax_record("size", str(size).encode())
                self._write_pax(records)
                short = raw.decode("utf-8").encode("ascii", "replace")[-100:]
                parts.append(self._header(short, b"", size if size < _MAX_OCTAL_SIZE else 0, b"0"))
        pad = -size & 511
        if size >= _BIG:
            self._big(data, pad)
        else:
            parts.append(data)
            if pad:
                parts.append(_PADS[pad])
            self._pending += 512 + size + pad
        self.bytes += 512 + size + pad
        self.members += 1
        if self._pending >= _FLUSH:
            self._flush()

    @staticmethod
    def _ustar_split(raw):
        """(prefix, name) fitting the ustar fields (155 + 100 bytes), or None."""
        if len(raw) > 256:
            return None
        i = raw.rfind(b"/", 0, 156)
        if i <= 0 or not 0 < len(raw) - i - 1 <= 100:
            return None
        return raw[:i], raw[i + 1 :]

    def _header(self, name, prefix, size, typeflag):
        size_field = b"%011o\x00" % size
        chksum = self._const_sum[typeflag] + sum(name) + sum(prefix) + sum(size_field)
        return b"".join(
            (
                name.ljust(100, b"\x00"),
                _MODE_UID_GID,
                size_field,
                self._mtime_field,
                b"%06o\x00 " % chksum,
                typeflag,
                _AFTER_TYPE,
                prefix.ljust(155, b"\x00"),
                _PAD12,
            )
        )

    def _write_pax(self, records):
        header = self._header(b"././@PaxHeader", b"", len(records), b"x")
        pad = -len(records) & 511
        self._parts += (header, records, _PADS[pad])
        self._pending += 512 + len(records) + pad
        self.bytes += 512 + len(records) + pad

    def _big(self, data, pad):
        """Add ``data`` (large) and ``pad`` zero bytes after what is pending, without joining
        ``data`` to anything: on a plain file, kept by reference for one writev of all that is
        pending (bytes only: they cannot change meanwhile); else written at once, separately."""
        if self._fd is None or data.__class__ is not bytes:
            self._flush()
            self._emit(data)
            if pad:
                self._parts.append(_PADS[pad])
            self._pending += pad
            return
        parts = self._parts
        parts.append(data)
        if pad:
            parts.append(_PADS[pad])
        self._vector = True
        self._pending += len(data) + pad
        if self._pending >= _FLUSH:
            self._flush()

    def _emit(self, data):
        if self._compressor is not None:
            data = self._compressor.compress(data)
            if not data:
                return
        self._fileobj.write(data)

    def _flush(self):
        if self._vector:  # large values among the parts: one writev, no join
            self._vector = False
            parts = self._parts
            self._parts = []
            self._pending = 0
            self._fileobj.flush()  # what it buffered goes first (and a closed file raises here)
            _writev_all(self._fd, parts)
            return
        if self._parts:
            data = b"".join(self._parts)
            self._parts = []
            self._pending = 0
            self._emit(data)

    def close(self):
        """End the archive (two zero blocks), finish compression, flush; the file stays open."""
        if self._closed:
            return
        self._closed = True
        self._parts.append(bytes(1024))
        self.bytes += 1024
        self._flush()
        if self._compressor is not None:
            tail = self._compressor.flush()
            if tail:
                self._fileobj.write(tail)
        flush = getattr(self._fileobj, "flush", None)
        if flush is not None:
            flush()


def _pax_record(key, value):
    """One pax record ``"LEN key=value\\n"``, LEN counting its own digits."""
    payload = b" " + key.encode() + b"=" + value + b"\n"
    n = len(payload)
    length = n + len(str(n))
    if len(str(length)) != len(str(n)):
        length = n + len(str(length))
    return b"%d" % length + payload


def _duplicate(key):
    return DuplicateKeyError(
        f"two consecutive output samples have the key {key!r}: readers (webdataset, tarproc) "
        "would take them for one sample; give each its own key", key)


def _member_keys(data):
    """The key of each member in ``data``, tar members as ``TarWriter`` writes them (whole
    blocks, no end-of-archive), from the headers alone."""
    n = len(data)
    pos = 0
    pax = None
    while pos < n:
        header = bytes(data[pos : pos + 512])
        size = _header_size(header, 0) if len(header) == 512 else None
        if size is None:
            raise ValueError(f"raw tar data: no member header at offset {pos}")
        body = pos + 512
        if header[156] == 0x78:  # "x": a pax header, for the next member
            pax = _parse_pax(bytes(data[body : body + size]), "<raw>", pos)
        else:
            if pax is not None and "path" in pax:
                name = pax["path"].decode("utf-8", "surrogateescape")
            else:
                name = _header_name(header, 0)
            pax = None
            key = split_name(name)[0]  # as readers group members into samples
            yield name if key is None else key
        pos = body + size + (-size & 511)


def first_key(data):
    """The key of the first member in raw tar data (see ``raw_keys``); None if it holds none."""
    return next(_member_keys(data), None)


def raw_keys(data):
    """``(first, last)``: the keys of the first and the last member in ``data``, tar members as
    ``TarWriter`` writes them; ``(None, None)`` if it holds none. Reads every header, a few
    microseconds a member: for raw data whose keys its writer did not pass on. (Two
    consecutive samples with one key cannot be told from one sample here: the writer that
    encoded them refuses those.)"""
    first = last = None
    for last in _member_keys(data):
        if first is None:
            first = last
    return first, last


def chain_keys(parts):
    """``(first, last)`` keys of the raw tar data ``parts`` (see ``raw_keys``) written one after
    the other; raises DuplicateKeyError if one part starts with the key another ends with."""
    first = last = None
    for part in parts:
        a, b = raw_keys(part)
        if a is None:
            continue
        if a == last:
            raise _duplicate(a)
        if first is None:
            first = a
        last = b
    return first, last


class _Collector:
    """A file object that keeps what is written, for ``encode_samples``."""

    __slots__ = ("parts",)

    def __init__(self):
        self.parts = []

    def write(self, data):
        self.parts.append(data)


def _same_sample(sample, key, fields):
    """True if TarWriter writes ``sample`` as the sample of ``key`` and ``fields`` (ext: bytes)."""
    if sample.__class__ is not dict or sample.get("__key__") != key:
        return False
    n = 0
    for k, v in sample.items():
        if k.__class__ is not str:
            return False
        if k[:2] == "__":
            continue
        w = fields.get(k)
        if w is None or (v is not w and (v.__class__ is not bytes or v != w)):
            return False
        n += 1
    return n == len(fields)


_encoders = {}  # mtime -> (TarWriter, _Collector), reused: workers encode many small batches


def encode_samples(samples, *, mtime=0):
    """The tar members ``TarWriter`` writes for ``samples`` (an iterable of dicts), as bytes
    without end-of-archive blocks: what ``TarWriter.write_raw`` appends.

    ``TarWriter.write_raw(encode_samples(s))`` gives the very bytes of ``TarWriter.write`` for
    each sample of ``s``; errors are those of ``TarWriter.write``.
    """
    if mtime == 0 and samples.__class__ is list and len(samples) == 1:
        known = _last_plain[0]
        if known is not None and _same_sample(samples[0], known[0], known[1]):
            return known[2]
    pair = _encoders.get(mtime)
    if pair is None:
        sink = _Collector()
        pair = _encoders[mtime] = (TarWriter(sink, mtime=mtime), sink)
    writer, sink = pair
    writer.last_key = None
    try:
        for sample in samples:
            writer.write(sample)
        writer._flush()
    except BaseException:
        writer._parts = []
        writer._pending = 0
        sink.parts = []
        raise
    parts = sink.parts
    if not parts:
        return b""
    sink.parts = []
    return parts[0] if len(parts) == 1 else b"".join(parts)
