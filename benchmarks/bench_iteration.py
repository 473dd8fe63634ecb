"""Time one iteration per method: library on 1 and 2 ranks, beside a naive loop.

The problem is logistic regression with the nonconvex regulariser
``lam sum_l x_l^2 / (1 + x_l^2)`` (lam 0.1) on a LibSVM file, split
contiguously over the clients. For every method (gd, clip-gd, clip21, ef21)
the script reports

* naive: a reference written the obvious way, a Python loop over the
  clients, each holding its own dense ``A_i``, that computes
  ``grad f_i``, applies the operator (clip or Top-k) and the error feedback
  client by client;
* lib 1 rank, lib 2 ranks: ``clip21mpi.runner.prepare`` and
  ``clip21mpi.runner.run`` under ``mpiexec -n 1`` and ``mpiexec -n 2``,
  with the HDF5 log written to a temporary folder.

Time per iteration is the loop's wall time over its ``iters + 1`` rounds
(the library's ``RunResult.wall_time / (iterations + 1)``); setup, data
loading and the final log write are not counted. Each library variant is
measured with the loss evaluated every iteration and every 10th one, since
the loss costs one more ``log1p`` per row; the naive loop evaluates it as
often. The 1-rank and 2-rank launches of a method alternate, repeat after
repeat, and the median over repeats is reported, because the machine is
shared and noisy.

The script starts itself under ``mpiexec`` (the one beside the running
Python, else the one on ``PATH``) in a hidden ``--worker`` mode, one launch
per method, rank count and repeat, with one BLAS/OpenMP thread per process;
rank 0 prints its timings as one JSON line, which the parent collects.

Example:
    Time every method on a9a with the default settings and keep the
    numbers::

        python benchmarks/bench_iteration.py path/to/a9a.txt --json a9a.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from workers import find_mpiexec, run_worker

from clip21mpi import __version__
from clip21mpi.comm import World, install_abort_on_error
from clip21mpi.config import RunConfig
from clip21mpi.methods import METHODS
from clip21mpi.runlog import read_log
from clip21mpi.runner import prepare, run
from problems.data import load_dataset, map_labels
from problems.split import client_offsets

METHOD_NAMES = ("gd", "clip-gd", "clip21", "ef21")
EVAL_EVERY = (1, 10)
RANK_COUNTS = (1, 2)
PROBLEM, REG, LAM, SPLIT = "logreg", "nonconvex", 0.1, "contiguous"
WARMUP_ITERS = 20

# Targets the library should meet (on the 1-rank and 2-rank columns).
TARGET_CLIP21_OVER_GD = 1.1
TARGET_MS_ONE_RANK = 1.5
TARGET_SPEEDUP = 1.5

COLUMN_LABELS = {"naive": "naive", "lib1": "lib 1r", "lib2": "lib 2r"}

# Above this (max - min) / median over repeats, the run warns of noise.
SPREAD_WARNING = 0.25

# Rank 0 of a worker prints one line starting with this, then JSON.
RESULT_PREFIX = "bench_iteration result: "


# The naive reference: one client at a time, dense rows, no stacking.


def _naive_clip(v: np.ndarray, tau: float) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v * (tau / norm) if norm > tau else v.copy()


def _naive_top_k(v: np.ndarray, k: int) -> np.ndarray:
    d = v.size
    if k >= d:
        return v.copy()
    keep = np.argpartition(np.abs(v), d - k)[d - k :]
    c = np.zeros_like(v)
    c[keep] = v[keep]
    return c


def _naive_operator(kind: str | None, tau: float, k: int):
    """Return the one-vector operator ``kind`` (identity, clip, topk)."""
    if kind == "clip":
        return lambda v: _naive_clip(v, tau)
    if kind == "topk":
        return lambda v: _naive_top_k(v, k)
    return lambda v: v


def naive_run(
    blocks: list[tuple[np.ndarray, np.ndarray]],
    method: str,
    gamma: float,
    tau: float,
    k: int,
    iters: int,
    eval_every: int,
) -> tuple[float, np.ndarray]:
    """Run ``method`` the obvious way and return (seconds, final x).

    Each round loops over the clients; client ``i`` computes

        grad f_i(x) = A_i^T (-b_i / (1 + exp(b_i A_i x))) / m_i + grad r(x)

    and sends ``c_i = C(grad f_i(x))`` (gd, clip-gd), or
    ``c_i = C(grad f_i(x) - g_i)`` and sets ``g_i += c_i`` (clip21, ef21;
    ef21 sends the identity in round 0). The server averages the messages
    into ``g`` and steps ``x <- x - gamma g``. Like the library it runs
    ``iters + 1`` rounds, tracks ``||grad f||^2`` every round, the loss
    every ``eval_every`` rounds and in the last, and steps ``iters`` times.

    Args:
        blocks: ``(A_i, b_i)`` per client, ``A_i`` a dense ``(m_i, d)``
            array and ``b_i`` the labels in {-1, +1}.
        method: one of ``METHOD_NAMES``.
        gamma: the step size.
        tau: the clip threshold.
        k: the Top-k coordinates.
        iters: the number of steps.
        eval_every: evaluate the loss every this many rounds.

    Returns:
        The wall time of the ``iters + 1`` rounds, and the final iterate.
    """
    spec = METHODS[method]
    op = _naive_operator(spec.operator, tau, k)
    op_first = _naive_operator(spec.first_operator or spec.operator, tau, k)
    n, d = len(blocks), blocks[0][0].shape[1]
    x = np.zeros(d)
    g = np.zeros(d)
    g_clients = [np.zeros(d) for _ in range(n)]
    grad_norm_sq = np.empty(iters + 1)
    loss = np.full(iters + 1, np.nan)

    t0 = time.perf_counter()
    for it in range(iters + 1):
        evaluate = it % eval_every == 0 or it == iters
        C = op_first if it == 0 else op
        q = 1.0 + x * x
        reg_grad = LAM * 2.0 * x / (q * q)
        reg_value = LAM * float(np.sum(x * x / q))
        message_sum = np.zeros(d)
        grad_sum = np.zeros(d)
        loss_sum = 0.0
        for i, (A_i, b_i) in enumerate(blocks):
            u = b_i * (A_i @ x)
            with np.errstate(over="ignore"):
                grad_i = A_i.T @ (-b_i / (1.0 + np.exp(u))) / b_i.size + reg_grad
            if evaluate:
                loss_sum += float(np.mean(np.logaddexp(0.0, -u))) + reg_value
            if spec.error_feedback:
                c_i = C(grad_i - g_clients[i])
                g_clients[i] += c_i
            else:
                c_i = C(grad_i)
            message_sum += c_i
            grad_sum += grad_i
        grad_mean = grad_sum / n
        grad_norm_sq[it] = grad_mean @ grad_mean
        if evaluate:
            loss[it] = loss_sum / n
        if it == iters:
            break
        g = g + message_sum / n if spec.error_feedback else message_sum / n
        x = x - gamma * g
    return time.perf_counter() - t0, x


def naive_blocks(data: str, clients: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return each client's dense rows and labels, split as the library does."""
    dataset = load_dataset(data, 0, clients)
    labels = map_labels(dataset.labels, (-1.0, 1.0), dataset.source)
    offsets = client_offsets(dataset.n_rows, clients)
    features = dataset.features
    blocks = []
    for start, stop in itertools.pairwise(offsets):
        A_i = features[start:stop]
        A_i = A_i.toarray() if hasattr(A_i, "toarray") else np.array(A_i)
        blocks.append((A_i, labels[start:stop].copy()))
    return blocks


# The worker: one launch under mpiexec, one method, every variant.


def run_config(args, method: str, eval_every: int, out: str) -> RunConfig:
    """Return the library configuration of one timed run."""
    return RunConfig(
        problem=PROBLEM,
        reg=REG,
        lam=LAM,
        data=str(args.data),
        clients=args.clients,
        split=SPLIT,
        method=method,
        tau=args.tau,
        k=args.k,
        iters=args.iters,
        eval_every=eval_every,
        out=out,
        overwrite=True,
    )


def worker(args) -> None:
    """Time ``args.worker`` on this MPI job; rank 0 prints the JSON report.

    Every rank runs the same sequence of collectives: a short warm-up run,
    then one timed run per loss-evaluation interval. On a 1-rank job the
    naive loop is timed right after each library run, with the library's
    step size, and its final iterate is compared with the library's.
    """
    world = World()
    install_abort_on_error(world)
    method = args.worker
    stem = os.path.join(args.log_dir, f"{method}-n{world.size}-r{args.repeat_index}")
    blocks = naive_blocks(str(args.data), args.clients) if world.size == 1 else None
    report = {"method": method, "ranks": world.size, "repeat": args.repeat_index}
    runs = []

    for eval_every in EVAL_EVERY:
        cfg = run_config(args, method, eval_every, f"{stem}-e{eval_every}.h5")
        setup = prepare(cfg, world.rank, world.size)
        if not runs:
            warm_cfg = cfg.replace(iters=WARMUP_ITERS, out=f"{stem}-warmup.h5")
            run(dataclasses.replace(setup, config=warm_cfg), world)
            report.update(
                data_name=setup.dataset_name, rows=setup.n_rows, dim=setup.dim
            )

        result = run(setup, world)
        entry = {
            "eval_every": eval_every,
            "lib_ms": 1e3 * result.wall_time / (result.iterations + 1),
            "status": result.status,
            "iterations": result.iterations,
            "step_size": result.step_size,
            "grad_norm_sq": result.grad_norm_sq,
        }
        if world.is_root:
            clip_fraction = read_log(result.path)["metrics"]["clip_fraction"]
            entry["clip_fraction_mean"] = float(np.mean(clip_fraction))

        if blocks is not None:
            seconds, x_naive = naive_run(
                blocks,
                method,
                result.step_size,
                args.tau,
                args.k,
                args.iters,
                eval_every,
            )
            entry["naive_ms"] = 1e3 * seconds / (args.iters + 1)
            entry["naive_max_abs_diff"] = float(
                np.max(np.abs(x_naive - result.x_final))
            )
        runs.append(entry)

    if world.is_root:
        report["runs"] = runs
        print(RESULT_PREFIX + json.dumps(report), flush=True)


# The parent: launch the workers, collect, summarise.


def launch(args, mpiexec: str, method: str, ranks: int, repeat: int, log_dir: str):
    """Run one worker job and return rank 0's report.

    Raises:
        SystemExit: if the job fails, prints no report or exceeds
            ``args.timeout`` seconds (its process group is then killed).
    """
    command = [
        mpiexec,
        "-n",
        str(ranks),
        sys.executable,
        str(Path(__file__).resolve()),
        str(args.data),
        "--clients",
        str(args.clients),
        "--iters",
        str(args.iters),
        "--tau",
        repr(args.tau),
        "--k",
        str(args.k),
        "--worker",
        method,
        "--log-dir",
        log_dir,
        "--repeat-index",
        str(repeat),
    ]
    return run_worker(
        command,
        RESULT_PREFIX,
        args.timeout,
        f"{method} on {ranks} rank(s)",
        "pass a larger --timeout or fewer --iters",
    )


def collect(args, mpiexec: str) -> list[dict]:
    """Launch every (repeat, method, rank count) job and return the reports.

    The two rank counts of a method run back to back, in an order that
    alternates from one method and repeat to the next, so slow spells of a
    shared machine hit both columns alike.
    """
    reports = []
    total = args.repeats * len(METHOD_NAMES) * len(RANK_COUNTS)
    with tempfile.TemporaryDirectory(prefix="bench_iteration-") as log_dir:
        for repeat in range(args.repeats):
            for m, method in enumerate(METHOD_NAMES):
                order = RANK_COUNTS if (repeat + m) % 2 == 0 else RANK_COUNTS[::-1]
                for ranks in order:
                    report = launch(args, mpiexec, method, ranks, repeat, log_dir)
                    reports.append(report)
                    times = ", ".join(
                        f"{r['lib_ms']:.3f} ms (eval every {r['eval_every']})"
                        for r in report["runs"]
                    )
                    print(
                        f"[{len(reports):>2}/{total}] repeat {repeat + 1}, {method}, "
                        f"{ranks} rank(s): {times}",
                        file=sys.stderr,
                        flush=True,
                    )
    return reports


def samples(reports: list[dict]) -> dict[tuple[int, str, str], list[float]]:
    """Return the ms/iter of every repeat, keyed by (eval_every, method, column).

    Columns: ``naive``, ``lib1``, ``lib2``.
    """
    found: dict[tuple[int, str, str], list[float]] = {}
    for report in reports:
        for entry in report["runs"]:
            key = (entry["eval_every"], report["method"])
            column = f"lib{report['ranks']}"
            found.setdefault((*key, column), []).append(entry["lib_ms"])
            if "naive_ms" in entry:
                found.setdefault((*key, "naive"), []).append(entry["naive_ms"])
    return found


def medians(cells) -> dict[int, dict[str, dict[str, float]]]:
    """Return ``{eval_every: {method: {column: median ms/iter}}}``."""
    table: dict[int, dict[str, dict[str, float]]] = {}
    for (eval_every, method, column), values in cells.items():
        row = table.setdefault(eval_every, {}).setdefault(method, {})
        row[column] = statistics.median(values)
    return table


def widest_spread(cells) -> tuple[float, tuple[int, str, str]]:
    """Return the largest ``(max - min) / median`` over repeats, and its cell."""
    spreads = {
        key: (max(v) - min(v)) / statistics.median(v) for key, v in cells.items()
    }
    key = max(spreads, key=spreads.get)
    return spreads[key], key


def check_targets(table) -> list[dict]:
    """Return one record per target and loss-evaluation interval."""
    checks = []
    for eval_every, rows in sorted(table.items()):
        ratio = rows["clip21"]["lib1"] / rows["gd"]["lib1"]
        checks.append(
            {
                "target": f"clip21 / gd on 1 rank <= {TARGET_CLIP21_OVER_GD:g}",
                "eval_every": eval_every,
                "value": f"{ratio:.2f}x",
                "met": ratio <= TARGET_CLIP21_OVER_GD,
            }
        )
        slowest = max(rows, key=lambda m: rows[m]["lib1"])
        worst_ms = rows[slowest]["lib1"]
        checks.append(
            {
                "target": f"ms/iter on 1 rank <= {TARGET_MS_ONE_RANK:g}, every method",
                "eval_every": eval_every,
                "value": f"{worst_ms:.3f} ms ({slowest})",
                "met": worst_ms <= TARGET_MS_ONE_RANK,
            }
        )
        speedups = {m: rows[m]["lib1"] / rows[m]["lib2"] for m in rows}
        weakest = min(speedups, key=speedups.get)
        checks.append(
            {
                "target": f"speed-up 1 -> 2 ranks >= {TARGET_SPEEDUP:g}, every method",
                "eval_every": eval_every,
                "value": f"{speedups[weakest]:.2f}x ({weakest})",
                "met": speedups[weakest] >= TARGET_SPEEDUP,
            }
        )
    return checks


def agreement(reports: list[dict]) -> dict[str, float]:
    """Return, per method, the largest ``|x_naive - x_lib|`` seen."""
    worst: dict[str, float] = {}
    for report in reports:
        for entry in report["runs"]:
            if "naive_max_abs_diff" in entry:
                method = report["method"]
                diff = entry["naive_max_abs_diff"]
                worst[method] = max(worst.get(method, 0.0), diff)
    return worst


def clip_fractions(reports: list[dict]) -> dict[str, float]:
    """Return, per method, the mean share of clipped client rounds (1 rank)."""
    shares: dict[str, list[float]] = {}
    for report in reports:
        if report["ranks"] == 1:
            for entry in report["runs"]:
                shares.setdefault(report["method"], []).append(
                    entry["clip_fraction_mean"]
                )
    return {m: statistics.mean(v) for m, v in shares.items()}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Return the text table of one loss-evaluation interval."""
    header = (
        f"{'method':<8} {'naive':>9} {'lib 1r':>9} {'lib 2r':>9} "
        f"{'naive/lib1':>11} {'lib1/lib2':>10} {'vs gd (1r)':>11}"
    )
    lines = [header, "-" * len(header)]
    gd = rows["gd"]["lib1"]
    for method in METHOD_NAMES:
        r = rows[method]
        lines.append(
            f"{method:<8} {r['naive']:>9.3f} {r['lib1']:>9.3f} {r['lib2']:>9.3f} "
            f"{r['naive'] / r['lib1']:>10.2f}x {r['lib1'] / r['lib2']:>9.2f}x "
            f"{r['lib1'] / gd:>10.2f}x"
        )
    return "\n".join(lines)


def summary(args, reports, table, checks) -> str:
    """Return the printed report: settings, tables, targets, checks."""
    first = reports[0]
    problem = (
        f"{first['data_name']}: {first['rows']} rows, {first['dim']} features, "
        f"{args.clients} clients ({SPLIT} split), {PROBLEM} + {REG} "
        f"regulariser (lam {LAM:g})"
    )
    settings = (
        f"{args.iters} iterations ({args.iters + 1} rounds), tau {args.tau:g}, "
        f"k {args.k}; median of {args.repeats} repeats; times in ms per iteration"
    )
    out = [problem, settings]
    for eval_every, rows in sorted(table.items()):
        when = "every iteration" if eval_every == 1 else f"every {eval_every}"
        out += ["", f"Loss evaluated {when} (eval_every={eval_every})"]
        out.append(format_table(rows))

    out += ["", "Targets (library)"]
    width = max(len(c["target"]) for c in checks)
    for c in checks:
        verdict = "met" if c["met"] else "NOT met"
        out.append(
            f"  {c['target']:<{width}}  eval_every={c['eval_every']:<3} "
            f"{c['value']:<18} {verdict}"
        )

    diffs = agreement(reports)
    shares = clip_fractions(reports)
    out += [
        "",
        "Naive loop vs library, max |x_naive - x_lib| after the run: "
        + ", ".join(f"{m} {diffs[m]:.1e}" for m in METHOD_NAMES),
        "Mean share of client rounds whose operator was active: "
        + ", ".join(f"{m} {shares[m]:.2f}" for m in METHOD_NAMES),
    ]
    return "\n".join(out)


def environment(mpiexec: str) -> dict:
    """Return what the numbers depend on besides the settings."""
    return {
        "clip21mpi": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "mpiexec": mpiexec,
        "threads_per_process": 1,
    }


# Command line.


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the public options and the hidden worker ones."""
    parser = argparse.ArgumentParser(
        description=(
            "Time one iteration of gd, clip-gd, clip21 and ef21: the library on "
            "1 and 2 MPI ranks beside a naive per-client numpy loop."
        ),
    )
    parser.add_argument(
        "data", type=Path, help="LibSVM file, e.g. a9a from the LIBSVM collection"
    )
    parser.add_argument(
        "--clients", type=int, default=20, help="number of clients (default: 20)"
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=300,
        help="iterations per timed run; it runs iters + 1 rounds (default: 300)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="launches per method and rank count; the median is shown (default: 3)",
    )
    parser.add_argument(
        "--tau",
        type=float,
        default=0.01,
        help="clip threshold of clip-gd and clip21 (default: 0.01)",
    )
    parser.add_argument(
        "--k", type=int, default=1, help="Top-k coordinates of ef21 (default: 1)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds one MPI launch may take before it is killed (default: 120)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write every number to this file"
    )
    # Hidden: the mode the script relaunches itself in under mpiexec.
    parser.add_argument("--worker", choices=METHOD_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", help=argparse.SUPPRESS)
    parser.add_argument("--repeat-index", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def validate(parser: argparse.ArgumentParser, args) -> None:
    """Exit with a usage error (code 2) for a setting the run cannot use."""
    if not args.data.is_file():
        parser.error(
            f"no such file: {str(args.data)!r}; pass the path of a LibSVM file, "
            "e.g. a9a.txt"
        )
    if args.clients < max(RANK_COUNTS):
        parser.error(
            f"--clients must be >= {max(RANK_COUNTS)} (every rank needs a client), "
            f"got {args.clients!r}"
        )
    if args.iters < 1:
        parser.error(f"--iters must be >= 1, got {args.iters!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats!r}")
    if not (math.isfinite(args.tau) and args.tau > 0):
        parser.error(f"--tau must be a positive number, got {args.tau!r}")
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k!r}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be positive, got {args.timeout!r}")


def main(argv=None) -> None:
    """Run the benchmark, or one worker job when ``--worker`` is given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args)
        return
    validate(parser, args)
    mpiexec = find_mpiexec()

    started = time.perf_counter()
    reports = collect(args, mpiexec)
    cells = samples(reports)
    table = medians(cells)
    checks = check_targets(table)
    print(summary(args, reports, table, checks))
    spread, (eval_every, method, column) = widest_spread(cells)
    if args.repeats > 1 and spread > SPREAD_WARNING:
        where = f"{method}, {COLUMN_LABELS[column]}, eval_every={eval_every}"
        print(
            f"\nwarning: ms/iter varies by up to {spread:.0%} between repeats "
            f"({where}); the machine is busy, so read the ratios with care or "
            "rerun with more --repeats on a quieter machine"
        )
    elapsed = time.perf_counter() - started
    print(f"\n{len(reports)} MPI launches in {elapsed:.0f} s", file=sys.stderr)

    if args.json is not None:
        settings = {
            "data": str(args.data),
            "clients": args.clients,
            "iters": args.iters,
            "repeats": args.repeats,
            "tau": args.tau,
            "k": args.k,
            "problem": PROBLEM,
            "reg": REG,
            "lam": LAM,
            "split": SPLIT,
            "eval_every": list(EVAL_EVERY),
            "ranks": list(RANK_COUNTS),
        }
        record = {
            "settings": settings,
            "environment": environment(mpiexec),
            "median_ms_per_iteration": {str(e): rows for e, rows in table.items()},
            "max_spread_over_repeats": spread,
            "targets": checks,
            "naive_max_abs_diff": agreement(reports),
            "launches": reports,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
