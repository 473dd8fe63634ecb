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
from dataclasses import dataclass

import numpy as np

from clip21mpi import __version__
from clip21mpi.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    mismatched_keys,
    save_checkpoint,
)
from clip21mpi.comm import World, mpi_versions
from clip21mpi.config import ConfigError, RunConfig
from clip21mpi.methods import METHODS, Method, auto_step_size
from clip21mpi.privacy import GaussianPrivacy, calibrate_noise_sigma
from clip21mpi.runlog import METRICS, RunLog, h5py_version
from clip21mpi.streams import stream
from problems.data import DataError, class_indices, load_dataset, map_labels
from problems.design import ClientDesign
from problems.losses import LOSSES, make_regulariser
from problems.objective import ClientObjectives
from problems.sharded import ShardedDataset, is_converted
from problems.split import client_offsets, rank_clients, row_order

__all__ = ["EXIT_CODES", "LocalSetup", "RunFailed", "RunResult", "prepare", "run"]

logger = logging.getLogger(__name__)

# Exit codes of a run, by final status.
EXIT_CODES = {
    "converged": 0,
    "max_iters": 0,
    "failed": 1,
    "diverged": 3,
    "checkpointed": 75,  # stopped on request with a checkpoint: resume it
}

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
    objectives: object  # ClientObjectives or MLPObjectives
    dataset_name: str
    n_rows: int
    dim: int
    resume: Checkpoint | None = None


@dataclass
class RunResult:
    """The outcome of a run, identical on every rank."""

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
    smoothness: float = float("nan")
    noise_sigma: float = 0.0
    epsilon: float | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def _build_objectives(cfg, dataset, rows, local_offsets):
    """Return the objectives of the local clients, rows ``rows``."""
    reg = make_regulariser(cfg.reg, cfg.lam)
    if isinstance(dataset, ShardedDataset):
        A = dataset.read_rows(rows)  # only this rank's rows leave the disk
    else:
        A = dataset.features[rows]
    design = ClientDesign(A, local_offsets)
    if cfg.problem == "mlp":
        from problems.mlp import MLPObjectives

        classes, n_classes = class_indices(dataset.labels, dataset.source)
        return MLPObjectives(design, classes[rows], n_classes, cfg.hidden, reg)
    loss = LOSSES[cfg.problem]
    labels = map_labels(dataset.labels, loss.labels, dataset.source)
    return ClientObjectives(loss, reg, design, labels[rows])


def prepare(config: RunConfig, rank: int, size: int) -> LocalSetup:
    """Validate ``config`` and build this rank's clients; no MPI call.

    Raises:
        ConfigError: a bad option, naming it.
    """
    cfg = config.validate(size)
    spec = METHODS[cfg.method]
    try:
        if is_converted(cfg.data):
            dataset = ShardedDataset.open(cfg.data)
        else:
            dataset = load_dataset(cfg.data, cfg.seed, cfg.clients)
        if cfg.clients > dataset.n_rows:
            raise ConfigError(
                "--clients",
                f"--clients {cfg.clients} exceeds the {dataset.n_rows} rows of "
                f"{dataset.source}; every client needs a row",
            )
        mine = rank_clients(cfg.clients, size, rank)
        order = row_order(cfg.split, dataset.labels, cfg.seed)
        offsets = client_offsets(dataset.n_rows, cfg.clients)
        rows = order[offsets[mine.start] : offsets[mine.stop]]
        local_offsets = offsets[mine.start : mine.stop + 1] - offsets[mine.start]
        objectives = _build_objectives(cfg, dataset, rows, local_offsets)
    except DataError as err:
        raise ConfigError("--data", f"--data: {err}") from err

    fewest = int(np.diff(offsets).min())
    if cfg.batch_size is not None and cfg.batch_size > fewest:
        raise ConfigError(
            "--batch-size",
            f"--batch-size {cfg.batch_size} exceeds the {fewest} rows of the "
            f"smallest client; pass at most {fewest} or fewer --clients",
        )
    if "topk" in spec.operator and cfg.k > objectives.dim:
        raise ConfigError(
            "--k",
            f"--k {cfg.k} exceeds the {objectives.dim} coordinates of the "
            f"{cfg.problem} model on {dataset.source}; pass 1 <= k <= "
            f"{objectives.dim}",
        )
    return LocalSetup(
        cfg,
        rank,
        size,
        mine,
        objectives,
        dataset.name,
        dataset.n_rows,
        objectives.dim,
        _checkpoint_to_resume(cfg),
    )


def _checkpoint_to_resume(cfg: RunConfig) -> Checkpoint | None:
    """Return the checkpoint next to ``--out`` that this run continues, if any.

    Raises:
        ConfigError: for ``--resume`` without a checkpoint, a corrupt one, or
            one of another configuration.
    """
    if cfg.out is None or cfg.overwrite:
        return None
    path = checkpoint_path(cfg.out)
    if not os.path.exists(path):
        if cfg.resume:
            raise ConfigError(
                "--resume", f"--resume: there is no checkpoint {path!r} to resume"
            )
        return None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError("--resume", str(err)) from err
    differ = mismatched_keys(ckpt.config, cfg.to_dict())
    if differ:
        shown = ", ".join(
            f"{k} {ckpt.config.get(k)!r} -> {getattr(cfg, k, None)!r}" for k in differ
        )
        raise ConfigError(
            "--resume",
            f"the checkpoint {path!r} belongs to another configuration ({shown}); "
            "pass the same options to resume it, or --overwrite to start afresh",
        )
    if ckpt.next_iteration > cfg.iters:
        raise ConfigError(
            "--resume",
            f"the checkpoint {path!r} is at iteration {ckpt.next_iteration}, past "
            f"--iters {cfg.iters}",
        )
    return ckpt


def default_log_path(cfg: RunConfig, dataset_name: str, folder: str = "runs") -> str:
    """Return ``runs/<method>-<problem>-<data>-<time>.h5``, never an existing file."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(folder, f"{cfg.method}-{cfg.problem}-{dataset_name}-{stamp}")
    path, n = base + ".h5", 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}.h5"
    return path


def initial_point(cfg: RunConfig, obj) -> np.ndarray:
    rng = stream(cfg.seed, "x0")
    if cfg.x0 == "normal":
        return rng.standard_normal(obj.dim)
    if cfg.x0 == "auto" and hasattr(obj, "init_params"):
        return obj.init_params(rng)
    return np.zeros(obj.dim)


def _smoothness(setup: LocalSetup, world: World) -> tuple[float, np.ndarray]:
    """Return L of f and every client's L_i (setup-time collectives).

    NaN where the problem has no smoothness constant (the MLP).
    """
    obj = setup.objectives
    L_local = obj.smoothness()
    if L_local is None:
        return float("nan"), np.full(setup.config.clients, np.nan)
    L_clients = np.concatenate(world.gather_to_all(L_local))
    gram = obj.gram_sum()
    if gram is None:
        # No Gram matrix for large d: lambda_max of a mean is at most the mean.
        return float(L_clients.mean()), L_clients
    world.sum_in_place(gram)
    return obj.smoothness_of_mean(gram / setup.config.clients), L_clients


def _privacy(cfg: RunConfig, method_bound: float, world: World):
    """Return the run's GaussianPrivacy (None without noise); sigma from
    ``--noise-sigma`` or calibrated to ``--epsilon`` on the root rank."""
    if not cfg.noisy:
        return None
    sigma = cfg.noise_sigma
    if cfg.epsilon is not None:
        sigma = world.broadcast(
            calibrate_noise_sigma(
                cfg.epsilon, cfg.delta, cfg.iters, method_bound, cfg.neighbouring
            )
            if world.is_root
            else None
        )
    return GaussianPrivacy(sigma, method_bound, cfg.delta, cfg.neighbouring)


def _header(setup, cfg, world, L, L_clients, step_size, privacy, command) -> dict:
    versions = {
        "clip21mpi": __version__,
        "numpy": np.__version__,
        "h5py": h5py_version(),
        "python": sys.version.split()[0],
        **mpi_versions(),
    }
    header = {
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
            "Top-k adds 32 bits per index; noisy messages are dense"
        ),
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if privacy is not None:
        header.update(
            noise_sigma=privacy.noise_sigma,
            noise_multiplier=privacy.noise_multiplier,
            delta=privacy.delta,
            neighbouring=privacy.relation,
            sensitivity=privacy.sensitivity,
            privacy_unit="client: one client's whole dataset",
            accountant=(
                "PLD for the attribute epsilon (exact Gaussian composition "
                "beyond epsilon 20: see epsilon_accountant), RDP for metrics/epsilon"
            ),
        )
    return header


class _MetricBuffer:
    """Rows of metrics kept on the root rank between flushes."""

    def __init__(self, log: RunLog | None):
        self.log = log
        names = log.metrics if log is not None else ()
        self.iteration = np.empty(FLUSH_ROWS, dtype=np.int64)
        self.columns = {m: np.empty(FLUSH_ROWS) for m in names}
        self.n = 0
        self.last_flush = time.perf_counter()

    def add(self, k, now, **values):
        if self.log is None:
            return
        i = self.n
        self.iteration[i] = k
        for name, column in self.columns.items():
            column[i] = values[name]
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


def _rng_states(rngs) -> list:
    return [rng.bit_generator.state for rng in rngs]


class _Checkpointer:
    """Writes checkpoints of the whole run (a collective: every rank calls it)."""

    def __init__(self, path, cfg, clients, world, metrics):
        self.path, self.cfg, self.clients = path, cfg, clients
        self.world, self.metrics = world, metrics

    def __call__(self, next_k, x, state, bits_sent, wall_time) -> None:
        local = (
            state.g_local,
            state.v_local,
            _rng_states(state.batch_rngs),
            _rng_states(state.noise_rngs),
        )
        parts = self.world.gather_to_root(local)
        if parts is None:
            return
        g_local, v_local, batch, noise = zip(*parts)
        self.metrics.flush()  # the log holds rows 0..next_k - 1
        save_checkpoint(
            self.path,
            Checkpoint(
                next_iteration=next_k,
                x=x,
                g=state.g,
                g_local=np.concatenate(g_local),
                v_local=None if v_local[0] is None else np.concatenate(v_local),
                rng_batch=[s for part in batch for s in part],
                rng_noise=[s for part in noise for s in part],
                bits_sent=bits_sent,
                wall_time=wall_time,
                config=self.cfg.to_dict(),
            ),
        )
        logger.info("checkpoint at iteration %d: %s", next_k, self.path)


def _restore(state, ckpt: Checkpoint, clients: range) -> None:
    """Put this rank's clients' part of ``ckpt`` into ``state``."""
    state.g[:] = ckpt.g
    state.g_local[:] = ckpt.g_local[clients.start : clients.stop]
    if state.v_local is not None:
        state.v_local[:] = ckpt.v_local[clients.start : clients.stop]
    for rngs, saved in (
        (state.batch_rngs, ckpt.rng_batch),
        (state.noise_rngs, ckpt.rng_noise),
    ):
        for rng, client in zip(rngs, clients):
            rng.bit_generator.state = saved[client]


def _iterate(
    cfg,
    obj,
    method,
    state,
    world,
    gamma,
    x,
    metrics,
    progress,
    epsilons,
    t0,
    start=0,
    bits_sent=0.0,
    checkpoint=None,
    stop=None,
) -> _Outcome:
    """The iterations, from x^start until a stop; one collective per iteration."""
    d, n, n_local = obj.dim, cfg.clients, obj.n_local
    stochastic = method.estimator.stochastic

    # One buffer per iteration: received-message sum, gradient sum, loss sum,
    # clients whose operator was active, bits, failed ranks, stop requests.
    buf = np.zeros(2 * d + 5)
    msg_sum, grad_sum = buf[:d], buf[d : 2 * d]
    LOSS, ACTIVE, BITS, FAILED, STOP = range(2 * d, 2 * d + 5)
    status, error, k = "running", None, start
    gns = loss = clip_fraction = float("nan")

    for k in range(start, cfg.iters + 1):
        evaluate = k % cfg.eval_every == 0 or k == cfg.iters
        first = k == 0
        buf[:] = 0.0
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                est = method.estimator.estimate(obj, x, state, evaluate)
                messages, active = method.messages(est.V, state, first)
                np.sum(messages, axis=0, out=msg_sum)
                noise = method.noise(state, d)
                if noise is not None:
                    msg_sum += noise.sum(axis=0)
                grads, values = est.grads, est.values
                if evaluate and grads is None:
                    values, grads = obj.values_and_grads(x)
                if grads is not None:
                    np.sum(grads, axis=0, out=grad_sum)
                if evaluate:
                    buf[LOSS] = values.sum()
            buf[ACTIVE] = np.count_nonzero(active)
            buf[BITS] = n_local * method.bits_per_message(d, first)
        except Exception as err:  # noqa: BLE001 - every rank learns of it below
            buf[:] = 0.0
            buf[FAILED] = 1.0
            error = err
        if stop is not None and stop.is_set():
            buf[STOP] = 1.0

        world.sum_in_place(buf)

        if buf[FAILED] > 0:
            status = "failed"
            break
        # Full gradients at x^k exist on evaluated rows, and on every row of
        # full-gradient methods; the stop decisions use only those.
        has_grad = evaluate or not stochastic
        with np.errstate(over="ignore", invalid="ignore"):
            grad_mean = grad_sum / n
            gns = float(grad_mean @ grad_mean) if has_grad else float("nan")
        clip_fraction = buf[ACTIVE] / n
        if not np.isfinite(buf[: LOSS + 1]).all() or (
            has_grad and not np.isfinite(gns)
        ):
            status = "diverged"
        elif has_grad and gns <= cfg.tol:
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
            epsilon=epsilons[k] if epsilons is not None else np.nan,
        )
        if progress is not None:
            progress(k, gns)
        if status != "running":
            break

        method.server_round(state, msg_sum / n)
        x = x - gamma * state.g
        bits_sent += buf[BITS] / n

        # Checkpoints end a round: the next run starts at round k + 1.
        stopping = buf[STOP] > 0
        every = cfg.checkpoint_every
        if checkpoint is not None and (stopping or (every and (k + 1) % every == 0)):
            checkpoint(k + 1, x, state, bits_sent, time.perf_counter() - t0)
        if stopping:
            status, k = "checkpointed", k + 1
            break

    return _Outcome(status, k, x, error, gns, loss, clip_fraction, bits_sent)


def run(
    setup: LocalSetup, world: World, progress=None, command: str = "", stop=None
) -> RunResult:
    """Run the configured method on every rank and log it on rank 0.

    Args:
        setup: this rank's clients, from ``prepare``; with ``setup.resume``
            the run continues from that checkpoint.
        world: the ranks of the run.
        progress: called on rank 0 as ``progress(k, grad_norm_sq)`` after each
            iteration, or None.
        command: the command line, stored in the log.
        stop: an object with ``is_set()`` (e.g. a ``threading.Event`` set by
            a signal handler); once it is set on any rank, every rank ends
            the same round, writes a checkpoint and returns with status
            ``checkpointed``.

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

    # Setup collectives: constants, step sizes, noise, where the log goes.
    L, L_clients = _smoothness(setup, world)
    L_tilde = float(np.sqrt(np.mean(L_clients**2)))
    if spec.estimator == "local-steps":
        gamma = cfg.server_step_size
    elif cfg.step_size == "auto":
        gamma = auto_step_size(cfg.method, L, L_tilde, cfg.k, d)
    else:
        gamma = float(cfg.step_size)
    local_step = 1.0 / L if cfg.local_step_size == "auto" else cfg.local_step_size
    options = {
        "tau": cfg.tau,
        "k": cfg.k,
        "alpha": cfg.alpha,
        "batch_size": cfg.batch_size,
        "beta": cfg.beta,
        "beta_hat": cfg.beta_hat,
        "local_steps": cfg.local_steps,
        "local_step_size": local_step,
    }
    method = Method(spec, **options)
    privacy = _privacy(cfg, method.norm_bound, world)
    sigma = 0.0 if privacy is None else privacy.noise_sigma
    method.noise_sigma = sigma  # calibrated to the method's norm bound
    path = cfg.out
    if path is None:
        path = world.broadcast(
            default_log_path(cfg, setup.dataset_name) if world.is_root else None
        )
    cfg = cfg.replace(out=path)
    x = initial_point(cfg, obj)
    state = method.init_state(setup.clients, d, cfg.seed)
    ckpt, start, bits_sent, elapsed = setup.resume, 0, 0.0, 0.0
    if ckpt is not None:
        _restore(state, ckpt, setup.clients)
        x = ckpt.x.copy()
        start, bits_sent, elapsed = ckpt.next_iteration, ckpt.bits_sent, ckpt.wall_time
    ckpt_path = checkpoint_path(path)

    log = epsilons = None
    if world.is_root:
        if ckpt is not None:
            log = RunLog.reopen(path, start)
            log.set_attrs({"resumed_at": start, "command_resumed": command})
        else:
            header = _header(setup, cfg, world, L, L_clients, gamma, privacy, command)
            names = METRICS + (("epsilon",) if privacy is not None else ())
            log = RunLog.create(path, header, x, cfg.overwrite, names)
            if os.path.exists(ckpt_path):  # a stale one, under --overwrite
                os.remove(ckpt_path)
        if privacy is not None:
            epsilons = privacy.epsilon_column(cfg.iters)
        logger.info(
            "%s on %s (%s), %d clients on %d ranks, d=%d, L=%.4g, step size %.4g%s, "
            "log %s",
            cfg.method,
            setup.dataset_name,
            cfg.problem,
            n,
            world.size,
            d,
            L,
            gamma,
            "" if privacy is None else f", noise sigma {sigma:.4g}",
            path,
        )
        logger.debug("configuration: %s", json.dumps(cfg.to_dict()))
    metrics = _MetricBuffer(log)

    if ckpt is not None:
        logger.info("resuming %s at iteration %d", path, start)
    t0 = time.perf_counter() - elapsed
    checkpointer = _Checkpointer(ckpt_path, cfg, setup.clients, world, metrics)
    try:
        out = _iterate(
            cfg,
            obj,
            method,
            state,
            world,
            gamma,
            x,
            metrics,
            progress,
            epsilons,
            t0,
            start,
            bits_sent,
            checkpointer,
            stop,
        )
    except BaseException as err:
        # Interrupted (e.g. Ctrl-C): keep what was flushed and say so.
        if log is not None:
            metrics.flush()
            log.close("failed", None, {"message": f"interrupted: {err!r}"})
        raise
    status, k, x = out.status, out.k, out.x
    wall_time = time.perf_counter() - t0

    message = ""
    if status == "failed":
        error = out.error
        texts = world.gather_to_all(
            None if error is None else f"{type(error).__name__}: {error}"
        )
        failing = [r for r, t in enumerate(texts) if t is not None]
        message = f"rank {failing[0]} failed at iteration {k}: {texts[failing[0]]}"
    # x^k has seen the messages of rounds 0..k-1.
    epsilon = accountant = None
    if privacy is not None:
        epsilon, accountant = world.broadcast(
            privacy.report(k) if world.is_root else None
        )
    if log is not None:
        metrics.flush()
        final = {"iterations": k, "wall_time_total": wall_time, "message": message}
        if epsilon is not None:
            final.update(epsilon=epsilon, epsilon_accountant=accountant)
        log.close(status, x, final)
        if status != "checkpointed" and os.path.exists(ckpt_path):
            os.remove(ckpt_path)  # finished: nothing to resume
        logger.debug(
            "%s after %d iterations: ||grad f||^2 = %.3e, %.2f s, log %s",
            status,
            k,
            out.grad_norm_sq,
            wall_time,
            path,
        )
    if status == "failed":
        raise RunFailed(message) from out.error
    return RunResult(
        status,
        k,
        x,
        out.grad_norm_sq,
        out.loss,
        gamma,
        path,
        wall_time,
        out.clip_fraction,
        out.bits_sent,
        L,
        sigma,
        epsilon,
    )
