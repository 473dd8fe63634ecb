"""The run loop: set up the local clients, iterate, and log.

``prepare`` does all local work that can fail on bad input (reading data,
checking options against it) without any collective, so a bad input fails
alike on every rank. ``run`` then talks to the other ranks: one sum of one
buffer per iteration carries the messages, the diagnostics and the stop
flag.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from clip21mpi import __version__
from clip21mpi.comm import World, mpi_versions
from clip21mpi.config import ConfigError, RunConfig
from clip21mpi.methods import METHODS, Method, auto_step_size
from clip21mpi.runlog import METRICS, RunLog
from clip21mpi.streams import stream
from problems.data import DataError, load_dataset, map_labels
from problems.design import ClientDesign
from problems.losses import LOSSES, make_regulariser
from problems.objective import ClientObjectives
from problems.split import client_offsets, rank_clients, row_order

__all__ = ["EXIT_CODES", "LocalSetup", "RunFailed", "RunResult", "prepare", "run"]

logger = logging.getLogger(__name__)

# Exit codes of a run, by final status.
EXIT_CODES = {"converged": 0, "max_iters": 0, "failed": 1, "diverged": 3}

FLUSH_SECONDS = 2.0
FLUSH_ROWS = 4096


class RunFailed(RuntimeError):
    """A rank raised during the iterations; the message is that rank's."""


@dataclass
class LocalSetup:
    """What one rank holds before the first collective."""

    config: RunConfig
    rank: int
    size: int
    clients: range
    objectives: ClientObjectives
    dataset_name: str
    n_rows: int
    dim: int


@dataclass
class RunResult:
    """The outcome of a run, identical on every rank (``path`` aside)."""

    status: str
    iterations: int
    x_final: np.ndarray
    grad_norm_sq: float
    loss: float
    step_size: float
    path: str | None
    wall_time: float
    clip_fraction: float
    bits_sent: float
    smoothness: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def prepare(config: RunConfig, rank: int, size: int) -> LocalSetup:
    """Validate ``config`` and build this rank's clients; no MPI call.

    Raises:
        ConfigError: a bad option, naming it.
    """
    cfg = config.validate(size)
    loss = LOSSES[cfg.problem]
    reg = make_regulariser(cfg.reg, cfg.lam)
    try:
        dataset = load_dataset(cfg.data, cfg.seed, cfg.clients)
        labels = map_labels(dataset.labels, loss.labels, dataset.source)
    except DataError as err:
        raise ConfigError("--data", f"--data: {err}") from err
    if cfg.clients > dataset.n_rows:
        raise ConfigError(
            "--clients",
            f"--clients {cfg.clients} exceeds the {dataset.n_rows} rows of "
            f"{dataset.source}; every client needs a row",
        )
    if METHODS[cfg.method].operator == "topk" and cfg.k > dataset.n_features:
        raise ConfigError(
            "--k",
            f"--k {cfg.k} exceeds the {dataset.n_features} features of "
            f"{dataset.source}; pass 1 <= k <= {dataset.n_features}",
        )

    mine = rank_clients(cfg.clients, size, rank)
    order = row_order(cfg.split, labels, cfg.seed)
    offsets = client_offsets(dataset.n_rows, cfg.clients)
    rows = order[offsets[mine.start] : offsets[mine.stop]]
    design = ClientDesign(
        dataset.features[rows],
        offsets[mine.start : mine.stop + 1] - offsets[mine.start],
    )
    objectives = ClientObjectives(loss, reg, design, labels[rows])
    return LocalSetup(
        cfg,
        rank,
        size,
        mine,
        objectives,
        dataset.name,
        dataset.n_rows,
        dataset.n_features,
    )


def default_log_path(cfg: RunConfig, dataset_name: str, folder: str = "runs") -> str:
    """Return ``runs/<method>-<problem>-<data>-<time>.h5``, never an existing file."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(folder, f"{cfg.method}-{cfg.problem}-{dataset_name}-{stamp}")
    path, n = base + ".h5", 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}.h5"
    return path


def _initial_point(cfg: RunConfig, dim: int) -> np.ndarray:
    if cfg.x0 == "normal":
        return stream(cfg.seed, "x0").standard_normal(dim)
    return np.zeros(dim)


def _smoothness(setup: LocalSetup, world: World) -> tuple[float, np.ndarray]:
    """Return L of f and every client's L_i (setup-time collectives)."""
    obj = setup.objectives
    L_local = obj.smoothness()
    L_clients = np.concatenate(world.gather_to_all(L_local))
    gram = obj.design.weighted_gram_sum()
    if gram is None:
        # No Gram matrix for large d: lambda_max of a mean is at most the mean.
        return float(L_clients.mean()), L_clients
    world.sum_in_place(gram)
    return obj.smoothness_of_mean(gram / setup.config.clients), L_clients


def _header(setup, cfg, world, L, L_clients, step_size, command) -> dict:
    import h5py

    versions = {
        "clip21mpi": __version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "python": sys.version.split()[0],
        **mpi_versions(),
    }
    return {
        "config": cfg.to_dict(),
        "command": command,
        "versions": versions,
        **{f"version_{k}": v for k, v in versions.items()},
        "ranks": world.size,
        "clients": cfg.clients,
        "seed": cfg.seed,
        "dim": setup.dim,
        "rows": setup.n_rows,
        "data_name": setup.dataset_name,
        "L": L,
        "L_i": L_clients,
        "step_size": step_size,
        "bits_counted": (
            "per client, protocol messages only: 64 bits per float64 value; "
            "Top-k adds 32 bits per index"
        ),
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


class _MetricBuffer:
    """Rows of metrics kept on the root rank between flushes."""

    def __init__(self, log: RunLog | None):
        self.log = log
        self.iteration = np.empty(FLUSH_ROWS, dtype=np.int64)
        self.columns = {m: np.empty(FLUSH_ROWS) for m in METRICS}
        self.n = 0
        self.last_flush = time.perf_counter()

    def add(self, k, now, **values):
        if self.log is None:
            return
        i = self.n
        self.iteration[i] = k
        for name, value in values.items():
            self.columns[name][i] = value
        self.n += 1
        if self.n == FLUSH_ROWS or now - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self):
        if self.log is None or self.n == 0:
            return
        self.log.append(
            self.iteration[: self.n], {m: c[: self.n] for m, c in self.columns.items()}
        )
        self.n = 0
        self.last_flush = time.perf_counter()


@dataclass
class _Outcome:
    status: str
    k: int
    x: np.ndarray
    error: BaseException | None
    grad_norm_sq: float
    loss: float
    clip_fraction: float
    bits_sent: float


def _loss_at(obj, x, world, n) -> float:
    """Return f(x) (NaN if a rank cannot evaluate it); a collective."""
    pair = np.zeros(2)
    try:
        with np.errstate(all="ignore"):
            pair[0] = obj.values(x).sum()
    except Exception:  # noqa: BLE001 - a diagnostic only; NaN says it failed
        pair[1] = 1.0
    world.sum_in_place(pair)
    return float("nan") if pair[1] else pair[0] / n


def _iterate(cfg, obj, method, world, gamma, x, metrics, progress, t0) -> _Outcome:
    """The iterations, from x^0 until a stop; one collective per iteration."""
    d, n, n_local = obj.dim, cfg.clients, obj.n_local

    # One buffer per iteration: message sum, gradient sum, loss sum,
    # clipped clients, bits, failed ranks.
    buf = np.zeros(2 * d + 4)
    msg_sum, grad_sum = buf[:d], buf[d : 2 * d]
    LOSS, ACTIVE, BITS, FAILED = 2 * d, 2 * d + 1, 2 * d + 2, 2 * d + 3
    state = method.init_state(n_local, d)
    bits_sent = 0.0
    status, error, k = "running", None, 0
    gns = loss = clip_fraction = float("nan")

    for k in range(cfg.iters + 1):
        evaluate = k % cfg.eval_every == 0 or k == cfg.iters
        first = k == 0
        buf[:] = 0.0
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                if evaluate:
                    values, grads = obj.values_and_grads(x)
                    buf[LOSS] = values.sum()
                else:
                    grads = obj.grads(x)
                messages, active = method.client_round(grads, state, first)
                np.sum(messages, axis=0, out=msg_sum)
                np.sum(grads, axis=0, out=grad_sum)
            buf[ACTIVE] = np.count_nonzero(active)
            buf[BITS] = n_local * method.bits_per_message(d, first)
        except Exception as err:  # noqa: BLE001 - every rank learns of it below
            buf[:] = 0.0
            buf[FAILED] = 1.0
            error = err

        world.sum_in_place(buf)

        if buf[FAILED] > 0:
            status = "failed"
            break
        with np.errstate(over="ignore", invalid="ignore"):
            grad_mean = grad_sum / n
            gns = float(grad_mean @ grad_mean)
        clip_fraction = buf[ACTIVE] / n
        if not np.isfinite(buf[: LOSS + 1]).all() or not np.isfinite(gns):
            status = "diverged"
        elif gns <= cfg.tol:
            status = "converged"
        elif k == cfg.iters:
            status = "max_iters"
        loss = buf[LOSS] / n
        if not evaluate:
            # The last row always has its loss: one more sum, once per run.
            loss = _loss_at(obj, x, world, n) if status != "running" else np.nan
        now = time.perf_counter()
        metrics.add(
            k,
            now,
            grad_norm_sq=gns,
            loss=loss,
            clip_fraction=clip_fraction,
            bits_sent=bits_sent,
            wall_time=now - t0,
        )
        if progress is not None:
            progress(k, gns)
        if status != "running":
            break

        method.server_round(state, msg_sum / n)
        x = x - gamma * state.g
        bits_sent += buf[BITS] / n

    return _Outcome(status, k, x, error, gns, loss, clip_fraction, bits_sent)


def run(setup: LocalSetup, world: World, progress=None, command: str = "") -> RunResult:
    """Run the configured method on every rank and log it on rank 0.

    Args:
        setup: this rank's clients, from ``prepare``.
        world: the ranks of the run.
        progress: called on rank 0 as ``progress(k, grad_norm_sq)`` after each
            iteration, or None.
        command: the command line, stored in the log.

    Returns:
        The RunResult, the same on every rank.

    Raises:
        RunFailed: if any rank raised during the iterations; every rank
            raises it, with the message of the lowest failing rank.
    """
    cfg = setup.config
    obj = setup.objectives
    d, n = setup.dim, cfg.clients
    spec = METHODS[cfg.method]
    method = Method(spec, tau=cfg.tau, k=cfg.k)

    # Setup collectives: constants, step size, where the log goes.
    L, L_clients = _smoothness(setup, world)
    L_tilde = float(np.sqrt(np.mean(L_clients**2)))
    if cfg.step_size == "auto":
        gamma = auto_step_size(cfg.method, L, L_tilde, cfg.k, d)
    else:
        gamma = float(cfg.step_size)
    path = cfg.out
    if path is None:
        path = world.broadcast(
            default_log_path(cfg, setup.dataset_name) if world.is_root else None
        )
    cfg = cfg.replace(out=path)
    x = _initial_point(cfg, d)
    log = None
    if world.is_root:
        header = _header(setup, cfg, world, L, L_clients, gamma, command)
        log = RunLog.create(path, header, x, overwrite=cfg.overwrite)
        logger.info(
            "%s on %s (%s), %d clients on %d ranks, d=%d, L=%.4g, step size %.4g, log %s",
            cfg.method,
            setup.dataset_name,
            cfg.problem,
            n,
            world.size,
            d,
            L,
            gamma,
            path,
        )
        logger.debug("configuration: %s", json.dumps(cfg.to_dict()))
    metrics = _MetricBuffer(log)

    t0 = time.perf_counter()
    try:
        out = _iterate(cfg, obj, method, world, gamma, x, metrics, progress, t0)
    except BaseException as err:
        # Interrupted (e.g. Ctrl-C): keep what was flushed and say so.
        if log is not None:
            metrics.flush()
            log.close("failed", None, {"message": f"interrupted: {err!r}"})
        raise
    status, k, x, error = out.status, out.k, out.x, out.error
    gns, loss = out.grad_norm_sq, out.loss

    wall_time = time.perf_counter() - t0
    message = ""
    if status == "failed":
        texts = world.gather_to_all(
            None if error is None else f"{type(error).__name__}: {error}"
        )
        failing = [r for r, t in enumerate(texts) if t is not None]
        message = f"rank {failing[0]} failed at iteration {k}: {texts[failing[0]]}"
    if log is not None:
        metrics.flush()
        log.close(
            status,
            x,
            {"iterations": k, "wall_time_total": wall_time, "message": message},
        )
        logger.debug(
            "%s after %d iterations: ||grad f||^2 = %.3e, %.2f s, log %s",
            status,
            k,
            gns,
            wall_time,
            path,
        )
    if status == "failed":
        raise RunFailed(message) from error
    return RunResult(
        status,
        k,
        x,
        gns,
        loss,
        gamma,
        path,
        wall_time,
        out.clip_fraction,
        out.bits_sent,
        L,
    )
