"""Running a benchmark's worker under mpiexec and reading its one result."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def find_mpiexec() -> str:
    """Return the mpiexec beside the running Python, else the one on PATH.

    Raises:
        SystemExit: if there is none.
    """
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise SystemExit(
            f"error: no mpiexec beside {sys.executable!r} nor on PATH; install an MPI "
            "(e.g. pip install mpich) or put its mpiexec on PATH"
        )
    return found


def worker_env() -> dict[str, str]:
    """Return this environment with one BLAS/OpenMP thread per process."""
    env = dict(os.environ)
    env.update({name: "1" for name in THREAD_VARIABLES})
    return env


def run_worker(command: list[str], prefix: str, timeout: float, what: str, hint: str):
    """Run ``command`` and return the JSON after ``prefix`` on its last such line.

    Raises:
        SystemExit: on a timeout (the whole process group is killed) or a
            failure, saying ``what`` failed, the command, ``hint`` and the end
            of its stderr.
    """
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SystemExit(
            f"error: {what} took more than --timeout {timeout:g} s and was killed; "
            f"{hint}\ncommand: {shlex.join(command)}"
        ) from None
    lines = [line for line in out.splitlines() if line.startswith(prefix)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(err.strip().splitlines()[-20:])
        raise SystemExit(
            f"error: {what} exited with code {proc.returncode}"
            f"{'' if lines else ' and printed no result'}\n"
            f"command: {shlex.join(command)}\n{tail}"
        )
    return json.loads(lines[-1].removeprefix(prefix))
