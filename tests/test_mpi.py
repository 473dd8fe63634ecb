"""Runs under real MPI: rank invariance, and failures that end every rank."""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from clip21mpi.runlog import read_log

TIMEOUT = 120


def mpiexec():
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = local if os.path.exists(local) else shutil.which("mpiexec")
    if found is None:
        pytest.fail("no mpiexec: install the project with its 'mpich' extra")
    return found


def launch(n, args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(
        [mpiexec(), "-n", str(n), sys.executable, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        **kw,
    )


def clip21mpi(n, *options):
    return launch(n, ["-c", "from cli.main import main; main()", "run", *options])


@pytest.mark.parametrize(
    "method,extra",
    [
        ("clip21", ["--tau", "0.05"]),
        ("ef21", ["--k", "2"]),
        ("clip-gd", ["--tau", "0.1"]),
        (
            "clip21-sgd2m",
            ["--tau", "0.1", "--batch-size", "5", "--noise-sigma", "0.01"],
        ),
        ("clip-fedavg", ["--tau", "0.1", "--local-steps", "3", "--batch-size", "4"]),
    ],
)
def test_same_trajectory_on_1_2_and_3_ranks(tmp_path, method, extra):
    logs = []
    for n in (1, 2, 3):
        out = tmp_path / f"{n}.h5"
        proc = clip21mpi(
            n,
            "--data",
            "synthetic:rows=300,features=8,heterogeneity=2",
            "--clients",
            "7",
            "--method",
            method,
            *extra,
            "--iters",
            "150",
            "--x0",
            "normal",
            "--out",
            str(out),
            "-q",
        )
        assert proc.returncode == 0, proc.stderr
        logs.append(read_log(out))
    assert [log["attrs"]["ranks"] for log in logs] == [1, 2, 3]
    base = logs[0]
    for other in logs[1:]:
        for name in ("grad_norm_sq", "loss", "clip_fraction", "bits_sent"):
            np.testing.assert_allclose(
                other["metrics"][name], base["metrics"][name], rtol=1e-10, err_msg=name
            )
        np.testing.assert_allclose(other["x_final"], base["x_final"], rtol=1e-10)
        np.testing.assert_array_equal(other["x0"], base["x0"])
        np.testing.assert_allclose(
            other["attrs"]["L_i"], base["attrs"]["L_i"], rtol=1e-12
        )
    gns = base["metrics"]["grad_norm_sq"]
    assert gns[-1] < 0.5 * gns[0]  # a run that moves, not a trivial one


def test_more_clients_than_ranks_and_a_summary_once(tmp_path):
    out = tmp_path / "run.h5"
    proc = clip21mpi(
        4,
        "--clients",
        "100",
        "--data",
        "synthetic:rows=1000,features=5",
        "--iters",
        "20",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("max_iters: clip21 after 20 iterations") == 1
    log = read_log(out)
    assert log["attrs"]["clients"] == 100 and len(log["attrs"]["L_i"]) == 100


def test_an_exception_on_one_rank_aborts_the_job(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text(
        textwrap.dedent("""
        import numpy as np
        from clip21mpi.comm import World, install_abort_on_error
        world = World()
        install_abort_on_error(world)
        if world.rank == 1:
            raise RuntimeError("rank one is broken")
        world.sum_in_place(np.zeros(1))   # the others wait here
        print("unreachable")
    """)
    )
    proc = launch(3, [str(script)])
    assert proc.returncode != 0
    assert "unreachable" not in proc.stdout
    assert proc.stderr.count("RuntimeError: rank one is broken") == 1
    assert "[rank 1] Traceback" in proc.stderr


def test_a_failure_inside_the_loop_is_logged_and_reported_once(tmp_path):
    out = tmp_path / "failed.h5"
    script = tmp_path / "fail_in_loop.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        from clip21mpi.comm import World
        from clip21mpi.config import RunConfig
        from clip21mpi.runner import RunFailed, prepare, run
        world = World()
        setup = prepare(RunConfig(data="synthetic:rows=90,features=3", clients=3,
                                  iters=50, out={str(out)!r}), world.rank, world.size)
        calls = 0
        if world.rank == 2:
            original = setup.objectives.values_and_grads
            def values_and_grads(x):
                global calls
                calls += 1
                if calls == 6:
                    raise FloatingPointError("bad shard")
                return original(x)
            setup.objectives.values_and_grads = values_and_grads
        try:
            run(setup, world)
        except RunFailed as err:
            if world.rank == 0:
                print("ERROR", err)
            sys.exit(1)
    """)
    )
    proc = launch(3, [str(script)])
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.count("ERROR") == 1
    assert "rank 2 failed at iteration 5: FloatingPointError: bad shard" in proc.stdout
    log = read_log(out)
    assert log["attrs"]["status"] == "failed"
    assert (
        log["attrs"]["message"]
        == "rank 2 failed at iteration 5: FloatingPointError: bad shard"
    )
    assert list(log["metrics"]["iteration"]) == [0, 1, 2, 3, 4]  # completed rows
