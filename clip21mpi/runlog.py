"""Every h5py call of the package: the HDF5 run log, written and read.

Layout of one run's file::

    /                      attributes: config (JSON), command, status, ...
    /feature               int64 (d,), a dimension scale
    /x0, /x_final          float64 (d,), indexed by feature
    /metrics/iteration     int64 (K+1,), a dimension scale
    /metrics/<name>        float64 (K+1,), indexed by iteration

The writer keeps the file closed between flushes, so any reader can open it
while the run goes on, and after a crash it holds every flushed row.
"""

from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["METRICS", "RunLog", "RunRecord", "read_log"]

METRICS = ("grad_norm_sq", "loss", "clip_fraction", "bits_sent", "wall_time")
STATUSES = ("running", "converged", "max_iters", "diverged", "failed", "checkpointed")


def _h5py():
    import h5py

    return h5py


def h5py_version() -> str:
    """Return the version of h5py that writes the logs."""
    return _h5py().__version__


def _open(path: str, mode: str):
    # Without file locking a reader holding the file open does not block the
    # writer's next flush.
    return _h5py().File(path, mode, locking=False)


def _attr_value(value):
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


class RunLog:
    """The writer of one run's log (used on one rank only).

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "run.h5")
        >>> log = RunLog.create(path, {"config": {}}, np.zeros(3))
        >>> log.append(np.arange(2), {m: np.zeros(2) for m in METRICS})
        >>> log.close("max_iters", np.zeros(3))
        >>> read_log(path)["attrs"]["status"]
        'max_iters'
    """

    def __init__(self, path: str, metrics=METRICS):
        self.path = os.fspath(path)
        self.metrics = tuple(metrics)

    @classmethod
    def create(
        cls, path, attrs: dict, x0: np.ndarray, overwrite: bool = False, metrics=METRICS
    ) -> RunLog:
        """Create the file with its attributes, ``x0`` and empty metrics.

        Raises:
            FileExistsError: if the file exists and ``overwrite`` is false.
        """
        log = cls(path, metrics)
        parent = os.path.dirname(os.path.abspath(log.path))
        os.makedirs(parent, exist_ok=True)
        with _open(log.path, "w" if overwrite else "w-") as f:
            for key, value in attrs.items():
                f.attrs[key] = _attr_value(value)
            f.attrs["status"] = "running"
            x0 = np.asarray(x0, dtype=np.float64)
            feature = f.create_dataset("feature", data=np.arange(x0.size))
            feature.make_scale("feature")
            f.create_dataset("x0", data=x0).dims[0].attach_scale(feature)
            group = f.create_group("metrics")
            it = group.create_dataset(
                "iteration",
                shape=(0,),
                maxshape=(None,),
                dtype=np.int64,
                chunks=(1024,),
            )
            it.make_scale("iteration")
            for name in log.metrics:
                ds = group.create_dataset(
                    name,
                    shape=(0,),
                    maxshape=(None,),
                    dtype=np.float64,
                    chunks=(1024,),
                    fillvalue=np.nan,
                )
                ds.dims[0].attach_scale(it)
        return log

    def append(self, iterations: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        """Append rows (one per iteration) and flush them to disk."""
        n = len(iterations)
        if n == 0:
            return
        with _open(self.path, "r+") as f:
            group = f["metrics"]
            start = group["iteration"].shape[0]
            for name, values in (("iteration", iterations), *columns.items()):
                ds = group[name]
                ds.resize((start + n,))
                ds[start:] = values

    @classmethod
    def reopen(cls, path, rows: int) -> RunLog:
        """Continue an existing log after its first ``rows`` rows.

        Rows beyond ``rows`` (flushed after the checkpoint a run resumes
        from) are dropped, so the resumed log has no gap and no duplicate.
        """
        with _open(os.fspath(path), "r+") as f:
            group = f["metrics"]
            metrics = tuple(name for name in group if name != "iteration")
            if group["iteration"].shape[0] < rows:
                raise ValueError(
                    f"{path} holds {group['iteration'].shape[0]} rows, fewer than "
                    f"the {rows} of its checkpoint"
                )
            for ds in group.values():
                ds.resize((rows,))
            f.attrs["status"] = "running"
        return cls(path, metrics)

    def set_attrs(self, attrs: dict) -> None:
        with _open(self.path, "r+") as f:
            for key, value in attrs.items():
                f.attrs[key] = _attr_value(value)

    def close(self, status: str, x_final: np.ndarray | None = None, attrs=None) -> None:
        """Record the final status, ``x_final`` and further attributes."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {STATUSES}")
        with _open(self.path, "r+") as f:
            for key, value in (attrs or {}).items():
                f.attrs[key] = _attr_value(value)
            f.attrs["status"] = status
            if x_final is not None:
                if "x_final" in f:
                    del f["x_final"]
                ds = f.create_dataset(
                    "x_final", data=np.asarray(x_final, dtype=np.float64)
                )
                ds.dims[0].attach_scale(f["feature"])


class RunRecord(dict):
    """A run log read into memory: ``attrs``, ``metrics``, ``x0``, ``x_final``."""

    @property
    def config(self) -> dict:
        return json.loads(self["attrs"]["config"])


def read_log(path) -> RunRecord:
    """Read a whole run log.

    Returns:
        A RunRecord with keys ``attrs`` (dict), ``metrics`` (dict of arrays,
        including ``iteration``), ``x0`` and ``x_final`` (None if absent).
    """
    with _open(os.fspath(path), "r") as f:
        attrs = {k: _from_h5(v) for k, v in f.attrs.items()}
        metrics = {k: ds[()] for k, ds in f["metrics"].items()}
        x0 = f["x0"][()]
        x_final = f["x_final"][()] if "x_final" in f else None
    return RunRecord(attrs=attrs, metrics=metrics, x0=x0, x_final=x_final)


def _from_h5(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
