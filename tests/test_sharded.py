"""Converted datasets: conversion, partial reads, and the ``data`` commands.

The converter must give what ``load_svmlight_file`` gives on the whole file,
whatever the block size; ``read_rows`` must equal slicing the full matrix
and read from the file only the entries of the rows asked for.
"""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import hashlib
import os

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from sklearn.datasets import load_svmlight_file

from cli.data import data
from clip21mpi import __version__
from clip21mpi.runlog import RunLog
from problems.data import DataError, load_dataset
from problems.sharded import (
    FORMAT,
    FORMAT_VERSION,
    ShardedDataset,
    client_label_counts,
    convert_libsvm,
    read_plan,
)
from problems.split import SPLITS, client_offsets, rank_clients, row_order

# Block sizes that cut the test files into many blocks.
SMALL_BLOCK = 997
TINY_BLOCK = 97

TINY = (
    "# a tiny dataset\n"
    "1 1:0.5 3:2\n"
    "-1 2:1.5\n"
    "\n"
    "1 qid:3 1:1 2:0 4:-3 # an explicit zero\n"
    "-1\n"
    "1 4:7\n"
)


def write_libsvm(path, n_rows=300, n_features=40, seed=0, zero_based=False):
    """Write random rows (some empty, some explicit zeros, comments between);
    return the path."""
    rng = np.random.default_rng(seed)
    base = 0 if zero_based else 1
    lines = ["# generated for the tests"]
    for i in range(n_rows):
        k = rng.integers(0, 8)
        cols = np.sort(rng.choice(n_features, size=k, replace=False))
        values = rng.standard_normal(k)
        values[rng.random(k) < 0.1] = 0.0
        label = rng.choice([-1.0, 1.0, 2.0])
        body = " ".join(f"{c + base}:{float(v)!r}" for c, v in zip(cols, values))
        lines.append(f"{label:g} {body}".rstrip())
        if i % 50 == 7:
            lines += ["", "# a comment line"]
    # Index 0 (or the top index) appears only in the last row, i.e. in the
    # last block: the index base is decided over the whole file.
    lines.append(f"1 {base}:1.25 {n_features - 1 + base}:-2")
    text = "\n".join(lines) + "\n"
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(os.path.splitext(path)[1], open)
    with opener(path, "wt") as fh:
        fh.write(text)
    return path


def assert_same_csr(got, expected):
    """Equal shapes and identical CSR arrays (explicit zeros included)."""
    assert sp.isspmatrix_csr(got)
    expected = sp.csr_matrix(expected)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_array_equal(got.data, expected.data)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A 301-row dataset, converted in small blocks; (dataset, full matrix)."""
    folder = tmp_path_factory.mktemp("converted")
    source = write_libsvm(folder / "rows.txt")
    dataset = convert_libsvm(source, folder / "rows.h5", block_bytes=SMALL_BLOCK)
    X, _ = load_svmlight_file(str(source))
    return dataset, sp.csr_matrix(X)


def invoke(*args, obj=None):
    return CliRunner().invoke(
        data, list(map(str, args)), prog_name="clip21mpi data", obj=obj
    )


def usage(command: str, message: str) -> str:
    return (
        f"Usage: clip21mpi data {command}\n"
        f"Try 'clip21mpi data {command.split()[0]} --help' for help.\n"
        f"\nError: {message}\n"
    )


CONVERT_USAGE = "convert [OPTIONS] FILE OUT"


# Conversion equals load_svmlight_file on the whole file.


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz", ".txt.bz2"])
@pytest.mark.parametrize("zero_based", [False, True])
@pytest.mark.parametrize("block_bytes", [TINY_BLOCK, SMALL_BLOCK, 1 << 20])
def test_round_trip_equals_load_svmlight_file(
    tmp_path, suffix, zero_based, block_bytes
):
    source = write_libsvm(tmp_path / f"rows{suffix}", zero_based=zero_based)
    dataset = convert_libsvm(source, tmp_path / "rows.h5", block_bytes=block_bytes)
    X, y = load_svmlight_file(str(source))

    assert (dataset.n_rows, dataset.n_features) == X.shape
    assert dataset.nnz == X.nnz
    assert dataset.attrs["source_index_base"] == (0 if zero_based else 1)
    assert_same_csr(dataset.read_rows(np.arange(dataset.n_rows)), X)
    np.testing.assert_array_equal(dataset.labels, y)
    np.testing.assert_array_equal(dataset.label_values, [-1.0, 1.0, 2.0])


def test_round_trip_equals_the_run_loader(converted):
    dataset, _ = converted
    loaded = load_dataset(dataset.attrs["source"])
    assert dataset.name == loaded.name == "rows"
    assert_same_csr(dataset.read_rows(np.arange(dataset.n_rows)), loaded.features)
    np.testing.assert_array_equal(dataset.labels, loaded.labels)


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compressed_file_reads_the_same(tmp_path, compression):
    source = write_libsvm(tmp_path / "rows.txt")
    result = invoke(
        "convert", source, tmp_path / "rows.h5", "--compression", compression
    )
    assert result.exit_code == 0, result.output
    dataset = ShardedDataset.open(tmp_path / "rows.h5")
    assert dataset.attrs["compression"] == compression
    X, _ = load_svmlight_file(str(source))
    rows = np.array([299, 3, 3, 150, 0])
    assert_same_csr(dataset.read_rows(rows), X[rows])


def test_layout_and_provenance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_libsvm("rows.txt.gz")
    argv = ["clip21mpi", "data", "convert", "rows.txt.gz", "rows.h5"]
    result = invoke(*argv[2:], obj={"argv": argv})
    assert result.exit_code == 0, result.output
    X, _ = load_svmlight_file("rows.txt.gz")
    nnz = X.nnz
    assert (
        result.stdout
        == f"rows.h5: 301 rows, 40 features, {nnz} nonzeros, 3 label values\n"
    )

    with h5py.File("rows.h5", "r") as f:
        shapes = {name: (f[name].dtype, f[name].shape) for name in f}
        attrs = dict(f.attrs)
        chunked = {name: f[name].chunks is not None for name in f}
    assert shapes == {
        "indptr": (np.int64, (302,)),
        "indices": (np.int32, (nnz,)),
        "data": (np.float64, (nnz,)),
        "labels": (np.float64, (301,)),
        "label_values": (np.float64, (3,)),
    }
    assert all(chunked[name] for name in ("indptr", "indices", "data", "labels"))
    raw = (tmp_path / "rows.txt.gz").read_bytes()
    assert attrs["format"] == FORMAT and attrs["format_version"] == FORMAT_VERSION
    assert (attrs["n_rows"], attrs["n_features"], attrs["nnz"]) == (301, 40, nnz)
    assert attrs["name"] == "rows"
    assert attrs["source"] == "rows.txt.gz"
    assert attrs["source_size"] == len(raw)
    assert attrs["source_sha256"] == hashlib.sha256(raw).hexdigest()
    assert attrs["converter_version"] == __version__
    assert attrs["command"] == "clip21mpi data convert rows.txt.gz rows.h5"
    created = dt.datetime.fromisoformat(attrs["created"])
    assert abs(dt.datetime.now().astimezone() - created) < dt.timedelta(minutes=5)


# read_rows equals slicing the full matrix.


@pytest.mark.parametrize(
    "rows",
    [
        np.arange(300),
        np.arange(40, 97),
        np.arange(299, -1, -1),
        np.array([5, 5, 5, 17, 5]),
        np.array([7]),
        np.array([0, 300]),
        np.array([250, 3, 120, 121, 122, 9, 300, 0, 121]),
        np.random.default_rng(1).integers(0, 301, size=500),
        np.random.default_rng(2).permutation(301),
    ],
    ids=[
        "all",
        "contiguous",
        "reversed",
        "repeated",
        "single",
        "ends",
        "arbitrary",
        "random-with-repeats",
        "permutation",
    ],
)
@pytest.mark.parametrize("max_gap", [0, 3, 1024])
def test_read_rows_equals_slicing(converted, rows, max_gap):
    dataset, X = converted
    assert_same_csr(dataset.read_rows(rows, max_gap=max_gap), X[rows])


def test_read_rows_of_no_rows(converted):
    dataset, X = converted
    A = dataset.read_rows(np.array([], dtype=np.int64))
    assert A.shape == (0, X.shape[1]) and A.nnz == 0


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("n_ranks", [1, 2, 3])
def test_every_rank_reads_its_clients_rows(converted, split, n_ranks):
    """The reading ``prepare`` does: the row order from the labels, then the
    rows of this rank's clients; together the ranks hold every client."""
    dataset, X = converted
    n_clients = 7
    order = row_order(split, dataset.labels, seed=3)
    offsets = client_offsets(dataset.n_rows, n_clients)
    blocks = []
    for rank in range(n_ranks):
        mine = rank_clients(n_clients, n_ranks, rank)
        rows = order[offsets[mine.start] : offsets[mine.stop]]
        A = dataset.read_rows(rows)
        assert A.shape[1] == dataset.n_features
        assert_same_csr(A, X[rows])
        blocks.append(A)
    assert_same_csr(sp.vstack(blocks, format="csr"), X[order])


def test_read_rows_rejects_bad_rows(converted):
    dataset, _ = converted
    with pytest.raises(IndexError) as err:
        dataset.read_rows(np.array([0, 301]))
    assert (
        str(err.value) == f"row 301 is outside {dataset.source}, whose rows are 0..300"
    )
    with pytest.raises(IndexError, match="row -1 is outside"):
        dataset.read_rows(np.array([-1, 3]))
    with pytest.raises(ValueError, match="1-D array of row numbers"):
        dataset.read_rows(np.array([1.0, 2.0]))


# Partial reads touch only the entries asked for.


@pytest.fixture
def h5_reads(monkeypatch):
    """Record every read of an HDF5 dataset: (name, start, stop)."""
    reads = []

    def span(name, sel):
        if isinstance(sel, slice):
            return (name, sel.start, sel.stop)
        return (name, None, None)  # a whole-array read

    getitem, read_direct = h5py.Dataset.__getitem__, h5py.Dataset.read_direct

    def recording_getitem(self, args, *rest, **kw):
        reads.append(span(self.name, args))
        return getitem(self, args, *rest, **kw)

    def recording_read_direct(self, dest, source_sel=None, dest_sel=None):
        reads.append(span(self.name, source_sel))
        return read_direct(self, dest, source_sel, dest_sel)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording_getitem)
    monkeypatch.setattr(h5py.Dataset, "read_direct", recording_read_direct)
    return reads


def test_open_reads_labels_only(converted, h5_reads):
    dataset, _ = converted
    ShardedDataset.open(dataset.source)
    assert sorted(name for name, *_ in h5_reads) == ["/label_values", "/labels"]


def test_contiguous_rows_are_one_slice_of_each_array(converted, h5_reads):
    dataset, X = converted
    a, b = 120, 180
    A = dataset.read_rows(np.arange(a, b))
    lo, hi = X.indptr[a], X.indptr[b]
    assert h5_reads == [
        ("/indptr", a, b + 1),
        ("/indices", lo, hi),
        ("/data", lo, hi),
    ]
    assert A.nnz == hi - lo < X.nnz // 4


def test_scattered_rows_read_only_their_entries(converted, h5_reads):
    """With max_gap 0 every run of rows is read alone: the entries read are
    exactly those of the rows asked for, each once."""
    dataset, X = converted
    rows = np.array([250, 3, 120, 121, 122, 9, 121, 30, 31])
    A = dataset.read_rows(rows, max_gap=0)
    assert_same_csr(A, X[rows])
    entry_reads = sorted((lo, hi) for name, lo, hi in h5_reads if name == "/data")
    wanted = np.unique(rows)
    runs = [(3, 4), (9, 10), (30, 32), (120, 123), (250, 251)]
    # Row 9 is empty: its run has no entries to read.
    assert X.indptr[10] == X.indptr[9]
    assert entry_reads == [
        (X.indptr[r0], X.indptr[r1]) for r0, r1 in runs if X.indptr[r1] > X.indptr[r0]
    ]
    assert sum(hi - lo for lo, hi in entry_reads) == X[wanted].nnz
    assert all(lo is not None for _, lo, _ in h5_reads)


def test_read_plan_covers_the_rows_in_bounded_spans():
    rng = np.random.default_rng(5)
    for _ in range(200):
        rows = np.unique(rng.integers(0, 400, size=rng.integers(1, 150)))
        if rng.random() < 0.3:
            rows = np.union1d(rows, np.arange(100, 100 + rng.integers(1, 60)))
        max_gap, span_rows = int(rng.integers(0, 20)), int(rng.integers(1, 40))
        starts, stops, whole = read_plan(rows, max_gap, span_rows)
        assert np.all(starts < stops) and np.all(stops[:-1] < starts[1:])
        inside = np.zeros(400, bool)
        for a, b, w in zip(starts, stops, whole):
            held = rows[(rows >= a) & (rows < b)]
            assert held[0] == a and held[-1] == b - 1
            assert w == (held.size == b - a)
            assert w or b - a < 2 * span_rows + max_gap
            inside[a:b] = True
        assert inside[rows].all()


# Malformed input names the file and the line, as the run's loader does.


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("x 1:2", "label 'x' is not a number"),
        ("1 2:3 1:4", "feature index 1 is negative or out of order"),
        ("1 2:3 2:4", "feature index 2 is negative or out of order"),
        ("1 -1:2", "feature index -1 is negative or out of order"),
        ("1 2-3", "'2-3' is not of the form index:value"),
        ("1 1:abc", "'1:abc' is not of the form index:value"),
    ],
)
def test_malformed_line_is_named(tmp_path, monkeypatch, bad, reason):
    monkeypatch.chdir(tmp_path)
    lines = ["1 1:0.5 2:1"] * 40 + ["# comment", ""] + [bad] + ["-1 3:1"] * 5
    with open("bad.txt", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    message = f"malformed LibSVM data in bad.txt, line 43: {reason}"

    with pytest.raises(DataError) as err:
        convert_libsvm("bad.txt", "bad.h5", block_bytes=TINY_BLOCK)
    assert str(err.value) == message
    with pytest.raises(DataError) as loaded:
        load_dataset("bad.txt")
    assert str(loaded.value) == message

    result = invoke("convert", "bad.txt", "bad.h5")
    assert result.exit_code == 2
    assert result.stderr == usage(CONVERT_USAGE, message)
    assert sorted(os.listdir()) == ["bad.txt"]


def test_truncated_gzip_is_malformed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_libsvm("rows.txt.gz")
    raw = (tmp_path / "rows.txt.gz").read_bytes()
    with open("cut.txt.gz", "wb") as fh:
        fh.write(raw[: len(raw) // 2])
    result = invoke("convert", "cut.txt.gz", "cut.h5")
    assert result.exit_code == 2
    assert "Error: malformed LibSVM data in cut.txt.gz: Compressed file ended" in (
        result.stderr
    )
    assert not os.path.exists("cut.h5")


def test_input_without_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("empty.txt", "w") as fh:
        fh.write("# nothing\n\n")
    result = invoke("convert", "empty.txt", "empty.h5")
    assert result.exit_code == 2
    assert result.stderr == usage(CONVERT_USAGE, "empty.txt holds no rows")
    assert sorted(os.listdir()) == ["empty.txt"]


def test_missing_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("convert", "nope.txt", "nope.h5")
    assert result.exit_code == 2
    assert result.stderr == usage(
        CONVERT_USAGE, "no such file: 'nope.txt'; pass a LibSVM file"
    )


def test_converting_a_converted_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("tiny.txt", "w") as fh:
        fh.write(TINY)
    convert_libsvm("tiny.txt", "tiny.h5")
    result = invoke("convert", "tiny.h5", "again.h5")
    assert result.exit_code == 2
    assert result.stderr == usage(
        CONVERT_USAGE,
        "tiny.h5 is an HDF5 file, not LibSVM text; a converted dataset needs no "
        "conversion: pass it to --data as it is",
    )


# Existing outputs.


def test_convert_refuses_an_existing_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("tiny.txt", "w") as fh:
        fh.write(TINY)
    with open("tiny.h5", "wb") as fh:
        fh.write(b"keep me")

    result = invoke("convert", "tiny.txt", "tiny.h5")
    assert result.exit_code == 2
    assert result.stderr == usage(
        CONVERT_USAGE,
        "the output 'tiny.h5' exists; pass --overwrite to replace it or choose "
        "another output path",
    )
    assert (tmp_path / "tiny.h5").read_bytes() == b"keep me"

    result = invoke("convert", "tiny.txt", "tiny.h5", "--overwrite")
    assert result.exit_code == 0, result.output
    assert ShardedDataset.open("tiny.h5").n_rows == 5
    assert sorted(os.listdir()) == ["tiny.h5", "tiny.txt"]


def test_failed_overwrite_keeps_the_old_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("tiny.txt", "w") as fh:
        fh.write(TINY)
    convert_libsvm("tiny.txt", "tiny.h5")
    with open("bad.txt", "w") as fh:
        fh.write("1 1:2\nx\n")
    result = invoke("convert", "bad.txt", "tiny.h5", "--overwrite")
    assert result.exit_code == 2
    assert ShardedDataset.open("tiny.h5").n_rows == 5
    assert sorted(os.listdir()) == ["bad.txt", "tiny.h5", "tiny.txt"]


# Opening what is not a converted dataset.


def test_open_rejects_other_files(tmp_path):
    log = tmp_path / "run.h5"
    RunLog.create(log, {"config": {}}, np.zeros(2))
    with pytest.raises(DataError) as err:
        ShardedDataset.open(log)
    assert str(err.value) == (
        f"{log} is not a converted dataset (its 'format' attribute is None, not "
        "'clip21mpi-csr'); convert a LibSVM file with 'clip21mpi data convert "
        "FILE OUT.h5'"
    )
    text = tmp_path / "tiny.txt"
    text.write_text(TINY)
    with pytest.raises(DataError, match=r"tiny.txt is not a readable HDF5 file"):
        ShardedDataset.open(text)
    with pytest.raises(DataError, match=r"^no such file: '.*missing.h5'; convert"):
        ShardedDataset.open(tmp_path / "missing.h5")


# info.

TINY_INFO = """\
tiny.txt: LibSVM file
rows:      5
features:  4
nnz:       7 (1.40 per row)
density:   0.35
labels:    2 values
  -1  2 rows (40.0%)
  1   3 rows (60.0%)
split:     contiguous, 2 clients, rows per client min 2, median 2.5, max 3
  client  rows  -1  1
       0     2   1  1
       1     3   1  2
"""


def test_info_of_a_tiny_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("tiny.txt", "w") as fh:
        fh.write(TINY)
    result = invoke("info", "tiny.txt", "--clients", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == TINY_INFO


def test_info_of_a_converted_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("tiny.txt", "w") as fh:
        fh.write(TINY)
    argv = ["clip21mpi", "data", "convert", "tiny.txt", "tiny.h5"]
    assert invoke(*argv[2:], obj={"argv": argv}).exit_code == 0
    attrs = ShardedDataset.open("tiny.h5").attrs

    result = invoke("info", "tiny.h5", "--clients", "2")
    assert result.exit_code == 0, result.output
    expected = (
        TINY_INFO.replace("tiny.txt: LibSVM file", "tiny.h5: converted dataset")
        + "provenance:\n"
        "  name               tiny\n"
        "  source             tiny.txt\n"
        f"  source_size        {len(TINY)}\n"
        f"  source_sha256      {hashlib.sha256(TINY.encode()).hexdigest()}\n"
        "  source_index_base  1\n"
        "  compression        none\n"
        f"  converter_version  {__version__}\n"
        f"  created            {attrs['created']}\n"
        "  command            clip21mpi data convert tiny.txt tiny.h5\n"
    )
    assert result.stdout == expected


def test_info_by_label_and_shuffled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("tiny.txt", "w") as fh:
        fh.write(TINY)
    result = invoke("info", "tiny.txt", "--clients", "2", "--split", "by-label")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(
        "split:     by-label, 2 clients, rows per client min 2, median 2.5, max 3\n"
        "  client  rows  -1  1\n"
        "       0     2   2  0\n"
        "       1     3   0  3\n"
    )
    result = invoke(
        "info", "tiny.txt", "--clients", "5", "--split", "shuffled", "--seed", "4"
    )
    assert result.exit_code == 0, result.output
    assert (
        "split:     shuffled, seed 4, 5 clients, rows per client min 1, median 1"
        in (result.stdout)
    )


def test_info_rejects_more_clients_than_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("tiny.txt", "w") as fh:
        fh.write(TINY)
    result = invoke("info", "tiny.txt", "--clients", "6")
    assert result.exit_code == 2
    assert result.stderr == usage(
        "info [OPTIONS] PATH",
        "Invalid value for '--clients': 6 exceeds the 5 rows of tiny.txt; every "
        "client needs a row",
    )


def test_client_label_counts_add_up(converted):
    dataset, _ = converted
    order = row_order("shuffled", dataset.labels, seed=1)
    offsets = client_offsets(dataset.n_rows, 6)
    values, counts = client_label_counts(dataset.labels, order, offsets)
    np.testing.assert_array_equal(values, dataset.label_values)
    np.testing.assert_array_equal(counts.sum(axis=1), np.diff(offsets))
    np.testing.assert_array_equal(
        counts.sum(axis=0), [np.sum(dataset.labels == v) for v in values]
    )


def test_data_group_is_registered():
    from cli.main import cli

    assert cli.commands["data"] is data


@pytest.mark.parametrize("split", ["contiguous", "shuffled"])
def test_a_run_on_the_converted_file_equals_the_run_on_the_text(
    converted, split, tmp_path
):
    """prepare reads only the rank's rows of a converted file; the run is the
    same as on the LibSVM file, on one rank or split over three."""
    from clip21mpi.comm import World
    from clip21mpi.config import RunConfig
    from clip21mpi.runner import prepare, run

    dataset, _ = converted
    h5_path = dataset.source
    text_path = os.path.join(os.path.dirname(h5_path), "rows.txt")
    common = {
        "clients": 6,
        "split": split,
        "iters": 30,
        "method": "clip21",
        "problem": "mlp",
        "hidden": 4,
        "step_size": 0.5,
    }  # three classes: the network
    results = []
    for source in (text_path, h5_path):
        cfg = RunConfig(
            data=str(source), out=str(tmp_path / f"{len(results)}.h5"), **common
        )
        results.append(run(prepare(cfg, 0, 1), World()))
    np.testing.assert_array_equal(results[0].x_final, results[1].x_final)
    # Each of three ranks holds exactly its clients' rows.
    full = prepare(RunConfig(data=str(text_path), **common), 0, 1).objectives.design.A
    parts = [
        prepare(RunConfig(data=str(h5_path), **common), r, 3).objectives.design.A
        for r in range(3)
    ]
    assert_same_csr(sp.vstack(parts).tocsr(), full)
