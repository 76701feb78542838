"""Python code per sample: a ``process_sample(sample)`` function defined by a script's text.

This is the contract shared by ``tarproc -P FILE.py`` and ``htmapper -p FILE.py``: the script
defines ``process_sample(sample: dict) -> dict | list[dict] | None``; fields are bytes,
``__key__`` is a str, None drops the sample. Workers receive the source text, never a path, so
they need no filesystem shared with the process that read the file.

Results are normalised by :func:`normalize_result`:

- a dict is one output sample, a list or tuple of dicts several, None (or an empty list) none;
- ``__key__`` missing means the input key — allowed only when there is a single output, since
  several outputs with the same key would merge into one sample in a tar;
- field values must be bytes-like; a str is encoded as UTF-8 (convenient for text fields);
  anything else (int, float, numpy arrays, ...) is a SampleFailed naming the key and the field,
  rather than a silent guess at an encoding;
- other ``__meta__`` fields are kept as they are; the input's ``__url__`` is carried over when
  the output has none;
- an output with no fields (``{}``, ``{"__key__": k}``: nothing to write) is dropped, as the
  shell path drops a sample whose files are all gone, and counted so;
- keys and field names are checked like member names (no ``..``, absolute paths, control
  characters, ``/`` in a field name): UnsafeNameError; a key, field name or str value that is
  not valid Unicode text (a lone surrogate such as ``"\\udcff"``) cannot be written as UTF-8: a
  SampleFailed naming the key and the field.

``sys.exit()`` in process_sample is a failure of that sample like any exception (a script must
not end the command, nor a ``-p N`` worker process); only the SystemExit that a pool raises on
SIGTERM (:class:`~tarproc.runner.pool.SignalExit`) goes through.
"""

from __future__ import annotations

import sys
import types

from tarproc.errors import SampleFailed, TarprocError, UnsafeNameError
from tarproc.runner.pool import SignalExit
from tarproc.runner.sampledir import SampleResult, check_ext, check_key

__all__ = ["load_module", "load_process_sample", "normalize_result", "PythonRunner", "ScriptError"]


class ScriptError(TarprocError):
    """A Python script cannot be used: syntax error, error at import, no process_sample."""


def load_module(source, filename="<script>"):
    """Run a script's ``source`` in a fresh module namespace and return the module.

    Raises a one-line ScriptError naming ``filename`` (and the script's line) for a syntax error
    or an exception while the module body runs. Shared by ``tarproc -P``, ``htmapper -p`` and
    the reshard jobs' mappers and reducers.
    """
    if isinstance(source, bytes):
        source = source.decode("utf-8")
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as exc:
        raise ScriptError(
            f"{filename}: syntax error at line {exc.lineno}: {exc.msg}"
        ) from None
    module = types.ModuleType("__tarproc_script__")
    module.__file__ = filename
    try:
        exec(code, module.__dict__)
    except Exception as exc:
        raise ScriptError(
            f"{filename}{_script_line(exc, filename)}: {type(exc).__name__} while loading: {exc}"
        ) from None
    return module


def _script_line(exc, filename):
    """``", line N"``: the script's last line in ``exc``'s traceback (empty if none)."""
    line = ""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = f", line {tb.tb_lineno}"
        tb = tb.tb_next
    return line


def load_process_sample(source, filename="<script>"):
    """Execute ``source`` in a fresh module namespace and return its ``process_sample``.

    Raises ScriptError naming ``filename`` for a syntax error, an exception while the module body
    runs, or a missing or non-callable ``process_sample``.
    """
    fn = load_module(source, filename).__dict__.get("process_sample")
    if fn is None:
        raise ScriptError(f"{filename}: does not define process_sample(sample)")
    if not callable(fn):
        raise ScriptError(f"{filename}: process_sample is not a function")
    return fn


def _traceback_tail(exc, lines=10):
    """The last ``lines`` lines of the traceback of ``exc``, raised by the user's code called
    from PythonRunner.run: without run's own frame, which says nothing to the user."""
    import traceback  # only on errors: ~4 ms of every start otherwise

    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None and tb.tb_frame.f_code is PythonRunner.run.__code__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return "\n".join(text.rstrip("\n").split("\n")[-lines:])


_SAFE_EXTS = set()  # field names already checked by check_ext


def _fail(msg, key, status="badresult"):
    return SampleFailed(msg, key=key, status=status)


def _not_text(text):
    """True if ``text`` (a str) cannot be encoded as UTF-8 (it holds a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _one(result, in_key, url, allow_default_key, owned=False):
    """One output dict as it is written, or None if it has no field (a dropped output)."""
    if not isinstance(result, dict):
        raise _fail(
            f"sample {in_key!r}: process_sample returned a list holding "
            f"{type(result).__name__}, not dict",
            in_key,
        )
    out = result if owned else dict(result)  # never change a dict the caller may still hold
    key = out.get("__key__")
    if key is None:
        if not allow_default_key:
            raise _fail(
                f"sample {in_key!r}: process_sample returned several samples; "
                "each needs its own __key__",
                in_key,
            )
        out["__key__"] = key = in_key
    elif key.__class__ is not str:
        raise _fail(
            f"sample {in_key!r}: __key__ returned by process_sample is "
            f"{type(key).__name__}, not str",
            in_key,
        )
    check_key(key, f"sample {in_key!r}: key returned by process_sample")
    if not key.isascii() and _not_text(key):  # (isascii: a flag of the str, no scan)
        raise _fail(
            f"sample {in_key!r}: key {key!r} returned by process_sample is not valid Unicode "
            "text (a lone surrogate)",
            in_key,
        )
    fixed = None
    meta = 0  # "__" names: an output with nothing else has no field to write
    try:
        for name, value in out.items():
            if value.__class__ is bytes and name in _SAFE_EXTS:
                continue  # the common case: a field name seen before, bytes
            if name[:2] == "__":
                meta += 1
                continue
            if value.__class__ is not bytes:
                if isinstance(value, str):
                    try:
                        value = value.encode("utf-8")
                    except UnicodeEncodeError:
                        raise _fail(
                            f"sample {key!r}: field {name!r} is a str that is not valid Unicode "
                            "text (a lone surrogate); return bytes for binary data",
                            key,
                        ) from None
                elif isinstance(value, (bytes, bytearray, memoryview)):
                    value = bytes(value)
                else:
                    raise _fail(
                        f"sample {key!r}: field {name!r} is {type(value).__name__}, "
                        "not bytes or str",
                        key,
                    )
                if fixed is None:
                    fixed = []
                fixed.append((name, value))
            if name not in _SAFE_EXTS:
                check_ext(name, key)
                if not name.isascii() and _not_text(name):
                    raise _fail(
                        f"sample {key!r}: field name {name!r} is not valid Unicode text "
                        "(a lone surrogate)",
                        key,
                    )
                if len(_SAFE_EXTS) < 4096:
                    _SAFE_EXTS.add(name)
    except TypeError:  # a field name that cannot be sliced (name[:2]): not a str
        for name in out:
            check_ext(name, key)
        raise
    if meta == len(out):
        return None  # nothing to write: dropped (see module doc)
    if fixed:
        out.update(fixed)
    if url is not None and "__url__" not in out:
        out["__url__"] = url
    return out


def normalize_result(result, in_sample, owned=None):
    """Turn what process_sample returned into a list of output samples (see module doc).

    ``owned`` is a dict the caller made for this call only (the copy it passed to the user's
    function): if that is what came back, it is used as is instead of being copied again.
    Outputs without any field are left out (an empty list: the sample is dropped).
    """
    in_key = in_sample.get("__key__")
    url = in_sample.get("__url__")
    if result is None:
        return []
    if isinstance(result, dict):
        out = _one(result, in_key, url, True, result is owned)
        return [] if out is None else [out]
    if isinstance(result, (list, tuple)):
        single = len(result) == 1
        outs = [_one(r, in_key, url, single) for r in result]
        if None in outs:
            outs = [out for out in outs if out is not None]
        return outs
    raise _fail(
        f"sample {in_key!r}: process_sample returned {type(result).__name__}; "
        "expected dict, list of dicts or None",
        in_key,
    )


class _Capture:
    """A minimal text sink standing in for sys.stdout/sys.stderr while user code runs."""

    __slots__ = ("parts",)

    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return False

    def take(self):
        if not self.parts:
            return b""
        data = "".join(self.parts).encode("utf-8", "replace")
        self.parts.clear()
        return data


class PythonRunner:
    """Run a script's ``process_sample`` on each sample, in the current process.

    Picklable: it carries the source text and compiles it lazily, once per process. What the code
    prints to ``sys.stdout``/``sys.stderr`` is captured per sample into the result (writes made
    below Python, to file descriptors 1 and 2, are not). An exception in the user code, or a
    ``sys.exit()``, becomes a SampleFailed (status ``"exception"``) with the traceback's tail. The function receives a
    shallow copy of the sample, so the input stays unchanged for ``errors="keep"``.
    """

    def __init__(self, source, filename="<script>"):
        if isinstance(source, bytes):
            source = source.decode("utf-8")
        self.source = source
        self.filename = filename
        self._fn = None
        self._out = _Capture()
        self._err = _Capture()

    @classmethod
    def from_file(cls, path):
        """A runner for the script at ``path`` (read now; the text travels with the object)."""
        with open(path, "rb") as f:
            return cls(f.read().decode("utf-8"), path)

    def __getstate__(self):
        return {"source": self.source, "filename": self.filename, "_fn": None,
                "_out": _Capture(), "_err": _Capture()}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def load(self):
        """Compile the script now (to report a ScriptError before any sample is read)."""
        if self._fn is None:
            self._fn = load_process_sample(self.source, self.filename)
        return self._fn

    def close(self):
        """Nothing to release; present for symmetry with ShellRunner."""

    def __call__(self, sample, index=0):
        return self.run(sample, index)

    def run(self, sample, index=0):
        """Call process_sample on a copy of ``sample``; return a SampleResult."""
        fn = self._fn or self.load()
        out, err = self._out, self._err
        if out.parts or err.parts:  # left over from an interrupted call
            out.take(), err.take()
        saved_out, saved_err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        arg = dict(sample)
        try:
            result = fn(arg)
        except (Exception, SystemExit) as exc:  # sys.exit() too: see the module doc
            sys.stdout, sys.stderr = saved_out, saved_err
            if isinstance(exc, SignalExit):
                raise
            key = sample.get("__key__")
            stderr = err.take()
            tail = _traceback_tail(exc)
            failed = SampleFailed(
                f"sample {key!r}: process_sample raised {type(exc).__name__}: {exc}",
                key=key,
                status="exception",
                stderr_tail="\n".join(
                    (stderr.decode("utf-8", "replace").rstrip("\n") + "\n" + tail)
                    .strip("\n")
                    .split("\n")[-10:]
                ),
            )
            failed.stdout = out.take()
            failed.stderr = stderr + tail.encode("utf-8", "replace") + b"\n"  # (whole lines)
            raise failed from None
        finally:
            if sys.stdout is out:
                sys.stdout, sys.stderr = saved_out, saved_err
        stdout, stderr = out.take(), err.take()
        try:
            outputs = normalize_result(result, sample, arg)
        except (SampleFailed, UnsafeNameError) as exc:
            exc.stdout, exc.stderr = stdout, stderr
            raise
        return SampleResult(outputs, stdout, stderr)

    def __repr__(self):
        return f"PythonRunner(filename={self.filename!r})"
