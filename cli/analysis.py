"""The commands that read run logs: ``report``, ``plot`` and ``info``.

None of them starts MPI. Folders stand for every ``*.h5`` below them; a
file that is not a run log is named on stderr (``skipped FILE: reason``)
and the others are read on. Exit codes: 0 when at least one run was read,
1 when none was, 2 for a usage error.
"""

from __future__ import annotations

import json
import os

import click

from clip21mpi.analysis import (
    DEFAULT_TOL,
    FINISHED,
    SETTINGS,
    STALE_AFTER,
    STATUS_ORDER,
    LogError,
    format_table,
    load_run,
    load_runs,
    runs_dataframe,
)
from clip21mpi.config import suggest
from clip21mpi.plotting import X_AXES, available_metrics, figure_format


def _logs_argument(command):
    return click.argument(
        "paths",
        nargs=-1,
        required=True,
        metavar="RUN_OR_FOLDER...",
        type=click.Path(exists=True),
    )(command)


def _read_runs(paths) -> list:
    """The runs of ``paths``; skipped files on stderr; none read is an error."""
    runs, skipped = load_runs(paths)
    for err in skipped:
        click.echo(f"skipped {err.path}: {err.reason}", err=True)
    if runs:
        return runs
    where = ", ".join(repr(p) for p in paths)
    if skipped:
        raise click.ClickException(
            f"no run logs in {where}: {len(skipped)} file(s) skipped, see above"
        )
    raise click.ClickException(f"no run logs in {where}: no *.h5 file there")


def _non_negative(ctx, param, value):
    if value is not None and not value >= 0:
        raise click.BadParameter(
            f"{value!r} is negative; pass a tolerance >= 0 on ||grad f||^2"
        )
    return value


def _figure_path(ctx, param, value):
    try:
        figure_format(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from err
    return value


@click.command()
@_logs_argument
@click.option(
    "--tol",
    type=float,
    default=None,
    callback=_non_negative,
    help="Tolerance on ||grad f||^2 for the bits and time to reach it "
    f"[default: each run's own --tol if > 0, else {DEFAULT_TOL:g}].",
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, allow_dash=True),
    default=None,
    help="Also write the rows as CSV to this file ('-': to stdout, instead of "
    "the table).",
)
@click.option(
    "--stale-after",
    type=float,
    default=STALE_AFTER,
    show_default=True,
    help="Seconds without a write after which a running log is shown as "
    "'running (stale?)'.",
)
def report(paths, tol, csv_path, stale_after):
    """A summary table of runs, one row per run.

    RUN is a log file; a FOLDER stands for every *.h5 below it. Blank cells
    are values a run does not have (tau of gd, epsilon without noise); 'not
    reached' says that ||grad f||^2 never came down to the tolerance. In the
    CSV both are empty cells, and numbers have their full precision.
    """
    runs = _read_runs(paths)
    frame = runs_dataframe(runs, tol, stale_after=stale_after)

    if csv_path == "-":
        click.echo(frame.to_csv(index=False), nl=False)
        return
    if csv_path is not None:
        try:
            frame.to_csv(csv_path, index=False)
        except OSError as err:
            raise click.BadParameter(
                f"cannot write {csv_path!r}: {err.strerror}", param_hint="'--csv'"
            ) from err

    click.echo(format_table(frame))
    counts = frame["status"].value_counts()
    order = [s for s in STATUS_ORDER if s in counts] + sorted(
        set(counts.index) - set(STATUS_ORDER)
    )
    parts = [f"{counts[s]} {s}" for s in order]
    stale = int(frame["stale"].sum())
    if stale:
        parts.append(f"{stale} of them stale?")
    n_finished = int(frame["status"].isin(FINISHED).sum())
    click.echo(f"\n{len(frame)} run(s), {n_finished} finished: {', '.join(parts)}")
    for run in runs:
        message = run.attrs.get("message", "")
        if run.status not in FINISHED and message:
            click.echo(f"{run.status}: {run.path}: {message}")


@click.command()
@_logs_argument
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False),
    callback=_figure_path,
    help="The figure: FIG.png, FIG.pdf or FIG.svg.",
)
@click.option(
    "--metric",
    default="grad_norm_sq",
    show_default=True,
    help="The metric on y: grad_norm_sq, loss, clip_fraction, bits_sent, "
    "wall_time, epsilon (noisy runs).",
)
@click.option(
    "--x",
    "x_axis",
    type=click.Choice(list(X_AXES)),
    default="iteration",
    show_default=True,
    help="The x axis: iteration, bits (bits_sent) or time (wall_time).",
)
@click.option(
    "--panels",
    type=click.Choice(SETTINGS),
    default=None,
    metavar="KEY",
    help="One panel per value of this configuration key (e.g. tau, method, k).",
)
@click.option("--log-x", is_flag=True, help="A logarithmic x axis.")
def plot(paths, out, metric, x_axis, panels, log_x):
    """A figure of one metric of runs against iterations, bits or time.

    RUN is a log file; a FOLDER stands for every *.h5 below it. One line per
    run, labelled by the settings that differ; the common ones make the
    title. The y axis is logarithmic when all values are positive and span
    more than two decades (never for clip_fraction).
    """
    from clip21mpi.plotting import plot_runs, save_figure

    runs = _read_runs(paths)
    valid = available_metrics(runs)
    if metric not in valid:
        raise click.BadParameter(
            f"{metric!r} is in none of the logs; valid: {', '.join(valid)}"
            f"{suggest(metric, valid)}",
            ctx=click.get_current_context(),
            param_hint="'--metric'",
        )
    kept = []
    for run in runs:
        missing = [m for m in (metric, X_AXES[x_axis]) if m not in run.metrics]
        if missing:
            click.echo(f"left out {run.path}: no metric {missing[0]!r}", err=True)
        else:
            kept.append(run)

    fig = plot_runs(kept, metric, x_axis, panels, log_x)
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        save_figure(fig, out)
    except OSError as err:
        raise click.BadParameter(
            f"cannot write {out!r}: {err.strerror or err}", param_hint="'--out'"
        ) from err
    click.echo(f"{out}: {metric} of {len(kept)} run(s) against {x_axis}")


@click.command()
@click.argument("path", metavar="RUN", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead.")
def info(path, as_json):
    """The configuration, status and provenance of one run log."""
    from clip21mpi.analysis import describe

    try:
        run = load_run(path)
    except LogError as err:
        raise click.ClickException(f"cannot read {path}: {err.reason}") from err
    described = describe(run)
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    size = _size(described.pop("size_bytes"))
    described = {"file": described.pop("file"), "size": size, **described}
    described["configuration"] = described.pop("config")
    keys = [k for k, v in described.items() if not isinstance(v, dict)]
    keys += ["  " + k for v in described.values() if isinstance(v, dict) for k in v]
    width = 2 + max(map(len, keys))
    for key, value in described.items():
        if isinstance(value, dict):
            if value:
                click.echo(f"{key}:")
                for sub, item in value.items():
                    click.echo(f"  {sub + ':':<{width - 2}} {_text(item)}")
        elif value not in ("", None, []):
            click.echo(f"{key + ':':<{width}} {_text(value)}")


def _text(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    if value is None:
        return "null"
    return str(value)


def _size(n_bytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit} ({n_bytes} bytes)"
    return f"{n_bytes} bytes"
