"""Checkpoints: atomic files, refusals, and resumed runs that are bitwise
identical to runs that were never interrupted."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from clip21mpi.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from clip21mpi.comm import World
from clip21mpi.config import ConfigError, RunConfig
from clip21mpi.runlog import read_log
from clip21mpi.runner import prepare, run

DATA = "synthetic:rows=240,features=6,heterogeneity=2"
# Momentum, minibatches and noise: every kind of state a checkpoint holds.
NOISY = {
    "data": DATA,
    "clients": 4,
    "method": "clip21-sgd2m",
    "batch_size": 8,
    "noise_sigma": 0.01,
    "tau": 0.05,
    "step_size": 0.3,
    "iters": 60,
    "eval_every": 7,
}


def test_round_trip_and_atomic_write(tmp_path):
    path = str(tmp_path / "a.ckpt")
    rng = np.random.default_rng(3)
    ckpt = Checkpoint(
        next_iteration=7,
        x=rng.standard_normal(3),
        g=rng.standard_normal(3),
        g_local=rng.standard_normal((2, 3)),
        v_local=None,
        rng_batch=[rng.bit_generator.state],
        rng_noise=[],
        bits_sent=12.5,
        wall_time=0.25,
        config={"tau": 0.1},
    )
    save_checkpoint(path, ckpt)
    assert os.listdir(tmp_path) == ["a.ckpt"]  # no temporary file left
    back = load_checkpoint(path)
    np.testing.assert_array_equal(back.g_local, ckpt.g_local)
    assert back.rng_batch == ckpt.rng_batch and back.v_local is None
    assert (back.next_iteration, back.bits_sent, back.config) == (7, 12.5, {"tau": 0.1})


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(
        CheckpointError, match="is corrupt or not a clip21mpi checkpoint"
    ):
        load_checkpoint(str(path))


def stop_at(iteration):
    """A stop request raised from the progress callback at ``iteration``."""
    event = threading.Event()

    def progress(k, _):
        if k == iteration:
            event.set()

    return event, progress


def test_stop_and_resume_is_bitwise_identical(tmp_path):
    whole = run(
        prepare(RunConfig(out=str(tmp_path / "whole.h5"), **NOISY), 0, 1), World()
    )

    cfg = RunConfig(out=str(tmp_path / "cut.h5"), **NOISY)
    event, progress = stop_at(25)
    first = run(prepare(cfg, 0, 1), World(), progress=progress, stop=event)
    # The request is seen in the next round's sum: round 26 ends, 27 is next.
    assert (first.status, first.iterations, first.exit_code) == ("checkpointed", 27, 75)
    assert read_log(cfg.out)["attrs"]["status"] == "checkpointed"
    assert load_checkpoint(checkpoint_path(cfg.out)).next_iteration == 27

    setup = prepare(cfg, 0, 1)  # finds the checkpoint next to --out
    assert setup.resume is not None
    second = run(setup, World())
    assert second.status == "max_iters"
    np.testing.assert_array_equal(second.x_final, whole.x_final)
    a, b = read_log(tmp_path / "whole.h5"), read_log(cfg.out)
    np.testing.assert_array_equal(b["metrics"]["iteration"], np.arange(61))
    for name in ("grad_norm_sq", "loss", "clip_fraction", "bits_sent", "epsilon"):
        np.testing.assert_array_equal(b["metrics"][name], a["metrics"][name], name)
    assert np.all(np.diff(b["metrics"]["wall_time"]) >= 0)
    assert (
        b["attrs"]["resumed_at"] == 27
        and b["attrs"]["epsilon"] == a["attrs"]["epsilon"]
    )
    assert not os.path.exists(checkpoint_path(cfg.out))  # finished: removed


def test_resume_refuses_another_configuration(tmp_path):
    cfg = RunConfig(out=str(tmp_path / "r.h5"), **NOISY)
    event, progress = stop_at(3)
    run(prepare(cfg, 0, 1), World(), progress=progress, stop=event)
    with pytest.raises(ConfigError) as err:
        prepare(cfg.replace(tau=0.5), 0, 1)
    assert err.value.message == (
        f"the checkpoint {checkpoint_path(cfg.out)!r} belongs to another "
        "configuration (tau 0.05 -> 0.5); pass the same options to resume it, "
        "or --overwrite to start afresh"
    )
    # --overwrite starts afresh and removes the stale checkpoint.
    fresh = run(prepare(cfg.replace(overwrite=True), 0, 1), World())
    assert fresh.status == "max_iters"
    assert not os.path.exists(checkpoint_path(cfg.out))


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    cfg = RunConfig(data=DATA, clients=2, out=str(tmp_path / "none.h5"), resume=True)
    with pytest.raises(ConfigError) as err:
        prepare(cfg, 0, 1)
    assert err.value.message == (
        f"--resume: there is no checkpoint {checkpoint_path(cfg.out)!r} to resume"
    )


def mpiexec():
    return os.path.join(os.path.dirname(sys.executable), "mpiexec")


def launch(n, out, *extra):
    args = [
        mpiexec(),
        "-n",
        str(n),
        sys.executable,
        "-c",
        "from cli.main import main; main()",
        "run",
        "--data",
        "synthetic:rows=4000,features=20,heterogeneity=1",
        "--clients",
        "6",
        "--method",
        "clip21-sgd",
        "--batch-size",
        "16",
        "--noise-sigma",
        "0.001",
        "--tau",
        "0.05",
        "--iters",
        "4000",
        "--out",
        str(out),
        "-q",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def test_killed_mpi_run_resumes_bitwise(tmp_path):
    """SIGKILL after a periodic checkpoint: the resumed run drops the rows
    logged after it and ends exactly where an uninterrupted run ends."""
    whole = launch(2, tmp_path / "whole.h5")
    cut_out = tmp_path / "cut.h5"
    cut = launch(2, cut_out, "--checkpoint-every", "500")
    deadline = time.monotonic() + 120
    ckpt = checkpoint_path(str(cut_out))
    while not os.path.exists(ckpt) or load_checkpoint(ckpt).next_iteration < 1000:
        assert cut.poll() is None, cut.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    os.killpg(cut.pid, signal.SIGKILL)
    cut.communicate(timeout=60)
    assert whole.wait(timeout=300) == 0, whole.communicate()

    rows_before = len(read_log(cut_out)["metrics"]["iteration"])
    resumed = launch(2, cut_out)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = read_log(tmp_path / "whole.h5"), read_log(cut_out)
    assert rows_before >= b["attrs"]["resumed_at"] >= 1000
    np.testing.assert_array_equal(b["x_final"], a["x_final"])
    np.testing.assert_array_equal(b["metrics"]["iteration"], np.arange(4001))
    for name in ("grad_norm_sq", "loss", "clip_fraction", "bits_sent", "epsilon"):
        np.testing.assert_array_equal(b["metrics"][name], a["metrics"][name], name)


def rows_logged(path) -> int:
    """Rows of a log being written (0 if absent or caught mid-flush)."""
    try:
        return len(read_log(path)["metrics"]["iteration"])
    except (OSError, KeyError):
        return 0


def test_sigterm_checkpoints_every_rank_and_exits_75(tmp_path):
    out = tmp_path / "term.h5"
    proc = launch(3, out)
    deadline = time.monotonic() + 120
    while rows_logged(out) < 50:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm signals every task
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert stdout.count("checkpointed: clip21-sgd after") == 1
    log = read_log(out)
    assert log["attrs"]["status"] == "checkpointed"
    assert len(log["metrics"]["iteration"]) == log["attrs"]["iterations"]
    assert (
        load_checkpoint(checkpoint_path(str(out))).next_iteration
        == log["attrs"]["iterations"]
    )
