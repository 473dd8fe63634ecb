"""Reading many run logs: the report, plot and info commands, and the
library functions behind them.

The logs come from the library in-process (one rank), except a failed and
a still-running log, which are written with RunLog directly, a corrupt
file of random bytes, and a foreign HDF5 file. Expected figures are
computed here from the datasets, opened with h5py, not with the code under
test.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from click.testing import CliRunner

from cli.main import cli
from clip21mpi.analysis import (
    DEFAULT_TOL,
    LogError,
    find_logs,
    load_run,
    load_runs,
    run_labels,
    runs_dataframe,
    to_dataframe,
)
from clip21mpi.comm import World
from clip21mpi.config import RunConfig
from clip21mpi.plotting import figure_format, plot_runs, save_figure
from clip21mpi.runlog import RunLog, read_log
from clip21mpi.runner import prepare, run

SYNTH = "synthetic:rows=200,features=5"
FINAL_ATTRS = ("status", "iterations", "wall_time_total", "message", "epsilon")
METRIC_NAMES = "bits_sent, clip_fraction, grad_norm_sq, loss, wall_time"


def make_run(path: Path, **options) -> str:
    """Run in-process on one rank and return the log's path."""
    config = RunConfig(data=SYNTH, out=os.fspath(path), **options)
    run(prepare(config, 0, 1), World(), command=f"make_run {path.name}")
    return os.fspath(path)


def unfinished_copy(source, path, rows: int, failed: str | None = None) -> str:
    """Write the first ``rows`` rows of ``source`` to a log left running, or
    closed as failed with the message ``failed``."""
    record = read_log(source)
    attrs = {k: v for k, v in record["attrs"].items() if k not in FINAL_ATTRS}
    metrics = record["metrics"]
    names = [name for name in metrics if name != "iteration"]
    log = RunLog.create(path, attrs, record["x0"], metrics=names)
    log.append(metrics["iteration"][:rows], {m: metrics[m][:rows] for m in names})
    if failed is not None:
        log.close("failed", None, {"message": failed, "iterations": rows - 1})
    return os.fspath(path)


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[str, str]:
    """Logs of every kind in one folder (``logs["folder"]``), by name."""
    folder = tmp_path_factory.mktemp("runs")
    paths = {
        "clip21": make_run(folder / "clip21.h5", method="clip21", iters=60),
        "clip-gd": make_run(folder / "clip-gd.h5", method="clip-gd", iters=60),
        "gd": make_run(folder / "gd.h5", method="gd", iters=1000, tol=1e-9),
        "diverged": make_run(
            folder / "diverged.h5",
            method="gd",
            reg="l2",
            step_size=1e6,
            iters=200,
        ),
        "noisy": make_run(
            folder / "sub" / "noisy.h5", method="clip21", noise_sigma=0.5, iters=20
        ),
        "sgd": make_run(
            folder / "sub" / "sgd.h5",
            method="clip21-sgd",
            batch_size=10,
            eval_every=5,
            iters=40,
        ),
    }
    paths["running"] = unfinished_copy(paths["clip21"], folder / "running.h5", 11)
    paths["failed"] = unfinished_copy(
        paths["clip21"], folder / "failed.h5", 8, "rank 0 failed at iteration 7: boom"
    )
    paths["folder"] = os.fspath(folder)
    return paths


@pytest.fixture(scope="module")
def bad_folder(logs, tmp_path_factory) -> dict[str, str]:
    """Two good logs, a corrupt file and a foreign HDF5 file."""
    folder = tmp_path_factory.mktemp("mixed")
    shutil.copy(logs["clip21"], folder / "b-clip21.h5")
    shutil.copy(logs["gd"], folder / "d-gd.h5")
    corrupt = folder / "a-corrupt.h5"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    foreign = folder / "c-foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["temperature"] = np.arange(10.0)
    return {"folder": os.fspath(folder), "corrupt": corrupt, "foreign": foreign}


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), prog_name="clip21mpi")


def assert_exit(result, code: int) -> None:
    assert result.exit_code == code, (
        f"exit {result.exit_code}, wanted {code}; exception {result.exception!r}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )


def usage(command: str, message: str) -> str:
    """The exact stderr of a usage error of ``command``."""
    return (
        f"Usage: clip21mpi {command} [OPTIONS] "
        f"{'RUN' if command == 'info' else 'RUN_OR_FOLDER...'}\n"
        f"Try 'clip21mpi {command} --help' for help.\n"
        "\n"
        f"Error: {message}\n"
    )


def expected_row(path, tol: float) -> dict:
    """The summary figures of one log, computed from its datasets."""
    with h5py.File(path, "r") as f:
        gns = f["metrics/grad_norm_sq"][()]
        loss = f["metrics/loss"][()]
        bits = f["metrics/bits_sent"][()]
        wall = f["metrics/wall_time"][()]
        status = f.attrs["status"]
        epsilon = f.attrs.get("epsilon", math.nan)
    finite = [v for v in gns if np.isfinite(v)]
    reached = [k for k, v in enumerate(gns) if v <= tol]
    return {
        "status": status.decode() if isinstance(status, bytes) else status,
        "final_grad_norm_sq": finite[-1],
        "final_loss": [v for v in loss if np.isfinite(v)][-1],
        "bits_to_tol": bits[reached[0]] if reached else math.nan,
        "time_to_tol": wall[reached[0]] if reached else math.nan,
        "epsilon": float(epsilon),
    }


def csv_rows(text: str) -> dict[str, dict]:
    return {os.path.basename(r["file"]): r for r in csv.DictReader(io.StringIO(text))}


def number(text: str) -> float:
    return math.nan if text == "" else float(text)


# Reading logs.


def test_find_logs_searches_folders_recursively_in_sorted_order(tmp_path):
    for name in ("b.h5", "a/z.h5", "a/c.txt", "c/d/e.h5", "a.h5"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = find_logs([tmp_path, tmp_path / "b.h5"])
    names = [os.path.relpath(p, tmp_path) for p in found]
    assert names == ["a.h5", "a/z.h5", "b.h5", "c/d/e.h5"]


def test_bad_files_give_a_reason(bad_folder):
    runs, skipped = load_runs([bad_folder["folder"]])
    assert [os.path.basename(r.path) for r in runs] == ["b-clip21.h5", "d-gd.h5"]
    reasons = {os.path.basename(err.path): err.reason for err in skipped}
    assert reasons == {
        "a-corrupt.h5": "not an HDF5 file (file signature not found)",
        "c-foreign.h5": "not a clip21mpi run log (no 'metrics')",
    }
    with pytest.raises(LogError, match="c-foreign.h5: not a clip21mpi run log"):
        load_run(bad_folder["foreign"])


def test_a_log_without_config_is_foreign(tmp_path):
    path = tmp_path / "bare.h5"
    RunLog.create(path, {"command": "elsewhere"}, np.zeros(2))
    with pytest.raises(LogError) as info:
        load_run(path)
    assert info.value.reason == "not a clip21mpi run log (no attribute 'config')"


@pytest.mark.parametrize(
    "name", ["clip21", "gd", "diverged", "noisy", "sgd", "running", "failed"]
)
def test_to_dataframe_matches_xarray(logs, name):
    ours = to_dataframe(logs[name])
    with xr.open_dataset(logs[name], engine="h5netcdf", group="metrics") as ds:
        theirs = ds.to_dataframe()
    assert ours.index.name == "iteration"
    assert sorted(ours.columns) == sorted(theirs.columns)
    pd.testing.assert_frame_equal(ours, theirs[ours.columns], check_exact=True)


def test_to_dataframe_keeps_nan_rows_of_stochastic_runs(logs):
    df = to_dataframe(logs["sgd"])
    evaluated = df["grad_norm_sq"].notna()
    assert df.index[evaluated].tolist() == list(range(0, 41, 5))


def test_runs_dataframe_warns_about_skipped_files(bad_folder):
    with pytest.warns(UserWarning) as caught:
        frame = runs_dataframe([bad_folder["folder"]])
    assert [str(w.message) for w in caught] == [
        f"skipped {bad_folder['corrupt']}: not an HDF5 file (file signature not found)",
        f"skipped {bad_folder['foreign']}: not a clip21mpi run log (no 'metrics')",
    ]
    assert frame["method"].tolist() == ["clip21", "gd"]


# The report.


def test_report_figures_match_the_datasets(logs):
    result = invoke("report", logs["folder"], "--csv", "-")
    assert_exit(result, 0)
    rows = csv_rows(result.stdout)
    assert set(rows) == {
        "clip21.h5",
        "clip-gd.h5",
        "gd.h5",
        "diverged.h5",
        "noisy.h5",
        "sgd.h5",
        "running.h5",
        "failed.h5",
    }
    for name, row in rows.items():
        # gd ran with --tol 1e-9, which is the tolerance it is judged by.
        tol = 1e-9 if name == "gd.h5" else DEFAULT_TOL
        want = expected_row(os.path.join(logs["folder"], row["file"]), tol)
        assert float(row["tol"]) == tol
        assert row["status"] == want["status"]
        for key in (
            "final_grad_norm_sq",
            "final_loss",
            "bits_to_tol",
            "time_to_tol",
            "epsilon",
        ):
            assert number(row[key]) == pytest.approx(
                want[key], rel=1e-14, nan_ok=True
            ), (name, key)


def test_report_knows_what_reached_the_tolerance(logs):
    rows = csv_rows(invoke("report", logs["folder"], "--csv", "-").stdout)
    assert rows["gd.h5"]["status"] == "converged"
    assert float(rows["gd.h5"]["final_grad_norm_sq"]) <= 1e-9
    assert float(rows["gd.h5"]["bits_to_tol"]) > 0
    assert rows["clip-gd.h5"]["bits_to_tol"] == ""
    # An explicit --tol overrides every run's own.
    rows = csv_rows(invoke("report", logs["folder"], "--tol", "1", "--csv", "-").stdout)
    assert {row["tol"] for row in rows.values()} == {"1.0"}
    with h5py.File(logs["clip21"]) as f:
        first = int(np.argmax(f["metrics/grad_norm_sq"][()] <= 1))
        bits = f["metrics/bits_sent"][first]
    assert float(rows["clip21.h5"]["bits_to_tol"]) == bits


def test_report_columns_say_what_each_run_used(logs):
    rows = csv_rows(invoke("report", logs["folder"], "--csv", "-").stdout)
    with h5py.File(logs["clip21"]) as f:
        step_size = f.attrs["step_size"]
        data_name = f.attrs["data_name"]
    clip21 = rows["clip21.h5"]
    assert clip21["problem"] == "logreg"
    assert clip21["data"] == data_name
    assert clip21["clients"] == "1"
    assert float(clip21["tau"]) == 0.1
    assert float(clip21["step_size"]) == step_size
    assert clip21["iterations"] == "60"
    assert rows["gd.h5"]["tau"] == ""
    assert rows["clip21.h5"]["epsilon"] == ""
    assert float(rows["noisy.h5"]["epsilon"]) > 0


def test_report_table_says_which_runs_finished(logs):
    result = invoke("report", logs["folder"])
    assert_exit(result, 0)
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line}
    path = os.path.join(logs["folder"], "{}.h5")
    assert " max_iters " in lines[path.format("clip21")]
    assert " converged " in lines[path.format("gd")]
    assert " diverged " in lines[path.format("diverged")]
    assert " failed " in lines[path.format("failed")]
    assert " running " in lines[path.format("running")]
    assert "(stale?)" not in result.stdout
    assert "not reached" in lines[path.format("clip-gd")]
    want = expected_row(path.format("clip21"), DEFAULT_TOL)
    assert f"{want['final_grad_norm_sq']:.3e}" in lines[path.format("clip21")]
    assert (
        "8 run(s), 5 finished: 1 converged, 4 max_iters, 1 running, 1 failed, "
        "1 diverged\n" in result.stdout
    )
    assert (
        "failed: " + path.format("failed") + ": rank 0 failed at iteration 7: boom"
        in result.stdout
    )


def test_report_marks_running_logs_not_written_for_long(logs, tmp_path):
    stale = tmp_path / "stale.h5"
    shutil.copy(logs["running"], stale)
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    result = invoke("report", stale)
    assert " running (stale?) " in result.stdout
    assert invoke("report", stale, "--stale-after", "7200").stdout.count("stale?") == 0


def test_report_csv_file_holds_the_rows_of_stdout(logs, tmp_path):
    out = tmp_path / "table.csv"
    to_file = invoke("report", logs["folder"], "--csv", out)
    assert_exit(to_file, 0)
    assert "file " in to_file.stdout
    to_stdout = invoke("report", logs["folder"], "--csv", "-")
    assert out.read_text() == to_stdout.stdout


def test_report_skips_bad_files_by_name(bad_folder):
    result = invoke("report", bad_folder["folder"])
    assert_exit(result, 0)
    assert result.stderr == (
        f"skipped {bad_folder['corrupt']}: not an HDF5 file (file signature not found)\n"
        f"skipped {bad_folder['foreign']}: not a clip21mpi run log (no 'metrics')\n"
    )
    assert "b-clip21.h5" in result.stdout
    assert "d-gd.h5" in result.stdout


def test_report_without_runs_exits_1(bad_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("report", empty)
    assert_exit(result, 1)
    assert result.stderr == f"Error: no run logs in '{empty}': no *.h5 file there\n"

    result = invoke("report", bad_folder["corrupt"], bad_folder["foreign"])
    assert_exit(result, 1)
    assert result.stderr.endswith(
        f"Error: no run logs in '{bad_folder['corrupt']}', "
        f"'{bad_folder['foreign']}': 2 file(s) skipped, see above\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Missing argument 'RUN_OR_FOLDER...'."),
        (
            ["missing.h5"],
            "Invalid value for 'RUN_OR_FOLDER...': Path 'missing.h5' does not exist.",
        ),
        (
            ["{folder}", "--tol", "-1"],
            (
                "Invalid value for '--tol': -1.0 is negative; pass a tolerance >= 0 "
                "on ||grad f||^2"
            ),
        ),
    ],
)
def test_report_usage_errors(logs, args, message):
    result = invoke("report", *[a.format(folder=logs["folder"]) for a in args])
    assert_exit(result, 2)
    assert result.stderr == usage("report", message)


# Figures.


def test_legend_lists_only_what_differs(logs):
    runs = [load_run(logs[name]) for name in ("gd", "clip-gd", "clip21")]
    fig = plot_runs(runs)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    # gd also differs in --iters and --tol from the two others.
    assert texts == [
        "method=gd, iters=1000, tol=1e-09",
        "method=clip-gd, tau=0.1, iters=60, tol=0",
        "method=clip21, tau=0.1, iters=60, tol=0",
    ]
    title = fig.get_suptitle()
    assert "problem=logreg" in title
    assert "clients=1" in title
    assert "method=" not in title
    assert "tau=" not in title

    same = plot_runs([load_run(logs["clip-gd"]), load_run(logs["clip21"])])
    assert [t.get_text() for t in same.legends[0].get_texts()] == [
        "method=clip-gd",
        "method=clip21",
    ]
    assert "tau=0.1" in same.get_suptitle()


def test_one_line_per_run_and_nan_rows_skipped(logs):
    runs = [load_run(logs[name]) for name in ("clip21", "sgd")]
    fig = plot_runs(runs, "grad_norm_sq")
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == 2
    with h5py.File(logs["sgd"]) as f:
        gns = f["metrics/grad_norm_sq"][()]
    sgd = lines[1]
    assert np.isfinite(sgd.get_ydata()).all()
    assert len(sgd.get_ydata()) == np.isfinite(gns).sum() == 9
    assert sgd.get_xdata().tolist() == list(range(0, 41, 5))


def test_y_scale_follows_the_metric(logs):
    runs = [load_run(logs[name]) for name in ("clip21", "clip-gd")]
    assert plot_runs(runs, "grad_norm_sq").axes[0].get_yscale() == "log"
    assert plot_runs(runs, "clip_fraction").axes[0].get_yscale() == "linear"
    assert plot_runs(runs, "loss").axes[0].get_yscale() == "linear"


def test_x_axes_are_bits_and_time(logs):
    run_ = load_run(logs["clip21"])
    with h5py.File(logs["clip21"]) as f:
        bits = f["metrics/bits_sent"][()]
        wall = f["metrics/wall_time"][()]
    line = plot_runs([run_], x="bits").axes[0].get_lines()[0]
    assert np.array_equal(line.get_xdata(), bits)
    line = plot_runs([run_], x="time").axes[0].get_lines()[0]
    assert np.array_equal(line.get_xdata(), wall)
    # Row 0 sent no bits yet: it has no place on a log axis.
    fig = plot_runs([run_], x="bits", log_x=True)
    assert fig.axes[0].get_xscale() == "log"
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == len(bits) - 1


def test_panels_one_per_value(tmp_path):
    runs = [
        load_run(make_run(tmp_path / f"{m}-{tau}.h5", method=m, tau=tau, iters=20))
        for m in ("clip-gd", "clip21")
        for tau in (0.5, 0.05, 0.1)
    ]
    runs.append(load_run(make_run(tmp_path / "gd.h5", method="gd", iters=20)))
    fig = plot_runs(runs, panels="tau")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["tau=0.05", "tau=0.1", "tau=0.5", "tau: not used"]
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2, 2, 1]
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["method=clip-gd", "method=clip21", "method=gd"]
    # Every panel shares the axes of the first.
    first = fig.axes[0]
    assert all(ax.get_shared_y_axes().joined(first, ax) for ax in fig.axes)


def test_lines_differ_in_colour_style_and_marker(logs):
    runs = [load_run(logs[name]) for name in ("gd", "clip-gd", "clip21", "noisy")]
    lines = plot_runs(runs).axes[0].get_lines()
    for attr in ("get_color", "get_linestyle", "get_marker"):
        values = [getattr(line, attr)() for line in lines]
        assert len(set(values)) == len(values), attr


def test_unfinished_runs_say_so_in_the_legend(logs):
    runs = [load_run(logs[name]) for name in ("clip21", "failed", "running")]
    fig = plot_runs(runs)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    # The three share every setting: they are told apart by file name.
    assert texts == ["clip21.h5", "failed.h5 [failed]", "running.h5 [running]"]
    assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()] == [61, 8, 11]


def test_run_labels_show_an_option_only_where_used(logs):
    runs = [load_run(logs[name]) for name in ("clip21", "noisy")]
    assert run_labels(runs) == [
        "noise_sigma=0, iters=60",
        "noise_sigma=0.5, delta=1e-05, neighbouring=add-remove, iters=20",
    ]


@pytest.mark.parametrize(
    ("suffix", "magic"),
    [(".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF-"), (".svg", b"<?xml")],
)
def test_plot_writes_every_format(logs, tmp_path, suffix, magic):
    out = tmp_path / f"figure{suffix}"
    result = invoke("plot", logs["clip21"], logs["gd"], "--out", out)
    assert_exit(result, 0)
    assert result.stdout == f"{out}: grad_norm_sq of 2 run(s) against iteration\n"
    data = out.read_bytes()
    assert data.startswith(magic)
    assert len(data) > 1000
    if suffix == ".svg":
        assert b"<svg" in data


def test_save_figure_follows_the_suffix(logs, tmp_path):
    fig = plot_runs([load_run(logs["clip21"])])
    assert save_figure(fig, tmp_path / "f.PDF") == "pdf"
    assert (tmp_path / "f.PDF").read_bytes().startswith(b"%PDF-")
    with pytest.raises(ValueError, match=r"unknown figure format '\.jpg'"):
        figure_format("f.jpg")


def test_plot_works_on_finished_failed_and_running_runs(logs, tmp_path):
    out = tmp_path / "all.png"
    result = invoke("plot", logs["folder"], "--out", out, "--metric", "loss")
    assert_exit(result, 0)
    assert result.stdout == f"{out}: loss of 8 run(s) against iteration\n"
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_leaves_out_runs_without_the_metric(logs, tmp_path):
    out = tmp_path / "epsilon.svg"
    result = invoke(
        "plot", logs["noisy"], logs["clip21"], "--metric", "epsilon", "--out", out
    )
    assert_exit(result, 0)
    assert result.stderr == f"left out {logs['clip21']}: no metric 'epsilon'\n"
    assert result.stdout == f"{out}: epsilon of 1 run(s) against iteration\n"


def test_plot_skips_bad_files_by_name(bad_folder, tmp_path):
    out = tmp_path / "mixed.png"
    result = invoke("plot", bad_folder["folder"], "--out", out, "--panels", "method")
    assert_exit(result, 0)
    assert result.stderr == (
        f"skipped {bad_folder['corrupt']}: not an HDF5 file (file signature not found)\n"
        f"skipped {bad_folder['foreign']}: not a clip21mpi run log (no 'metrics')\n"
    )
    assert out.exists()


def test_plot_without_runs_exits_1(bad_folder, tmp_path):
    result = invoke("plot", bad_folder["corrupt"], "--out", tmp_path / "f.png")
    assert_exit(result, 1)
    assert result.stderr.endswith(
        f"Error: no run logs in '{bad_folder['corrupt']}': 1 file(s) skipped, "
        "see above\n"
    )
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--metric", "gradnorm"],
            (
                "Invalid value for '--metric': 'gradnorm' is in none of the logs; "
                f"valid: {METRIC_NAMES}; did you mean 'grad_norm_sq'?"
            ),
        ),
        (
            ["--x", "epoch"],
            (
                "Invalid value for '--x': 'epoch' is not one of 'iteration', 'bits', "
                "'time'."
            ),
        ),
        (
            ["--out", "figure.jpg"],
            (
                "Invalid value for '--out' / '-o': 'figure.jpg': unknown figure format "
                "'.jpg'; end the name with .png, .pdf or .svg"
            ),
        ),
        (
            ["--out", "figure"],
            (
                "Invalid value for '--out' / '-o': 'figure': no suffix; end the name "
                "with .png, .pdf or .svg"
            ),
        ),
    ],
)
def test_plot_usage_errors(logs, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    if "--out" not in args:
        args = [*args, "--out", "figure.png"]
    result = invoke("plot", logs["clip21"], *args)
    assert_exit(result, 2)
    assert result.stderr == usage("plot", message)
    assert os.listdir(tmp_path) == []


def test_plot_unknown_panels_lists_the_options(logs, tmp_path):
    result = invoke(
        "plot", logs["clip21"], "--panels", "lr", "--out", tmp_path / "f.png"
    )
    assert_exit(result, 2)
    assert "Error: Invalid value for '--panels': 'lr' is not one of 'method', " in (
        result.stderr
    )


# info.


def test_info_shows_configuration_status_and_provenance(logs):
    result = invoke("info", logs["noisy"])
    assert_exit(result, 0)
    lines = result.stdout.splitlines()
    fields = {
        line.split(":", 1)[0]: line.split(":", 1)[1].strip()
        for line in lines
        if not line.startswith(" ") and ":" in line
    }
    with h5py.File(logs["noisy"]) as f:
        attrs = dict(f.attrs)
        n_rows = f["metrics/iteration"].shape[0]
    assert fields["file"] == logs["noisy"]
    assert fields["size"].endswith(f"({os.path.getsize(logs['noisy'])} bytes)")
    assert fields["status"] == "max_iters"
    assert fields["rows"] == str(n_rows)
    assert fields["command"] == attrs["command"]
    assert fields["ranks"] == "1"
    assert float(fields["L"]) == attrs["L"]
    assert float(fields["step_size"]) == attrs["step_size"]
    for section in ("versions:", "privacy:", "configuration:"):
        assert section in lines
    assert any(
        line.split() == ["epsilon:", repr(float(attrs["epsilon"]))] for line in lines
    )
    assert any(line.split() == ["method:", "clip21"] for line in lines)


def test_info_json_holds_the_resolved_configuration(logs):
    result = invoke("info", logs["clip21"], "--json")
    assert_exit(result, 0)
    info = json.loads(result.stdout)
    with h5py.File(logs["clip21"]) as f:
        config = json.loads(f.attrs["config"])
        assert info["rows"] == f["metrics/iteration"].shape[0]
    assert info["config"] == config
    assert info["size_bytes"] == os.path.getsize(logs["clip21"])
    assert info["privacy"] == {}
    assert info["status"] == "max_iters"


def test_info_of_a_failed_run_shows_its_message(logs):
    result = invoke("info", logs["failed"])
    assert "message:" in result.stdout
    assert "rank 0 failed at iteration 7: boom" in result.stdout


def test_info_of_a_foreign_file_exits_1(bad_folder):
    result = invoke("info", bad_folder["foreign"])
    assert_exit(result, 1)
    assert result.stderr == (
        f"Error: cannot read {bad_folder['foreign']}: not a clip21mpi run log "
        "(no 'metrics')\n"
    )


def test_info_of_a_folder_is_a_usage_error(logs):
    result = invoke("info", logs["folder"])
    assert_exit(result, 2)
    assert result.stderr == usage(
        "info", f"Invalid value for 'RUN': File '{logs['folder']}' is a directory."
    )
