"""Running the CLI as a user would: every MPI run is a subprocess with a timeout."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

BIN = pathlib.Path(sys.executable).parent
TIMEOUT = 600


def dllama(*args, np: int | None = None, timeout: int = TIMEOUT, check: bool = True, cwd=None):
    cmd = [str(BIN / "dllama-mpi"), *map(str, args)]
    if np is not None:
        cmd = [str(BIN / "mpirun"), "-np", str(np), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith("error:")]


def peak_rss_mib(stderr: str) -> dict[int, float]:
    line = [l for l in stderr.splitlines() if l.startswith("peak RSS:")][-1]
    return {int(r): float(m) for r, m in re.findall(r"rank (\d+) (\d+) MiB", line)}
