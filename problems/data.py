"""Datasets: LibSVM files, scikit-learn's bundled data, and a synthetic generator.

``--data`` takes one of

* a path to a LibSVM file (``.gz`` and ``.bz2`` are read as such);
* a bundled dataset name: ``breast_cancer`` (scikit-learn's copy, 569 rows,
  30 features, each feature standardised to mean 0 and variance 1) or
  ``digits`` (1797 8x8 images of 10 digits, pixels scaled to [0, 1]);
* ``synthetic`` or ``synthetic:rows=2000,features=20,heterogeneity=1.0``:
  Gaussian rows generated in client blocks. Block ``i`` has features
  ``N(h mu_i, I)`` and labels ``sign(a^T (w + h v_i))``, so ``h``
  (``heterogeneity``) = 0 gives identically distributed clients and larger
  ``h`` more heterogeneous ones, under the contiguous split.
"""

from __future__ import annotations

import bz2
import gzip
import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from clip21mpi.streams import stream

__all__ = [
    "BUNDLED",
    "DataError",
    "Dataset",
    "class_indices",
    "libsvm_line_problem",
    "load_dataset",
    "map_labels",
]

BUNDLED = ("breast_cancer", "digits")
SYNTHETIC_DEFAULTS = {"rows": 2000, "features": 20, "heterogeneity": 1.0}


class DataError(ValueError):
    """A dataset that cannot be read or used; the message says where and why."""


@dataclass(frozen=True)
class Dataset:
    """Rows and raw labels of a dataset.

    Attributes:
        name: a short name for logs and file names.
        source: what ``--data`` said.
        features: ``(N, d)`` ndarray or CSR matrix.
        labels: ``(N,)`` raw labels as read.
    """

    name: str
    source: str
    features: object
    labels: np.ndarray

    @property
    def n_rows(self) -> int:
        return self.features.shape[0]

    @property
    def n_features(self) -> int:
        return self.features.shape[1]


def load_dataset(spec: str, seed: int = 0, n_clients: int = 1) -> Dataset:
    """Load the dataset that ``spec`` names (see the module docstring).

    Args:
        spec: a path, a bundled name, or a synthetic specification.
        seed: the run's seed (synthetic data uses its ``data`` stream).
        n_clients: the number of clients (synthetic data is made in blocks).

    Raises:
        DataError: for a missing or malformed file, naming the file and line.
    """
    if spec in BUNDLED:
        return _load_bundled(spec)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _make_synthetic(spec, seed, n_clients)
    return _load_libsvm(spec)


def _load_bundled(name: str) -> Dataset:
    from sklearn import datasets

    if name == "digits":
        X, y = datasets.load_digits(return_X_y=True)
        return Dataset(name, name, X / 16.0, y.astype(np.float64))
    X, y = datasets.load_breast_cancer(return_X_y=True)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    return Dataset(name, name, X, y.astype(np.float64))


def _parse_synthetic(spec: str) -> dict:
    params = dict(SYNTHETIC_DEFAULTS)
    body = spec.partition(":")[2]
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in params:
            raise DataError(
                f"bad synthetic parameter {item!r} in {spec!r}; valid: "
                + ", ".join(f"{k}=<number>" for k in params)
            )
        try:
            params[key] = type(params[key])(value)
        except ValueError:
            raise DataError(
                f"synthetic {key} must be a number, got {value!r}"
            ) from None
    if params["rows"] < 1 or params["features"] < 1 or params["heterogeneity"] < 0:
        raise DataError(
            f"synthetic needs rows >= 1, features >= 1, heterogeneity >= 0, got {params}"
        )
    return params


def _make_synthetic(spec: str, seed: int, n_clients: int) -> Dataset:
    from problems.split import client_offsets

    p = _parse_synthetic(spec)
    N, d, h = p["rows"], p["features"], p["heterogeneity"]
    if n_clients > N:
        raise DataError(f"synthetic data with {N} rows cannot feed {n_clients} clients")
    rng = stream(seed, "data")
    w = rng.standard_normal(d) / np.sqrt(d)
    mu = rng.standard_normal((n_clients, d))
    v = rng.standard_normal((n_clients, d)) / np.sqrt(d)
    X = rng.standard_normal((N, d))
    y = np.empty(N)
    offsets = client_offsets(N, n_clients)
    for i in range(n_clients):
        rows = slice(offsets[i], offsets[i + 1])
        X[rows] += h * mu[i]
        y[rows] = np.where(X[rows] @ (w + h * v[i]) >= 0, 1.0, -1.0)
    name = f"synthetic-h{h:g}"
    return Dataset(name, spec, X, y)


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", errors="replace")
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", errors="replace")
    return open(path, errors="replace")


# The largest feature index an int32 column can hold.
MAX_INDEX = np.iinfo(np.int32).max - 1


def libsvm_line_problem(line: str) -> str | None:
    """Return why a LibSVM line is malformed, or None if it is well formed.

    The rules are scikit-learn's: a numeric label, an optional ``qid:``
    token right after it, then ``index:value`` tokens with strictly
    increasing non-negative integer indices (comments after ``#``).

    Example:
        >>> libsvm_line_problem("1 3:1 2:1")
        'feature index 2 is negative or out of order'
    """
    body = line.split("#", 1)[0].split()
    if not body:
        return None
    try:
        float(body[0])
    except ValueError:
        return f"label {body[0]!r} is not a number"
    tokens = body[1:]
    if tokens and tokens[0].startswith("qid:"):
        tokens = tokens[1:]
    last = -1
    for token in tokens:
        index, sep, value = token.partition(":")
        try:
            idx = int(index)
            float(value)
        except ValueError:
            idx = None
        if not sep or idx is None:
            return f"{token!r} is not of the form index:value"
        if idx < 0 or idx <= last:
            return f"feature index {idx} is negative or out of order"
        if idx > MAX_INDEX:
            return f"feature index {idx} exceeds {MAX_INDEX}"
        last = idx
    return None


def _first_bad_line(path: str) -> tuple[int, str] | None:
    """Return (line number, reason) of the first malformed LibSVM line."""
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            problem = libsvm_line_problem(line)
            if problem is not None:
                return lineno, problem
    return None


def _load_libsvm(path: str) -> Dataset:
    from sklearn.datasets import load_svmlight_file

    if not os.path.isfile(path):
        raise DataError(
            f"no such file: {path!r}; pass a LibSVM file, "
            f"a bundled name ({', '.join(BUNDLED)}) or 'synthetic'"
        )
    try:
        X, y = load_svmlight_file(path, dtype=np.float64)
    except (ValueError, UnicodeDecodeError, OSError, EOFError) as err:
        bad = (
            _first_bad_line(path) if not isinstance(err, (OSError, EOFError)) else None
        )
        where = f"{path}, line {bad[0]}: {bad[1]}" if bad else f"{path}: {err}"
        raise DataError(f"malformed LibSVM data in {where}") from err
    if X.shape[0] == 0:
        raise DataError(f"{path} holds no rows")
    name = os.path.basename(path)
    for suffix in (".gz", ".bz2", ".txt", ".svm", ".libsvm"):
        name = name.removesuffix(suffix)
    return Dataset(name, path, sp.csr_matrix(X), y)


def map_labels(
    labels: np.ndarray, target: tuple[float, float], source: str
) -> np.ndarray:
    """Map two raw label values to ``target``: smallest to the first, largest
    to the second.

    Raises:
        DataError: if the labels do not take exactly two values.

    Example:
        >>> map_labels(np.array([2.0, 1.0, 2.0]), (-1.0, 1.0), "x")
        array([ 1., -1.,  1.])
    """
    values = np.unique(labels)
    if values.size != 2:
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (
            ", ..." if values.size > 6 else ""
        )
        raise DataError(
            f"binary classification needs exactly two label values; {source} has "
            f"{values.size} ({shown})"
        )
    return np.where(labels == values[1], target[1], target[0])


def class_indices(labels: np.ndarray, source: str) -> tuple[np.ndarray, int]:
    """Return each row's class index (0..C-1, by sorted label) and C.

    Raises:
        DataError: if there are fewer than two classes.

    Example:
        >>> class_indices(np.array([5.0, 3.0, 5.0, 9.0]), "x")
        (array([1, 0, 1, 2]), 3)
    """
    values, index = np.unique(labels, return_inverse=True)
    if values.size < 2:
        raise DataError(f"classification needs two or more classes; {source} has one")
    return index, values.size
