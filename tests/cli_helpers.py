"""Running the installed commands the way a user does: through bash, from a directory."""

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def shell_env(extra=None):
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:/usr/bin:{env.get('PATH', '')}"
    env.pop("TARPROC_DEBUG", None)
    if extra:
        env.update(extra)
    return env


def sh(command, cwd, timeout=120, check=False, env=None, input=None):
    """Run a command line with bash -o pipefail in `cwd`; returns CompletedProcess (bytes)."""
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, capture_output=True,
                          timeout=timeout, env=shell_env(env), input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{command!r} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')}")
    return proc


def assert_one_line_error(proc, prog):
    """A failing command prints `prog: error: ...` and no Python traceback."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, err
    assert f"{prog}: error:" in err, err
    assert "Traceback" not in err, err
    return err
