"""Compression of tar streams: detection by magic bytes on read, choice by file name on write.

Reading never seeks, so pipes and network streams work: the first few bytes are read once, kept,
and handed back as the beginning of the stream. Every decompressor is driven with bounded output
per call, so a small compressed input cannot inflate into a large allocation, and a stream that
ends before its compressed end marker is reported as truncated instead of silently looking like a
short archive.
"""

import io
import zlib

from tarproc.errors import FormatError

__all__ = ["open_decompressed", "compression_for_name", "detect_compression", "make_compressor"]

COMPRESSIONS = ("gz", "bz2", "xz", "zst")

_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BZ2_BLOCK_MAGICS = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")
_PEEK = 10  # long enough for the bzip2 signature ("BZh", level digit, block magic)

_CHUNK = 1 << 20  # output produced per decompressor call, and input read per call

_SUFFIXES = {
    ".tar": None,
    ".gz": "gz",
    ".tgz": "gz",
    ".gzip": "gz",  # (spelled out: what a user who writes it means)
    ".bz2": "bz2",
    ".bzip2": "bz2",
    ".tbz": "bz2",
    ".tbz2": "bz2",
    ".xz": "xz",
    ".txz": "xz",
    ".zst": "zst",
    ".zstd": "zst",
    ".tzst": "zst",
}


def compression_for_name(name):
    """The compression implied by a file name or URL suffix: None, "gz", "bz2", "xz" or "zst".

    ``.tar`` and unknown suffixes mean no compression. For URLs (``scheme://``) a query string or
    fragment is ignored, so signed URLs such as ``https://h/x.tar.gz?sig=...`` still work.
    """
    name = str(name)
    if "://" in name:
        name = name.split("#", 1)[0].split("?", 1)[0]
    base = name.rsplit("/", 1)[-1].lower()
    dot = base.rfind(".")
    if dot < 0:
        return None
    return _SUFFIXES.get(base[dot:])


def detect_compression(head):
    """The compression whose magic bytes start ``head`` (the first few bytes of a stream), or None."""
    if head[:2] == _GZIP_MAGIC:
        return "gz"
    if head[:4] == _ZSTD_MAGIC:
        return "zst"
    if head[:6] == _XZ_MAGIC:
        return "xz"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0" and head[4:10] in _BZ2_BLOCK_MAGICS:
        return "bz2"
    return None


def make_compressor(compression, level=None):
    """A compressor object (``compress(data)``/``flush()``) with deterministic output.

    gzip output carries no file name and mtime 0 in its header, so the same input gives the same
    bytes. Default levels favour speed over the last few percent: gzip 6 (like the gzip command),
    bzip2 9, xz 6, zstd 3.
    """
    if compression == "gz":
        return zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)
    if compression == "bz2":
        import bz2

        return bz2.BZ2Compressor(9 if level is None else level)
    if compression == "xz":
        import lzma

        return lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6 if level is None else level)
    if compression == "zst":
        import zstandard

        return zstandard.ZstdCompressor(level=3 if level is None else level, write_checksum=True).compressobj()
    raise ValueError(f"unknown compression {compression!r}; expected one of None, {', '.join(COMPRESSIONS)}")


def _read_head(fileobj, n):
    """Read up to n bytes, looping over short reads, stopping only at end of stream."""
    parts = []
    have = 0
    while have < n:
        data = fileobj.read(n - have)
        if not data:
            break
        parts.append(data)
        have += len(data)
    return b"".join(parts)


class _PrefixedReader(io.RawIOBase):
    """A stream that returns some already-read bytes first, then the rest of another stream."""

    def __init__(self, prefix, raw):
        self._prefix = prefix
        self._raw = raw

    def readable(self):
        return True

    def read(self, n=-1):
        if self._prefix:
            if n is None or n < 0:
                data = self._prefix + self._raw.read()
                self._prefix = b""
                return data
            data = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return data
        return self._raw.read(n)

    def direct_read(self):
        """The underlying stream's ``read`` once the prefix is used up (reading from this
        stream is then the same, with one Python call less), else None."""
        return None if self._prefix else self._raw.read

    def readinto(self, b):
        if not self._prefix:
            raw_readinto = getattr(self._raw, "readinto", None)
            if raw_readinto is not None:
                n = raw_readinto(b)
                return 0 if n is None else n
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _DecompressingReader(io.RawIOBase):
    """A readable stream of the decompressed bytes of a (possibly multi-member) compressed stream."""

    def __init__(self, raw, kind, head, url):
        self._raw = raw
        self._kind = kind
        self._url = url
        self._dec = None
        self._in = head  # compressed input not yet given to the decompressor
        self._raw_eof = False
        self._out = b""
        self._outpos = 0
        self._consumed = 0  # compressed bytes handed to decompressors, for error messages
        self._zin = 1024  # zstd input per call; adapts to the observed ratio

    def readable(self):
        return True

    def _new_decompressor(self):
        kind = self._kind
        if kind == "gz":
            return zlib.decompressobj(31)
        if kind == "bz2":
            import bz2

            return bz2.BZ2Decompressor()
        if kind == "xz":
            import lzma

            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()

    def _read_raw(self):
        if self._raw_eof:
            return b""
        data = self._raw.read(_CHUNK)
        if not data:
            self._raw_eof = True
            return b""
        return data

    def _error(self, what):
        return FormatError(
            f"{self._url}: corrupt {self._kind} data near compressed byte {self._consumed}: {what}"
        )

    def _produce(self):
        """Decompress some more output into self._out; False at the clean end of the stream."""
        while True:
            dec = self._dec
            if dec is None:
                # Between members: start a new one if more compressed data follows.
                if not self._in:
                    self._in = self._read_raw()
                    if not self._in:
                        return False
                if self._kind == "gz" and self._in[:1] == b"\0":
                    # Zero padding after the last gzip member (tape blocking) is harmless.
                    stripped = self._in.lstrip(b"\0")
                    self._consumed += len(self._in) - len(stripped)
                    self._in = stripped
                    continue
                if self._consumed and detect_compression(self._in.ljust(_PEEK, b"\0")[:_PEEK]) != self._kind:
                    if len(self._in) < _PEEK and not self._raw_eof:
                        more = self._read_raw()
                        if more:
                            self._in += more
                            continue
                    raise self._error("trailing garbage after the compressed data")
                dec = self._dec = self._new_decompressor()
            if not self._in and self._needs_input(dec):
                self._in = self._read_raw()
                if not self._in:
                    out = b""
                    if self._kind == "gz":
                        try:
                            out = dec.flush()
                        except zlib.error as exc:
                            raise self._error(exc) from None
                        if dec.eof:
                            self._dec = None
                    if not out and self._dec is not None:
                        raise FormatError(
                            f"{self._url}: truncated {self._kind} data: the stream ends after "
                            f"{self._consumed} compressed bytes, before the end of the compressed data"
                        )
                    if out:
                        self._out, self._outpos = out, 0
                        return True
                    continue
            try:
                out = self._feed(dec)
            except FormatError:
                raise
            except Exception as exc:  # zlib.error, OSError, lzma.LZMAError, EOFError, ZstdError
                raise self._error(exc) from None
            if dec.eof:
                self._dec = None
                rest = dec.unused_data
                if self._kind == "gz" and dec.unconsumed_tail:
                    rest += dec.unconsumed_tail
                self._consumed -= len(rest)
                self._in = rest + self._in
            if out:
                self._out, self._outpos = out, 0
                return True

    def _needs_input(self, dec):
        kind = self._kind
        if kind == "gz":
            return not dec.unconsumed_tail
        if kind == "zst":
            return True
        return dec.needs_input

    def _feed(self, dec):
        """Give the decompressor some input; return its (bounded) output."""
        kind = self._kind
        if kind == "gz":
            data = dec.unconsumed_tail or self._in
            if data is self._in:
                self._consumed += len(data)
                self._in = b""
            out = dec.decompress(data, _CHUNK)
            return out
        if kind == "zst":
            # zstandard's decompressobj has no output limit: bound it through the input size.
            n = self._zin
            data = self._in[:n]
            self._in = self._in[n:]
            self._consumed += len(data)
            out = dec.decompress(data)
            if data:
                ratio = max(1.0, len(out) / len(data))
                self._zin = max(512, min(1 << 18, int(_CHUNK / ratio)))
            return out
        # bz2, xz: keep their own input buffer; feed new input only when they ask for it.
        if dec.needs_input:
            data = self._in
            self._consumed += len(data)
            self._in = b""
        else:
            data = b""
        return dec.decompress(data, _CHUNK)

    def read(self, n=-1):
        if n is None or n < 0:
            parts = []
            while True:
                data = self.read(_CHUNK)
                if not data:
                    return b"".join(parts)
                parts.append(data)
        if self._outpos >= len(self._out):
            if not self._produce():
                return b""
        pos = self._outpos
        if pos == 0 and n >= len(self._out):
            data = self._out
        else:
            data = self._out[pos : pos + n]
        self._outpos = pos + len(data)
        return data

    def readinto(self, b):
        # Straight from the decompressed output into b, without an intermediate slice.
        if self._outpos >= len(self._out):
            if not self._produce():
                return 0
        pos = self._outpos
        n = min(len(b), len(self._out) - pos)
        b[:n] = memoryview(self._out)[pos : pos + n]
        self._outpos = pos + n
        return n


def open_decompressed(fileobj, url="-"):
    """A readable binary stream of the uncompressed bytes of ``fileobj``.

    The compression (gzip including multi-member, bzip2, xz, zstd, or none) is recognised from
    magic bytes, never from a name, and the stream is never seeked. Corrupt or truncated
    compressed data raises FormatError naming ``url`` when it is read.
    """
    head = _read_head(fileobj, _PEEK)
    kind = detect_compression(head)
    if kind is None:
        return _PrefixedReader(head, fileobj)
    return _DecompressingReader(fileobj, kind, head, url)
