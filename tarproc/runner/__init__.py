"""Per-sample processing: one sample in one temp dir with a shell command, or Python code.

- :class:`ShellRunner`: a command or script per sample in a private temp dir (``tarproc -c``).
- :class:`PythonRunner`: a script's ``process_sample`` in-process (``tarproc -P``, ``htmapper -p``).
- :class:`SamplePool` / :func:`process_samples`: the local ``-p N`` pool, ordered and bounded.
"""

from tarproc.runner.pool import Outcome, PoolStats, SamplePool, process_samples
from tarproc.runner.pyscript import PythonRunner, ScriptError, load_process_sample, normalize_result
from tarproc.runner.sampledir import SampleResult, ShellRunner, default_tmpdir

__all__ = [
    "ShellRunner",
    "PythonRunner",
    "SampleResult",
    "ScriptError",
    "SamplePool",
    "Outcome",
    "PoolStats",
    "process_samples",
    "load_process_sample",
    "normalize_result",
    "default_tmpdir",
]
