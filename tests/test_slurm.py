"""The job scripts in slurm/, submitted to a running Slurm.

``sudo slurm/local-cluster.sh start`` gives this machine a one-node Slurm.
Without a usable Slurm these tests are skipped; with
CLIP21MPI_REQUIRE_SLURM=1 (as .ci/run sets it) they fail instead.
Jobs run 2 or 3 ranks with ``--overcommit``, so two cores are enough, and
start them with ``srun --mpi=pmi2``, or ``pmix`` when this interpreter's
MPI is Open MPI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cli.main import cli
from clip21mpi.runlog import read_log

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
BIN = Path(sys.executable).parent
SYNTH = "synthetic:rows=300,features=5"
# From submission to the end of a job; a requeued job also waits the
# cluster's cred_expire (10 s on the local cluster) before it starts again.
JOB_TIMEOUT = 300
COMMAND_TIMEOUT = 60
READY = ("idle", "mixed", "allocated", "completing")
FINISHED = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
)
MPI_PLUGIN = "pmix" if (BIN / "ompi_info").exists() else "pmi2"
HAS_CHECKPOINTS = "checkpoint_every" in {p.name for p in cli.commands["run"].params}
HAS_SWEEP = "sweep" in cli.commands  # else plain runs make the array


def _why_no_slurm() -> str | None:
    """Why jobs cannot be submitted here, or None when they can."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH"
    try:
        proc = subprocess.run(
            ["sinfo", "--noheader", "--format=%T"],
            check=False,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer within {COMMAND_TIMEOUT} s"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip()}"
    states = proc.stdout.split()
    if not any(state in READY for state in states):
        return f"no node is ready (sinfo: {' '.join(states) or 'no nodes'})"
    return None


@pytest.fixture(scope="module")
def slurm():
    """Skip without a usable Slurm, or fail under CLIP21MPI_REQUIRE_SLURM=1."""
    reason = _why_no_slurm()
    if reason is None:
        return
    hint = "start one with: sudo slurm/local-cluster.sh start"
    if os.environ.get("CLIP21MPI_REQUIRE_SLURM") == "1":
        pytest.fail(
            f"CLIP21MPI_REQUIRE_SLURM=1 but Slurm is not usable: {reason}; {hint}"
        )
    pytest.skip(f"Slurm is not usable: {reason}; {hint}")


def job_env(**extra: str) -> dict[str, str]:
    """This environment, less any Slurm or MPI job's, for sbatch and srun.

    sbatch passes it on to the job, so the job finds this interpreter's
    clip21mpi first on PATH.
    """
    stale = ("SLURM_", "SBATCH_", "SRUN_", "PMI_", "PMIX_", "HYDRA_", "MPIR_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(stale)}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MPI_PLUGIN=MPI_PLUGIN)
    env.update(extra)
    return env


def sbatch(tmp_path, *argv: str, env: dict[str, str] | None = None) -> str:
    """Submit a job that runs in tmp_path; return its id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", "--time=10", *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        env=env or job_env(),
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_records(job_id: str) -> list[dict[str, str]]:
    """Slurm's record of a job: one dict per array task (one for a plain job)."""
    proc = subprocess.run(
        ["scontrol", "--oneliner", "show", "job", job_id],
        check=False,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert proc.returncode == 0, f"scontrol show job {job_id}: {proc.stderr}"
    return [
        dict(re.findall(r"(\w+)=(\S*)", line))
        for line in proc.stdout.splitlines()
        if line.strip()
    ]


def wait_for(job_id: str, done=None, timeout: float = JOB_TIMEOUT) -> list[dict]:
    """Poll until ``done(records)`` (default: every task finished); return them.

    A job still going at the timeout is cancelled and the test fails.
    """
    if done is None:

        def done(records):
            return all(r["JobState"] in FINISHED for r in records)

    deadline = time.monotonic() + timeout
    while True:
        records = job_records(job_id)
        if records and done(records):
            return records
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], timeout=COMMAND_TIMEOUT, check=False)
            states = [r["JobState"] for r in records]
            pytest.fail(f"job {job_id} not done after {timeout} s: states {states}")
        time.sleep(0.5)


def outputs(tmp_path) -> str:
    """Every job output file in tmp_path, for assertion messages."""
    return "\n".join(
        f"--- {path.name}\n{path.read_text(errors='replace')}"
        for path in sorted(tmp_path.glob("*.out"))
    )


def test_run_sbatch_runs_one_world_of_three_ranks(slurm, tmp_path):
    env = job_env(DATA=SYNTH, CLIENTS="6", OUT="run.h5")
    job = sbatch(
        tmp_path,
        "--ntasks=3",
        "--overcommit",
        "--output=run-%j.out",
        str(SLURM / "run.sbatch"),
        "--iters",
        "300",
        env=env,
    )

    (record,) = wait_for(job)

    text = (tmp_path / f"run-{job}.out").read_text()
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert text.count("max_iters: clip21 after 300 iterations") == 1, text
    log = read_log(tmp_path / "run.h5")
    attrs = log["attrs"]
    assert (attrs["status"], attrs["iterations"]) == ("max_iters", 300)
    assert (attrs["ranks"], attrs["clients"]) == (3, 6)
    np.testing.assert_array_equal(log["metrics"]["iteration"], np.arange(301))
    config = json.loads(attrs["config"])
    assert (config["data"], config["method"], config["iters"]) == (SYNTH, "clip21", 300)


def test_an_array_of_three_runs(slurm, tmp_path):
    """Three array tasks: cells of slurm/sweep.sbatch, or three seeds of
    plain runs where the sweep command is not there."""
    submit = _submit_sweep if HAS_SWEEP else _submit_seeds
    job, varied, values = submit(tmp_path)

    records = wait_for(job)

    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2"]
    states = {(r["JobState"], r["ExitCode"]) for r in records}
    assert states == {("COMPLETED", "0:0")}, outputs(tmp_path)
    paths = sorted(tmp_path.glob("**/*.h5"))
    logs = [read_log(path) for path in paths]
    configs = [json.loads(log["attrs"]["config"]) for log in logs]
    assert sorted(c[varied] for c in configs) == values, [p.name for p in paths]
    for log, config in zip(logs, configs):
        assert (log["attrs"]["status"], log["attrs"]["ranks"]) == ("max_iters", 2)
        assert (config["data"], config["clients"]) == (SYNTH, 4)
        np.testing.assert_array_equal(log["metrics"]["iteration"], np.arange(201))


def _submit_sweep(tmp_path):
    job = sbatch(
        tmp_path,
        *("--array=0-2", "--ntasks=2", "--overcommit", "--output=sweep-%A_%a.out"),
        str(SLURM / "sweep.sbatch"),
        *("--out", "grid", "--set", f"data={SYNTH}", "--set", "iters=200"),
        *("--set", "clients=4", "--grid", "tau=0.01,0.1,1"),
    )
    return job, "tau", [0.01, 0.1, 1.0]


def _submit_seeds(tmp_path):
    task = "$SLURM_ARRAY_TASK_ID"
    wrapped = (
        f"srun --mpi={MPI_PLUGIN} clip21mpi run --data {SYNTH} --clients 4 "
        f"--iters 200 --seed {task} --out seed-{task}.h5 -q"
    )
    job = sbatch(
        tmp_path,
        *("--array=0-2", "--ntasks=2", "--overcommit", "--output=seed-%A_%a.out"),
        f"--wrap={wrapped}",
    )
    return job, "seed", [0, 1, 2]


@pytest.mark.xfail(
    not HAS_CHECKPOINTS,
    reason="needs --checkpoint-every and --resume in clip21mpi run",
    strict=False,
)
def test_long_run_sbatch_checkpoints_requeues_and_resumes(slurm, tmp_path):
    iters = 20000  # long enough to be signalled (about 1 ms per round)
    env = job_env(OUT="long.h5", CHECKPOINT_EVERY="0")
    job = sbatch(
        tmp_path,
        "--ntasks=2",
        "--overcommit",
        "--output=long-%j.out",
        str(SLURM / "long-run.sbatch"),
        *("--data", SYNTH, "--clients", "4", "--iters", str(iters), "-q"),
        env=env,
    )

    # What --signal=B:USR1@120 sends before the time limit, but now: once
    # the run has written its log, it is iterating.
    def iterating(records):
        return records[0]["JobState"] == "RUNNING" and (tmp_path / "long.h5").exists()

    wait_for(job, iterating, timeout=COMMAND_TIMEOUT)
    time.sleep(1.0)
    subprocess.run(
        ["scancel", "--batch", "--signal=USR1", job],
        check=True,
        timeout=COMMAND_TIMEOUT,
    )
    (record,) = wait_for(job)

    text = (tmp_path / f"long-{job}.out").read_text()
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert record["Restarts"] == "1", text
    assert f"start 1 of job {job}" in text and f"start 2 of job {job}" in text, text
    stopped = re.search(
        r"^checkpointed: clip21 after (\d+) iterations", text, re.MULTILINE
    )
    assert stopped is not None, text
    assert f"requeueing job {job}" in text, text
    log = read_log(tmp_path / "long.h5")
    attrs = log["attrs"]
    assert (attrs["status"], attrs["iterations"]) == ("max_iters", iters), text
    assert attrs["resumed_at"] == int(stopped.group(1))
    assert 0 < attrs["resumed_at"] < iters
    np.testing.assert_array_equal(log["metrics"]["iteration"], np.arange(iters + 1))
    assert not (tmp_path / "long.h5.ckpt").exists()  # finished: nothing to resume


def test_srun_without_pmi_is_refused_with_the_flag_to_add(slurm, tmp_path):
    srun = ["srun", "--ntasks=2", "--overcommit", "--mpi=none", f"--chdir={tmp_path}"]
    run = ["run", "--data", SYNTH, "--iters", "5", "--out", "run.h5"]

    proc = subprocess.run(
        [*srun, str(BIN / "clip21mpi"), *run],
        check=False,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        env=job_env(),
        stdin=subprocess.DEVNULL,
    )

    assert proc.returncode == 2, proc.stderr
    # Each one-rank copy is rank 0 of its own world, so each prints it.
    message = (
        "Error: Slurm started 2 tasks (SLURM_NTASKS) but MPI sees a world of 1 rank: "
        "launch with srun --mpi=pmi2 (MPICH family) or --mpi=pmix (Open MPI), or "
        "with mpiexec -n $SLURM_NTASKS\n"
    )
    assert proc.stderr.count(message) == 2, proc.stderr
    assert not (tmp_path / "run.h5").exists()


def test_local_cluster_start_is_idempotent(slurm):
    conf = Path("/etc/slurm/slurm.conf")
    if os.geteuid() != 0 or "local-cluster.sh" not in conf.read_text():
        pytest.skip("not the local cluster of slurm/local-cluster.sh, or not root")
    pidfiles = [Path("/run/slurmctld.pid"), Path("/run/slurmd.pid")]
    before = [p.read_text() for p in pidfiles]

    proc = subprocess.run(
        [str(SLURM / "local-cluster.sh"), "start"],
        check=False,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )

    assert proc.returncode == 0, proc.stderr
    assert "starting" not in proc.stdout and "writing" not in proc.stdout
    assert "takes jobs" in proc.stdout
    assert [p.read_text() for p in pidfiles] == before
