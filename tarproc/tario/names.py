"""Member names: safety checks and the WebDataset split of a name into key and extension."""

import re

__all__ = ["unsafe_reason", "split_name", "is_meta_name"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_META = re.compile(r"__[^/]*__($|/)")
_SURROGATE = re.compile("[\udc80-\udcff]")


def unsafe_reason(name):
    """Why ``name`` could escape an extraction directory or mislead a terminal, or None if safe.

    Unsafe: empty, absolute, a ``..`` path component, control characters (newlines, escapes),
    or bytes that are not UTF-8 (read as surrogate escapes): keys become file contents, command
    environments and member names of the UTF-8 pax headers we write, which cannot carry them.
    """
    if not name:
        return "empty name"
    if name[0] == "/":
        return "absolute path"
    if ".." in name and ".." in name.split("/"):
        return "'..' path component"
    if _CONTROL.search(name):
        return "control character in name"
    if _SURROGATE.search(name):
        return "not UTF-8"
    return None


def split_name(name):
    """(key, extension) of a member name as WebDataset groups it, or (None, None).

    The key is the path up to the first dot of the basename (directories stay in the key), the
    extension is everything after that dot. A basename without a dot has no key. This is the
    same split as ``webdataset.tariterators.base_plus_ext``, without the regular expression,
    including its corner case: a basename starting with a dot belongs to the key of its
    directory (``d/.x`` is key ``d/``, extension ``x``) when that directory name has no dot.
    """
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot > slash + 1:
        return name[:dot], name[dot + 1 :]
    if dot < 0 or slash < 0 or "." in name[name.rfind("/", 0, slash) + 1 : slash]:
        return None, None
    return name[:dot], name[dot + 1 :]


def is_meta_name(name):
    """True for names WebDataset skips as metadata (``__something__`` at the start of the path)."""
    return name.startswith("__") and _META.match(name) is not None
