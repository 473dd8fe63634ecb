"""Every MPI call of the package: the communicator the run loop talks to.

Nothing else imports mpi4py. The run loop sees a ``World`` with a rank, a
size, one in-place sum over a float64 buffer (the hot path), and a few
setup-time collectives.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np

__all__ = ["World", "install_abort_on_error", "mpi_versions"]


def _mpi():
    from mpi4py import MPI

    return MPI


class World:
    """The ranks of one run.

    Args:
        comm: an mpi4py communicator; ``MPI.COMM_WORLD`` by default.
    """

    def __init__(self, comm=None):
        self._comm = comm if comm is not None else _mpi().COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def sum_in_place(self, buf: np.ndarray) -> np.ndarray:
        """Sum ``buf`` over all ranks, in place; every rank gets the sum."""
        self._comm.Allreduce(_mpi().IN_PLACE, buf, op=_mpi().SUM)
        return buf

    def broadcast(self, obj, root: int = 0):
        """Return root's ``obj`` on every rank."""
        return self._comm.bcast(obj, root=root)

    def gather_to_all(self, obj) -> list:
        """Return the list of every rank's ``obj``, in rank order."""
        return self._comm.allgather(obj)

    def gather_to_root(self, obj, root: int = 0) -> list | None:
        """Return the list of every rank's ``obj`` on ``root``, None elsewhere."""
        return self._comm.gather(obj, root=root)

    def abort(self, code: int = 1) -> None:
        """End every rank of the job with ``code``."""
        self._comm.Abort(code)


def mpi_versions() -> dict[str, str]:
    """Return the versions of mpi4py and of the MPI library."""
    import mpi4py

    MPI = _mpi()
    # Open MPI ends its version text with a NUL byte, which HDF5 refuses.
    text = MPI.Get_library_version().replace("\x00", "")
    library = text.strip().splitlines()[0].strip()
    return {
        "mpi4py": mpi4py.__version__,
        "mpi_library": library,
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
    }


def install_abort_on_error(world: World) -> None:
    """Make an uncaught exception on any rank abort the whole job.

    The traceback is printed once, by the rank that raised, prefixed with
    its number; then ``MPI_Abort`` ends the other ranks instead of leaving
    them waiting in a collective.
    """
    if world.size == 1:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, (KeyboardInterrupt, SystemExit)):
            previous(kind, value, tb)
        else:
            text = "".join(traceback.format_exception(kind, value, tb))
            sys.stderr.write(
                "".join(f"[rank {world.rank}] {line}\n" for line in text.splitlines())
            )
        sys.stderr.flush()
        world.abort(1)

    sys.excepthook = hook
