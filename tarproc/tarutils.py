"""Small everyday tools for tar sample streams: look inside (`tarshow`), cut into shards
(`tarsplit`), join (`tarcat`), and the size parser their options share.

Each reads `-`, local files, URLs or shard patterns through :func:`tarproc.streams.iter_samples`
and writes through the storage layer, so every output is committed atomically and every input
scheme works the same way.

    from tarproc import tarutils
    tarutils.cat(["a.tar", "b.tgz"], "all.tar.gz")                 # -> (samples, bytes written)
    tarutils.split("all.tar.gz", "part-%04d.tar", maxcount=100)    # -> manifest of the shards
"""

import json
import re
import sys

from .errors import TarprocError

__all__ = ["parse_size", "format_size", "describe", "show", "split", "cat", "write_manifest"]

_UNITS = {"": 1, "b": 1,
          "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15,
          "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
          "ti": 2**40, "tib": 2**40, "pi": 2**50, "pib": 2**50}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text):
    """Bytes named by a size such as `1GB`, `500MB`, `1e9`, `64k`, `2GiB` or `1_000_000`.

    Decimal units (k, M, G, T, P, with or without B) are powers of 1000, as disk vendors and
    `ls -h --si` count; `KiB`, `MiB`, ... are powers of 1024. Case does not matter.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text).replace("_", ""))
        if not m:
            raise TarprocError(f"{text!r} is not a size (examples: 1GB, 500MB, 1e9, 64KiB)")
        value, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS:
        raise TarprocError(f"{text!r}: unknown size unit {unit!r} (use B, kB, MB, GB, TB or KiB, MiB, GiB)")
    n = value * _UNITS[unit]
    if n < 1:
        raise TarprocError(f"{text!r}: a size must be at least one byte")
    return int(n)


def format_size(n):
    """A short decimal rendering of a byte count (`1.2 MB`), for messages."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _fields(sample):
    return [(k, v) for k, v in sample.items() if not k.startswith("__")]


def _size_of(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    return len(str(value).encode("utf-8"))


def describe(sample):
    """One line for a sample: its key, then each field with its size in bytes, tab-separated.

    `n01440764_0000000<TAB>cls 1<TAB>jpg 103245<TAB>json 89`; easy to read and to `cut`/`awk`.
    """
    parts = [sample.get("__key__", "")]
    parts += [f"{ext} {_size_of(value)}" for ext, value in _fields(sample)]
    return "\t".join(parts)


def _as_text(value):
    """A field's content for a terminal: UTF-8 text as is, anything else as a placeholder."""
    if isinstance(value, str):
        return value
    data = bytes(value)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(data)} bytes of binary data>"
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return f"<{len(data)} bytes of binary data>"
    return text


def _field_value(sample, field):
    """The value of `field` in a sample; `a;b` picks the first of several alternatives."""
    for name in field.split(";"):
        if name in sample:
            return sample[name]
    return None


def show(sources, out=None, count=None, skip=0, fields=(), raw=False, urls=False):
    """Print the samples of `sources` to `out` (stdout): one `describe` line per sample.

    `fields` also prints those fields' contents (text as is, binary as a placeholder), indented
    below the line. With `raw`, only the bytes of the single field in `fields` are written, one
    sample after another (`tarshow -n 1 -f jpg --raw > a.jpg`). `urls` adds the shard each
    sample came from. Returns the number of samples shown.
    """
    from .streams import iter_samples

    if raw and len(fields) != 1:
        raise TarprocError("--raw needs exactly one -f FIELD")
    if out is None:
        from .storage.local import full_writer

        out = full_writer(sys.stdout.buffer) if raw else sys.stdout
    shown = 0
    for sample in _window(iter_samples(sources), skip, count):
        shown += 1
        if raw:
            value = _field_value(sample, fields[0])
            if value is None:
                raise TarprocError(f"{sample.get('__url__', '-')}: sample {sample.get('__key__')!r} "
                                   f"has no field {fields[0]!r}")
            out.write(value if isinstance(value, (bytes, bytearray)) else str(value).encode())
            continue
        line = describe(sample)
        if urls:
            line = f"{sample.get('__url__', '')}\t{line}"
        out.write(line + "\n")
        for field in fields:
            value = _field_value(sample, field)
            text = "<missing>" if value is None else _as_text(value)
            body = text.rstrip("\n").replace("\n", "\n    ")
            out.write(f"  {field}: {body}\n")
    out.flush()
    return shown


def _window(samples, skip, count):
    """Samples after skipping `skip`, at most `count` of them (None: all)."""
    if count is not None and count < 0:
        raise TarprocError("--count must not be negative")
    if skip and skip < 0:
        raise TarprocError("--skip must not be negative")
    n = 0
    for i, sample in enumerate(samples):
        if i < (skip or 0):
            continue
        if count is not None and n >= count:
            return
        n += 1
        yield sample
    # drain nothing: stopping early closes the underlying streams through the generator


def _strip_meta(sample):
    """The sample without the reader's metadata (`__url__`, ...), ready to be written again."""
    return {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def split(sources, pattern, maxcount=None, maxsize=None, count=None, skip=0, start=0,
          compression="auto"):
    """Split the samples of `sources` into numbered shards of `pattern` (`%06d` or `{:06d}`).

    A new shard starts before `maxcount` samples or `maxsize` bytes of field data would be
    exceeded (a single bigger sample still gets a shard of its own). Each shard is committed
    atomically; returns the manifest, a list of dicts with url, count, bytes and sha256.
    """
    from .streams import ShardWriter, iter_samples

    if maxcount is None and maxsize is None:
        raise TarprocError("give --maxcount and/or --maxsize to say where to split")
    writer = ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, start=start,
                         compression=compression)
    with writer:
        for sample in _window(iter_samples(sources), skip, count):
            writer.write(_strip_meta(sample))
    return writer.shards


def cat(sources, output="-", count=None, skip=0, compression="auto"):
    """Concatenate the samples of `sources` into one tar at `output` (default stdout).

    Compression follows the output name (`.tgz`, `.tar.zst`, ...), whatever the inputs used.
    Returns a dict with url, count, bytes and sha256 of what was written; the output appears
    only complete (committed atomically).
    """
    from .streams import SampleWriter, iter_samples

    with SampleWriter(output, compression=compression) as sink:
        for sample in _window(iter_samples(sources), skip, count):
            sink.write(_strip_meta(sample))
    return {"url": output, "count": sink.count, "bytes": sink.nbytes, "sha256": sink.sha256}


def write_manifest(url, manifest):
    """Write a JSON manifest to a path or URL atomically."""
    from . import storage

    data = (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode("utf-8")
    with storage.open_write(url) as sink:
        sink.write(data)
