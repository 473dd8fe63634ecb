"""The HDF5 run log: its layout after a run, and the RunLog writer itself."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest
import xarray as xr
from sklearn.datasets import load_breast_cancer

from clip21mpi import __version__
from clip21mpi.config import RunConfig
from clip21mpi.runlog import METRICS, RunLog, read_log

SYNTH = "synthetic:rows=200,features=5"
D_SYNTH = 5
D_BREAST_CANCER = 30
VERSION_KEYS = {
    "version_clip21mpi",
    "version_numpy",
    "version_h5py",
    "version_python",
    "version_mpi4py",
    "version_mpi_library",
    "version_mpi_standard",
}


@pytest.fixture
def run_log(invoke, tmp_path):
    """Return ``run_log(*args)``: run in-process to ``run.h5``, return its path."""

    def _run_log(*args):
        result = invoke(*args, "--out", "run.h5", "-q")
        assert result.exit_code == 0, (
            f"exit {result.exit_code}: {result.exception!r}\n{result.stderr}"
        )
        return tmp_path / "run.h5"

    return _run_log


@pytest.fixture
def breast_cancer_log(run_log):
    """clip21 on breast_cancer: 3 clients on one rank, 20 iterations, seed 7."""
    return run_log(
        "--data", "breast_cancer", "--clients", "3", "--iters", "20", "--seed", "7"
    )


# Layout after a run.


def test_metrics_group_layout(breast_cancer_log):
    K = 20
    with h5py.File(breast_cancer_log, "r") as f:
        group = f["metrics"]
        assert set(group) == {"iteration", *METRICS}
        assert set(METRICS) == {
            "grad_norm_sq",
            "loss",
            "clip_fraction",
            "bits_sent",
            "wall_time",
        }
        iteration = group["iteration"]
        assert iteration.is_scale
        assert iteration.dtype == np.int64
        np.testing.assert_array_equal(iteration[()], np.arange(K + 1))
        for name in METRICS:
            ds = group[name]
            assert (ds.shape, ds.dtype) == ((K + 1,), np.float64), name
            scales = ds.dims[0]
            assert len(scales) == 1 and scales[0].name == "/metrics/iteration", name
            assert np.isfinite(ds[()]).all(), name


def test_root_datasets(breast_cancer_log):
    with h5py.File(breast_cancer_log, "r") as f:
        for name in ("x0", "x_final"):
            ds = f[name]
            assert (ds.shape, ds.dtype) == ((D_BREAST_CANCER,), np.float64), name
            assert ds.dims[0][0].name == "/feature", name
        assert f["feature"].is_scale
        np.testing.assert_array_equal(f["feature"][()], np.arange(D_BREAST_CANCER))
        np.testing.assert_array_equal(f["x0"][()], np.zeros(D_BREAST_CANCER))
        assert np.isfinite(f["x_final"][()]).all()
        assert np.abs(f["x_final"][()]).max() > 0


def test_root_attributes(breast_cancer_log):
    with h5py.File(breast_cancer_log, "r") as f:
        attrs = dict(f.attrs)

    # The resolved configuration: reg 'auto' is stored as what it meant.
    expected = RunConfig(
        data="breast_cancer",
        clients=3,
        iters=20,
        seed=7,
        out="run.h5",
        reg="nonconvex",
    ).to_dict()
    assert json.loads(attrs["config"]) == expected
    assert isinstance(attrs["command"], str)
    assert attrs["status"] == "max_iters"
    assert (attrs["ranks"], attrs["clients"], attrs["seed"]) == (1, 3, 7)
    assert (attrs["dim"], attrs["rows"]) == (D_BREAST_CANCER, 569)
    assert attrs["iterations"] == 20
    L, L_i = attrs["L"], attrs["L_i"]
    assert L_i.shape == (3,) and (L_i > 0).all()
    # The mean of L_i-smooth functions is at most mean(L_i)-smooth.
    assert 0 < L <= L_i.mean() * (1 + 1e-12)
    assert VERSION_KEYS <= set(attrs)
    assert attrs["version_clip21mpi"] == __version__
    assert attrs["version_h5py"] == h5py.__version__
    assert attrs["version_numpy"] == np.__version__
    versions = json.loads(attrs["versions"])
    assert {f"version_{k}" for k in versions} == VERSION_KEYS


def test_first_row_known_answer(run_log):
    # At x0 = 0 every logistic row costs log 2 and the regulariser vanishes,
    # so f(0) = log 2 and grad f(0) = -mean_j(b_j a_j) / 2.
    path = run_log("--data", "breast_cancer", "--clients", "1", "--iters", "2")

    X, y = load_breast_cancer(return_X_y=True)
    A = (X - X.mean(axis=0)) / X.std(axis=0)
    b = np.where(y == y.max(), 1.0, -1.0)
    grad = -(b[:, None] * A).mean(axis=0) / 2
    metrics = read_log(path)["metrics"]
    assert metrics["loss"][0] == pytest.approx(math.log(2), rel=1e-14)
    assert metrics["grad_norm_sq"][0] == pytest.approx(grad @ grad, rel=1e-12)


def test_single_client_L_equals_its_L_i(run_log):
    attrs = read_log(run_log("--data", SYNTH, "--iters", "1"))["attrs"]

    assert attrs["L"] == pytest.approx(attrs["L_i"][0], rel=1e-12)


@pytest.mark.parametrize("method", ["gd", "clip21"])
def test_bits_sent_dense(run_log, method):
    path = run_log(
        "--data", SYNTH, "--clients", "2", "--method", method, "--iters", "6"
    )

    bits = read_log(path)["metrics"]["bits_sent"]
    np.testing.assert_array_equal(bits, 64 * D_SYNTH * np.arange(7))


def test_bits_sent_ef21_top1(run_log):
    # The first ef21 round is dense (64 d); then one value and one index.
    path = run_log(
        "--data",
        SYNTH,
        "--clients",
        "2",
        "--method",
        "ef21",
        "--k",
        "1",
        "--iters",
        "6",
    )

    bits = read_log(path)["metrics"]["bits_sent"]
    assert bits[0] == 0
    assert bits[1] == 64 * D_SYNTH
    np.testing.assert_array_equal(np.diff(bits)[1:], np.full(5, 64 + 32))


@pytest.mark.parametrize(
    ("args", "first_row"),
    [
        (["--method", "clip21", "--tau", "1e-3"], 1.0),
        (["--method", "gd"], 0.0),
        (["--method", "ef21", "--k", "1"], 0.0),
    ],
    ids=["clip21-tiny-tau", "gd", "ef21"],
)
def test_clip_fraction_is_a_fraction(run_log, args, first_row):
    path = run_log("--data", SYNTH, "--clients", "4", "--iters", "10", *args)

    fraction = read_log(path)["metrics"]["clip_fraction"]
    assert ((fraction >= 0) & (fraction <= 1)).all()
    assert fraction[0] == first_row
    # Four clients: a fraction of them is a multiple of 1/4.
    np.testing.assert_array_equal(fraction * 4, np.round(fraction * 4))


def test_clip_fraction_zero_without_clipping(run_log):
    path = run_log(
        "--data",
        SYNTH,
        "--clients",
        "4",
        "--iters",
        "10",
        "--method",
        "clip21",
        "--tau",
        "1e6",
    )

    np.testing.assert_array_equal(read_log(path)["metrics"]["clip_fraction"], 0.0)


def test_wall_time_nondecreasing(breast_cancer_log):
    wall_time = read_log(breast_cancer_log)["metrics"]["wall_time"]

    assert wall_time[0] >= 0
    assert (np.diff(wall_time) >= 0).all()


def test_xarray_reads_metrics(run_log):
    path = run_log("--data", SYNTH, "--iters", "12", "--eval-every", "5")
    record = read_log(path)

    with xr.open_dataset(path, engine="h5netcdf", group="metrics") as ds:
        assert dict(ds.sizes) == {"iteration": 13}
        assert set(ds.data_vars) == set(METRICS)
        np.testing.assert_array_equal(ds["iteration"].values, np.arange(13))
        for name in METRICS:
            assert ds[name].dims == ("iteration",)
            np.testing.assert_array_equal(
                ds[name].values, record["metrics"][name], err_msg=name
            )
    assert np.isnan(record["metrics"]["loss"]).any()  # NaN survives the reader


def test_eval_every_leaves_loss_nan_between_evaluations(run_log):
    path = run_log("--data", SYNTH, "--iters", "12", "--eval-every", "5")

    metrics = read_log(path)["metrics"]
    evaluated = np.flatnonzero(np.isfinite(metrics["loss"]))
    assert evaluated.tolist() == [0, 5, 10, 12]
    for name in ("grad_norm_sq", "clip_fraction", "bits_sent", "wall_time"):
        assert np.isfinite(metrics[name]).all(), name


def test_eval_every_evaluates_last_row_when_tol_stops(invoke, tmp_path):
    # The loss is not part of the trajectory, so the run with --eval-every
    # stops where the plain run does: at K, which is not a multiple of K - 1.
    plain = invoke("--data", SYNTH, "--tol", "1e-3", "--out", "plain.h5", "-q")
    K = len(read_log(tmp_path / "plain.h5")["metrics"]["iteration"]) - 1
    assert plain.exit_code == 0 and K >= 3, plain.stderr

    result = invoke(
        "--data", SYNTH, "--tol", "1e-3", "--eval-every", K - 1, "--out", "run.h5", "-q"
    )

    assert result.exit_code == 0, result.stderr
    record = read_log(tmp_path / "run.h5")
    assert record["attrs"]["status"] == "converged"
    assert record["metrics"]["iteration"][-1] == K
    assert np.isfinite(record["metrics"]["loss"][-1])
    assert ", f = nan," not in result.stdout


# The RunLog writer and read_log.


def _columns(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(rows) for name in METRICS}


def test_append_in_batches_concatenates(tmp_path):
    path = tmp_path / "log.h5"
    attrs = {
        "config": {"method": "gd", "tau": 1.0},
        "L_i": [1.0, 2.0],
        "note": None,
        "ranks": 2,
    }
    sizes = [3, 1, 1500, 5]  # the third batch spans chunks of 1024 rows
    columns = _columns(sum(sizes))

    log = RunLog.create(path, attrs, np.arange(4.0))
    start = 0
    for n in sizes:
        log.append(
            np.arange(start, start + n),
            {name: c[start : start + n] for name, c in columns.items()},
        )
        start += n
    log.append(np.arange(0), {name: np.empty(0) for name in METRICS})
    log.close("max_iters", np.ones(4), {"iterations": start - 1})

    record = read_log(path)
    np.testing.assert_array_equal(record["metrics"]["iteration"], np.arange(start))
    for name in METRICS:
        np.testing.assert_array_equal(record["metrics"][name], columns[name])
    assert record.config == {"method": "gd", "tau": 1.0}
    np.testing.assert_array_equal(record["attrs"]["L_i"], [1.0, 2.0])
    assert record["attrs"]["note"] == ""
    assert record["attrs"]["ranks"] == 2
    assert record["attrs"]["status"] == "max_iters"
    assert record["attrs"]["iterations"] == start - 1
    np.testing.assert_array_equal(record["x0"], np.arange(4.0))
    np.testing.assert_array_equal(record["x_final"], np.ones(4))


def test_read_log_before_close(tmp_path):
    path = tmp_path / "log.h5"
    RunLog.create(path, {}, np.zeros(2))

    record = read_log(path)

    assert record["attrs"]["status"] == "running"
    assert record["x_final"] is None
    assert {name: a.shape for name, a in record["metrics"].items()} == {
        name: (0,) for name in ("iteration", *METRICS)
    }


def test_create_refuses_existing_file(tmp_path):
    path = tmp_path / "log.h5"
    log = RunLog.create(path, {"config": {"seed": 1}}, np.zeros(2))
    log.append(np.arange(2), _columns(2))

    with pytest.raises(FileExistsError):
        RunLog.create(path, {"config": {"seed": 2}}, np.zeros(2))

    record = read_log(path)
    assert record.config == {"seed": 1}
    assert record["metrics"]["iteration"].tolist() == [0, 1]

    RunLog.create(path, {"config": {"seed": 2}}, np.zeros(2), overwrite=True)
    record = read_log(path)
    assert record.config == {"seed": 2}
    assert record["metrics"]["iteration"].tolist() == []


def test_close_rejects_unknown_status(tmp_path):
    log = RunLog.create(tmp_path / "log.h5", {}, np.zeros(2))

    with pytest.raises(ValueError) as err:
        log.close("done")

    assert str(err.value) == (
        "unknown status 'done'; valid: "
        "('running', 'converged', 'max_iters', 'diverged', 'failed', 'checkpointed')"
    )


def test_reader_opens_file_between_flushes(tmp_path):
    path = tmp_path / "log.h5"
    columns = _columns(5)
    log = RunLog.create(path, {}, np.zeros(2))

    log.append(np.arange(3), {name: c[:3] for name, c in columns.items()})
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "running"
        np.testing.assert_array_equal(f["metrics/iteration"][()], np.arange(3))
        np.testing.assert_array_equal(f["metrics/loss"][()], columns["loss"][:3])

    log.append(np.arange(3, 5), {name: c[3:] for name, c in columns.items()})
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["metrics/iteration"][()], np.arange(5))
        np.testing.assert_array_equal(f["metrics/loss"][()], columns["loss"])


READER = """
import sys, h5py
f = h5py.File(sys.argv[1], "r")
print(f["metrics/iteration"].shape[0], flush=True)
sys.stdin.readline()
f.close()
"""


def test_reader_holding_file_open_does_not_block_writer(tmp_path):
    # Another process keeps the file open (with HDF5's default file locking)
    # while the writer flushes more rows and closes the log.
    path = tmp_path / "log.h5"
    log = RunLog.create(path, {}, np.zeros(2))
    log.append(np.arange(2), _columns(2))
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline() == "2\n"
        log.append(np.arange(2, 4), _columns(2, seed=1))
        log.close("max_iters", np.ones(2))
    finally:
        _out, err = reader.communicate("\n", timeout=120)
    assert reader.returncode == 0, err

    record = read_log(path)
    np.testing.assert_array_equal(record["metrics"]["iteration"], np.arange(4))
    assert record["attrs"]["status"] == "max_iters"
