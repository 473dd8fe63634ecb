"""The ``clip21mpi`` command: parse, validate, and call the library."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
import tomllib

import click

from cli.analysis import info, plot, report
from cli.data import data
from cli.reproduce import reproduce
from cli.sweep import sweep
from clip21mpi import __version__
from clip21mpi.config import ConfigError, RunConfig, suggest

DEFAULTS = RunConfig()


class StepSize(click.ParamType):
    """A positive number, or ``auto``."""

    name = "step_size"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if str(value).strip().lower() == "auto":
            return "auto"
        try:
            return float(value)
        except ValueError:
            self.fail(
                f"{value!r} is neither a number nor 'auto'; pass e.g. --step-size 0.5 "
                "or --step-size auto",
                param,
                ctx,
            )


def world_rank() -> int:
    """This process's rank, without starting MPI when it is not yet started."""
    if "mpi4py.MPI" in sys.modules:
        return sys.modules["mpi4py.MPI"].COMM_WORLD.Get_rank()
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _load_config_file(ctx, param, value):
    """Read a TOML file into the command's defaults (the command line wins)."""
    if value is None:
        return None
    try:
        with open(value, "rb") as fh:
            table = tomllib.load(fh)
    except OSError as err:
        raise click.BadParameter(f"cannot read {value!r}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise click.BadParameter(f"{value!r} is not valid TOML: {err}") from err
    table = table.get("run", table)
    names = {p.name for p in ctx.command.params if p.name not in ("config",)}
    defaults = {}
    for key, item in table.items():
        name = key.replace("-", "_")
        if name not in names:
            raise click.BadParameter(
                f"unknown key {key!r} in {value!r}{suggest(name, names)} "
                f"(valid: {', '.join(sorted(names))})"
            )
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def setup_logging(rank: int, verbose: int, quiet: bool) -> None:
    if rank == 0:
        level = (
            logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
        )
    else:
        level = logging.DEBUG if verbose > 1 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


_LAUNCHERS = ("mpiexec", "mpirun", "hydra", "orterun", "prterun", "prted", "srun")


def _reaches_terminal(stream) -> bool:
    """Whether ``stream`` ends on a terminal, also through an MPI launcher.

    Under ``mpiexec`` a rank writes into a pipe that the launcher copies to
    its own stderr; the bar is shown when that is a terminal (Linux only).
    """
    if stream.isatty():
        return True
    pid = os.getppid()
    for _ in range(3):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            target = os.readlink(f"/proc/{pid}/fd/2")
        except OSError:
            return False
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name.startswith(_LAUNCHERS) and target.startswith(("/dev/pts/", "/dev/tty")):
            return True
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
    return False


def check_slurm_world(world_size: int) -> None:
    """Refuse the one-rank copies that ``srun`` without a PMI plugin starts.

    Raises:
        click.UsageError: if Slurm started several tasks but MPI sees one.
    """
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
    if "SLURM_PROCID" not in os.environ or not tasks or not tasks.isdigit():
        return
    if world_size == 1 and int(tasks) > 1:
        raise click.UsageError(
            f"Slurm started {tasks} tasks (SLURM_NTASKS) but MPI sees a world of 1 "
            "rank: launch with srun --mpi=pmi2 (MPICH family) or --mpi=pmix (Open "
            "MPI), or with mpiexec -n $SLURM_NTASKS"
        )


def stop_on_signals():
    """Return an Event that SIGTERM and SIGUSR1 set (Slurm's warnings before a
    time limit or a preemption); the run then checkpoints and stops."""
    import signal
    import threading

    event = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: event.set())
        for sig in (signal.SIGTERM, signal.SIGUSR1)
    }

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(restore)  # the handlers last as long as the command
    return event


class Progress:
    """Progress on rank 0: a bar on a terminal, a log line every ``every`` s otherwise.

    The bar goes to stdout, ahead of the summary in the same stream, so the
    two never interleave under an MPI launcher.
    """

    def __init__(self, total: int, stream=None, every: float = 10.0):
        self.total = max(total, 1)
        self.stream = stream or sys.stdout
        self.tty = _reaches_terminal(self.stream)
        self.every = 0.1 if self.tty else every
        self.last = time.perf_counter()
        self.shown = None
        self.log = logging.getLogger("clip21mpi.progress")

    def __call__(self, k: int, grad_norm_sq: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.every:
            self.shown = None if self.shown is None else (k, grad_norm_sq)
            return
        self.last = now
        share = min(k / self.total, 1.0)
        if self.tty:
            self.shown = (k, grad_norm_sq)
            self._draw(k, grad_norm_sq)
        else:
            self.log.info(
                "iteration %d/%d (%.0f%%): ||grad f||^2 = %.3e",
                k,
                self.total,
                100 * share,
                grad_norm_sq,
            )

    def _draw(self, k: int, grad_norm_sq: float) -> None:
        bar = "#" * int(30 * min(k / self.total, 1.0))
        self.stream.write(
            f"\r[{bar:<30}] {k}/{self.total}  ||grad f||^2 = {grad_norm_sq:.3e}"
        )
        self.stream.flush()

    def close(self) -> None:
        """End the bar on the last iteration it was told of."""
        if self.shown is not None:
            self._draw(*self.shown)
            self.stream.write("\n")
            self.stream.flush()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clip21mpi")
def cli():
    """Clipped, error-compensated distributed optimisation over MPI.

    Start it under MPI, e.g. ``mpiexec -n 4 clip21mpi run``.
    """


# The run options: (option, type, help). Defaults come from RunConfig; a
# type of None is text, "flag" a switch.
RUN_OPTIONS = (
    (
        "--problem",
        None,
        (
            "logreg (logistic), nls (nonlinear least squares) or mlp "
            "(a one-hidden-layer network with softmax cross-entropy)."
        ),
    ),
    (
        "--reg",
        None,
        (
            "Regulariser: none, l2 (lam/2 ||x||^2), nonconvex "
            "(lam sum x^2/(1+x^2)) or auto (nonconvex; none for mlp)."
        ),
    ),
    ("--lam", float, "Regulariser weight."),
    (
        "--data",
        None,
        (
            "LibSVM file (.gz, .bz2 too), converted .h5 file, bundled "
            "name (breast_cancer, digits), or synthetic[:rows=N,features=D,"
            "heterogeneity=H]."
        ),
    ),
    ("--clients", int, "Number of clients (default: the number of ranks)."),
    ("--split", None, "Rows to clients: contiguous, shuffled or by-label."),
    (
        "--method",
        None,
        (
            "gd, clip-gd, clip-sgd, clip21, clip21-sgd, press-clip21, "
            "ef21, clip21-sgd2m, normec or clip-fedavg (see the README)."
        ),
    ),
    ("--tau", float, "Clip threshold (bounds each message's norm)."),
    ("--k", int, "Top-k coordinates per message (ef21, press-clip21)."),
    ("--step-size", StepSize(), "Step size gamma, or auto (see the README)."),
    ("--iters", int, "Maximum number of iterations."),
    ("--tol", float, "Stop when ||grad f||^2 <= tol (0: only at an exact zero)."),
    ("--eval-every", int, "Evaluate the loss every this many iterations."),
    ("--seed", int, "Seed of every random stream."),
    (
        "--x0",
        None,
        (
            "Starting point: zeros, normal (N(0, I), seeded), or auto "
            "(zeros; Glorot-uniform weights for mlp)."
        ),
    ),
    (
        "--out",
        click.Path(dir_okay=False),
        "HDF5 log (default: runs/<method>-<problem>-<data>-<time>.h5).",
    ),
    ("--overwrite", "flag", "Replace an existing --out."),
    (
        "--batch-size",
        int,
        "Rows per client and step: stochastic gradients (default: all rows).",
    ),
    (
        "--noise-sigma",
        float,
        ("Std of the Gaussian noise each client adds to its message."),
    ),
    (
        "--epsilon",
        float,
        ("Privacy target for the whole run: calibrates --noise-sigma."),
    ),
    ("--delta", float, "The delta of (epsilon, delta)-DP."),
    (
        "--neighbouring",
        None,
        (
            "Neighbouring relation of clients: add-remove "
            "(sensitivity = bound) or replace (2 x bound)."
        ),
    ),
    ("--alpha", float, "normec: the shift in v / (alpha + ||v||)."),
    (
        "--beta",
        float,
        (
            "clip21-sgd2m: momentum weight (default 0.1); normec: "
            "feedback weight (default 1)."
        ),
    ),
    ("--beta-hat", float, "clip21-sgd2m: feedback weight (default: --beta)."),
    ("--local-steps", int, "clip-fedavg: local steps per round."),
    ("--local-step-size", StepSize(), "clip-fedavg: local step size, or auto (1/L)."),
    ("--server-step-size", float, "clip-fedavg: server step size."),
    ("--hidden", int, "mlp: hidden units."),
    (
        "--checkpoint-every",
        int,
        (
            "Write a checkpoint next to --out every N "
            "iterations (0: only on SIGTERM or SIGUSR1)."
        ),
    ),
    (
        "--resume",
        "flag",
        (
            "Continue from the checkpoint next to --out (also done "
            "without this flag when one exists and matches)."
        ),
    ),
)


def run_options(command):
    """Add ``--config`` and every option of RUN_OPTIONS to ``command``."""
    for option, kind, text in reversed(RUN_OPTIONS):
        default = getattr(DEFAULTS, option[2:].replace("-", "_"))
        if kind == "flag":
            command = click.option(option, is_flag=True, help=text)(command)
        else:
            command = click.option(
                option,
                type=kind,
                default=default,
                help=text,
                show_default=default is not None,
            )(command)
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        callback=_load_config_file,
        is_eager=True,
        expose_value=False,
        help="TOML file of options (keys as the option names); the command line wins.",
    )(command)


@cli.command()
@run_options
@click.option("-v", "--verbose", count=True, help="More output (-vv: every rank).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def run(verbose, quiet, **options):
    """Run one method on one problem and write its HDF5 log."""
    from clip21mpi.comm import World, install_abort_on_error
    from clip21mpi.runner import RunFailed, prepare
    from clip21mpi.runner import run as run_method

    world = World()
    setup_logging(world.rank, verbose, quiet)
    install_abort_on_error(world)
    check_slurm_world(world.size)
    try:
        setup = prepare(RunConfig(**options), world.rank, world.size)
    except ConfigError as err:
        raise click.UsageError(err.message) from err
    stop = stop_on_signals()

    progress = None
    if world.is_root and not quiet:
        progress = Progress(setup.config.iters)
    try:
        argv = click.get_current_context().find_root().obj or {}
        command = shlex.join(argv.get("argv") or sys.argv)
        result = run_method(setup, world, progress, command, stop)
    except RunFailed as err:
        if world.is_root:
            click.echo(f"Error: {err}", err=True)
        sys.exit(1)
    finally:
        if progress is not None:
            progress.close()
    if world.is_root:
        click.echo(
            f"{result.status}: {setup.config.method} after {result.iterations} "
            f"iterations, ||grad f||^2 = {result.grad_norm_sq:.6e}, "
            f"f = {result.loss:.6g}, {result.wall_time:.2f} s\nlog: {result.path}"
        )
        if result.status == "checkpointed":
            click.echo(
                f"checkpoint: {result.path}.ckpt; the same command resumes the run"
            )
    sys.exit(result.exit_code)


@cli.command()
@click.argument("name", required=False)
def methods(name):
    """List the methods, or show NAME's update rule, notation and paper."""
    from clip21mpi.methods import METHODS

    if name is None:
        width = max(map(len, METHODS))
        for spec in METHODS.values():
            click.echo(f"{spec.name:<{width}}  {spec.summary}")
        return
    if name not in METHODS:
        raise click.BadParameter(
            f"{name!r} is not one of {', '.join(METHODS)}{suggest(name, METHODS)}",
            param_hint="NAME",
        )
    spec = METHODS[name]
    click.echo(f"{spec.name}: {spec.paper}\n\n{spec.notation}\n\nsends: {spec.sends}")


# Further commands: each module defines its own, and is registered here.
cli.add_command(info)
cli.add_command(plot)
cli.add_command(report)
cli.add_command(sweep)
cli.add_command(reproduce)
cli.add_command(data)


def main(argv=None) -> None:
    """Entry point: click errors are shown once (by rank 0), with exit code 2."""
    try:
        rv = cli.main(
            args=argv,
            prog_name="clip21mpi",
            standalone_mode=False,
            obj={"argv": None if argv is None else ["clip21mpi", *argv]},
        )
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except click.ClickException as err:
        if world_rank() == 0:
            err.show()
        sys.exit(err.exit_code)
    except click.Abort:
        if world_rank() == 0:
            click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
