"""Streaming tar reader: members and WebDataset samples, in constant memory.

Python's ``tarfile`` keeps every header it has seen (about 1 GB per million members) and spends
tens of microseconds per member; this reader keeps nothing but a read buffer, reads in large
chunks, and slices small members out of the buffer without further system calls.

Formats: ustar (with its prefix field), GNU (``././@LongLink`` long names, base-256 sizes), pax
(per-member ``path`` and ``size``; global headers are ignored) and old v7 headers.

End of archive: the first all-zero header block ends the archive, as in Python's tarfile (GNU tar
writes two; one is enough to know). An input that simply stops at a block boundary is accepted
as a complete archive too, as GNU tar does: streams cut by a writer that never finished cannot be
told from archives written without end blocks. What follows the end of the archive is read and
discarded so that compressed streams are checked to their end; if it holds anything but zeros a
warning says so. A stream cut inside a header or inside a member (data or padding) is an error.
"""

import warnings
import zlib

from tarproc.errors import FormatError, UnsafeNameError

from .compress import open_decompressed
from .names import is_meta_name, split_name, unsafe_reason

__all__ = ["iter_members", "iter_samples", "TarioWarning"]

_CHUNK = 1 << 20  # bytes asked of the underlying stream per read
_MAX_META = 16 << 20  # largest pax / GNU long-name header accepted
_MAX_WARNINGS = 10  # per stream and kind, then one "further ... not reported" warning

_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = {  # types without data blocks (POSIX), skipped
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": None,  # directory: skipped silently
    b"6": "fifo",
}
_POSIX_MAGIC = b"ustar\x00"
_ZERO_BLOCK = bytes(512)


class TarioWarning(UserWarning):
    """Something in a tar stream was skipped or looks wrong, but reading went on."""


def _warn(message):
    warnings.warn(message, TarioWarning, stacklevel=3)


def _octal(field):
    """The number in a tar numeric field (octal text, or GNU base-256); None if malformed."""
    if field[0] & 0x80:
        if field[0] == 0xFF:  # negative base-256
            return None
        return int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
    nul = field.find(0)
    if nul >= 0:
        field = field[:nul]
    field = field.strip()
    if not field:
        return 0
    try:
        return int(field, 8)
    except ValueError:
        return None


def _checksum_ok(block):
    """True if the header checksum matches (unsigned sum, or signed as some old tars wrote)."""
    # Fast exact unsigned sum without a Python-level loop: the byte sum is known modulo 65521
    # (adler32's low half) and modulo 255 (a base-256 number modulo 255); their product exceeds
    # any possible sum, so the two residues determine it (Chinese remainder theorem).
    field = sum(block[148:156])
    a = ((zlib.adler32(block) & 0xFFFF) - 1 - field + 256) % 65521
    b = (int.from_bytes(block, "little") - field + 256) % 255
    unsigned = a + 65521 * (((b - a) * 91) % 255)  # 91 is the inverse of 65521 modulo 255
    stored_field = block[148:156]
    if stored_field == b"%06o\x00 " % unsigned:
        return True
    stored = _octal(stored_field)
    if stored is None:
        return False
    if unsigned == stored:
        return True
    signed = unsigned - 256 * sum(1 for c in block[:148] + block[156:] if c >= 128)
    return signed == stored


def _parse_pax(data, url, offset):
    """The records of a pax extended header as a dict of str to bytes values."""
    records = {}
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:  # some writers pad with NULs
            break
        space = data.find(b" ", pos, pos + 24)
        try:
            length = int(data[pos:space]) if space > pos else -1
        except ValueError:
            length = -1
        if length <= 0 or pos + length > n or data[pos + length - 1] != 0x0A:
            raise FormatError(f"{url}: malformed pax header at offset {offset}")
        record = data[space + 1 : pos + length - 1]
        eq = record.find(b"=")
        if eq <= 0:
            raise FormatError(f"{url}: malformed pax record at offset {offset}")
        records[record[:eq].decode("utf-8", "surrogateescape")] = record[eq + 1 :]
        pos += length
    return records


def _decode(raw):
    return raw.decode("utf-8", "surrogateescape")


def iter_members(fileobj, url="-", max_member_size=None, *, unsafe="error"):
    """Yield ``(name, data)`` for every regular file in a tar stream, in archive order.

    ``fileobj`` is any readable binary stream (never seeked); compression is detected from its
    first bytes. Directories are skipped silently; links, devices, fifos and unknown member types
    are skipped with a TarioWarning naming member and ``url``, and never followed. A member name
    that is absolute, has a ``..`` component or control characters raises UnsafeNameError, or
    with ``unsafe="skip"`` is skipped with a warning. A damaged or truncated stream, or a member
    larger than ``max_member_size`` bytes, raises FormatError naming ``url``, the member and the
    byte offset (in the uncompressed stream) of its header.
    """
    if unsafe not in ("error", "skip"):
        raise ValueError(f"unsafe must be 'error' or 'skip', not {unsafe!r}")
    stream = open_decompressed(fileobj, url)
    read = stream.read
    readinto = getattr(stream, "readinto", None)
    # Chunks are read into two reused buffers in turn (the previous one may still hold the
    # start of a member that straddles chunks): no allocation, no fresh pages per chunk.
    spare = (bytearray(_CHUNK), bytearray(_CHUNK)) if readinto is not None else None
    flip = 0
    buf = memoryview(b"")  # the current chunk of the stream
    pos = 0  # read position in buf
    base = 0  # stream offset of buf[0]
    eof = False
    last = None  # name of the last member read, for error messages
    long_name = None
    pax = None
    nwarn = 0

    def take(n, keep=True):
        """The next n bytes of the stream as bytes (fewer at its end); or, with keep=False,
        skip them and return how many there were.

        Copies only the bytes asked for: a member that straddles two chunks is joined from
        views of both, and the new chunk becomes the current one.
        """
        nonlocal buf, pos, base, eof, flip
        have = len(buf) - pos
        if have >= n:
            pos += n
            return buf[pos - n : pos].tobytes() if keep else n
        parts = [buf[pos:]] if (have and keep) else []
        base += len(buf)
        buf, pos = memoryview(b""), 0
        first = True
        while have < n and not eof:
            want = n - have
            if first and spare is not None and want <= _CHUNK:
                chunk = spare[flip]
                flip ^= 1
                got = readinto(chunk)
                chunk = memoryview(chunk)[:got] if got else None
            else:
                # Later reads of the same take get fresh memory: both buffers may be in use.
                chunk = read(want if want > _CHUNK else _CHUNK)
                chunk = memoryview(chunk) if chunk else None
            first = False
            if chunk is None:
                eof = True
                break
            if len(chunk) > want:
                if keep:
                    parts.append(chunk[:want])
                buf, pos = chunk, want
                have = n
                break
            if keep:
                parts.append(chunk)
            have += len(chunk)
            base += len(chunk)
        if not keep:
            return have
        return b"".join(parts)

    def where(offset, name=None):
        if name is not None:
            return f"{url}: member {name!r} at offset {offset}"
        if last is None:
            return f"{url}: at offset {offset}"
        return f"{url}: at offset {offset} (after member {last!r})"

    while True:
        # --- header block ---
        offset = base + pos
        if len(buf) - pos >= 512:
            block = buf[pos : pos + 512].tobytes()
            pos += 512
        else:
            block = take(512)
            if len(block) < 512:
                if not block:
                    if long_name is not None or pax is not None:
                        raise FormatError(
                            f"{where(offset)}: truncated archive: extended header without its member"
                        )
                    return
                if offset == 0:
                    raise FormatError(
                        f"{url}: not a tar archive ({len(block)} bytes, shorter than one tar header)"
                    )
                raise FormatError(f"{where(offset)}: truncated archive: the stream ends inside a header")
        if block == _ZERO_BLOCK:
            break
        if not _checksum_ok(block):
            if offset == 0:
                raise FormatError(f"{url}: not a tar archive (no valid tar header at offset 0)")
            raise FormatError(f"{where(offset)}: bad tar header checksum")
        typeflag = block[156:157]

        # --- name ---
        if long_name is not None:
            name = long_name
            long_name = None
        else:
            nul = block.find(0, 0, 100)
            raw = block[:nul] if nul >= 0 else block[:100]
            if block[345] != 0 and block[257:263] == _POSIX_MAGIC:
                prefix = block[345:500]
                nul = prefix.find(0)
                if nul >= 0:
                    prefix = prefix[:nul]
                raw = prefix + b"/" + raw
            name = _decode(raw)

        # --- size ---
        size = None
        if block[135] in (0, 32):
            try:
                size = int(block[124:135], 8)
            except ValueError:
                pass
        if size is None:
            size = _octal(block[124:136])
        if size is None or size < 0:
            raise FormatError(f"{where(offset, name)}: invalid size field")
        sparse = False
        if pax is not None:
            if "path" in pax:
                name = _decode(pax["path"])
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    size = -1
                if size < 0:
                    raise FormatError(f"{where(offset, name)}: invalid pax size")
            sparse = "GNU.sparse.major" in pax or "GNU.sparse.size" in pax or "GNU.sparse.map" in pax
            pax = None

        # --- what kind of member ---
        skip = None  # None: yield it; else why it is skipped
        meta = False
        if typeflag in _REGULAR:
            if sparse:
                skip = "GNU sparse file (not supported)"
        elif typeflag in _NO_DATA:
            kind = _NO_DATA[typeflag]
            if kind is not None:
                nwarn += 1
                if nwarn <= _MAX_WARNINGS:
                    _warn(f"{where(offset, name)}: skipping {kind} (links and special files are never followed)")
                elif nwarn == _MAX_WARNINGS + 1:
                    _warn(f"{url}: further skipped members are not reported")
            continue
        elif typeflag in (b"L", b"K", b"x", b"X", b"g"):
            meta = True
            if size > _MAX_META:
                raise FormatError(f"{where(offset)}: extended header of {size} bytes is too large")
        else:
            skip = f"unsupported member type {typeflag!r}"
        if skip is None and not meta:
            if max_member_size is not None and size > max_member_size:
                raise FormatError(
                    f"{where(offset, name)}: member of {size} bytes exceeds the limit of {max_member_size} bytes"
                )
            reason = None
            if name[:1] in ("/", "") or ".." in name or not name.isprintable():
                reason = unsafe_reason(name)
            if reason is not None:
                if unsafe == "error":
                    raise UnsafeNameError(f"{where(offset, name)}: unsafe member name ({reason})")
                skip = f"unsafe member name ({reason})"

        # --- data ---
        padded = (size + 511) & ~511
        if skip is not None:
            nwarn += 1
            if nwarn <= _MAX_WARNINGS:
                _warn(f"{where(offset, name)}: skipping {skip}")
            elif nwarn == _MAX_WARNINGS + 1:
                _warn(f"{url}: further skipped members are not reported")
            if len(buf) - pos >= padded:
                pos += padded
            elif take(padded, keep=False) < padded:
                raise FormatError(f"{where(offset, name)}: truncated archive: the stream ends inside the member")
            continue
        if len(buf) - pos >= padded:
            data = buf[pos : pos + size].tobytes()
            pos += padded
        else:
            data = take(size)
            pad = padded - size
            if len(data) < size or (pad and take(pad, keep=False) < pad):
                raise FormatError(f"{where(offset, name)}: truncated archive: the stream ends inside the member")

        if meta:
            if typeflag == b"L":
                nul = data.find(0)
                long_name = _decode(data[:nul] if nul >= 0 else data)
            elif typeflag in (b"x", b"X"):
                pax = _parse_pax(data, url, offset)
            # "K" (long link target) and "g" (global pax header) are not needed.
            continue
        last = name
        yield name, data

    # --- end of archive: check the rest of the stream is only padding ---
    trailing = bool(buf[pos:].tobytes().strip(b"\0"))
    while not eof:
        data = read(_CHUNK)
        if not data:
            break
        if not trailing and data.strip(b"\0"):
            trailing = True
    if trailing:
        _warn(f"{url}: data after the end-of-archive block ignored")


def iter_samples(fileobj, url="-", *, strict=False, max_member_size=None, unsafe="error"):
    """Yield WebDataset samples from a tar stream: dicts of ``__key__``, ``__url__`` and one
    ``bytes`` value per extension.

    Members are grouped exactly as WebDataset groups them: the key is the member path up to the
    first dot of its basename, the extension the rest, and consecutive members with the same key
    form one sample. Differences, all deliberate: extensions keep their case (WebDataset lowers
    it) so that a copy is an identity; members without an extension are skipped with a warning
    instead of silently; ``__name__``-style metadata members are skipped silently as WebDataset
    does. A key that comes back after other keys (a sample split in two places) gives a
    TarioWarning naming key and ``url`` and is yielded as a second sample, or with ``strict=True``
    raises FormatError. The same extension twice within one sample raises FormatError (as
    WebDataset raises), since silently keeping either value would lose data.

    Memory: apart from the read buffer, about 16 bytes per distinct key, to notice split samples.
    """
    sample = None
    key = None
    seen = _SeenKeys()
    nsplit = 0
    nnokey = 0
    for name, data in iter_members(fileobj, url, max_member_size, unsafe=unsafe):
        if name[:2] == "__" and is_meta_name(name):
            continue
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot > slash + 1:
            k = name[:dot]
            ext = name[dot + 1 :]
        else:
            k, ext = split_name(name)
        if k is None:
            nnokey += 1
            if nnokey <= _MAX_WARNINGS:
                _warn(f"{url}: skipping member {name!r}: no extension, so it belongs to no sample")
            elif nnokey == _MAX_WARNINGS + 1:
                _warn(f"{url}: further members without extension are not reported")
            continue
        if k != key:
            if sample is not None:
                yield sample
            if seen.add(k):
                if strict:
                    raise FormatError(
                        f"{url}: sample {k!r} is split: its members are not consecutive (member {name!r})"
                    )
                nsplit += 1
                if nsplit <= _MAX_WARNINGS:
                    _warn(
                        f"{url}: sample {k!r} is split: its members are not consecutive; "
                        f"reading member {name!r} as a separate sample"
                    )
                elif nsplit == _MAX_WARNINGS + 1:
                    _warn(f"{url}: further split samples are not reported")
            key = k
            sample = {"__key__": k, "__url__": url}
        if ext in sample:
            raise FormatError(f"{url}: sample {k!r} has extension {ext!r} twice (member {name!r})")
        sample[ext] = data
    if sample is not None:
        yield sample


class _SeenKeys:
    """A set of keys kept as 64-bit hashes in a flat open-addressing table (~16 bytes a key).

    Python's per-process string hash is enough here: the table never leaves the process. Two
    distinct keys with the same 64-bit hash would give a spurious split-sample report; with a
    million keys that has a chance of about 1 in 30 million.
    """

    __slots__ = ("_slots", "_mask", "_count")

    def __init__(self):
        from array import array

        self._slots = array("Q", bytes(8 * 1024))
        self._mask = 1023
        self._count = 0

    def add(self, key):
        """Remember ``key``; True if it was already there."""
        h = (hash(key) & 0xFFFFFFFFFFFFFFFF) or 1
        slots = self._slots
        mask = self._mask
        i = h & mask
        while True:
            v = slots[i]
            if v == 0:
                slots[i] = h
                self._count += 1
                if self._count * 2 > mask:
                    self._grow()
                return False
            if v == h:
                return True
            i = (i + 1) & mask

    def _grow(self):
        from array import array

        old = self._slots
        mask = self._mask * 2 + 1
        slots = array("Q", bytes(8 * (mask + 1)))
        for h in old:
            if h:
                i = h & mask
                while slots[i]:
                    i = (i + 1) & mask
                slots[i] = h
        self._slots = slots
        self._mask = mask

