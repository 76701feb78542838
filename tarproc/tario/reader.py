"""Streaming tar reader: members and WebDataset samples, in constant memory.

Python's ``tarfile`` keeps every header it has seen (about 1 GB per million members) and spends
tens of microseconds per member; this reader keeps nothing but a read buffer, reads in large
chunks, and slices small members out of the buffer without further system calls. Large members
(64 KiB and more) are read by the stream straight into the bytes objects it yields.

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

__all__ = ["iter_members", "iter_samples", "iter_raw_samples", "decode_raw_sample", "TarioWarning",
           "iter_chunks", "iter_chunk_samples", "StreamState"]

_CHUNK = 1 << 20  # bytes asked of the underlying stream per read
_BIG = 1 << 16  # members at least this large are read straight into their own bytes object
_DIRECT_RUN = 16  # after a large member, this many smaller ones at most are read in direct mode
_AHEAD_MAX = 16 << 10  # read-ahead after a large member in direct mode, at most
_EMPTY = b""  # an empty buffer
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


def _warn(message, stacklevel=3):
    warnings.warn(message, TarioWarning, stacklevel=stacklevel)


def _raise_warning(message, stacklevel=None):
    raise TarioWarning(message)


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


_adler32 = zlib.adler32


def _checksum_ok(block):
    """True if the header checksum matches (unsigned sum, or signed as some old tars wrote)."""
    # Fast exact unsigned sum without a Python-level loop: adler32's low half is 1 + the byte
    # sum modulo 65521, exact for pieces of at most 256 bytes (256 * 255 < 65520). The
    # checksum field itself counts as eight spaces (8 * 32 = 256; 256 - 3 for the three 1s).
    unsigned = (_adler32(block[:148]) & 0xFFFF) + (_adler32(block[156:400]) & 0xFFFF) + (_adler32(block[400:512]) & 0xFFFF) + 253
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


def _trailing_data(rest, read, eof):
    """True if what follows the end-of-archive block, ``rest`` and then (unless ``eof``) all
    that ``read`` gives, holds anything but zeros; reads the stream to its end (so that a
    compressed stream is checked to its end)."""
    trailing = bool(bytes(rest).strip(b"\0"))
    while not eof:
        data = read(_CHUNK)
        if not data:
            break
        if not trailing and data.strip(b"\0"):
            trailing = True
    return trailing


def _read_until(read, parts, have, n, step):
    """Append what ``read`` gives (``step`` bytes at least at a time) to ``parts`` until
    ``have`` bytes become ``n`` or the stream ends: ``(have, ended)``."""
    while have < n:
        data = read(max(n - have, step))
        if not data:
            return have, True
        parts.append(data)
        have += len(data)
    return have, False


def _header_name(buf, pos):
    """The name field of the header at ``buf[pos:]``, with its ustar prefix, as a str."""
    nul = buf.find(0, pos, pos + 100)
    raw = buf[pos:nul] if nul >= 0 else buf[pos : pos + 100]
    if buf[pos + 345] != 0 and buf.startswith(_POSIX_MAGIC, pos + 257):
        prefix = buf[pos + 345 : pos + 500]
        nul = prefix.find(0)
        if nul >= 0:
            prefix = prefix[:nul]
        raw = prefix + b"/" + raw
    return raw.decode("utf-8", "surrogateescape")


def _header_size(buf, pos):
    """The size field of the header at ``buf[pos:]`` (octal or base-256); None if malformed."""
    if buf[pos + 135] in (0, 32):
        try:
            return int(buf[pos + 124 : pos + 135], 8)
        except ValueError:
            pass
    return _octal(buf[pos + 124 : pos + 136])


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
    yield from _members(
        stream.read, getattr(stream, "readinto", None), url, max_member_size, unsafe,
        direct_read=getattr(stream, "direct_read", None),
    )


def _members(read, readinto, url, max_member_size, unsafe, buf=b"", base=0, direct_read=None,
             samples=False, strict=False, state=None):
    """The body of ``iter_members`` on an opened (uncompressed) stream's ``read``/``readinto``.

    With ``read=None``, parse the tar members held in ``buf`` (bytes-like) alone, reporting
    offsets from ``base``: how workers decode the raw samples of ``iter_raw_samples``.
    ``direct_read()``, if given, returns a faster equivalent of ``read`` once there is one
    (the underlying stream's own, once a prefix is used up), else None. With ``samples=True``
    the members are grouped and the samples yielded: the body of ``iter_samples`` (``strict``
    is its argument), in one generator rather than two for speed. ``state`` (a StreamState,
    with ``samples=True``) is what the stream before ``buf`` left, and is brought up to date
    when the members end: a stream read in pieces reports as one read at once.
    """
    # Chunks are read into two reused buffers in turn (the previous one may still hold the
    # start of a member that straddles chunks): no allocation, no fresh pages per chunk.
    # Large members are the exception: copying them out of a chunk costs about as much again
    # as reading them. So after a large member ("direct" mode, left after _DIRECT_RUN smaller
    # members in a row) the stream is read no further than the parser needs: a large member's
    # data is read by the stream straight into the bytes object that is yielded, then its
    # padding and the next header; a small member's data with its padding and the next header.
    # The underlying stream's own buffering (io.BufferedReader) keeps those reads cheap.
    spare = [None, None] if readinto is not None else None  # allocated when first needed
    flip = 0
    direct = 0  # > 0: direct mode, for at most this many more members smaller than _BIG
    xread = None  # the read of direct mode
    big_end = 0  # stream offset where the last large member (with its padding) ended
    last_gap = 0  # bytes from there to the next large member's data, the last time
    ahead = 512  # bytes to read after a large member's data in direct mode
    # grouping (samples=True)
    sample = None
    key = None
    blocks = None
    whole = state is None  # the whole stream (not a chunk of it): tally what was skipped at its end
    if state is None:
        state = StreamState()
    seen = state.seen
    slots = seen._slots  # seen.add(k), inline (see _SeenKeys.add)
    mask = seen._mask
    nseen = seen._count
    nsplit = state.nsplit
    nnokey = state.nnokey
    limit = (1 << 64) if max_member_size is None else max_member_size  # in the fast lane
    buf = buf if buf.__class__ is bytes else memoryview(buf)  # the current chunk of the stream
    pos = 0  # read position in buf
    eof = read is None
    last = state.last  # name of the last member read, for error messages
    long_name = None
    pax = None
    nwarn = state.nwarn
    warn = state.warn

    def take(n, keep=True):
        """The next n bytes of the stream as bytes (fewer at its end); or, with keep=False,
        skip them and return how many there were.

        Copies only the bytes asked for: a member that straddles two chunks is joined from
        views of both, and the new chunk becomes the current one.
        """
        nonlocal buf, pos, base, eof, flip, xread
        have = len(buf) - pos
        if have >= n:
            pos += n
            return bytes(buf[pos - n : pos]) if keep else n
        parts = [buf[pos:]] if (have and keep) else []
        base += len(buf)
        buf, pos = _EMPTY, 0
        first = True
        if direct:
            # Direct mode: ask for exactly what is missing; a data read that gets it all in one
            # go is returned as it is, without a copy. Skipped bytes are read in bounded pieces.
            if xread is None:
                xread = (direct_read() if direct_read is not None else None) or read
            while have < n and not eof:
                want = n - have
                chunk = xread(want if keep or want <= _CHUNK else _CHUNK)
                if not chunk:
                    eof = True
                    break
                if len(chunk) > want:  # more than asked: keep the rest as the current chunk
                    chunk = memoryview(chunk)
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
            if len(parts) == 1 and parts[0].__class__ is bytes:
                return parts[0]
            return b"".join(parts)
        while have < n and not eof:
            want = n - have
            if first and spare is not None and want <= _CHUNK:
                chunk = spare[flip]
                if chunk is None:
                    chunk = spare[flip] = bytearray(_CHUNK)
                flip ^= 1
                got = readinto(chunk)
                chunk = memoryview(chunk)[:got] if got else None
            else:
                # Later reads of the same take get fresh memory: both buffers may be in use.
                # Skipped bytes are read in bounded pieces, whatever their size.
                chunk = read(want if (want > _CHUNK and keep) else _CHUNK)
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

    def fetch(size, padded, offset, name):
        """The data of the member ``name`` (its header at ``offset``) that starts at pos but
        is not all in buf; its padding is skipped too."""
        nonlocal buf, pos, base, xread
        data = None
        if direct and pos == len(buf) and not eof:
            # Direct mode, with the chunk used up: see above.
            if xread is None:
                xread = (direct_read() if direct_read is not None else None) or read
            base += len(buf)
            buf, pos = _EMPTY, 0
            if size >= _BIG:
                got = xread(size)
                if got.__class__ is bytes and len(got) == size:
                    data = got
                    base += size
                    got = xread(padded - size + ahead)
                if got:
                    buf = got if got.__class__ is bytes else memoryview(got)
            else:
                got = xread(padded + 512)
                if got:
                    buf = got if got.__class__ is bytes else memoryview(got)
        if data is not None:  # a large member read directly; its padding is next
            pad = padded - size
            if pad:
                if len(buf) >= pad:
                    pos = pad
                elif take(pad, keep=False) < pad:
                    raise FormatError(f"{where(offset, name)}: truncated archive: the stream ends inside the member")
        elif len(buf) - pos >= padded:
            data = buf[pos : pos + size]
            if data.__class__ is not bytes:  # buf: bytes, or a view of a chunk
                data = data.tobytes()
            pos += padded
        else:
            data = take(size)
            pad = padded - size
            if len(data) < size or (pad and take(pad, keep=False) < pad):
                raise FormatError(f"{where(offset, name)}: truncated archive: the stream ends inside the member")
        return data

    def where(offset, name=None):
        if name is not None:
            return f"{url}: member {name!r} at offset {offset}"
        if last is None:
            return f"{url}: at offset {offset}"
        return f"{url}: at offset {offset} (after member {last!r})"

    while True:
        # --- fast lane (samples): members with TarWriter's plain headers, safe names ---
        # The common case, in a loop of its own: it takes what the general path below reads
        # the same way and with nothing to report (see the fast path there), and leaves
        # everything else, from the header on, to the general path.
        if samples and long_name is None and pax is None:
            while len(buf) - pos >= 512:
                block = buf[pos : pos + 512]
                if block.__class__ is not bytes:  # buf: bytes, or a view of a chunk
                    block = block.tobytes()
                nul = block.find(0, 0, 100)
                if nul <= 0 or block[135] or not block.endswith(_PLAIN_TAIL):
                    break
                size_field = block[124:135]
                try:
                    size = int(size_field, 8)
                except ValueError:
                    break
                if size < 0 or size > limit or block[148:156] != b"%06o\x00 " % ((_adler32(block[:148]) & 0xFFFF) + _TAIL_REST):
                    break
                name = block[:nul].decode("utf-8", "surrogateescape")
                if name[0] in "/_" or ".." in name or not name.isprintable():
                    break  # unsafe, or __meta__ perhaps: the general path decides
                slash = name.rfind("/")
                dot = name.find(".", slash + 1)
                if dot <= slash + 1:
                    break
                k = name[:dot]
                ext = name[dot + 1 :]
                if k == key:
                    if ext in sample:
                        break
                else:
                    h = hash(k) or 1
                    i = h & mask
                    v = slots[i]
                    while v and v != h:
                        i = (i + 1) & mask
                        v = slots[i]
                    if v:
                        break  # a split sample
                # the member is the lane's
                offset = base + pos
                pos += 512
                padded = (size + 511) & ~511
                if size >= _BIG:
                    direct = _DIRECT_RUN
                    gap = offset + 512 - big_end
                    ahead = gap if gap == last_gap and gap <= _AHEAD_MAX else 512
                    last_gap = gap
                    big_end = offset + 512 + padded
                elif direct:
                    direct -= 1
                if len(buf) - pos >= padded:
                    data = buf[pos : pos + size]
                    if data.__class__ is not bytes:  # buf: bytes, or a view of a chunk
                        data = data.tobytes()
                    pos += padded
                elif size >= _BIG and pos == len(buf) and xread is not None and not eof:
                    # fetch() in direct mode, inline: the data, then its padding and what is ahead
                    base += len(buf)
                    buf, pos = _EMPTY, 0
                    data = xread(size)
                    if data.__class__ is bytes and len(data) == size:
                        base += size
                        got = xread(padded - size + ahead)
                        if got:
                            buf = got if got.__class__ is bytes else memoryview(got)
                        pad = padded - size
                        if len(buf) >= pad:
                            pos = pad
                        elif take(pad, keep=False) < pad:
                            raise FormatError(f"{where(offset, name)}: truncated archive: the stream ends inside the member")
                    else:  # a short read: as fetch() goes on
                        if data:
                            buf = data if data.__class__ is bytes else memoryview(data)
                        data = take(size)
                        pad = padded - size
                        if len(data) < size or (pad and take(pad, keep=False) < pad):
                            raise FormatError(f"{where(offset, name)}: truncated archive: the stream ends inside the member")
                else:
                    data = fetch(size, padded, offset, name)
                last = name
                if k != key:
                    if sample is not None:
                        if blocks is not None:
                            _last_read[0] = (sample, tuple(sample), tuple(sample.values()), blocks)
                        try:
                            yield sample
                        finally:
                            _last_read[0] = None
                    slots[i] = h
                    nseen += 1
                    if nseen * 2 > mask:
                        seen._count = nseen
                        seen._grow()
                        slots = seen._slots
                        mask = seen._mask
                    key = k
                    sample = {"__key__": k, "__url__": url}
                    blocks = []
                    prev = ""
                sample[ext] = data
                if blocks is not None:
                    if (
                        ext > prev
                        and ext[0] != "_"
                        and block[nul:124] == _NAME_PAD_MODE[nul]
                        and block[136:148] == _PLAIN_MTIME
                        and size_field.isdigit()
                        and name.isascii()
                    ):
                        blocks.append(block)
                        prev = ext
                    else:
                        blocks = None

        # --- header block ---
        offset = base + pos
        if len(buf) - pos >= 512:
            block = buf[pos : pos + 512]
            if block.__class__ is not bytes:  # buf: bytes, or a view of a chunk
                block = block.tobytes()
            pos += 512
        else:
            block = take(512)
            if len(block) < 512:
                if not block:
                    if long_name is not None or pax is not None:
                        raise FormatError(
                            f"{where(offset)}: truncated archive: extended header without its member"
                        )
                    break  # the stream ends (eof): nothing follows to check
                if offset == 0:
                    raise FormatError(
                        f"{url}: not a tar archive ({len(block)} bytes, shorter than one tar header)"
                    )
                raise FormatError(f"{where(offset)}: truncated archive: the stream ends inside a header")
        if block == _ZERO_BLOCK:
            break
        # --- fast path: a regular member with TarWriter's ustar header tail ---
        # (typeflag "0", no link, ustar magic, empty owner names and prefix) and a plain octal
        # size: the checksum then needs one sum, of the first 148 bytes (under 65521, so adler32
        # gives it exactly). What this accepts, the general path below reads the same way.
        nul = block.find(0, 0, 100)
        plain = False
        if nul > 0 and long_name is None and pax is None and block[135] == 0 and block.endswith(_PLAIN_TAIL):
            size_field = block[124:135]
            try:
                size = int(size_field, 8)
            except ValueError:
                size = -1
            plain = size >= 0 and block[148:156] == b"%06o\x00 " % ((_adler32(block[:148]) & 0xFFFF) + _TAIL_REST)
        if plain:
            raw = block[:nul]
            name = raw.decode("utf-8", "surrogateescape")
            skip = None
            meta = False
        else:
            # The checksum as TarWriter and most tars write it, inline; else _checksum_ok decides.
            if block[148:156] != b"%06o\x00 " % (
                (_adler32(block[:148]) & 0xFFFF) + (_adler32(block[156:400]) & 0xFFFF) + (_adler32(block[400:512]) & 0xFFFF) + 253
            ) and not _checksum_ok(block):
                if offset == 0:
                    raise FormatError(f"{url}: not a tar archive (no valid tar header at offset 0)")
                raise FormatError(f"{where(offset)}: bad tar header checksum")
            typeflag = block[156:157]

            # --- name ---
            if long_name is not None:
                name = long_name
                long_name = None
            else:
                raw = block[:nul] if nul >= 0 else block[:100]
                if block[345] != 0 and block[257:263] == _POSIX_MAGIC:
                    prefix = block[345:500]
                    nul = prefix.find(0)
                    if nul >= 0:
                        prefix = prefix[:nul]
                    raw = prefix + b"/" + raw
                name = raw.decode("utf-8", "surrogateescape")

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
                        warn(f"{where(offset, name)}: skipping {kind} (links and special files are never followed)")
                    elif nwarn == _MAX_WARNINGS + 1:
                        warn(f"{url}: further skipped members are not reported")
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
                warn(f"{where(offset, name)}: skipping {skip}")
            elif nwarn == _MAX_WARNINGS + 1:
                warn(f"{url}: further skipped members are not reported")
            if len(buf) - pos >= padded:
                pos += padded
            elif take(padded, keep=False) < padded:
                raise FormatError(f"{where(offset, name)}: truncated archive: the stream ends inside the member")
            continue
        if not meta:
            if size >= _BIG:
                direct = _DIRECT_RUN
                # What lies between large members (the small ones, the next large one's header)
                # is read with the padding when it has had the same length twice.
                gap = offset + 512 - big_end
                ahead = gap if gap == last_gap and gap <= _AHEAD_MAX else 512
                last_gap = gap
                big_end = offset + 512 + padded
            elif direct:
                direct -= 1
        if len(buf) - pos >= padded:
            data = buf[pos : pos + size]
            if data.__class__ is not bytes:  # buf: bytes, or a view of a chunk
                data = data.tobytes()
            pos += padded
        else:
            data = fetch(size, padded, offset, name)

        if meta:
            if typeflag == b"L":
                nul = data.find(0)
                long_name = _decode(data[:nul] if nul >= 0 else data)
            elif typeflag in (b"x", b"X"):
                pax = _parse_pax(data, url, offset)
            # "K" (long link target) and "g" (global pax header) are not needed.
            continue
        last = name
        if not samples:
            yield name, data
            continue

        # --- grouping into samples, as iter_samples documents ---
        if name[:2] == "__" and is_meta_name(name):
            continue
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot > slash + 1:
            k = name[:dot]
            ext = name[dot + 1 :]
        else:
            k, ext = split_name(name)
            plain = False
        if k is None:
            nnokey += 1
            if nnokey <= _MAX_WARNINGS:
                warn(f"{url}: skipping member {name!r}: no extension, so it belongs to no sample", 4)
            elif nnokey == _MAX_WARNINGS + 1:
                warn(f"{url}: further members without extension are not reported", 4)
            continue
        if k != key:
            if sample is not None:
                if blocks is not None:
                    _last_read[0] = (sample, tuple(sample), tuple(sample.values()), blocks)
                try:
                    yield sample
                finally:
                    _last_read[0] = None
            # seen.add(k), inline
            h = hash(k) or 1
            i = h & mask
            v = slots[i]
            while v and v != h:
                i = (i + 1) & mask
                v = slots[i]
            if not v:
                slots[i] = h
                nseen += 1
                if nseen * 2 > mask:
                    seen._count = nseen
                    seen._grow()
                    slots = seen._slots
                    mask = seen._mask
            if v:
                if strict:
                    raise FormatError(
                        f"{url}: sample {k!r} is split: its members are not consecutive (member {name!r})"
                    )
                nsplit += 1
                if nsplit <= _MAX_WARNINGS:
                    warn(
                        f"{url}: sample {k!r} is split: its members are not consecutive; "
                        f"reading member {name!r} as a separate sample",
                        4,
                    )
                elif nsplit == _MAX_WARNINGS + 1:
                    warn(f"{url}: further split samples are not reported", 4)
            key = k
            sample = {"__key__": k, "__url__": url}
            blocks = []  # the members' headers while the sample is what TarWriter writes for it
            prev = ""
        if ext in sample:
            raise FormatError(f"{url}: sample {k!r} has extension {ext!r} twice (member {name!r})")
        sample[ext] = data
        if blocks is not None:
            # Is the header exactly TarWriter's for this member (a zero-padded ASCII name, its
            # mode and owner, an all-digits size, its mtime), in TarWriter's order of members?
            if (
                plain
                and ext > prev
                and ext[0] != "_"
                and block[nul:124] == _NAME_PAD_MODE[nul]
                and block[136:148] == _PLAIN_MTIME
                and size_field.isdigit()
                and raw.isascii()
            ):
                blocks.append(block)
                prev = ext
            else:
                blocks = None

    # --- end of archive: check the rest of the stream is only padding ---
    if _trailing_data(buf[pos:], read, eof):
        warn(f"{url}: data after the end-of-archive block ignored")
    if whole:
        _tally(warn, url, nwarn, nnokey)
    seen._count = nseen
    state.nsplit, state.nnokey, state.nwarn, state.last = nsplit, nnokey, nwarn, last
    if sample is not None:
        if blocks is not None:
            _last_read[0] = (sample, tuple(sample), tuple(sample.values()), blocks)
        try:
            yield sample
        finally:
            _last_read[0] = None


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
    if unsafe not in ("error", "skip"):
        raise ValueError(f"unsafe must be 'error' or 'skip', not {unsafe!r}")
    stream = open_decompressed(fileobj, url)
    yield from _members(
        stream.read, getattr(stream, "readinto", None), url, max_member_size, unsafe,
        direct_read=getattr(stream, "direct_read", None), samples=True, strict=strict,
    )


def iter_raw_samples(fileobj, url="-", *, strict=False, max_member_size=None, unsafe="error"):
    """Yield the samples of a tar stream still encoded: ``(offset, raw, nbytes)`` per sample.

    ``raw`` holds the sample's tar members exactly as they are in the (uncompressed) stream:
    headers, extended headers, data and padding, no end blocks; ``offset`` is the stream offset
    of its first header and ``nbytes`` the total size of its members' data. ``decode_raw_sample
    (raw, url, offset)`` turns it into the very dict ``iter_samples`` gives for that sample.

    This is the cheap half of ``iter_samples``, for a process that only hands samples on (to
    worker processes that decode them): it parses just what grouping and safety need — names,
    sizes, member types — and skips, warns and raises exactly as ``iter_samples`` does, with the
    same messages, except for two checks left to ``decode_raw_sample``: the header checksums of
    regular members and an extension appearing twice within a sample. Members that
    ``iter_samples`` skips (links, directories, unsafe names under ``unsafe="skip"``,
    ``__meta__`` names, names without extension) are left out of ``raw``.
    """
    if unsafe not in ("error", "skip"):
        raise ValueError(f"unsafe must be 'error' or 'skip', not {unsafe!r}")
    stream = open_decompressed(fileobj, url)
    read = stream.read
    buf = b""  # stream bytes from offset `base`, as one bytes object
    base = 0
    pos = 0  # parse position in buf
    eof = False
    seg = -1  # position in buf where the open span of the current sample starts, or -1
    segs = []  # earlier spans of the current sample (only when skipped members interrupt it)
    sample_offset = 0
    nbytes = 0
    key = None
    seen = _SeenKeys()
    nsplit = 0
    nnokey = 0
    nwarn = 0
    last = None
    long_name = None
    pax = None
    zero = _ZERO_BLOCK
    chunk = _CHUNK

    def where(offset, name=None):
        if name is not None:
            return f"{url}: member {name!r} at offset {offset}"
        if last is None:
            return f"{url}: at offset {offset}"
        return f"{url}: at offset {offset} (after member {last!r})"

    def check(block, offset):
        """Raise the checksum error iter_members would raise for this header, if any."""
        if not _checksum_ok(block):
            if offset == 0:
                raise FormatError(f"{url}: not a tar archive (no valid tar header at offset 0)")
            raise FormatError(f"{where(offset)}: bad tar header checksum")

    mstart = 0  # position in buf of the current member's first header (extended headers first)
    while True:
        # --- header block ---
        if len(buf) - pos < 512 and not eof:
            # Refill: keep what the current sample and member still need, append a new chunk.
            cut = mstart if (long_name is not None or pax is not None) else pos
            if seg >= 0 and cut - seg >= chunk:  # a large sample: set its start aside once
                segs.append(buf[seg:cut])
                seg = cut
            keep = seg if seg >= 0 else cut
            parts = [buf[keep:]]
            _, eof = _read_until(read, parts, len(buf) - pos, 512, chunk)
            buf = b"".join(parts)
            base += keep
            pos -= keep
            mstart -= keep
            if seg >= 0:
                seg -= keep
        offset = base + pos
        if long_name is None and pax is None:
            mstart = pos
        if len(buf) - pos < 512:
            rest = len(buf) - pos
            if not rest:
                if long_name is not None or pax is not None:
                    raise FormatError(f"{where(offset)}: truncated archive: extended header without its member")
                break
            if offset == 0:
                raise FormatError(f"{url}: not a tar archive ({rest} bytes, shorter than one tar header)")
            raise FormatError(f"{where(offset)}: truncated archive: the stream ends inside a header")
        if buf[pos] == 0 and buf.startswith(zero, pos):
            pos += 512
            break
        if offset == 0:
            check(buf[pos : pos + 512], 0)
        typeflag = buf[pos + 156]

        # --- name ---
        if long_name is not None:
            name = long_name
            long_name = None
        else:
            name = _header_name(buf, pos)

        # --- size ---
        size = _header_size(buf, pos)
        if size is None or size < 0:
            check(buf[pos : pos + 512], offset)
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
                    check(buf[pos : pos + 512], offset)
                    raise FormatError(f"{where(offset, name)}: invalid pax size")
            sparse = "GNU.sparse.major" in pax or "GNU.sparse.size" in pax or "GNU.sparse.map" in pax
            pax = None

        # --- what kind of member ---
        skip = None
        meta = False
        if typeflag == 48 or typeflag == 0 or typeflag == 55:  # "0", NUL, "7": regular
            if sparse:
                check(buf[pos : pos + 512], offset)
                skip = "GNU sparse file (not supported)"
        else:
            check(buf[pos : pos + 512], offset)
            tf = bytes((typeflag,))
            if tf in _NO_DATA:
                kind = _NO_DATA[tf]
                if kind is not None:
                    nwarn += 1
                    if nwarn <= _MAX_WARNINGS:
                        _warn(f"{where(offset, name)}: skipping {kind} (links and special files are never followed)")
                    elif nwarn == _MAX_WARNINGS + 1:
                        _warn(f"{url}: further skipped members are not reported")
                pos += 512
                if seg >= 0:  # the member is left out of the sample's raw bytes
                    segs.append(buf[seg:mstart])
                    seg = pos
                continue
            if tf in (b"L", b"K", b"x", b"X", b"g"):
                meta = True
                if size > _MAX_META:
                    raise FormatError(f"{where(offset)}: extended header of {size} bytes is too large")
            else:
                skip = f"unsupported member type {tf!r}"
        if skip is None and not meta:
            if max_member_size is not None and size > max_member_size:
                check(buf[pos : pos + 512], offset)
                raise FormatError(
                    f"{where(offset, name)}: member of {size} bytes exceeds the limit of {max_member_size} bytes"
                )
            if name[:1] in ("/", "") or ".." in name or not name.isprintable():
                reason = unsafe_reason(name)
                if reason is not None:
                    check(buf[pos : pos + 512], offset)
                    if unsafe == "error":
                        raise UnsafeNameError(f"{where(offset, name)}: unsafe member name ({reason})")
                    skip = f"unsafe member name ({reason})"

        # --- data ---
        end = pos + 512 + ((size + 511) & ~511)
        if end > len(buf):
            if seg >= 0 and mstart - seg >= chunk:
                segs.append(buf[seg:mstart])
                seg = mstart
            keep = seg if seg >= 0 else mstart
            parts = [buf[keep:]]
            if not eof:
                _, eof = _read_until(read, parts, len(buf), end, chunk)
            buf = b"".join(parts)
            base += keep
            pos -= keep
            end -= keep
            mstart -= keep
            if seg >= 0:
                seg -= keep
            if end > len(buf):
                check(buf[pos : pos + 512], offset)
                raise FormatError(f"{where(offset, name)}: truncated archive: the stream ends inside the member")
        if skip is not None:
            nwarn += 1
            if nwarn <= _MAX_WARNINGS:
                _warn(f"{where(offset, name)}: skipping {skip}")
            elif nwarn == _MAX_WARNINGS + 1:
                _warn(f"{url}: further skipped members are not reported")
            pos = end
            if seg >= 0:
                segs.append(buf[seg:mstart])
                seg = end
            continue
        if meta:
            check(buf[pos : pos + 512], offset)
            data = buf[pos + 512 : pos + 512 + size]
            if typeflag == 76:  # "L"
                nul = data.find(0)
                long_name = _decode(data[:nul] if nul >= 0 else data)
            elif typeflag == 120 or typeflag == 88:  # "x", "X"
                pax = _parse_pax(data, url, offset)
            pos = end
            continue
        last = name
        pos = end

        # --- grouping, as iter_samples does ---
        if name[:2] == "__" and is_meta_name(name):
            if seg >= 0:
                segs.append(buf[seg:mstart])
                seg = end
            continue
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot > slash + 1:
            k = name[:dot]
        else:
            k = split_name(name)[0]
        if k is None:
            nnokey += 1
            if nnokey <= _MAX_WARNINGS:
                _warn(f"{url}: skipping member {name!r}: no extension, so it belongs to no sample")
            elif nnokey == _MAX_WARNINGS + 1:
                _warn(f"{url}: further members without extension are not reported")
            if seg >= 0:
                segs.append(buf[seg:mstart])
                seg = end
            continue
        if k != key:
            if key is not None:
                if segs:
                    segs.append(buf[seg:mstart])
                    yield sample_offset, b"".join(segs), nbytes
                    segs = []
                else:
                    yield sample_offset, buf[seg:mstart], nbytes
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
            seg = mstart
            sample_offset = base + mstart
            nbytes = size
        else:
            if seg < 0:
                seg = mstart
            nbytes += size

    if key is not None:
        # mstart: the end-of-archive block, or the end of the stream
        if segs:
            segs.append(buf[seg:mstart])
            yield sample_offset, b"".join(segs), nbytes
        else:
            yield sample_offset, buf[seg:mstart], nbytes

    # --- end of archive: check the rest of the stream is only padding ---
    if _trailing_data(buf[pos:], read, eof):
        _warn(f"{url}: data after the end-of-archive block ignored")
    _tally(_warn, url, nwarn, nnokey)


def _tally(warn, url, nwarn, nnokey):
    """Past the warnings' limit per kind, how many members were skipped in all: none goes
    unsaid, however many there were."""
    if nwarn > _MAX_WARNINGS:
        warn(f"{url}: {nwarn} members skipped in all (links, special files, unsafe names)")
    if nnokey > _MAX_WARNINGS:
        warn(f"{url}: {nnokey} members without extension skipped in all")


# The sample iter_samples yields, while it is out, if it is exactly what TarWriter (mtime 0)
# writes for it, member for member: (sample, its keys, its values, its members' header blocks),
# else None. TarWriter.write of that very dict, unchanged (same keys and value objects), writes
# those headers as they are instead of making them again: identity copies cost less. Checked
# by identity, so correct whoever calls what in which order (or thread).
_last_read = [None]

# The last sample decode_raw_sample decoded whose raw bytes are exactly what TarWriter (mtime 0)
# writes for it: (key, {ext: value}, raw), else None. encode_samples of a sample with the same
# key and fields returns raw as it is, since that is its encoding: code that passes samples
# through (identity, filters, errors="keep") costs no re-encoding. Content-checked, so correct
# whoever calls what in which order.
_last_plain = [None]

# TarWriter's plain header (mtime 0) around name, size and checksum; the checksum's constant part.
_PLAIN_MODE = b"0000644\x00" + b"0000000\x00" + b"0000000\x00"
_PLAIN_MTIME = b"00000000000\x00"
_PLAIN_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(64) + b"0000000\x00" + b"0000000\x00" + bytes(167)
_PLAIN_SUM = sum(_PLAIN_MODE) + sum(_PLAIN_MTIME) + 8 * 32 + sum(_PLAIN_TAIL)
# A header's checksum is adler32(header[:148]) & 0xFFFF + _TAIL_REST if its tail is _PLAIN_TAIL
# (the checksum field counts as 8 spaces; adler32 adds 1).
_TAIL_REST = 8 * 32 + sum(_PLAIN_TAIL) - 1
# What follows a name of n bytes up to byte 124 of TarWriter's header: NULs, mode, uid, gid.
_NAME_PAD_MODE = [bytes(100 - n) + _PLAIN_MODE for n in range(101)]


def _decode_plain(raw, url):
    """``decode_raw_sample`` for the common case — ustar headers of regular members with short
    names, valid checksums, one key, distinct extensions — or None for anything else, which
    the general parser then handles (and reports) exactly as ``iter_samples`` does."""
    if raw.__class__ is not bytes:
        raw = bytes(raw)
    n = len(raw)
    pos = 0
    sample = None
    key = None
    fields = {}
    plain = True  # raw is what TarWriter writes for the sample
    prev = None
    while pos < n:
        h = pos
        if n - h < 512:
            return None
        nul = raw.find(0, h, h + 100)
        name_raw = raw[h : nul if nul >= 0 else h + 100]
        try:
            size = int(raw[h + 124 : h + 135], 8)
        except ValueError:
            return None
        if plain and name_raw.isascii():
            # Exactly TarWriter's header for this name and size? Then it is valid too.
            sfield = b"%011o\x00" % size
            if not raw.startswith(
                b"".join((name_raw.ljust(100, b"\x00"), _PLAIN_MODE, sfield, _PLAIN_MTIME,
                          b"%06o\x00 " % (_PLAIN_SUM + sum(name_raw) + sum(sfield)), _PLAIN_TAIL)),
                h,
            ):
                plain = False
        else:
            plain = False
        if not plain:
            typeflag = raw[h + 156]
            if (typeflag != 48 and typeflag != 0 and typeflag != 55) or raw[h + 345] != 0 or raw[h + 135] not in (0, 32):
                return None
            if not _checksum_ok(raw[h : h + 512]):  # an all-zero block fails too
                return None
        name = name_raw.decode("utf-8", "surrogateescape")
        start = h + 512
        end = start + size
        pos = start + ((size + 511) & ~511)
        if size < 0 or pos > n or name[:1] in ("/", "") or name[:2] == "__" or ".." in name or not name.isprintable():
            return None
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot <= slash + 1:
            return None
        if sample is None:
            key = name[:dot]
            sample = {"__key__": key, "__url__": url}
        elif name[:dot] != key:
            return None
        ext = name[dot + 1 :]
        if ext in sample:
            return None
        value = raw[start:end]
        sample[ext] = value
        if plain:
            if raw.count(0, end, pos) == pos - end and ext[:2] != "__" and (prev is None or ext > prev):
                fields[ext] = value
                prev = ext
            else:
                plain = False
    if sample is None:
        return None
    return sample, ((key, fields, raw) if plain else None)


def decode_raw_sample(raw, url="-", offset=0):
    """The sample dict held in ``raw``, the tar members of one sample (see ``iter_raw_samples``).

    Parsed by the same code as ``iter_samples``, so the dict is the one ``iter_samples`` gives,
    with ``__url__`` set to ``url``; header checksums are verified here. ``offset`` is the
    stream offset of ``raw`` in ``url``, for error messages. Raises FormatError for damaged
    members, an extension twice, or ``raw`` not holding exactly one sample.
    """
    _last_plain[0] = None
    sample, _last_plain[0] = _decode_raw(raw, url, offset)
    return sample


def _decode_raw(raw, url, offset):
    """``decode_raw_sample``, and ``(key, fields, raw)`` if ``raw`` is exactly what TarWriter
    (mtime 0) writes for the sample, else None: ``(sample, plain)``."""
    done = _decode_plain(raw, url)
    if done is not None:
        return done
    sample = None
    key = None
    for name, data in _members(None, None, url, None, "error", raw, offset):
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
            continue
        if sample is None:
            key = k
            sample = {"__key__": k, "__url__": url}
        elif k != key:
            raise FormatError(f"{url}: at offset {offset}: raw sample {key!r} also holds member {name!r}")
        if ext in sample:
            raise FormatError(f"{url}: sample {k!r} has extension {ext!r} twice (member {name!r})")
        sample[ext] = data
    if sample is None:
        raise FormatError(f"{url}: at offset {offset}: raw sample holds no member")
    return sample, None


def iter_chunk_samples(chunk, url, offset, state=None, *, read=None, strict=False,
                       max_member_size=None, unsafe="error"):
    """The samples of ``chunk``, tar members of ``url`` from stream offset ``offset`` (see
    ``iter_chunks``), exactly as ``iter_samples`` yields them when it reads the whole stream.

    ``state`` (a StreamState) is what the stream before ``chunk`` left: keys seen (for split
    samples), warnings counted, the last member's name (for error messages); it is brought up to
    date when the chunk ends. With ``read``, the stream goes on after ``chunk``, read from there.
    """
    return _members(read, None, url, max_member_size, unsafe, chunk, offset, samples=True,
                    strict=strict, state=state)


_CUT_TYPES = (48, 0, 55)  # "0", NUL, "7": regular members, which chunks may end between
_META_TYPES = (76, 75, 120, 88, 103)  # "L", "K", "x", "X", "g": extended headers
_NO_DATA_TYPES = tuple(t[0] for t in _NO_DATA)  # link, device, directory, fifo: no data blocks


def iter_chunks(read, url="-", *, target=1 << 20, max_member_size=None):
    """Cut an uncompressed tar stream (its ``read``) into chunks of whole samples, without
    reading the samples: ``(offset, chunk, more)``, ``chunk`` the stream's bytes from ``offset``.

    Only the headers' size fields are read to go from member to member (and extended headers,
    which may change the size of the next member); names only once a chunk holds ``target``
    bytes, to end it before a member that starts a sample: a regular member with a plain key
    (``iter_samples``'s grouping) other than that of the regular member just before it.
    ``iter_chunk_samples`` reads the chunks one after another with one StreamState as
    ``iter_samples`` reads the stream, same samples, warnings and errors: what this cannot
    read (a header it cannot size, a truncated stream) is left in the last chunk for the reader
    to report; data after the end of the archive is read here, and stands in the last chunk as
    one byte after its end block so that the reader warns of it at the same point.

    ``more`` is True for a last chunk that stops short of the stream's end, where a member
    (larger than ``max_member_size``, or sized by a damaged header) begins: the stream goes on
    after it, to be read by ``iter_chunk_samples(..., read=read)``, not held in memory here.
    """
    buf = b""
    base = 0  # stream offset of buf[0]
    start = 0  # the open chunk's start in buf
    pos = 0  # the next header in buf
    mstart = 0  # the first header of the member at pos (its extended headers come first)
    eof = False
    long_name = pax = None
    prev = None  # key of the member before, where a chunk may end after it (full chunks only)
    step = max(_CHUNK, 4 * target)  # bytes read at once: a few chunks, so that what is left of
    # the open chunk is copied a few times less often than new data comes in

    def fill(n):
        """Make buf hold n bytes from pos (dropping what lies before the chunk); False at the
        stream's end."""
        nonlocal buf, base, pos, mstart, start, eof
        have = len(buf) - pos
        if have >= n:
            return True
        parts = [memoryview(buf)[start:]]  # (joined below: no copy here)
        if not eof:
            have, eof = _read_until(read, parts, have, n, step)
        buf = b"".join(parts)
        base += start
        pos -= start
        mstart -= start
        start = 0
        return have >= n

    limit = (1 << 64) if max_member_size is None else max_member_size
    while True:
        if len(buf) - pos < 512 and not fill(512):
            break
        if long_name is None and pax is None:
            mstart = pos
            if buf[pos + 156] == 48 and not buf[pos + 135]:
                # The common case, in short: a regular member, its size in octal digits.
                try:
                    size = int(buf[pos + 124 : pos + 135], 8)
                except ValueError:
                    size = -1
                if 0 <= size <= limit:
                    end = 512 + ((size + 511) & ~511)
                    if pos - start < target:
                        prev = None
                    else:
                        key = _cut_key(buf, pos, 48, None, None)
                        if key is not None and prev is not None and key != prev:
                            yield base + start, buf[start:pos], False
                            start = pos
                        prev = key
                    if len(buf) - pos < end and not fill(end):
                        break
                    pos += end
                    continue
        if buf[pos] == 0 and buf.startswith(_ZERO_BLOCK, pos):
            pos += 512
            trailing = _trailing_data(buf[pos:], read, eof)
            yield base + start, buf[start:pos] + (b"\1" if trailing else b""), False
            return
        typeflag = buf[pos + 156]
        size = _header_size(buf, pos)
        ext_name, ext = long_name, pax  # what extended headers said of this member
        long_name = pax = None
        if ext is not None and "size" in ext:
            try:
                size = int(ext["size"])
            except ValueError:
                size = None
        meta = typeflag in _META_TYPES
        if (size is None or size < 0 or (meta and size > _MAX_META)
                or (max_member_size is not None and size > max_member_size and typeflag in _CUT_TYPES)):
            yield base + start, buf[start:], True
            return
        end = 512 if typeflag in _NO_DATA_TYPES else 512 + ((size + 511) & ~511)
        if meta:
            if not fill(end):
                break
            data = buf[pos + 512 : pos + 512 + size]
            if typeflag == 76:  # "L"
                nul = data.find(0)
                long_name = _decode(data[:nul] if nul >= 0 else data)
            elif typeflag == 120 or typeflag == 88:  # "x", "X"
                try:
                    pax = _parse_pax(data, url, base + pos)
                except FormatError:
                    yield base + start, buf[start:], True
                    return
        else:
            key = None
            if mstart - start >= target:
                key = _cut_key(buf, pos, typeflag, ext_name, ext)
                if key is not None and prev is not None and key != prev:
                    yield base + start, buf[start:mstart], False
                    start = mstart
            prev = key
            if not fill(end):
                break
        pos += end
    if len(buf) > start:  # the stream ends (maybe inside a member: the reader says so)
        yield base + start, buf[start:], False


def _cut_key(buf, pos, typeflag, long_name, pax):
    """The key of the member whose header is at ``buf[pos:]`` if a chunk may end next to it: a
    regular member with a safe, plain name (no ``__`` start, an extension), else None."""
    if typeflag not in _CUT_TYPES:
        return None
    name = long_name if long_name is not None else _header_name(buf, pos)
    if pax is not None:
        if "GNU.sparse.major" in pax or "GNU.sparse.size" in pax or "GNU.sparse.map" in pax:
            return None
        if "path" in pax:
            name = _decode(pax["path"])
    if name[:1] in ("/", "") or name[:2] == "__" or ".." in name or not name.isprintable():
        return None
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return name[:dot] if dot > slash + 1 else None


class StreamState:
    """What reading a tar stream up to some point leaves for reading on from there: the keys
    seen (to notice split samples), the warnings counted per kind, the last member's name (for
    error messages). See ``iter_chunk_samples``."""

    __slots__ = ("seen", "nsplit", "nnokey", "nwarn", "last", "warn")

    def __init__(self, keys=0, raise_warnings=False):
        self.seen = _SeenKeys(keys)  # room for this many keys before the table grows
        self.nsplit = self.nnokey = self.nwarn = 0
        self.last = None
        # raise_warnings: raise the first TarioWarning as an exception instead (without
        # touching the warnings module's state, which all threads share)
        self.warn = _raise_warning if raise_warnings else _warn


class _SeenKeys:
    """A set of keys kept as 64-bit hashes in a flat open-addressing table (~16 bytes a key).

    Python's per-process string hash is enough here: the table never leaves the process. Two
    distinct keys with the same 64-bit hash would give a spurious split-sample report; with a
    million keys that has a chance of about 1 in 30 million.
    """

    __slots__ = ("_slots", "_mask", "_count")

    def __init__(self, keys=0):
        from array import array

        n = 1024
        while n <= 2 * keys:
            n *= 2
        self._slots = array("q", bytes(8 * n))
        self._mask = n - 1
        self._count = 0

    def add(self, key):
        """Remember ``key``; True if it was already there."""
        h = hash(key) or 1
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

    def add_all(self, keys):
        """Remember the keys of ``keys`` (distinct) if none is there yet and return True; else
        remember none of them and return False."""
        if not isinstance(keys, list):
            keys = list(keys)
        while (self._count + len(keys)) * 2 > self._mask:  # room first: no growing on the way
            self._grow()
        slots = self._slots
        mask = self._mask
        hashes = [hash(k) or 1 for k in keys]
        for n, h in enumerate(hashes):
            i = h & mask
            v = slots[i]
            while v:
                if v == h:  # seen: take back those of keys put in, last first (exact)
                    for h in reversed(hashes[:n]):
                        i = h & mask
                        while slots[i] != h:
                            i = (i + 1) & mask
                        slots[i] = 0
                    return False
                i = (i + 1) & mask
                v = slots[i]
            slots[i] = h
        self._count += len(hashes)
        return True

    def _grow(self):
        from array import array

        old = self._slots
        mask = self._mask * 2 + 1
        slots = array("q", bytes(8 * (mask + 1)))
        for h in filter(None, old):  # (the empty slots skipped in C)
            i = h & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = h
        self._slots = slots
        self._mask = mask

