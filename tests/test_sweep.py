"""The ``clip21mpi sweep`` command and its grids: expansion order, merging of
cells that differ only in options their method does not use, log names, the
exact messages a user sees, and sweeps in one process, under mpiexec, and
stopped by SIGTERM and started again."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from clip21mpi.checkpoint import checkpoint_path
from clip21mpi.config import RunConfig
from clip21mpi.methods import METHODS
from clip21mpi.runlog import read_log
from clip21mpi.sweep import (
    OPTIONS,
    Grid,
    SweepError,
    convert,
    expand,
    load_grid_file,
    parse_command_line,
    unused_options,
)

SYNTH = "synthetic:rows=200,features=5"
TIMEOUT = 120
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")
# Every option a grid may set: RunConfig's fields but out and overwrite.
VALID = ", ".join(sorted(OPTIONS))
TAU_HINT = "pass a threshold > 0 (it bounds each message's norm)"
# (gd, clip21) x two thresholds on small data: three runs, as gd ignores tau.
SMALL = (
    *("--set", f"data={SYNTH}", "--set", "iters=5"),
    *("--grid", "method=gd,clip21", "--grid", "tau=0.01,0.1"),
)
SMALL_NAMES = ["method-gd.h5", "method-clip21_tau-0.01.h5", "method-clip21_tau-0.1.h5"]


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Undo the SIGTERM and SIGUSR1 handlers that a sweep installs."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """Return ``sweep(*args)``: ``clip21mpi sweep *args`` in-process, in tmp_path."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def _sweep(*args):
        return runner.invoke(cli, ["sweep", *map(str, args)], prog_name="clip21mpi")

    return _sweep


def usage_error(message: str) -> str:
    return (
        "Usage: clip21mpi sweep [OPTIONS]\n"
        "Try 'clip21mpi sweep --help' for help.\n"
        "\n"
        f"Error: {message}\n"
    )


def assert_exit(result, code: int) -> None:
    assert result.exit_code == code, (
        f"exit {result.exit_code}, wanted {code}; exception {result.exception!r}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )


def summary_line(log, status="max_iters") -> str:
    """The line a finished run prints, with the last ||grad f||^2 of its log
    (``log`` in a folder given to the sweep as ``--out runs``)."""
    gns = read_log(log)["metrics"]["grad_norm_sq"][-1]
    return f"{status:<12}  ||grad f||^2 = {gns:.6e}  runs/{log.name}"


# Expansion: order, merging, names.


def test_cells_are_the_product_in_grid_order_last_key_fastest():
    grid = parse_command_line(["method=clip21"], ["seed=0,1", "tau=0.5,0.1,2"])

    cells = expand(grid)

    assert [cell.name for cell in cells] == [
        "seed-0_tau-0.5.h5",
        "seed-0_tau-0.1.h5",
        "seed-0_tau-2.0.h5",
        "seed-1_tau-0.5.h5",
        "seed-1_tau-0.1.h5",
        "seed-1_tau-2.0.h5",
    ]
    assert [(cell.index, cell.points) for cell in cells] == [
        (i, (i,)) for i in range(6)
    ]
    assert cells[4].options == {"method": "clip21", "seed": 1, "tau": 0.1}
    assert cells[4].varied == {"seed": 1, "tau": 0.1}


def test_gd_with_three_thresholds_is_one_cell():
    grid = parse_command_line([], ["method=gd,clip21", "tau=0.01,0.1,1"])

    cells = expand(grid)

    assert [(c.name, c.points, c.unused) for c in cells] == [
        ("method-gd.h5", (0, 1, 2), ("tau",)),
        ("method-clip21_tau-0.01.h5", (3,), ()),
        ("method-clip21_tau-0.1.h5", (4,), ()),
        ("method-clip21_tau-1.0.h5", (5,), ()),
    ]
    assert cells[0].options == {"method": "gd"}
    assert cells[0].config().tau == RunConfig().tau


def test_repeated_values_run_once():
    cells = expand(parse_command_line([], ["seed=0,1,0"]))

    assert [(c.name, c.points, c.unused) for c in cells] == [
        ("seed-0.h5", (0, 2), ()),
        ("seed-1.h5", (1,), ()),
    ]


@pytest.mark.parametrize(
    ("options", "dropped", "kept"),
    [
        ({"method": "gd"}, {"tau", "k", "alpha", "beta", "hidden"}, {"step_size"}),
        ({"method": "ef21"}, {"tau", "alpha"}, {"k", "step_size"}),
        ({"method": "normec"}, {"tau", "k", "beta_hat"}, {"alpha", "beta"}),
        ({"method": "clip-fedavg"}, {"step_size", "k"}, {"tau", "local_steps"}),
        ({"method": "clip21", "problem": "mlp"}, {"k"}, {"tau", "hidden"}),
        ({"method": "clip21"}, {"delta", "neighbouring"}, {"noise_sigma", "epsilon"}),
        ({"method": "clip21", "epsilon": 1.0}, set(), {"delta", "neighbouring"}),
        ({"method": "nonsense", "tau": 1.0}, set(), set(OPTIONS)),
    ],
)
def test_unused_options(options, dropped, kept):
    unused = unused_options(options)

    assert dropped <= unused
    assert not kept & unused


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_method_never_loses_its_own_or_the_common_options(method):
    unused = unused_options({"method": method})
    own = {o.removeprefix("--").replace("-", "_") for o in METHODS[method].options}
    common = {"data", "clients", "split", "problem", "reg", "lam", "iters", "tol"}
    common |= {"eval_every", "seed", "x0", "batch_size", "noise_sigma", "epsilon"}

    assert not (own | common) & unused


# The options that a method does not use, changed all at once, change nothing.
OTHER_VALUES = {
    "tau": 0.0123,
    "k": 2,
    "alpha": 0.5,
    "beta": 0.3,
    "beta_hat": 0.7,
    "local_steps": 2,
    "local_step_size": 0.05,
    "server_step_size": 0.5,
    "step_size": 0.123,
    "hidden": 8,
    "delta": 1e-3,
    "neighbouring": "replace",
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_options_dropped_for_a_method_do_not_change_its_run(method, tmp_path):
    from clip21mpi.comm import World
    from clip21mpi.runner import prepare, run

    world = World()
    base = {"method": method, "data": SYNTH, "iters": 5, "batch_size": 20}
    base |= {"x0": "normal", "clients": 3}
    unused = unused_options(base)
    assert unused <= set(OTHER_VALUES), unused - set(OTHER_VALUES)
    changed = base | {key: OTHER_VALUES[key] for key in unused}

    records = []
    for i, options in enumerate((base, changed)):
        config = RunConfig(**options, out=str(tmp_path / f"{i}.h5"))
        run(prepare(config, world.rank, world.size), world)
        records.append(read_log(tmp_path / f"{i}.h5"))

    assert all(records[1].config[key] == OTHER_VALUES[key] for key in unused)
    np.testing.assert_array_equal(records[0]["x_final"], records[1]["x_final"])
    np.testing.assert_array_equal(
        records[0]["metrics"]["grad_norm_sq"], records[1]["metrics"]["grad_norm_sq"]
    )
    assert np.ptp(records[0]["metrics"]["grad_norm_sq"]) > 0  # the run moved


def test_names_are_safe_file_names():
    grid = Grid(
        {"method": "clip21"},
        {
            "lam": (-0.5, 1e-12, 1e20),
            "data": ("../data/a9a train.txt", SYNTH, "/abs/path"),
            "step_size": ("auto", 0.25),
        },
    )

    names = [cell.name for cell in expand(grid)]

    assert names[:6] == [
        "lam--0.5_data-..-data-a9a-train.txt_step_size-auto.h5",
        "lam--0.5_data-..-data-a9a-train.txt_step_size-0.25.h5",
        "lam--0.5_data-synthetic-rows-200-features-5_step_size-auto.h5",
        "lam--0.5_data-synthetic-rows-200-features-5_step_size-0.25.h5",
        "lam--0.5_data--abs-path_step_size-auto.h5",
        "lam--0.5_data--abs-path_step_size-0.25.h5",
    ]
    assert names[6] == "lam-1e-12_data-..-data-a9a-train.txt_step_size-auto.h5"
    assert names[12] == "lam-1e+20_data-..-data-a9a-train.txt_step_size-auto.h5"
    assert len(set(names)) == len(names) == 18
    for name in names:
        assert set(name) <= NAME_CHARS, name
        assert os.path.basename(name) == name and not name.startswith(("-", "."))


def test_names_do_not_depend_on_where_the_values_come_from(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('[grid]\ntau = [1, 0.5]\nseed = [0, 2]\nstep-size = ["auto", 1]\n')

    from_file = expand(load_grid_file(path))
    from_line = expand(
        parse_command_line([], ["tau=1,0.5", "seed=0,2", "step_size=auto,1"])
    )

    assert [c.name for c in from_file] == [c.name for c in from_line]
    assert [c.options for c in from_file] == [c.options for c in from_line]
    assert from_file[0].name == "tau-1.0_seed-0_step_size-auto.h5"


def test_values_that_would_share_a_name_are_an_error():
    grid = parse_command_line([], ["data=a/b.txt,a:b.txt"])

    with pytest.raises(SweepError) as raised:
        expand(grid)

    assert str(raised.value) == (
        "cells 0 and 1 would both write 'data-a-b.txt.h5'; make the varied values "
        "differ in letters, digits or '._+-'"
    )


# Values: the types of RunConfig's fields.


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("tau", "1e-2", 0.01),
        ("tau", "3", 3.0),
        ("tau", 3, 3.0),
        ("seed", "7", 7),
        ("seed", 7, 7),
        ("step_size", "auto", "auto"),
        ("step_size", " AUTO ", "auto"),
        ("step_size", "0.5", 0.5),
        ("step_size", 2, 2.0),
        ("clients", "none", None),
        ("clients", "None", None),
        ("clients", "4", 4),
        ("beta", "none", None),
        ("beta", "0.25", 0.25),
        ("epsilon", "inf", float("inf")),
        ("data", "runs/a9a.txt", "runs/a9a.txt"),
        ("method", " gd ", "gd"),
    ],
)
def test_values_take_the_field_types(name, value, expected):
    converted = convert(name, value)

    assert converted == expected
    assert type(converted) is type(expected)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("seed", "1.5", "--grid seed: '1.5' is not a whole number"),
        ("seed", 1.5, "--grid seed: 1.5 is not a whole number"),
        ("seed", True, "--grid seed: True is not a whole number"),
        ("tau", "big", "--grid tau: 'big' is not a number"),
        ("tau", [0.1], "--grid tau: [0.1] is not a number"),
        ("clients", "all", "--grid clients: 'all' is not a whole number or none"),
        ("data", 5, "--grid data: 5 is not text"),
    ],
)
def test_values_that_do_not_fit_their_field(name, value, message):
    with pytest.raises(SweepError) as raised:
        convert(name, value, f"--grid {name}")

    assert str(raised.value) == message


def test_flags_take_true_or_false():
    flags = [convert("resume", value) for value in ("true", "False", " TRUE", True)]

    assert flags == [True, False, True, True]
    with pytest.raises(SweepError) as raised:
        convert("resume", "yes", "--set resume")
    assert str(raised.value) == "--set resume: 'yes' is not true or false"


# Grid files and the command line.


def test_command_line_wins_over_the_grid_file(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(
        "[base]\n"
        'data = "breast_cancer"\n'
        "iters = 100\n"
        "tau = 0.5\n"
        "[grid]\n"
        'method = ["clip21", "clip-gd"]\n'
        "seed = [0, 1]\n"
        "lam = [0.1, 0.01]\n"
    )
    line = parse_command_line(
        ["seed=3", f"data={SYNTH}"], ["tau=0.1,1", "method=clip21,gd"]
    )

    grid = load_grid_file(path).merged_with(line)

    assert grid.base == {"iters": 100, "seed": 3, "data": SYNTH}
    assert grid.axes == {
        "method": ("clip21", "gd"),
        "lam": (0.1, 0.01),
        "tau": (0.1, 1.0),
    }


def test_list_shows_the_merged_grid(sweep, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('[base]\niters = 100\n[grid]\nmethod = ["clip21", "gd"]\n')

    result = sweep(
        *("--grid-file", path, "--out", "runs", "--list", "--set", "iters=5"),
        *("--grid", "method=gd,clip-gd", "--grid", "seed=0,1"),
    )

    assert_exit(result, 0)
    assert result.stdout == (
        "fixed: iters=5\n"
        "cell  file                      options\n"
        "0     method-gd_seed-0.h5       method=gd seed=0\n"
        "1     method-gd_seed-1.h5       method=gd seed=1\n"
        "2     method-clip-gd_seed-0.h5  method=clip-gd seed=0\n"
        "3     method-clip-gd_seed-1.h5  method=clip-gd seed=1\n"
        "4 runs from 4 grid points\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.toml"]


def test_list_says_which_cells_stand_for_several_grid_points(sweep, tmp_path):
    result = sweep(*SMALL, "--grid", "seed=0,0", "--out", "runs", "--list")

    assert_exit(result, 0)
    assert result.stdout == (
        "fixed: data=synthetic:rows=200,features=5 iters=5\n"
        "cell  file                              options\n"
        "0     method-gd_seed-0.h5               method=gd seed=0"
        "               (4 grid points; tau unused)\n"
        "1     method-clip21_tau-0.01_seed-0.h5  method=clip21 tau=0.01 seed=0"
        "  (2 grid points; same options)\n"
        "2     method-clip21_tau-0.1_seed-0.h5   method=clip21 tau=0.1 seed=0"
        "   (2 grid points; same options)\n"
        "3 runs from 8 grid points\n"
    )
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--grid", "tua=1,2"],
            f"--grid: unknown option 'tua'; did you mean 'tau'? (valid: {VALID})",
        ),
        (
            ["--set", "step-sise=0.1"],
            (
                f"--set: unknown option 'step-sise'; did you mean 'step_size'? "
                f"(valid: {VALID})"
            ),
        ),
        (
            ["--set", "out=x.h5"],
            (
                "--set: 'out' is set by the sweep, not per run: --out FOLDER holds the "
                "logs, each named after its run's options, and --overwrite replaces "
                "existing ones"
            ),
        ),
        (["--set", "tau"], "--set expects KEY=VALUE, got 'tau'"),
        (["--grid", "=1,2"], "--grid expects KEY=V1,V2,..., got '=1,2'"),
        (
            ["--grid", "tau=0.1,"],
            "--grid tau: empty value in 'tau=0.1,'; separate values by commas",
        ),
        (
            ["--set", "tau=1", "--grid", "tau=1,2"],
            "--grid tau: 'tau' is also given by --set tau; give it once",
        ),
        (["--grid", "seed=0,x"], "--grid seed: 'x' is not a whole number"),
        (
            ["--grid", "tau=1,-1"],
            f"cell 1 (tau--1.0.h5): --tau must be positive, got -1.0; {TAU_HINT}",
        ),
        (
            ["--grid", "method=gd,clip-sgd"],
            (
                "cell 1 (method-clip-sgd.h5): --method clip-sgd needs --batch-size "
                "(rows per client and step)"
            ),
        ),
    ],
)
@pytest.mark.parametrize("listing", [False, True], ids=["run", "list"])
def test_usage_errors(sweep, tmp_path, args, message, listing):
    result = sweep(*args, "--out", "runs", *(["--list"] if listing else []))

    assert_exit(result, 2)
    assert result.stderr == usage_error(message)
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[grid]\nitres = [1, 2]\n",
            (
                "[grid] in {path!r}: unknown option 'itres'; did you mean "
                f"'iters'? (valid: {VALID})"
            ),
        ),
        (
            "[run]\ntau = 1\n",
            (
                "--grid-file: unknown entry 'run' in {path!r}; a grid file has a [base] "
                "table of fixed options and a [grid] table of lists"
            ),
        ),
        (
            "[grid]\ntau = 0.1\n",
            (
                "[grid] tau in {path!r}: expected a non-empty list of values, got 0.1; "
                "fixed options go under [base]"
            ),
        ),
        (
            "[base]\ntau = [0.1, 1]\n",
            (
                "[base] tau in {path!r}: [0.1, 1] is a list; lists of values go under "
                "[grid]"
            ),
        ),
        (
            "[base]\nstep-size = 1\nstep_size = 2\n",
            (
                "[base] step_size in {path!r}: 'step_size' is also given by [base] "
                "step-size in {path!r}; give it once"
            ),
        ),
        (
            "[grid]\nseed = [0.5]\n",
            "[grid] seed in {path!r}: 0.5 is not a whole number",
        ),
        ("[grid\n", "--grid-file: {path!r} is not valid TOML: {toml}"),
    ],
)
def test_grid_file_errors(sweep, tmp_path, text, message):
    import tomllib

    path = tmp_path / "sweep.toml"
    path.write_text(text)
    try:
        tomllib.loads(text)
        toml = ""
    except tomllib.TOMLDecodeError as err:
        toml = str(err)

    result = sweep("--grid-file", path, "--out", "runs")

    assert_exit(result, 2)
    assert result.stderr == usage_error(message.format(path=str(path), toml=toml))


def test_unreadable_grid_file(sweep, tmp_path):
    result = sweep("--grid-file", "missing.toml", "--out", "runs")

    assert_exit(result, 2)
    assert result.stderr == usage_error(
        "--grid-file: cannot read 'missing.toml': No such file or directory"
    )


# --task-index.


def test_task_index_lists_and_runs_one_cell(sweep, tmp_path):
    listed = sweep(*SMALL, "--out", "runs", "--list", "--task-index", "2")
    ran = sweep(*SMALL, "--out", "runs", "--task-index", "2", "-q")

    assert_exit(listed, 0)
    assert listed.stdout == (
        "fixed: data=synthetic:rows=200,features=5 iters=5\n"
        "cell  file                      options\n"
        "2     method-clip21_tau-0.1.h5  method=clip21 tau=0.1\n"
        "3 runs from 4 grid points\n"
    )
    assert_exit(ran, 0)
    assert os.listdir(tmp_path / "runs") == ["method-clip21_tau-0.1.h5"]
    log = tmp_path / "runs" / "method-clip21_tau-0.1.h5"
    assert ran.stdout == f"{summary_line(log)}\n1 run: 1 max_iters\n"
    assert read_log(log).config["tau"] == 0.1


@pytest.mark.parametrize("index", ["3", "-1"])
def test_task_index_out_of_range(sweep, tmp_path, index):
    result = sweep(*SMALL, "--out", "runs", "--task-index", index)

    assert_exit(result, 2)
    assert result.stderr == usage_error(
        f"Invalid value for '--task-index': {index} is out of range: the grid has "
        "3 runs; pass 0 to 2 (see --list)"
    )
    assert list(tmp_path.iterdir()) == []


def test_task_index_of_a_single_run(sweep):
    result = sweep("--set", "iters=1", "--out", "runs", "--task-index", "1")

    assert_exit(result, 2)
    assert result.stderr == usage_error(
        "Invalid value for '--task-index': 1 is out of range: the grid has 1 run; "
        "pass 0 (see --list)"
    )


# Sweeps that run, in this process (MPI as a singleton).


def test_sweep_writes_one_log_per_cell(sweep, tmp_path):
    result = sweep(*SMALL, "--out", "runs")

    assert_exit(result, 0)
    runs = tmp_path / "runs"
    assert sorted(os.listdir(runs)) == sorted(SMALL_NAMES)
    lines = [summary_line(runs / name) for name in SMALL_NAMES]
    assert result.stdout == "\n".join([*lines, "3 runs: 3 max_iters"]) + "\n"
    for number, name in enumerate(SMALL_NAMES, start=1):
        assert f"INFO run {number}/3 (cell {number - 1}): " in result.stderr

    configs = [read_log(runs / name).config for name in SMALL_NAMES]
    assert [(c["method"], c["tau"]) for c in configs] == [
        ("gd", RunConfig().tau),
        ("clip21", 0.01),
        ("clip21", 0.1),
    ]
    for config, name in zip(configs, SMALL_NAMES):
        assert (config["data"], config["iters"], config["seed"]) == (SYNTH, 5, 0)
        assert config["out"] == os.path.join("runs", name)
        assert read_log(runs / name)["attrs"]["status"] == "max_iters"


def test_existing_logs_are_skipped_unless_overwrite(sweep, tmp_path):
    args = ("--set", f"data={SYNTH}", "--grid", "seed=0,1", "--out", "runs", "-q")
    first = sweep(*args, "--set", "iters=3")
    logs = [tmp_path / "runs" / f"seed-{seed}.h5" for seed in (0, 1)]
    before = [log.read_bytes() for log in logs]

    again = sweep(*args, "--set", "iters=4")

    assert_exit(first, 0)
    assert_exit(again, 0)
    assert again.stdout == (
        "skipped       runs/seed-0.h5 exists (status max_iters); pass --overwrite "
        "to replace it\n"
        "skipped       runs/seed-1.h5 exists (status max_iters); pass --overwrite "
        "to replace it\n"
        "2 runs: 2 skipped\n"
    )
    assert [log.read_bytes() for log in logs] == before

    replaced = sweep(*args, "--set", "iters=4", "--overwrite")

    assert_exit(replaced, 0)
    assert replaced.stdout.endswith("\n2 runs: 2 max_iters\n")
    for log in logs:
        record = read_log(log)
        assert record.config["iters"] == 4
        assert record["metrics"]["iteration"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_skipped_logs_that_did_not_end_well_fail_the_sweep(sweep, tmp_path):
    args = ("--set", f"data={SYNTH}", "--set", "method=gd", "--set", "reg=l2")
    args += ("--grid", "step_size=1e6,0.5", "--set", "iters=200", "--out", "runs")
    first = sweep(*args, "-q")
    (tmp_path / "runs" / "step_size-0.5.h5").write_text("not a log")

    again = sweep(*args, "-q")

    assert_exit(first, 1)
    assert_exit(again, 1)
    assert again.stdout == (
        "skipped       runs/step_size-1000000.0.h5 exists (status diverged); pass "
        "--overwrite to replace it\n"
        "skipped       runs/step_size-0.5.h5 exists but is not a run log; pass "
        "--overwrite to replace it\n"
        "2 runs: 2 skipped\n"
    )
    assert (tmp_path / "runs" / "step_size-0.5.h5").read_text() == "not a log"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_failed_and_diverged_runs_do_not_stop_the_sweep(sweep, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(
        '[base]\nmethod = "gd"\nreg = "l2"\niters = 200\n'
        f'[grid]\ndata = ["missing.txt", "{SYNTH}"]\nstep_size = [1e6, 0.5]\n'
    )

    result = sweep("--grid-file", path, "--out", "runs", "-q")

    assert_exit(result, 1)
    missing = (
        "--data: no such file: 'missing.txt'; pass a LibSVM file, a bundled name "
        "(breast_cancer, digits) or 'synthetic'"
    )
    runs = tmp_path / "runs"
    synth = "data-synthetic-rows-200-features-5"
    assert result.stdout.splitlines() == [
        f"failed        runs/data-missing.txt_step_size-1000000.0.h5: {missing}",
        f"failed        runs/data-missing.txt_step_size-0.5.h5: {missing}",
        summary_line(runs / f"{synth}_step_size-1000000.0.h5", "diverged"),
        summary_line(runs / f"{synth}_step_size-0.5.h5"),
        "4 runs: 1 max_iters, 1 diverged, 2 failed",
    ]
    assert sorted(os.listdir(runs)) == [
        f"{synth}_step_size-0.5.h5",
        f"{synth}_step_size-1000000.0.h5",
    ]


# Under real MPI.


def test_mpiexec_two_ranks_run_each_cell_once(
    mpiexec, console_script, console_env, tmp_path
):
    argv = [mpiexec, "-n", "2", console_script, "sweep", *SMALL, "--out", "runs"]
    env = {**console_env, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

    proc = subprocess.run(
        argv,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    runs = tmp_path / "runs"
    assert sorted(os.listdir(runs)) == sorted(SMALL_NAMES)
    for name in SMALL_NAMES:
        record = read_log(runs / name)
        assert (record["attrs"]["ranks"], record.config["clients"]) == (2, 2)
        assert proc.stdout.count(f"  runs/{name}\n") == 1
    expected = [summary_line(runs / name) for name in SMALL_NAMES]
    assert proc.stdout.splitlines() == [*expected, "3 runs: 3 max_iters"]


def test_sigterm_checkpoints_the_run_and_the_same_command_goes_on(
    console_script, console_env, tmp_path
):
    argv = [console_script, "sweep", "--set", f"data={SYNTH}", "--out", "runs"]
    argv += ["--grid", "iters=5000,5", "-q"]
    first_log = tmp_path / "runs" / "iters-5000.h5"
    env = {**console_env, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    where = {"cwd": tmp_path, "env": env, "text": True}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(argv, **pipes, **where)
    deadline = time.monotonic() + TIMEOUT
    while not first_log.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no log within the timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # what Slurm sends before a time limit
    stdout, stderr = proc.communicate(timeout=TIMEOUT)

    assert proc.returncode == 75, stderr
    assert stdout == (
        f"{summary_line(first_log, 'checkpointed')}\n"
        "2 runs: 1 checkpointed, 1 not started\n"
    )
    stopped_at = read_log(first_log)["attrs"]["iterations"]
    assert 0 < stopped_at < 5000
    assert sorted(os.listdir(tmp_path / "runs")) == [
        "iters-5000.h5",
        os.path.basename(checkpoint_path("iters-5000.h5")),
    ]

    again = subprocess.run(
        argv, capture_output=True, timeout=TIMEOUT, check=False, **where
    )

    assert again.returncode == 0, again.stderr
    runs = tmp_path / "runs"
    assert again.stdout.splitlines() == [
        summary_line(runs / "iters-5000.h5"),
        summary_line(runs / "iters-5.h5"),
        "2 runs: 2 max_iters",
    ]
    record = read_log(first_log)
    assert record["attrs"]["resumed_at"] == stopped_at
    assert record["metrics"]["iteration"].tolist() == list(range(5001))
    assert sorted(os.listdir(runs)) == ["iters-5.h5", "iters-5000.h5"]
