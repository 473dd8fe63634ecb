"""The ``clip21mpi run`` command: exit codes, the exact messages a user sees,
and what a run leaves on disk.

Most runs go in-process through click's CliRunner (MPI starts as a singleton
with one rank); a few start the installed console script, one of them under
``mpiexec -n 2``.
"""

from __future__ import annotations

import gzip
import re
import shlex
import subprocess
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli, main
from clip21mpi.runlog import read_log

SYNTH = "synthetic:rows=200,features=5"
FAST = ("--data", SYNTH, "--iters", "10")
DIVERGE = (
    *("--data", SYNTH, "--method", "gd", "--reg", "l2"),
    *("--step-size", "1e6", "--iters", "200"),
)
TIMEOUT = 120

SUMMARY = re.compile(
    r"(?P<status>\w+): (?P<method>[\w-]+) after (?P<iterations>\d+) iterations, "
    r"\|\|grad f\|\|\^2 = (?P<grad_norm_sq>\S+), f = (?P<loss>\S+), "
    r"\d+\.\d\d s\nlog: (?P<log>.+)\n\Z"
)
TAU_HINT = "pass a threshold > 0 (it bounds each message's norm)"
VALID_KEYS = (
    "alpha, batch_size, beta, beta_hat, checkpoint_every, clients, data, delta, "
    "epsilon, eval_every, hidden, iters, k, lam, local_step_size, local_steps, "
    "method, neighbouring, noise_sigma, out, overwrite, problem, quiet, reg, "
    "resume, seed, server_step_size, split, step_size, tau, tol, verbose, x0"
)


def summary(result) -> dict:
    """The fields of the summary line, or fail showing what was printed."""
    match = SUMMARY.match(result.stdout)
    assert match, f"no summary line in {result.stdout!r} (stderr {result.stderr!r})"
    return match.groupdict()


def run_console(argv, cwd, env) -> subprocess.CompletedProcess:
    """Run a real command line; the caller checks its exit code and output."""
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def assert_exit(result, code: int) -> None:
    assert result.exit_code == code, (
        f"exit {result.exit_code}, wanted {code}; exception {result.exception!r}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )


# Invalid options: exit 2, one usage message, nothing written.


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tau", "0"], f"--tau must be positive, got 0.0; {TAU_HINT}"),
        (["--tau", "-1"], f"--tau must be positive, got -1.0; {TAU_HINT}"),
        (
            ["--step-size", "0"],
            "--step-size must be a positive number or 'auto', got 0.0",
        ),
        (
            ["--step-size", "-1"],
            "--step-size must be a positive number or 'auto', got -1.0",
        ),
        (
            ["--step-size", "fast"],
            (
                "Invalid value for '--step-size': 'fast' is neither a number nor "
                "'auto'; pass e.g. --step-size 0.5 or --step-size auto"
            ),
        ),
        (
            ["--method", "clip-21"],
            (
                "--method 'clip-21' is not one of gd, clip-gd, clip-sgd, clip21, "
                "clip21-sgd, press-clip21, ef21, clip21-sgd2m, normec, clip-fedavg; "
                "did you mean 'clip21'?"
            ),
        ),
        (
            ["--problem", "logref"],
            "--problem 'logref' is not one of logreg, nls, mlp; did you mean 'logreg'?",
        ),
        (
            ["--method", "ef21", "--k", "6"],
            (
                f"--k 6 exceeds the 5 coordinates of the logreg model on {SYNTH}; "
                "pass 1 <= k <= 5"
            ),
        ),
        (
            ["--data", "missing.svm"],
            (
                "--data: no such file: 'missing.svm'; pass a LibSVM file, a bundled name "
                "(breast_cancer, digits) or 'synthetic'"
            ),
        ),
    ],
    ids=[
        "tau-0",
        "tau-negative",
        "step-size-0",
        "step-size-negative",
        "step-size-word",
        "method-typo",
        "problem-typo",
        "k-above-d",
        "no-file",
    ],
)
def test_invalid_option_exits_2_with_message(
    invoke, usage_error, tmp_path, args, message
):
    result = invoke("--data", SYNTH, "--iters", "3", *args)

    assert_exit(result, 2)
    assert result.stderr == usage_error(message)
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_k_equal_to_d_is_accepted(invoke):
    args = ["--method", "ef21", "--k", "5", "--out", "run.h5"]

    result = invoke("--data", SYNTH, "--iters", "2", *args)

    assert_exit(result, 0)
    assert summary(result)["status"] == "max_iters"


BAD_ROWS = "1 1:1 2:3\n-1 1:2\nx 1:2\n"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "bad.svm",
            BAD_ROWS,
            "--data: malformed LibSVM data in {path}, line 3: label 'x' is not a number",
        ),
        (
            "bad.svm.gz",
            BAD_ROWS,
            "--data: malformed LibSVM data in {path}, line 3: label 'x' is not a number",
        ),
        (
            "comment.svm",
            "# two classes\n\n1 1:1\n-1 1:2 2:x\n",
            (
                "--data: malformed LibSVM data in {path}, line 4: '2:x' is not of the form "
                "index:value"
            ),
        ),
        (
            "order.svm",
            "1 1:1\n-1 3:1 2:1\n",
            (
                "--data: malformed LibSVM data in {path}, line 2: feature index 2 is "
                "negative or out of order"
            ),
        ),
        (
            "three.svm",
            "1 1:1\n2 1:2\n3 2:1\n",
            (
                "--data: binary classification needs exactly two label values; {path} has 3 "
                "(1, 2, 3)"
            ),
        ),
    ],
    ids=["label", "gzip", "after-comment", "index-order", "three-labels"],
)
def test_bad_data_file_names_file_and_line(
    invoke, usage_error, tmp_path, name, text, message
):
    path = tmp_path / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wt") as fh:
        fh.write(text)

    result = invoke("--data", path, "--iters", "3")

    assert_exit(result, 2)
    assert result.stderr == usage_error(message.format(path=path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_good_libsvm_file_runs(invoke, tmp_path):
    (tmp_path / "tiny.svm").write_text("1 1:1 2:3\n-1 1:2\n1 2:1\n-1 1:-1 2:-2\n")

    result = invoke("--data", "tiny.svm", "--iters", "3", "--out", "run.h5")

    assert_exit(result, 0)
    attrs = read_log(tmp_path / "run.h5")["attrs"]
    assert (attrs["rows"], attrs["dim"], attrs["data_name"]) == (4, 2, "tiny")


def test_existing_out_needs_overwrite(invoke, usage_error, tmp_path):
    assert_exit(invoke(*FAST, "--out", "run.h5"), 0)
    before = (tmp_path / "run.h5").read_bytes()

    refused = invoke("--data", SYNTH, "--iters", "3", "--out", "run.h5")

    assert_exit(refused, 2)
    assert refused.stderr == usage_error(
        "the log 'run.h5' exists; pass --overwrite to replace it or choose another "
        "--out"
    )
    assert (tmp_path / "run.h5").read_bytes() == before

    replaced = invoke("--data", SYNTH, "--iters", "3", "--out", "run.h5", "--overwrite")

    assert_exit(replaced, 0)
    record = read_log(tmp_path / "run.h5")
    assert record.config["iters"] == 3
    assert record["metrics"]["iteration"].tolist() == [0, 1, 2, 3]


# --config TOML files.


def test_config_unknown_key(invoke, usage_error, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[run]\nmethod = "gd"\nitres = 7\n')

    result = invoke("--config", path)

    assert_exit(result, 2)
    assert result.stderr == usage_error(
        f"Invalid value for '--config': unknown key 'itres' in {str(path)!r}; "
        f"did you mean 'iters'? (valid: {VALID_KEYS})"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml"]


@pytest.mark.parametrize(
    "config_first", [True, False], ids=["config-first", "config-last"]
)
def test_config_values_used_and_command_line_wins(invoke, tmp_path, config_first):
    path = tmp_path / "run.toml"
    path.write_text(
        "[run]\n"
        'method = "gd"\n'
        f'data = "{SYNTH}"\n'
        "tau = 0.5\n"
        "step-size = 0.25\n"
        "iters = 7\n"
    )
    config = ["--config", path]
    line = ["--iters", "3", "--out", "run.h5"]

    result = invoke(*(config + line if config_first else line + config))

    assert_exit(result, 0)
    record = read_log(tmp_path / "run.h5")
    used = record.config
    shown = [used[key] for key in ("method", "data", "tau", "step_size")]
    assert shown == ["gd", SYNTH, 0.5, 0.25]
    assert used["iters"] == 3
    assert record["attrs"]["step_size"] == 0.25
    assert record["metrics"]["iteration"].tolist() == [0, 1, 2, 3]


def test_config_values_are_validated_like_options(invoke, usage_error, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(f'data = "{SYNTH}"\ntau = 0\n')

    result = invoke("--config", path)

    assert_exit(result, 2)
    assert result.stderr == usage_error(f"--tau must be positive, got 0.0; {TAU_HINT}")


# Runs that start: summary line, status, exit code.


def test_normal_run_prints_summary_of_last_row(invoke, tmp_path):
    result = invoke(*FAST, "--out", "run.h5", "-q")

    assert_exit(result, 0)
    assert result.stderr == ""
    fields = summary(result)
    shown = [fields[key] for key in ("status", "method", "iterations", "log")]
    assert shown == ["max_iters", "clip21", "10", "run.h5"]
    metrics = read_log(tmp_path / "run.h5")["metrics"]
    assert fields["grad_norm_sq"] == f"{metrics['grad_norm_sq'][-1]:.6e}"
    assert fields["loss"] == f"{metrics['loss'][-1]:.6g}"


def test_tol_stops_with_status_converged(invoke, tmp_path):
    result = invoke(
        "--data", SYNTH, "--tol", "1e-3", "--iters", "1000", "--out", "run.h5"
    )

    assert_exit(result, 0)
    fields = summary(result)
    assert fields["status"] == "converged"
    record = read_log(tmp_path / "run.h5")
    gns = record["metrics"]["grad_norm_sq"]
    assert int(fields["iterations"]) == len(gns) - 1 < 1000
    assert gns[-1] <= 1e-3 < gns[:-1].min()
    assert record["attrs"]["status"] == "converged"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_huge_step_size_diverges_with_exit_3(invoke, tmp_path):
    result = invoke(*DIVERGE, "--out", "run.h5")

    assert_exit(result, 3)
    fields = summary(result)
    assert (fields["status"], fields["method"]) == ("diverged", "gd")
    record = read_log(tmp_path / "run.h5")
    assert record["attrs"]["status"] == "diverged"
    gns = record["metrics"]["grad_norm_sq"]
    assert int(fields["iterations"]) == len(gns) - 1 < 200
    assert not np.isfinite(gns[-1]) and np.isfinite(gns[:-1]).all()


def test_divergence_is_reported_without_numpy_warning(invoke):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke(*DIVERGE, "--out", "run.h5")

    assert_exit(result, 3)
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == []


def test_default_out_gives_distinct_files(invoke, tmp_path):
    first = invoke("--data", SYNTH, "--iters", "2", "-q")
    second = invoke("--data", SYNTH, "--iters", "2", "-q")

    assert_exit(first, 0)
    assert_exit(second, 0)
    logs = [summary(r)["log"] for r in (first, second)]
    assert logs[0] != logs[1]
    name = re.compile(r"runs/clip21-logreg-synthetic-h1-\d{8}-\d{6}(-\d+)?\.h5")
    assert all(name.fullmatch(log) for log in logs), logs
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        log.removeprefix("runs/") for log in logs
    )


def test_main_records_the_argv_it_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--data", SYNTH, "--iters", "2", "--out", "run.h5", "-q"]

    with pytest.raises(SystemExit) as exited:
        main(argv)

    assert exited.value.code == 0
    assert read_log(tmp_path / "run.h5")["attrs"]["command"].endswith(shlex.join(argv))


# The installed console script, with and without mpiexec.


def test_console_script_run_records_command(console_script, console_env, tmp_path):
    argv = [console_script, "run", "--data", SYNTH, "--iters", "5", "--out", "run.h5"]

    proc = run_console(argv, tmp_path, console_env)

    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["status"] == "max_iters"
    attrs = read_log(tmp_path / "run.h5")["attrs"]
    assert attrs["command"] == shlex.join(argv)
    assert attrs["ranks"] == 1


def test_console_script_usage_error(console_script, console_env, usage_error, tmp_path):
    proc = run_console([console_script, "run", "--tau", "0"], tmp_path, console_env)

    assert proc.returncode == 2
    assert proc.stderr == usage_error(f"--tau must be positive, got 0.0; {TAU_HINT}")
    assert proc.stdout == ""


def test_mpiexec_more_ranks_than_clients_fails_once(
    mpiexec, console_script, console_env, usage_error, tmp_path
):
    args = ["--clients", "1", "--data", SYNTH, "--iters", "3"]
    argv = [mpiexec, "-n", "2", console_script, "run", *args]

    proc = run_console(argv, tmp_path, console_env)

    assert proc.returncode == 2, proc.stderr
    # Printed once, by rank 0; Open MPI's launcher adds its own report after.
    assert proc.stderr.startswith(
        usage_error(
            "2 MPI ranks but only 1 clients; every rank needs a client: pass "
            "--clients >= 2 or start at most 1 ranks"
        )
    )
    assert proc.stderr.count("Error: 2 MPI ranks") == 1
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_mpiexec_two_ranks_match_one_rank(
    mpiexec, console_script, console_env, invoke, tmp_path
):
    args = ["--clients", "3", "--data", SYNTH, "--iters", "20", "-q"]
    argv = [mpiexec, "-n", "2", console_script, "run", *args, "--out", "two.h5"]

    proc = run_console(argv, tmp_path, console_env)
    one = invoke(*args, "--out", "one.h5")

    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["log"] == "two.h5"  # printed once, by rank 0
    assert_exit(one, 0)
    two_ranks, one_rank = read_log(tmp_path / "two.h5"), read_log(tmp_path / "one.h5")
    assert (two_ranks["attrs"]["ranks"], one_rank["attrs"]["ranks"]) == (2, 1)
    assert two_ranks["attrs"]["clients"] == one_rank["attrs"]["clients"] == 3
    np.testing.assert_allclose(
        two_ranks["attrs"]["L_i"], one_rank["attrs"]["L_i"], rtol=1e-12
    )
    np.testing.assert_allclose(
        two_ranks["x_final"], one_rank["x_final"], rtol=1e-10, atol=1e-12
    )
    for name in ("grad_norm_sq", "loss", "clip_fraction", "bits_sent"):
        np.testing.assert_allclose(
            two_ranks["metrics"][name],
            one_rank["metrics"][name],
            rtol=1e-10,
            atol=1e-14,
            err_msg=name,
        )


def test_methods_lists_and_explains():
    runner = CliRunner()
    listing = runner.invoke(cli, ["methods"])
    assert listing.exit_code == 0
    assert len(listing.stdout.splitlines()) == 10
    shown = runner.invoke(cli, ["methods", "clip21"])
    assert shown.exit_code == 0
    assert shown.stdout.startswith("clip21: Khirirat, Gorbunov, Horvath")
    assert "tau    clip threshold   --tau" in shown.stdout
    wrong = runner.invoke(cli, ["methods", "normc"])
    assert wrong.exit_code == 2
    assert "did you mean 'normec'?" in wrong.stderr
