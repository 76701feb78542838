"""Turn loose files into a sharded dataset: plan which files form which sample, deal the samples
into shards, and build one shard from its plan.

This is the Dask-free half of `htupload` (the job in :mod:`tarproc.jobs.upload_job` runs
:func:`build_shard` once per shard). Planning happens on the driver and is cheap; building reads
the sources and can run anywhere.

Sources of samples:

- a directory tree: every file is a field, grouped into samples by key = the path relative to
  the root up to the first dot of the basename (`n01/img_0001.seg.png` -> key `n01/img_0001`,
  field `seg.png`), exactly as the tar readers group members. Hidden files and directories (names
  starting with a dot) are not part of the dataset and are left out, as readers would drop them;
  a file without an extension cannot be a field and is an error, as is a symlink loop;
- a plan (TSV): lines `KEY.EXT<TAB>SOURCE`, SOURCE being a local path, any storage URL, or
  `text:VALUE` for inline data (as in `tarp create`); blank lines and `#` comments are ignored.
  Relative paths are relative to the current directory. Samples keep the plan's order;
- a list of files (one per line, such as `find` prints): keys are relative to the deepest
  directory common to all files (or to `root`), so `find images -name '*.jpg'` gives the same
  keys as the directory `images/`.

Directory trees and file lists are sorted by key, so the same files always give the same plan.

Sharding: `@N` patterns deal the samples into exactly N shards of nearly equal counts (contiguous
runs, so reading shards in order gives the samples in order; a shard may be empty when there are
fewer samples than shards, so the pattern stays complete); printf patterns (`%06d`) start a new
shard before `maxcount` samples or `maxsize` bytes would be exceeded, using file sizes taken on the
driver, so every shard is known in advance and all can be built in parallel. A plain output name
is one shard.

    plan = upload.plan_sources(["images/"])
    shards = upload.deal(plan, "out/ds-@4.tar")
    upload.build_shard(shards[0])
"""

import os
import random
import re
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

from . import shards as _shards
from .errors import TarprocError

__all__ = ["PlanError", "UnreadableSources", "Sample", "Shard", "plan_directory", "plan_tsv",
           "plan_files", "plan_sources", "read_lines", "shuffle_samples", "deal", "sample_sizes",
           "read_source", "build_shard", "is_sharded_pattern", "TAR_BLOCK"]

TAR_BLOCK = 512
#: Bytes a tar spends beyond its members: two zero blocks.
TAR_TRAILER = 1024


class PlanError(TarprocError):
    """The sources cannot be turned into samples (bad plan line, file without extension, ...)."""


class UnreadableSources(TarprocError):
    """Some files of a shard could not be read; the message names each (key.ext, source, why)."""

    def __init__(self, message, problems=()):
        super().__init__(message)
        self.problems = list(problems)


#: One planned sample: its key and its fields as ((ext, source), ...), source a path, URL or
#: `text:VALUE`.
Sample = namedtuple("Sample", "key fields")

#: One planned shard: where it goes, its position, and its samples.
Shard = namedtuple("Shard", "url index samples")


def _split(name, where):
    from .tario.names import split_name, unsafe_reason

    key, ext = split_name(name)
    if key is None or not ext:
        raise PlanError(f"{where}: {name!r} has no extension after the key, so it cannot be a "
                        f"sample field (KEY.EXT)")
    reason = unsafe_reason(name)
    if reason:
        raise PlanError(f"{where}: {name!r} is not a safe member name ({reason})")
    return key, ext


class _Collector:
    """Groups (key, ext, source) triples into samples, refusing duplicate fields."""

    def __init__(self):
        self.samples = {}

    def add(self, key, ext, source, where):
        fields = self.samples.setdefault(key, {})
        if ext in fields:
            raise PlanError(f"{where}: field {key}.{ext} appears twice "
                            f"({fields[ext]} and {source})")
        fields[ext] = source

    def result(self, sort):
        keys = sorted(self.samples) if sort else list(self.samples)
        return [Sample(k, tuple(sorted(self.samples[k].items()))) for k in keys]


def _walk(root, rel, seen, out):
    """(relative name, path) of every non-hidden file under root, following directory symlinks."""
    here = os.path.join(root, rel) if rel else root
    real = os.path.realpath(here)
    if real in seen:
        raise PlanError(f"{here}: directory symlink loop")
    seen = seen | {real}
    try:
        entries = sorted(os.scandir(here), key=lambda e: e.name)
    except OSError as exc:
        raise PlanError(f"{here}: cannot list directory: {exc.strerror or exc}") from exc
    for entry in entries:
        if entry.name.startswith("."):
            continue
        name = f"{rel}/{entry.name}" if rel else entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            _walk(root, name, seen, out)
        else:
            # regular files, and also dangling symlinks and special files: these are reported
            # when the shard is built rather than silently left out
            out.append((name, entry.path))


def plan_directory(root):
    """Samples of every file in a directory tree, sorted by key."""
    if not os.path.isdir(root):
        raise PlanError(f"{root}: not a directory")
    files = []
    _walk(root, "", frozenset(), files)
    collect = _Collector()
    for name, path in files:
        key, ext = _split(name, path)
        collect.add(key, ext, path, path)
    return collect.result(sort=True)


def read_lines(source):
    """The lines of a local file, a URL or `-` (stdin), decoded as UTF-8, without line ends."""
    from . import storage

    with storage.open_read(source) as stream:
        data = stream.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{source}: not UTF-8 text ({exc})") from exc
    return text.splitlines()


def plan_tsv(lines, name="plan"):
    """Samples of a plan: lines `KEY.EXT<TAB>SOURCE`, in the order keys first appear."""
    collect = _Collector()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{name}:{number}"
        if "\t" not in line:
            raise PlanError(f"{where}: expected KEY.EXT<TAB>SOURCE, got {line[:80]!r}")
        member, source = line.split("\t", 1)
        if not source.startswith("text:"):
            source = source.strip()
        if not source:
            raise PlanError(f"{where}: empty SOURCE for {member!r}")
        key, ext = _split(member.strip(), where)
        collect.add(key, ext, source, where)
    return collect.result(sort=False)


def _common_dir(paths):
    dirs = [p.split("/")[:-1] for p in paths]
    common = dirs[0]
    for d in dirs[1:]:
        n = 0
        while n < len(common) and n < len(d) and common[n] == d[n]:
            n += 1
        common = common[:n]
    return "/".join(common)


def plan_files(paths, root=None, name="file list"):
    """Samples of a list of files; keys are relative to `root` or to the files' common directory."""
    paths = [p.strip() for p in paths]
    paths = [p for p in paths if p and not p.startswith("#")]
    if not paths:
        raise PlanError(f"{name}: no files listed")
    local = [("://" not in p and not p.startswith("pipe:")) for p in paths]
    absolute = any(p.startswith("/") for p, is_local in zip(paths, local) if is_local)
    logical = []
    for p, is_local in zip(paths, local):
        if is_local:
            p = os.path.abspath(p) if absolute or root else os.path.normpath(p)
            if p.startswith("./"):
                p = p[2:]
        logical.append(p)
    if root is not None:
        base = os.path.abspath(root).rstrip("/")
        prefix = base + "/"
    else:
        base = _common_dir(logical)
        prefix = base + "/" if base else ""
    collect = _Collector()
    for source, rel in zip(paths, logical):
        if not rel.startswith(prefix):
            raise PlanError(f"{source}: not under {base}")
        key, ext = _split(rel[len(prefix):], source)
        collect.add(key, ext, source, source)
    return collect.result(sort=True)


def plan_sources(sources, files=None, root=None):
    """Samples of several sources in turn: directories, plan files or URLs, `-` (a plan on stdin).

    `files` names a list of files (a path, URL or `-` for stdin) planned with :func:`plan_files`.
    Keys must be unique across all sources.
    """
    samples = []
    for source in sources:
        if source != "-" and "://" not in source and os.path.isdir(source):
            samples.extend(plan_directory(source))
        else:
            samples.extend(plan_tsv(read_lines(source), name=source))
    if files is not None:
        samples.extend(plan_files(read_lines(files), root=root,
                                  name="stdin" if files == "-" else files))
    seen = set()
    for sample in samples:
        if sample.key in seen:
            raise PlanError(f"sample key {sample.key!r} comes from more than one source")
        seen.add(sample.key)
    return samples


def shuffle_samples(samples, seed):
    """A copy of the samples in a random order that depends only on `seed`."""
    out = list(samples)
    random.Random(seed).shuffle(out)
    return out


def source_size(source):
    """Bytes a source will contribute, or None when it cannot be found out (reported at build)."""
    if source.startswith("text:"):
        return len(source[5:].encode("utf-8"))
    from . import storage

    try:
        if storage.is_local(source):
            return os.stat(storage.local_path(source)).st_size
        return storage.size(source)
    except Exception:  # noqa: BLE001 - the build step reports the real problem
        return None


def sample_sizes(samples, threads=16):
    """For each sample, the bytes its members take in an uncompressed tar (headers, padding).

    Local files are stat'ed; remote ones are asked for their size, several at a time.
    """
    sources = sorted({src for s in samples for _, src in s.fields})
    remote = [s for s in sources if "://" in s and not s.startswith("file://")]
    sizes = {}
    if remote:
        with ThreadPoolExecutor(max(1, min(threads, len(remote)))) as pool:
            sizes.update(zip(remote, pool.map(source_size, remote)))
    for src in sources:
        if src not in sizes:
            sizes[src] = source_size(src)
    return [sum(_member_bytes(f"{s.key}.{ext}", sizes[src] or 0) for ext, src in s.fields)
            for s in samples]


def _member_bytes(name, size):
    """Tar bytes of one member: header, data padded to 512, and at most a pax record for a long
    or non-ASCII name (counted whenever it might be needed, so estimates never fall short)."""
    blocks = -(-size // TAR_BLOCK)
    extra = 0
    raw = name.encode("utf-8")
    if len(raw) > 100 or not raw.isascii():
        extra = TAR_BLOCK + -(-(len(raw) + 32) // TAR_BLOCK) * TAR_BLOCK
    return TAR_BLOCK + blocks * TAR_BLOCK + extra


def _numbered_name(pattern, index):
    if _shards.is_printf(pattern):
        return _shards.printf_name(pattern, index)
    return pattern.format(index)


def is_sharded_pattern(pattern):
    """'at' for `@N` patterns, 'printf' for `%06d`/`{:06d}` numbering, None for a single name."""
    if _shards.at_count(pattern) is not None:
        return "at"
    if _shards.is_printf(pattern) or re.search(r"\{[^{}]*\}", pattern.rsplit("/", 1)[-1]):
        return "printf"
    return None


def deal(samples, output, maxcount=None, maxsize=None, sizes=None):
    """The shards of an upload: a list of :class:`Shard` (url, index, samples).

    `@N` deals contiguous runs of nearly equal counts into exactly N shards; printf/`{}` patterns
    fill shards up to `maxcount` samples and `maxsize` tar bytes, in order, with `sizes` from
    :func:`sample_sizes` (computed here when needed and not given); a single name gets all.
    """
    kind = is_sharded_pattern(output)
    if kind == "at":
        if maxcount is not None or maxsize is not None:
            raise PlanError(f"{output}: --maxcount/--maxsize need a numbered pattern such as "
                            f"out-%06d.tar; @N deals the samples evenly into N shards")
        urls = _shards.expand(output)
        n = len(urls)
        q, r = divmod(len(samples), n)
        out, start = [], 0
        for i, url in enumerate(urls):
            end = start + q + (1 if i < r else 0)
            out.append(Shard(url, i, list(samples[start:end])))
            start = end
        return out
    if kind is None:
        if maxcount is not None or maxsize is not None:
            raise PlanError(f"{output}: --maxcount/--maxsize need a numbered pattern such as "
                            f"out-%06d.tar")
        return [Shard(output, 0, list(samples))]
    maxcount = 100_000 if maxcount is None else int(maxcount)
    if maxcount < 1:
        raise PlanError("--maxcount must be at least 1")
    if maxsize is not None and sizes is None:
        sizes = sample_sizes(samples)
    budget = None if maxsize is None else maxsize - TAR_TRAILER
    out, current, used = [], [], 0
    for i, sample in enumerate(samples):
        size = sizes[i] if sizes is not None else 0
        if current and (len(current) >= maxcount or (budget is not None and used + size > budget)):
            out.append(Shard(_numbered_name(output, len(out)), len(out), current))
            current, used = [], 0
        current.append(sample)
        used += size
    if current or not out:
        out.append(Shard(_numbered_name(output, len(out)), len(out), current))
    return out


def read_source(source):
    """The bytes of a source: `text:VALUE` inline, else the whole object at a path or URL."""
    if source.startswith("text:"):
        return source[5:].encode("utf-8")
    from . import storage

    if storage.is_local(source):
        path = storage.local_path(source)
        if os.path.isdir(path):
            raise TarprocError(f"cannot read {storage.redact(source)}: is a directory")
    with storage.open_read(source) as stream:
        return stream.read()


def _reason(exc):
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def build_shard(shard, skip_unreadable=False, compression="auto"):
    """Write one shard from its plan and commit it; returns its statistics and manifest entry.

    Every source is read; if any cannot be, the shard is not committed and
    :class:`UnreadableSources` (with `.problems`) names every bad file of the shard, so one run
    finds them all. With `skip_unreadable`, those samples are left out instead, the shard is
    committed, and the statistics list them under `unreadable` (the caller must report them).
    """
    from .streams import SampleWriter

    problems, bytes_in = [], 0
    writer = SampleWriter(shard.url, compression=compression)
    try:
        for sample in shard.samples:
            record = {"__key__": sample.key}
            bad = []
            for ext, source in sample.fields:
                try:
                    data = read_source(source)
                except Exception as exc:  # noqa: BLE001 - every cause is reported with its file
                    from .storage import redact  # (reports and manifests carry no credentials)

                    bad.append({"key": sample.key, "field": ext, "source": redact(source),
                                "error": _reason(exc), "shard": redact(shard.url)})
                    continue
                record[ext] = data
                bytes_in += len(data)
            if bad:
                problems.extend(bad)
                continue
            if not problems or skip_unreadable:
                writer.write(record)
        if problems and not skip_unreadable:
            first = problems[0]
            from .storage import redact

            raise UnreadableSources(
                f"{redact(shard.url)}: {len(problems)} unreadable file(s), shard not written; first: "
                f"{first['key']}.{first['field']} ({first['source']}): {first['error']}", problems)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"url": shard.url, "index": shard.index, "count": writer.count,
            "bytes": writer.nbytes, "sha256": writer.sha256,
            "samples_in": len(shard.samples), "samples_out": writer.count,
            "bytes_in": bytes_in, "bytes_out": writer.nbytes, "unreadable": problems}


def build_shard_task(shard, skip_unreadable=False, compression="auto"):
    """:func:`build_shard` as a job task: unreadable files come back as statistics, not raised.

    A missing file will not appear on a retry, and an exception's message would be cut to one
    line; returned, every problem reaches the driver intact (`written` False). Other errors (an
    output that cannot be written, ...) still raise, so the driver retries them.
    """
    try:
        return build_shard(shard, skip_unreadable=skip_unreadable, compression=compression)
    except UnreadableSources as exc:
        return {"url": shard.url, "index": shard.index, "written": False, "count": 0,
                "samples_in": len(shard.samples), "samples_out": 0,
                "unreadable": exc.problems, "error": str(exc)}


def describe_shard(url):
    """Manifest entry of an existing shard (count of samples, bytes, sha256), read back."""
    import hashlib

    from . import storage
    from .tario import iter_samples

    digest, nbytes = hashlib.sha256(), 0

    class _Hashing:
        def __init__(self, raw):
            self.raw = raw

        def read(self, n=-1):
            nonlocal nbytes
            data = self.raw.read(n)
            digest.update(data)
            nbytes += len(data)
            return data

        def readinto(self, buf):
            data = self.read(len(buf))
            buf[:len(data)] = data
            return len(data)

        def readable(self):
            return True

    count = 0
    with storage.open_read(url) as raw:
        hashing = _Hashing(raw)
        for _ in iter_samples(hashing, url=url):
            count += 1
        while hashing.read(1 << 20):
            pass
    return {"url": url, "count": count, "bytes": nbytes, "sha256": digest.hexdigest()}
