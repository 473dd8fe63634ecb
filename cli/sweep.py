"""The ``clip21mpi sweep`` command: run a grid of runs, one after another."""

from __future__ import annotations

import collections
import logging
import os
import shlex
import sys

import click

from clip21mpi.config import ConfigError
from clip21mpi.sweep import (
    SweepError,
    count,
    expand,
    format_listing,
    load_grid_file,
    parse_command_line,
    validate_cells,
)

logger = logging.getLogger(__name__)

# Statuses in the order the final count lists them (any other one comes last).
_COUNTED = ("converged", "max_iters", "diverged", "failed", "checkpointed", "skipped")
# The statuses of runs that ended well; a sweep of only those exits with 0.
_SUCCESS = ("converged", "max_iters")
_STATUS_WIDTH = len("checkpointed")  # the longest status


@click.command()
@click.option(
    "--grid-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML file: a [base] table of fixed options and a [grid] table of "
    "lists of values; the command line wins.",
)
@click.option(
    "--set",
    "fixed",
    multiple=True,
    metavar="KEY=VALUE",
    help="A fixed option of every run, e.g. --set iters=500 (repeatable).",
)
@click.option(
    "--grid",
    "varied",
    multiple=True,
    metavar="KEY=V1,V2,...",
    help="A varied option, e.g. --grid tau=0.01,0.1 (repeatable; the last one "
    "given varies fastest; values that hold a comma go in --grid-file).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="Folder of the logs, one per run, named after its varied options.",
)
@click.option(
    "--task-index",
    type=int,
    default=None,
    help="Run only this cell (0-based, as --list numbers them), e.g. "
    "--task-index $SLURM_ARRAY_TASK_ID.",
)
@click.option(
    "--list",
    "list_only",
    is_flag=True,
    help="Print the cells, their files and options, and run nothing.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing logs (else skip).")
@click.option("-v", "--verbose", count=True, help="More output (-vv: every rank).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def sweep(
    grid_file, fixed, varied, out, task_index, list_only, overwrite, verbose, quiet
):
    """Run every cell of a grid of options, each into its own HDF5 log.

    The cells are the product of the --grid values (the last one fastest);
    options a cell's method does not use are dropped, and cells that become
    the same run once. All cells run inside one MPI job, one after another,
    each into --out/<its varied options>.h5, e.g.

    \b
        mpiexec -n 4 clip21mpi sweep --out runs/tau --set iters=500 \\
            --grid method=clip21,clip-gd --grid tau=0.01,0.1,1

    An existing log is skipped unless --overwrite, or resumed if it has a
    checkpoint. SIGTERM or SIGUSR1 checkpoints the current run and ends the
    sweep with exit code 75; the same command then goes on. Otherwise the
    exit code is 0 if every run (or skipped log) ended converged or
    max_iters, 1 if not, and 2 for a usage error.
    """
    from cli.main import (
        check_slurm_world,
        setup_logging,
        stop_on_signals,
        world_rank,
    )

    # The grid, every cell of it, and this task's share.
    try:
        grid = parse_command_line(fixed, varied)
        if grid_file is not None:
            grid = load_grid_file(grid_file).merged_with(grid)
        cells = expand(grid)
    except SweepError as err:
        raise click.UsageError(str(err)) from err
    selected = cells
    if task_index is not None:
        if not 0 <= task_index < len(cells):
            valid = "0" if len(cells) == 1 else f"0 to {len(cells) - 1}"
            raise click.BadParameter(
                f"{task_index} is out of range: the grid has "
                f"{count(len(cells), 'run')}; pass {valid} (see --list)",
                param_hint="'--task-index'",
            )
        selected = [cells[task_index]]

    if list_only:
        # No MPI here (a login node may not allow it): ranks are checked at run time.
        try:
            validate_cells(cells, 1)
        except SweepError as err:
            raise click.UsageError(str(err)) from err
        if world_rank() == 0:
            click.echo(format_listing(grid, cells, selected))
        return

    from clip21mpi.comm import World, install_abort_on_error
    from clip21mpi.runner import EXIT_CODES

    world = World()
    setup_logging(world.rank, verbose, quiet)
    install_abort_on_error(world)
    check_slurm_world(world.size)
    try:
        configs = validate_cells(cells, world.size)
    except SweepError as err:
        raise click.UsageError(str(err)) from err
    stop = stop_on_signals()

    # The runs, in cell order; a signal checkpoints the current one and stops.
    argv = click.get_current_context().find_root().obj or {}
    command = shlex.join(argv.get("argv") or sys.argv)
    counts, finished = collections.Counter(), True
    for number, cell in enumerate(selected, start=1):
        path = os.path.join(out, cell.name)
        logger.info(
            "run %d/%d (cell %d): %s",
            number,
            len(selected),
            cell.index,
            cell.describe(),
        )
        config = configs[cell.index].replace(out=path, overwrite=overwrite)
        status, ok, line = run_cell(config, world, quiet, command, stop)
        counts[status] += 1
        finished = finished and ok
        if world.is_root:
            click.echo(line)
        if status == "checkpointed":
            counts["not started"] = len(selected) - number
            break

    if world.is_root:
        order = [*_COUNTED, *sorted(set(counts) - set(_COUNTED))]
        tally = ", ".join(f"{counts[s]} {s}" for s in order if counts[s])
        click.echo(f"{count(len(selected), 'run')}: {tally}")
    if counts["checkpointed"]:
        sys.exit(EXIT_CODES["checkpointed"])
    sys.exit(0 if finished else 1)


def _line(status: str, text: str) -> str:
    return f"{status:<{_STATUS_WIDTH}}  {text}"


def _existing_status(path: str, world) -> str | None:
    """Return, on every rank, the status of the log to skip at ``path`` as
    rank 0 reads it ("" if it is no run log), or None if there is no log or
    a checkpoint next to it to resume."""
    from clip21mpi.checkpoint import checkpoint_path
    from clip21mpi.runlog import read_log

    status = None
    if (
        world.is_root
        and os.path.exists(path)
        and not os.path.exists(checkpoint_path(path))
    ):
        try:
            status = str(read_log(path)["attrs"].get("status", ""))
        except (OSError, KeyError, ValueError):
            status = ""
    return world.broadcast(status)


def run_cell(config, world, quiet: bool, command: str, stop):
    """Run one cell on every rank.

    Returns:
        Its status, whether it counts as a success, and its summary line.
    """
    from cli.main import Progress
    from clip21mpi.runner import RunFailed, prepare
    from clip21mpi.runner import run as run_method

    # An existing log is kept, unless a checkpoint next to it is resumed.
    path = config.out
    existing = None if config.overwrite else _existing_status(path, world)
    if existing is not None:
        found = f"(status {existing})" if existing else "but is not a run log"
        text = f"{path} exists {found}; pass --overwrite to replace it"
        return "skipped", existing in _SUCCESS, _line("skipped", text)

    # A bad input (e.g. an unreadable data file) fails this run on every rank.
    try:
        setup, problem = prepare(config, world.rank, world.size), None
    except ConfigError as err:
        setup, problem = None, err.message
    problems = world.gather_to_all(problem)
    failing = [rank for rank, text in enumerate(problems) if text is not None]
    if failing:
        return "failed", False, _line("failed", f"{path}: {problems[failing[0]]}")

    progress = Progress(config.iters) if world.is_root and not quiet else None
    try:
        result = run_method(setup, world, progress, command, stop)
    except RunFailed as err:
        return "failed", False, _line("failed", f"{path}: {err}")
    finally:
        if progress is not None:
            progress.close()
    text = f"||grad f||^2 = {result.grad_norm_sq:.6e}  {path}"
    return result.status, result.status in _SUCCESS, _line(result.status, text)
