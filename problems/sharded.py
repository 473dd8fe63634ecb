"""Converted datasets: LibSVM rows stored as chunked CSR arrays, read in parts.

A dataset too large for one rank is converted once, with
``clip21mpi data convert FILE OUT.h5``, into an HDF5 file (the layout is in
``clip21mpi/runlog.py``, which makes every h5py call). Every rank then opens
it with ``ShardedDataset.open``, which reads only the attributes and the
labels (8 bytes per row), and reads the rows of its own clients with
``read_rows``::

    dataset = ShardedDataset.open("big.h5")
    order = row_order(split, dataset.labels, seed)
    offsets = client_offsets(dataset.n_rows, n_clients)
    rows = order[offsets[mine.start] : offsets[mine.stop]]
    A = dataset.read_rows(rows)          # CSR, (rows.size, dataset.n_features)

The conversion streams the input in blocks of text, so a file larger than
memory converts, and it gives exactly what ``load_svmlight_file`` gives on
the whole file: indices are shifted to zero-based when no index 0 occurs
anywhere in the file, and ``n_features`` is the largest index plus one.
"""

from __future__ import annotations

import bz2
import datetime as _dt
import gzip
import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from clip21mpi import __version__
from clip21mpi.runlog import CSR_COMPRESSIONS, CsrReader, CsrWriter
from problems.data import MAX_INDEX, DataError, libsvm_line_problem

__all__ = [
    "BLOCK_BYTES",
    "COMPRESSIONS",
    "FORMAT",
    "FORMAT_VERSION",
    "DataSummary",
    "ShardedDataset",
    "ShardedWriter",
    "client_label_counts",
    "convert_libsvm",
    "is_converted",
    "read_plan",
    "summarise",
]

FORMAT = "clip21mpi-csr"
FORMAT_VERSION = 1
COMPRESSIONS = CSR_COMPRESSIONS
# Text parsed at a time by the converter; it uses about six times this.
BLOCK_BYTES = 16 << 20
# Wanted rows at most this many rows apart are read in one span.
MAX_GAP = 1024
# Rows of one span that holds unwanted rows (its read buffer is bounded).
SPAN_ROWS = 1 << 16

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CONVERT_HINT = "convert a LibSVM file with 'clip21mpi data convert FILE OUT.h5'"


def is_converted(path) -> bool:
    """Whether ``path`` is an HDF5 file: open it with ``ShardedDataset.open``
    (which checks that it is a converted dataset), not as LibSVM text."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        return False


def _dataset_name(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".gz", ".bz2", ".txt", ".svm", ".libsvm"):
        name = name.removesuffix(suffix)
    return name


# Reading a LibSVM file in blocks.


class _HashingReader(io.RawIOBase):
    """A binary file that hashes and counts the bytes read through it."""

    def __init__(self, raw):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
            self.size += n
        return n

    def drain(self) -> None:
        """Read (and hash) whatever the decompressor left unread."""
        while self.read(1 << 20):
            pass


def _bad_line(block: bytes, first_line: int) -> tuple[int, str] | None:
    """Return (line number, reason) of the first malformed line of ``block``.

    The rules are those of scikit-learn's parser: a numeric label, an
    optional ``qid:`` token right after it, then ``index:value`` tokens with
    strictly increasing non-negative integer indices.
    """
    for offset, raw in enumerate(block.split(b"\n")):
        problem = libsvm_line_problem(raw.decode(errors="replace"))
        if problem is not None:
            return first_line + offset, problem
    return None


def _parse_block(path: str, block: bytes, first_line: int):
    """Return the rows of ``block`` as (CSR with the file's indices, labels)."""
    from sklearn.datasets import load_svmlight_file

    try:
        X, y = load_svmlight_file(io.BytesIO(block), dtype=np.float64, zero_based=True)
    except (ValueError, OverflowError) as err:
        bad = _bad_line(block, first_line)
        last_line = first_line + block.rstrip(b"\n").count(b"\n")
        where = (
            f"{path}, line {bad[0]}: {bad[1]}"
            if bad
            else f"{path}, lines {first_line}-{last_line}: {err}"
        )
        raise DataError(f"malformed LibSVM data in {where}") from err
    return sp.csr_matrix(X), np.asarray(y, dtype=np.float64)


class _LibSVMBlocks:
    """A LibSVM file (plain, .gz or .bz2) read as blocks of whole lines.

    Iterating yields ``(X, y)`` per block, with the file's own indices
    (no shift); afterwards ``size`` and ``sha256`` describe the file as
    stored on disk.
    """

    def __init__(self, path: str, block_bytes: int = BLOCK_BYTES):
        if not os.path.isfile(path):
            raise DataError(f"no such file: {path!r}; pass a LibSVM file")
        self.path = path
        self.block_bytes = block_bytes
        self.size = 0
        self.sha256 = ""

    def __iter__(self):
        path = self.path
        with open(path, "rb") as raw:
            hashing = _HashingReader(raw)
            if path.endswith(".gz"):
                text = gzip.GzipFile(fileobj=hashing, mode="rb")
            elif path.endswith(".bz2"):
                text = bz2.BZ2File(hashing, mode="rb")
            else:
                text = io.BufferedReader(hashing)
            first_line, carry = 1, b""
            while True:
                try:
                    chunk = text.read(self.block_bytes)
                except (OSError, EOFError) as err:
                    raise DataError(f"malformed LibSVM data in {path}: {err}") from err
                if not chunk:
                    break
                cut = chunk.rfind(b"\n") + 1
                if cut == 0:
                    carry += chunk  # no line ends in this chunk
                    continue
                # At most the chunk and one block are held at once.
                block = carry + chunk[:cut] if carry else chunk[:cut]
                carry = chunk[cut:]
                del chunk
                lines = block.count(b"\n")
                parsed = _parse_block(path, block, first_line)
                del block
                yield parsed
                del parsed
                first_line += lines
            if carry:
                yield _parse_block(path, carry, first_line)
            hashing.drain()
        self.size = hashing.size
        self.sha256 = hashing.sha256.hexdigest()


# Writing a converted dataset.


class ShardedWriter:
    """Writes a converted dataset block by block; ``out`` appears only when done.

    Rows go to a hidden file beside ``out``, which replaces ``out`` in
    ``finish``. On an exception inside the ``with`` block the hidden file
    is removed and ``out`` is left as it was.

    Args:
        out: the HDF5 file to write.
        overwrite: replace an existing ``out``.
        compression: ``none``, ``gzip`` or ``lzf``.
        index_base: ``auto`` (as ``load_svmlight_file``: shift every index
            down by one when no index is 0) or ``0`` (store indices as given).

    Raises:
        FileExistsError: if ``out`` exists and ``overwrite`` is false.

    Example:
        >>> import tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "tiny.h5")
        >>> with ShardedWriter(out) as writer:
        ...     writer.append(sp.csr_matrix([[0.0, 2.0], [3.0, 0.0]]), [1.0, -1.0])
        ...     writer.finish(name="tiny", source="generated")
        >>> ShardedDataset.open(out).read_rows(np.array([1])).toarray()
        array([[3., 0.]])
    """

    def __init__(
        self,
        out,
        *,
        overwrite: bool = False,
        compression: str = "none",
        index_base: str | int = "auto",
    ):
        self.out = os.fspath(out)
        if os.path.exists(self.out) and not overwrite:
            raise FileExistsError(_exists_message(self.out))
        if index_base not in ("auto", 0):
            raise ValueError(f"index_base must be 'auto' or 0, got {index_base!r}")
        self.overwrite = overwrite
        self.compression = compression
        self.index_base = index_base
        parent = os.path.dirname(os.path.abspath(self.out))
        os.makedirs(parent, exist_ok=True)
        self._partial = os.path.join(
            parent, f".{os.path.basename(self.out)}.{os.getpid()}.partial"
        )
        self._writer = CsrWriter(self._partial, compression)
        self._min_index = MAX_INDEX
        self._max_index = -1
        self._label_values = np.empty(0)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb) -> None:
        self._writer.close()
        if os.path.exists(self._partial):
            os.remove(self._partial)

    @property
    def n_rows(self) -> int:
        return self._writer.n_rows

    @property
    def nnz(self) -> int:
        return self._writer.nnz

    def append(self, X, labels) -> None:
        """Append the rows of ``X`` (CSR, sorted indices) and their labels."""
        X = sp.csr_matrix(X)
        X.sort_indices()
        labels = np.asarray(labels, dtype=np.float64)
        if labels.shape != (X.shape[0],):
            raise ValueError(
                f"{X.shape[0]} rows need {X.shape[0]} labels, got shape {labels.shape}"
            )
        if X.nnz:
            self._min_index = min(self._min_index, int(X.indices.min()))
            self._max_index = max(self._max_index, int(X.indices.max()))
        self._label_values = np.union1d(self._label_values, labels)
        self._writer.append(X.indptr, X.indices, X.data, labels)

    def finish(
        self,
        *,
        name: str,
        source: str,
        n_features: int | None = None,
        command: str = "",
        provenance: dict | None = None,
    ) -> None:
        """Complete the file, with its attributes, and move it to ``out``.

        Args:
            name: the dataset's short name (run logs record it).
            source: where the rows came from.
            n_features: the column count; by default the largest index + 1.
            command: the command line that made the file.
            provenance: further root attributes (e.g. the source's sha256).

        Raises:
            ValueError: if ``n_features`` is below the largest index + 1.
            FileExistsError: if ``out`` appeared meanwhile and ``overwrite``
                is false.
        """
        shift = 0
        if self.index_base == "auto" and self.nnz and self._min_index > 0:
            shift = -1
        least = self._max_index + shift + 1 if self.nnz else 1
        if n_features is None:
            n_features = least
        elif n_features < least:
            raise ValueError(f"n_features {n_features} is below the {least} in use")
        if shift:
            self._writer.shift_indices(shift)
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "n_rows": self.n_rows,
            "n_features": int(n_features),
            "nnz": self.nnz,
            "source": source,
            "source_index_base": 1 if shift else 0,
            "compression": self.compression,
            "converter_version": __version__,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            **(provenance or {}),
        }
        self._writer.finish(attrs, self._label_values)
        if os.path.exists(self.out) and not self.overwrite:
            raise FileExistsError(_exists_message(self.out))
        os.replace(self._partial, self.out)


def _exists_message(out: str) -> str:
    return (
        f"the output {out!r} exists; pass --overwrite to replace it or choose "
        "another output path"
    )


def convert_libsvm(
    path,
    out,
    *,
    overwrite: bool = False,
    compression: str = "none",
    block_bytes: int = BLOCK_BYTES,
    command: str = "",
) -> ShardedDataset:
    """Convert a LibSVM file (plain, .gz, .bz2) into a converted dataset.

    The input is parsed ``block_bytes`` of text at a time, so memory stays
    bounded by a few blocks whatever the file's size.

    Args:
        path: the LibSVM file.
        out: the HDF5 file to write.
        overwrite: replace an existing ``out``.
        compression: ``none``, ``gzip`` or ``lzf``.
        block_bytes: text parsed at a time.
        command: the command line, kept in the file.

    Returns:
        The converted dataset, opened.

    Raises:
        DataError: for a missing, empty or malformed input, naming the file
            and line.
        FileExistsError: if ``out`` exists and ``overwrite`` is false.
    """
    path, out = os.fspath(path), os.fspath(out)
    blocks = _LibSVMBlocks(path, block_bytes)
    if is_converted(path):
        raise DataError(
            f"{path} is an HDF5 file, not LibSVM text; a converted dataset needs "
            "no conversion: pass it to --data as it is"
        )
    if os.path.exists(out) and os.path.samefile(path, out):
        raise DataError(f"the output {out!r} is the input; choose another output")
    with ShardedWriter(out, overwrite=overwrite, compression=compression) as writer:
        for X, y in blocks:
            writer.append(X, y)
            del X, y  # before the next block is read
        if writer.n_rows == 0:
            raise DataError(f"{path} holds no rows")
        writer.finish(
            name=_dataset_name(path),
            source=path,
            command=command,
            provenance={"source_size": blocks.size, "source_sha256": blocks.sha256},
        )
    return ShardedDataset.open(out)


# Reading a converted dataset.


def read_plan(
    rows: np.ndarray, max_gap: int = MAX_GAP, span_rows: int = SPAN_ROWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the spans of rows to read for the sorted distinct ``rows``.

    Consecutive rows form runs. A run of ``span_rows`` rows or more is read
    alone; shorter runs at most ``max_gap`` rows apart share a span of
    fewer than ``2 span_rows`` rows, read whole, unwanted rows included
    (one read costs more than a short gap).

    Returns:
        ``(starts, stops, whole)``: span ``j`` is rows
        ``starts[j]:stops[j]``, and ``whole[j]`` says it holds wanted rows
        only (it is then read straight into the result).

    Example:
        >>> read_plan(np.array([0, 1, 2, 5, 6, 40, 41]), max_gap=4)
        (array([ 0, 40]), array([ 7, 42]), array([False,  True]))
    """
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    run_starts = rows[np.r_[0, cut]]
    run_stops = rows[np.r_[cut - 1, rows.size - 1]] + 1
    long = run_stops - run_starts >= span_rows
    gaps = run_starts[1:] - run_stops[:-1]
    new = np.r_[True, (gaps > max_gap) | long[1:] | long[:-1]]
    # Cut long groups of short runs every span_rows rows.
    group_start = run_starts[new][np.cumsum(new) - 1]
    block = (run_starts - group_start) // span_rows
    new[1:] |= block[1:] != block[:-1]
    first = np.flatnonzero(new)
    last = np.r_[first[1:] - 1, run_starts.size - 1]
    return run_starts[first], run_stops[last], first == last


def _entry_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Return ``concat(arange(s, s + n) for s, n in zip(starts, lengths))``."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1])


class ShardedDataset:
    """A converted dataset: attributes and labels in memory, rows on disk.

    Open it with ``ShardedDataset.open(path)``.

    Attributes:
        name: the dataset's short name (the source's, without suffixes).
        source: the path it was opened from.
        n_rows: N, the number of rows.
        n_features: d, the same for every part read.
        nnz: the number of stored entries.
        labels: ``(N,)`` raw labels of every row.
        label_values: the sorted distinct labels.
        attrs: the file's attributes (provenance included).
    """

    def __init__(self, path: str, attrs: dict, labels: np.ndarray, label_values):
        self.source = path
        self.attrs = attrs
        self.name = attrs["name"]
        self.n_rows = int(attrs["n_rows"])
        self.n_features = int(attrs["n_features"])
        self.nnz = int(attrs["nnz"])
        self.labels = labels
        self.label_values = label_values

    @classmethod
    def open(cls, path) -> ShardedDataset:
        """Open a converted dataset, reading its attributes and labels only.

        Raises:
            DataError: if the file is missing, is not a converted dataset,
                has a newer format, or is damaged.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"no such file: {path!r}; {_CONVERT_HINT}")
        try:
            with CsrReader(path) as reader:
                _check_layout(path, reader.attrs, reader.shapes)
                labels = reader.labels()
                label_values = reader.label_values()
                attrs = reader.attrs
        except OSError as err:
            raise DataError(
                f"{path} is not a readable HDF5 file ({err}); {_CONVERT_HINT}"
            ) from err
        return cls(path, attrs, labels, label_values)

    def read_rows(self, rows, max_gap: int = MAX_GAP) -> sp.csr_matrix:
        """Return the given rows, in the given order, as a CSR matrix.

        Only the runs of consecutive rows asked for are read (see
        ``read_plan``): the rows of a contiguous split are one slice of
        each array. Rows may repeat and come in any order.

        Args:
            rows: row numbers in ``0..n_rows-1``, a 1-D integer array.
            max_gap: rows at most this far apart are read in one span.

        Returns:
            A ``(rows.size, n_features)`` CSR matrix.

        Raises:
            IndexError: for a row outside the dataset.
        """
        rows = np.asarray(rows)
        if rows.ndim != 1 or not (rows.size == 0 or rows.dtype.kind in "iu"):
            raise ValueError(
                f"rows must be a 1-D array of row numbers, got shape {rows.shape} "
                f"and dtype {rows.dtype}"
            )
        rows = rows.astype(np.int64, copy=False)
        if rows.size == 0:
            return sp.csr_matrix((0, self.n_features))
        if rows.min() < 0 or rows.max() >= self.n_rows:
            bad = rows.min() if rows.min() < 0 else rows.max()
            raise IndexError(
                f"row {bad} is outside {self.source}, whose rows are "
                f"0..{self.n_rows - 1}"
            )
        if rows.size == 1 or bool(np.all(rows[1:] > rows[:-1])):
            wanted, inverse = rows, None
        else:
            wanted, inverse = np.unique(rows, return_inverse=True)

        A = self._read_sorted(wanted, max_gap)
        return A if inverse is None else A[inverse]

    def _read_sorted(self, wanted: np.ndarray, max_gap: int) -> sp.csr_matrix:
        """Return the sorted distinct rows ``wanted``.

        The entry offsets of each span give the result's ``indptr``; then
        each span's entries are read, straight into the result when the span
        holds wanted rows only, else into a buffer that the wanted rows'
        entries are taken from.
        """
        starts, stops, whole = read_plan(wanted, max_gap)
        # Span j holds wanted[first[j]:first[j + 1]].
        first = np.r_[np.searchsorted(wanted, starts), wanted.size]
        indptr = np.zeros(wanted.size + 1, dtype=np.int64)
        spans = []
        with CsrReader(self.source) as reader:
            for j in range(starts.size):
                p = reader.indptr(starts[j], stops[j])
                base = indptr[first[j]]
                out = indptr[first[j] + 1 : first[j + 1] + 1]
                if whole[j]:
                    np.subtract(p[1:], p[0] - base, out=out)
                    spans.append((p[0], p[-1], None, None))
                    continue
                r = wanted[first[j] : first[j + 1]] - starts[j]
                row_starts, lengths = p[r] - p[0], p[r + 1] - p[r]
                np.cumsum(lengths, out=out)
                out += base
                spans.append((p[0], p[-1], row_starts, lengths))

            indices = np.empty(indptr[-1], dtype=np.int32)
            data = np.empty(indptr[-1], dtype=np.float64)
            buffer_indices = buffer_data = np.empty(0)
            for j, (lo, hi, row_starts, lengths) in enumerate(spans):
                out = slice(indptr[first[j]], indptr[first[j + 1]])
                if row_starts is None:
                    reader.read_entries(lo, hi, indices[out], data[out])
                    continue
                if buffer_data.size < hi - lo:
                    buffer_indices = np.empty(hi - lo, dtype=np.int32)
                    buffer_data = np.empty(hi - lo, dtype=np.float64)
                reader.read_entries(
                    lo, hi, buffer_indices[: hi - lo], buffer_data[: hi - lo]
                )
                if out.stop > out.start:
                    take = _entry_positions(row_starts, lengths)
                    indices[out] = buffer_indices[take]
                    data[out] = buffer_data[take]
        return sp.csr_matrix(
            (data, indices, indptr), shape=(wanted.size, self.n_features)
        )


def _check_layout(path: str, attrs: dict, shapes: dict) -> None:
    """Raise DataError unless the file is a converted dataset this code reads."""
    found = attrs.get("format")
    if found != FORMAT:
        raise DataError(
            f"{path} is not a converted dataset (its 'format' attribute is "
            f"{found!r}, not {FORMAT!r}); {_CONVERT_HINT}"
        )
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path} has format version {version!r}; clip21mpi {__version__} reads "
            f"version {FORMAT_VERSION}: convert the source again with this version"
        )
    n, nnz = int(attrs["n_rows"]), int(attrs["nnz"])
    expected = {
        "indptr": (n + 1,),
        "indices": (nnz,),
        "data": (nnz,),
        "labels": (n,),
    }
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise DataError(
                f"{path} is damaged: {name!r} has shape {shapes.get(name)}, "
                f"expected {shape}; convert the source again"
            )
    if "label_values" not in shapes:
        raise DataError(f"{path} is damaged: no 'label_values'; convert it again")


# Describing a dataset (``clip21mpi data info``).


@dataclass(frozen=True)
class DataSummary:
    """What ``clip21mpi data info`` shows of a dataset.

    Attributes:
        kind: ``LibSVM file`` or ``converted dataset``.
        path: the file.
        n_rows, n_features, nnz: the sizes, as a run would see them.
        labels: every row's raw label.
        provenance: a converted dataset's attributes, else None.
    """

    kind: str
    path: str
    n_rows: int
    n_features: int
    nnz: int
    labels: np.ndarray
    provenance: dict | None = None


def summarise(path, block_bytes: int = BLOCK_BYTES) -> DataSummary:
    """Describe a LibSVM file (streamed in blocks) or a converted dataset.

    Raises:
        DataError: for a missing or malformed file, naming the file and line.
    """
    path = os.fspath(path)
    if is_converted(path):
        dataset = ShardedDataset.open(path)
        return DataSummary(
            "converted dataset",
            path,
            dataset.n_rows,
            dataset.n_features,
            dataset.nnz,
            dataset.labels,
            dataset.attrs,
        )
    n_rows = nnz = 0
    min_index, max_index = MAX_INDEX, -1
    labels = []
    for X, y in _LibSVMBlocks(path, block_bytes):
        n_rows += X.shape[0]
        nnz += X.nnz
        labels.append(y)
        if X.nnz:
            min_index = min(min_index, int(X.indices.min()))
            max_index = max(max_index, int(X.indices.max()))
    if n_rows == 0:
        raise DataError(f"{path} holds no rows")
    shift = 1 if nnz and min_index > 0 else 0
    n_features = max_index - shift + 1 if nnz else 1
    return DataSummary(
        "LibSVM file", path, n_rows, n_features, nnz, np.concatenate(labels)
    )


def client_label_counts(
    labels: np.ndarray, order: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return the label values and each client's count of each.

    Client ``i`` holds rows ``order[offsets[i]:offsets[i + 1]]``.

    Returns:
        ``(values, counts)`` with ``counts[i, c]`` the rows of client ``i``
        whose label is ``values[c]``.

    Example:
        >>> client_label_counts(
        ...     np.array([1.0, -1.0, 1.0, 1.0]), np.arange(4), np.array([0, 1, 4]))
        (array([-1.,  1.]), array([[0, 1],
               [1, 2]]))
    """
    values, index = np.unique(labels[order], return_inverse=True)
    n_clients = offsets.size - 1
    client = np.repeat(np.arange(n_clients), np.diff(offsets))
    counts = np.bincount(
        client * values.size + index.ravel(), minlength=n_clients * values.size
    )
    return values, counts.reshape(n_clients, values.size)
