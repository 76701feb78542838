"""Samples in and out of storage: the one obvious call for reading a shard or pattern, and writers
that commit each shard atomically.

This joins the three core layers (storage, shard patterns, tar I/O) and is what the commands and
the Python API use for every read and write of samples.
"""


import contextlib

from . import shards, storage, tario
from .errors import DuplicateKeyError, TarprocError


def iter_raw_samples(source, *, strict=False, count=None, max_member_size=None, unsafe="error"):
    """Like `iter_samples`, but yield each sample still encoded: `(url, offset, raw, nbytes)`.

    `raw` is the sample's tar members (see `tario.iter_raw_samples`); `tario.decode_raw_sample(raw,
    url, offset)` gives the dict `iter_samples` would have yielded; `nbytes` is its data size.
    """
    seen = 0
    if count is not None and count <= 0:
        return
    for url in _input_urls(source):
        with storage.open_read(url) as raw:
            shown = storage.redact(url)  # (what samples and messages name: no credentials)
            for offset, data, nbytes in tario.iter_raw_samples(
                    raw, url=shown, strict=strict, max_member_size=max_member_size, unsafe=unsafe):
                yield shown, offset, data, nbytes
                seen += 1
                if count is not None and seen >= count:
                    return


def iter_samples(source, *, strict=False, count=None, max_member_size=None, unsafe="error"):
    """Yield the samples of a URL, a shard pattern, or a list of them, read one after another;
    or of an open binary file object (its name, if any, is the samples' `__url__`).

    Each sample is a dict with `__key__`, `__url__` (the shard it came from, `-` for stdin) and one
    bytes value per extension. `count` stops after that many samples in all.
    """
    seen = 0
    if count is not None and count <= 0:
        return
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        opened = [(name if isinstance(name, str) else "-", source)]
    else:
        opened = ((url, None) for url in _input_urls(source))
    for url, fileobj in opened:
        # (a caller's file object stays open: it is the caller's)
        with (storage.open_read(url) if fileobj is None else contextlib.nullcontext(fileobj)) as raw:
            # (the reader recognises the compression itself, from magic bytes); `__url__` and
            # messages name the input without credentials (commands see it as __source__)
            for sample in tario.iter_samples(raw, url=storage.redact(url), strict=strict,
                                             max_member_size=max_member_size, unsafe=unsafe):
                yield sample
                seen += 1
                if count is not None and seen >= count:
                    return


def _input_urls(source):
    """The inputs of ``source``, all of them; a missing local one fails now, before the first
    sample, rather than after hours of work on the ones before it."""
    urls = list(shards.expand_inputs(source))
    missing = [u for u in urls if u != "-" and storage.is_local(u) and not storage.exists(u)]
    if missing:
        more = (f" ({len(missing) - 1} more of the {len(urls)} inputs missing too)"
                if len(missing) > 1 else "")
        raise storage.StorageError(f"cannot open {storage.redact(missing[0])}: "
                                   f"No such file or directory{more}")
    return urls


class _Tally:
    """A write-through file object that counts and hashes what passes to the real one."""

    def __init__(self, target, hashing=True):
        self.target = target
        self.nbytes = 0
        if hashing:
            import hashlib  # only when asked: ~5 ms of every tarproc start otherwise

            self.sha256 = hashlib.sha256()
        else:
            self.sha256 = None

    def write(self, data):
        self.nbytes += len(data)
        if self.sha256 is not None:
            self.sha256.update(data)
        return self.target.write(data)

    def flush(self):
        flush = getattr(self.target, "flush", None)
        if flush:
            flush()


class _CommitOnExit:
    """Context manager of the writers: a clean exit closes (commits), an exception aborts."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class SampleWriter(_CommitOnExit):
    """Write samples as one tar to a URL; the object appears there only when the writer commits.

    Compression follows the name (`.tgz`, `.tar.zst`, ...) unless given. `sha256=False` skips
    hashing the output when nobody asks for `sha256`. Use it as a context
    manager: a clean exit commits, an exception aborts and leaves nothing at the destination.

        with SampleWriter("out/shard-0000.tar.gz") as sink:
            for sample in samples:
                sink.write(sample)
    """

    def __init__(self, url, compression="auto", mtime=0, sha256=True):
        self.url = url
        if compression == "auto":
            compression = tario.compression_for_name(url)
        self._store = storage.open_write(url)
        self._tally = _Tally(self._store, hashing=sha256)
        self._tar = tario.TarWriter(self._tally, compression=compression, mtime=mtime)
        self.count = 0
        self.closed = False

    def write(self, sample):
        """Append one sample; DuplicateKeyError (naming this output) if its key is the key of
        the sample written just before it. A sample without fields writes nothing and is not
        counted."""
        tar = self._tar
        before = tar.samples
        try:
            tar.write(sample)
        except DuplicateKeyError as exc:
            raise self.named(exc) from None
        self.count += tar.samples - before

    def write_raw(self, data, count=1, keys=None):
        """Append ``count`` samples already encoded as tar members (``tario.encode_samples``);
        ``keys`` as ``TarWriter.write_raw`` takes them."""
        try:
            self._tar.write_raw(data, count, keys=keys)
        except DuplicateKeyError as exc:
            raise self.named(exc) from None
        self.count += count

    def write_raw_parts(self, parts, count):
        """``write_raw`` of the raw tar data ``parts`` one after the other, in one piece."""
        try:
            keys = tario.writer.chain_keys(parts)
        except DuplicateKeyError as exc:
            raise self.named(exc) from None
        self.write_raw(parts[0] if len(parts) == 1 else b"".join(parts), count, keys=keys)

    def named(self, exc):
        """DuplicateKeyError ``exc`` (from this writer, or from where its raw data was encoded)
        with a message that names this output."""
        if exc.url is not None:
            return exc
        return DuplicateKeyError(f"{self.url}: {exc}", exc.key, self.url)

    @property
    def nbytes(self):
        """Bytes written to storage so far (after compression)."""
        return self._tally.nbytes

    @property
    def sha256(self):
        """Hex SHA-256 of what was written (None if made with `sha256=False`, which saves its cost)."""
        h = self._tally.sha256
        return None if h is None else h.hexdigest()

    def close(self):
        """Finish the archive and commit it under its final name."""
        if self.closed:
            return
        self.closed = True
        try:
            self._tar.close()
        except BaseException:
            self._store.abort()
            raise
        self._store.commit()

    def abort(self):
        """Drop everything written; nothing appears at the destination."""
        if self.closed:
            return
        self.closed = True
        self._store.abort()


def write_samples(url, samples, compression="auto"):
    """Write an iterable of samples to one URL atomically; returns (count, bytes written)."""
    with SampleWriter(url, compression=compression) as sink:
        for sample in samples:
            sink.write(sample)
    return sink.count, sink.nbytes


def _number_fields(pattern):
    """How many shard-number fields an output pattern has (printf ``%06d`` or ``{:06d}``)."""
    import string

    printf = len(shards.PRINTF_FIELD.findall(pattern))
    try:
        braces = sum(1 for _, field, _, _ in string.Formatter().parse(pattern) if field is not None)
    except ValueError:  # unbalanced braces
        braces = 0
    return printf if printf else braces


class ShardWriter(_CommitOnExit):
    """Write a stream of samples as numbered shards of at most `maxcount` samples / `maxsize` bytes.

    `pattern` is printf-style (`out/ds-%06d.tar`) or `{}`-style (`out/ds-{:06d}.tar`). Every shard
    is committed atomically as soon as it is full; `shards` lists what was written, as dicts of
    url, count, bytes and sha256 (a manifest). Like WebDataset's ShardWriter, but atomic and for
    any storage URL. `maxcount=None` / `maxsize=None`: no limit of that kind; `maxsize` may be
    a size such as "1GB". Writing after `close` is an error (the sample would be lost).
    """

    def __init__(self, pattern, maxcount=100_000, maxsize=3e9, start=0, compression="auto"):
        import os

        from .tarutils import parse_size

        pattern = os.fspath(pattern)
        fields = _number_fields(pattern)
        if fields != 1:
            raise TarprocError(
                f"output pattern {pattern!r} has {fields or 'no'} number field{'s' if fields else ''}"
                ": it needs exactly one, such as ds-%06d.tar or ds-{:06d}.tar")
        if maxcount is not None and maxcount < 1:
            raise TarprocError(f"the most samples per shard must be at least 1, not {maxcount}")
        if maxsize is not None:
            maxsize = parse_size(maxsize)
        self.pattern = pattern
        self.maxcount = maxcount if maxcount is not None else float("inf")
        self.maxsize = maxsize if maxsize is not None else float("inf")
        self.closed = False
        self.index = start
        self.compression = compression
        self.shards = []
        self._sink = None
        self._raw_size = 0

    def _name(self, index):
        if shards.is_printf(self.pattern):
            return shards.printf_name(self.pattern, index)
        return self.pattern.format(index)

    def write(self, sample):
        if self.closed:
            raise ValueError(f"write to a closed ShardWriter ({self.pattern})")
        if all(k[:2] == "__" for k in sample):
            return  # no fields: nothing to write (and no shard to open for it)
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__") and isinstance(v, (bytes, str)))
        if self._sink is not None and (self._sink.count >= self.maxcount
                                       or self._raw_size + size > self.maxsize):
            self._finish()
        if self._sink is None:
            self._sink = SampleWriter(self._name(self.index), compression=self.compression)
            self._raw_size = 0
            self.index += 1
        self._sink.write(sample)
        self._raw_size += size

    def _finish(self):
        sink, self._sink = self._sink, None
        sink.close()
        self.shards.append({"url": sink.url, "count": sink.count, "bytes": sink.nbytes, "sha256": sink.sha256})

    def close(self):
        self.closed = True
        if self._sink is not None:
            self._finish()

    def abort(self):
        self.closed = True
        if self._sink is not None:
            self._sink.abort()
            self._sink = None
