"""Shard patterns: turn `imagenet_train-{0000..0147}.tgz`, `Volume_@1000.tgz` or a glob into URLs.

Patterns are how users name whole collections of shards on the command line, in any storage
scheme. Brace expansion and the `@N` notation (from tmbdev's dlinputs/htpar) are pure string
operations; globs are resolved against storage (local paths, s3, gs).
"""

import glob as _glob
import re

from .errors import PatternError

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_AT = re.compile(r"@(\d+)")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _brace_options(body, pattern):
    """The alternatives one `{...}` group stands for: a numeric range or a comma list."""
    m = _RANGE.match(body)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        width = max(width, len(hi) if hi.startswith("0") and len(hi) > 1 else 0)
        a, b = int(lo), int(hi)
        step = 1 if b >= a else -1
        return [str(i).zfill(width) for i in range(a, b + step, step)]
    if "," in body:
        return body.split(",")
    raise PatternError(f"{pattern}: cannot expand {{{body}}} (use {{A..B}} or {{a,b}})")


def expand_braces(pattern):
    """Expand every `{A..B}` and `{a,b,c}` group (leftmost varies slowest), like bash."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    out = []
    for option in _brace_options(m.group(1), pattern):
        out.extend(expand_braces(head + option + tail))
    return out


def _split_last_component(url):
    """(everything up to the last '/', the last path component)."""
    i = url.rfind("/")
    return url[: i + 1], url[i + 1:]


def at_count(pattern):
    """The N of a `NAME@N` pattern, or None when the pattern has no `@digits` in its last component."""
    _, last = _split_last_component(pattern)
    found = list(_AT.finditer(last))
    return int(found[-1].group(1)) if found else None


def expand_at(pattern):
    """Expand the last `@digits` of the last path component into N zero-padded shard names.

    The width is the number of digits written: `x-@16.tar` gives x-00.tar .. x-15.tar and
    `Volume_@1000.tgz` gives Volume_0000.tgz .. Volume_0999.tgz. An `@` elsewhere (such as
    `http://user@host/`) is left alone.
    """
    dirpart, last = _split_last_component(pattern)
    found = list(_AT.finditer(last))
    if not found:
        return [pattern]
    m = found[-1]
    digits = m.group(1)
    n, width = int(digits), len(digits)
    if n == 0:
        raise PatternError(f"{pattern}: @{digits} means zero shards")
    head, tail = last[: m.start()], last[m.end():]
    return [f"{dirpart}{head}{str(i).zfill(width)}{tail}" for i in range(n)]


def expand(pattern):
    """All names a pattern stands for (braces and `@N`), without touching storage."""
    out = []
    for name in expand_braces(pattern):
        out.extend(expand_at(name))
    return out


def has_glob(url):
    """Whether the last part of a URL holds glob characters (`*`, `?`, `[`)."""
    return bool(_GLOB_CHARS.search(url))


def _resolve_glob(url):
    from . import storage

    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        return sorted(_glob.glob(path))
    return sorted(storage.glob(url))


def expand_inputs(patterns):
    """Input URLs for one pattern or a list of them: braces, `@N`, then globs for local/s3/gs.

    A glob that matches nothing is an error; so is an empty result. `-` and `pipe:` pass as is,
    and so does a local path that names an existing file as it is (`c@2.tgz`).
    """
    import os

    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    elif not isinstance(patterns, (list, tuple)):
        patterns = list(patterns)
    patterns = [os.fspath(p) if isinstance(p, os.PathLike) else p for p in patterns]
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"an input is a URL, a path or a shard pattern, not {type(p).__name__}")
    urls = []
    for pattern in patterns:
        if pattern == "-" or pattern.startswith("pipe:") or _existing_file(pattern):
            urls.append(pattern)
            continue
        for name in expand(pattern):
            if has_glob(name) and not _is_http(name):
                matched = _resolve_glob(name)
                if not matched:
                    raise PatternError(f"{name}: no file matches this pattern")
                urls.extend(matched)
            else:
                urls.append(name)
    if not urls:
        raise PatternError(f"{' '.join(patterns)}: the pattern names no shards")
    return urls


def require_local_inputs(urls):
    """Raise one PatternError naming the local inputs among ``urls`` that do not exist: a job
    refuses them before any work (remote ones fail in their tasks)."""
    import os

    from . import storage

    missing = [u for u in urls if u != "-" and storage.is_local(u)
               and not os.path.exists(storage.local_path(u))]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise PatternError(f"no such input shard: {', '.join(missing[:3])}{more}")
    return urls


def _existing_file(pattern):
    """Whether ``pattern`` holds pattern characters but names an existing local file as it is
    (``c@2.tgz``, ``b{1}.tgz``): that file is meant, as bash leaves a glob without match alone."""
    if not any(c in pattern for c in "@{[*?") or _is_http(pattern):
        return False
    from . import storage
    import os

    return storage.is_local(pattern) and os.path.isfile(storage.local_path(pattern))


def _is_http(url):
    return url.startswith(("http://", "https://"))


#: A printf-style shard-number field of an output pattern, as in `out-%06d.tar`.
PRINTF_FIELD = re.compile(r"%0?\d*d")


def is_printf(pattern):
    """Whether an output pattern is open-ended printf-style numbering such as `out-%06d.tar`."""
    return PRINTF_FIELD.search(pattern) is not None


def printf_name(pattern, index):
    """The index-th name of a printf-style output pattern."""
    return PRINTF_FIELD.sub(lambda m: m.group(0) % index, pattern, count=1)


def expand_outputs(pattern, count=None):
    """Output URLs for a pattern; with `count`, check that it names exactly that many shards."""
    import os

    names = expand(os.fspath(pattern))
    if count is not None and len(names) != count:
        raise PatternError(
            f"{pattern}: names {len(names)} output shard(s) but there are {count} input shard(s)"
        )
    return names
