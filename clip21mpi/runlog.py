"""Every h5py call of the package: run logs, and converted (sharded) datasets.

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
        if os.path.exists(log.path) and not overwrite:
            raise FileExistsError(f"the log {log.path!r} exists")
        # Built under a temporary name and renamed: a reader never meets a
        # half-made log.
        tmp = f"{log.path}.tmp-{os.getpid()}"
        with _open(tmp, "w") as f:
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
        os.replace(tmp, log.path)
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


# Sharded datasets
#
# A dataset converted for reading in parts (``problems/sharded.py`` holds the
# logic; these are its file operations). Layout of one file::
#
#     /               attributes: format, format_version, name, n_rows,
#                     n_features, nnz, source, source_size, source_sha256,
#                     converter_version, created, command, ...
#     /indptr         int64 (n_rows + 1,): row i is entries indptr[i]:indptr[i+1]
#     /indices        int32 (nnz,): the feature of each entry
#     /data           float64 (nnz,): the value of each entry
#     /labels         float64 (n_rows,): the raw labels
#     /label_values   float64 (C,): the sorted distinct labels
#
# Every array is chunked, so reading a range of rows touches only the chunks
# that hold it.

__all__ += ["CSR_COMPRESSIONS", "CsrReader", "CsrWriter"]

CSR_COMPRESSIONS = ("none", "gzip", "lzf")
CSR_ROW_CHUNK = 1 << 16
CSR_ENTRY_CHUNK = 1 << 17
CSR_GZIP_LEVEL = 4


class CsrWriter:
    """Writes the rows of a CSR matrix and their labels to a new file, in blocks.

    Args:
        path: the file to create; an existing file is replaced.
        compression: ``none``, ``gzip`` or ``lzf`` (with byte shuffling).

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "rows.h5")
        >>> with CsrWriter(path) as writer:
        ...     writer.append([0, 1, 3], [2, 0, 1], [5.0, 6.0, 7.0], [1.0, -1.0])
        ...     writer.append([0, 1], [2], [8.0], [1.0])
        ...     writer.finish({"n_features": 3}, [-1.0, 1.0])
        >>> with CsrReader(path) as reader:
        ...     reader.indptr(1, 3), reader.shapes["data"], reader.attrs["n_features"]
        (array([1, 3, 4]), (4,), 3)
    """

    def __init__(self, path, compression: str = "none"):
        if compression not in CSR_COMPRESSIONS:
            raise ValueError(
                f"unknown compression {compression!r}; valid: "
                + ", ".join(CSR_COMPRESSIONS)
            )
        filters = {}
        if compression != "none":
            filters = {"compression": compression, "shuffle": True}
            if compression == "gzip":
                filters["compression_opts"] = CSR_GZIP_LEVEL
        self.path = os.fspath(path)
        self.n_rows = 0
        self.nnz = 0
        self._file = _open(self.path, "w")
        columns = (
            ("indptr", np.int64, CSR_ROW_CHUNK),
            ("indices", np.int32, CSR_ENTRY_CHUNK),
            ("data", np.float64, CSR_ENTRY_CHUNK),
            ("labels", np.float64, CSR_ROW_CHUNK),
        )
        for name, dtype, chunk in columns:
            self._file.create_dataset(
                name,
                shape=(0,),
                maxshape=(None,),
                dtype=dtype,
                chunks=(chunk,),
                **filters,
            )
        _csr_extend(self._file["indptr"], np.zeros(1, dtype=np.int64))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def append(self, indptr, indices, data, labels) -> None:
        """Append rows: ``indptr`` counts from 0, one label per row."""
        indptr = np.asarray(indptr, dtype=np.int64)
        f = self._file
        _csr_extend(f["indptr"], self.nnz + indptr[1:])
        _csr_extend(f["indices"], np.asarray(indices, dtype=np.int32))
        _csr_extend(f["data"], np.asarray(data, dtype=np.float64))
        _csr_extend(f["labels"], np.asarray(labels, dtype=np.float64))
        self.n_rows += indptr.size - 1
        self.nnz += int(indptr[-1])

    def shift_indices(self, offset: int) -> None:
        """Add ``offset`` to every stored feature index, a block at a time."""
        ds = self._file["indices"]
        step = 64 * CSR_ENTRY_CHUNK
        for lo in range(0, self.nnz, step):
            block = ds[lo : lo + step]
            block += offset
            ds[lo : lo + step] = block

    def finish(self, attrs: dict, label_values) -> None:
        """Write the root attributes and the label values, and close the file."""
        f = self._file
        f.create_dataset("label_values", data=np.asarray(label_values, np.float64))
        for key, value in attrs.items():
            f.attrs[key] = _attr_value(value)
        self.close()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()


class CsrReader:
    """Reads parts of a file written by CsrWriter; use it in a ``with`` block.

    Opening reads only the root attributes and the array shapes.

    Attributes:
        attrs: the root attributes (strings decoded, scalars as Python numbers).
        shapes: the shape of each array, by name.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._file = _open(self.path, "r")
        self.attrs = {k: _from_h5(v) for k, v in self._file.attrs.items()}
        self.shapes = {
            name: item.shape
            for name, item in self._file.items()
            if isinstance(item, _h5py().Dataset)
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def labels(self) -> np.ndarray:
        """Return every row's label."""
        return self._file["labels"][()]

    def label_values(self) -> np.ndarray:
        """Return the sorted distinct labels."""
        return self._file["label_values"][()]

    def indptr(self, start: int, stop: int) -> np.ndarray:
        """Return ``indptr[start:stop + 1]``, the entry offsets of rows start..stop-1."""
        return self._file["indptr"][start : stop + 1]

    def read_entries(self, lo: int, hi: int, indices: np.ndarray, data: np.ndarray):
        """Read entries ``lo..hi-1`` into ``indices`` and ``data`` (length hi - lo)."""
        if hi > lo:
            self._file["indices"].read_direct(indices, np.s_[lo:hi])
            self._file["data"].read_direct(data, np.s_[lo:hi])


def _csr_extend(ds, values: np.ndarray) -> None:
    start = ds.shape[0]
    if values.size:
        ds.resize((start + values.size,))
        ds[start:] = values
