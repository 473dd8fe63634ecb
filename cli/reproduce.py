"""The ``clip21mpi reproduce`` command: run a named preset, draw, summarise."""

from __future__ import annotations

import os
import shlex
import sys

import click

from clip21mpi.reproduce import PresetError, load_preset, preset_names


@click.command()
@click.argument("preset", required=False)
@click.option("--data", help="The dataset of every run (as for run --data).")
@click.option(
    "--out", type=click.Path(file_okay=False), help="Folder for runs, figures, summary."
)
@click.option(
    "--set",
    "fixed",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override an option of every run, e.g. --set iters=200 (repeatable).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["png", "pdf", "svg"]),
    default="png",
    show_default=True,
    help="Figure format.",
)
@click.option("--overwrite", is_flag=True, help="Rerun runs whose logs exist.")
@click.option("--list", "list_only", is_flag=True, help="List the bundled presets.")
@click.option("-v", "--verbose", count=True, help="More output (-vv: every rank).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def reproduce(preset, data, out, fixed, fmt, overwrite, list_only, verbose, quiet):
    """Run the preset PRESET (a bundled name or a preset .toml file) on --data,
    then write its figures and summary.md into --out.

    Bundled presets: clip21-logreg, clip21-phases, dp-tradeoff. Copy one from
    the package's presets folder to change it.
    """
    from cli.main import check_slurm_world, setup_logging, stop_on_signals, world_rank
    from cli.sweep import run_cell
    from clip21mpi.config import ConfigError
    from clip21mpi.sweep import SweepError, expand, parse_command_line, validate_cells

    if list_only:
        if world_rank() == 0:
            for name in preset_names():
                click.echo(f"{name}: {load_preset(name).description}")
        return
    for option, value in (("PRESET", preset), ("--data", data), ("--out", out)):
        if not value:
            raise click.UsageError(f"{option} is required (see --list for presets)")
    try:
        spec = load_preset(preset)
        overrides = parse_command_line(fixed=fixed).base
    except (PresetError, SweepError) as err:
        raise click.UsageError(str(err)) from err
    overrides["data"] = data

    from clip21mpi.comm import World, install_abort_on_error
    from clip21mpi.reproduce import (
        base_config,
        build_grid,
        gradient_scale,
        uses_g0,
    )
    from clip21mpi.runner import initial_point, prepare

    world = World()
    setup_logging(world.rank, verbose, quiet)
    install_abort_on_error(world)
    check_slurm_world(world.size)

    # G0 = max_i ||grad f_i(x0)|| on this data, if the preset needs it.
    g0 = None
    if uses_g0(spec):
        try:
            setup = prepare(base_config(spec, overrides), world.rank, world.size)
        except (ConfigError, SweepError, TypeError) as err:
            raise click.UsageError(getattr(err, "message", str(err))) from err
        g0 = gradient_scale(setup, initial_point(setup.config, setup.objectives), world)
    try:
        cells = expand(build_grid(spec, g0 or 0.0, overrides))
        configs = validate_cells(cells, world.size)
    except (PresetError, SweepError) as err:
        raise click.UsageError(str(err)) from err

    # The runs, one after another; existing logs are kept.
    runs_dir = os.path.join(out, "runs")
    argv = click.get_current_context().find_root().obj or {}
    command = shlex.join(argv.get("argv") or sys.argv)
    stop = stop_on_signals()
    for number, cell in enumerate(cells, start=1):
        config = configs[cell.index].replace(
            out=os.path.join(runs_dir, cell.name), overwrite=overwrite
        )
        if world.is_root:
            click.echo(f"[{number}/{len(cells)}] {cell.describe()}")
        status, _, line = run_cell(config, world, True, command, stop)
        if world.is_root:
            click.echo(line)
        if status == "checkpointed":
            sys.exit(75)

    if world.is_root:
        written = _draw_and_summarise(spec, runs_dir, out, fmt, command, g0)
        click.echo(f"summary: {written}")


def _draw_and_summarise(spec, runs_dir, out, fmt, command, g0) -> str:
    """Figures and summary.md on the root rank; return the summary's path."""
    from clip21mpi.analysis import load_runs, summarize
    from clip21mpi.plotting import plot_final_against, plot_runs, save_figure
    from clip21mpi.reproduce import write_summary

    runs, skipped = load_runs([runs_dir])
    figures = []
    for figure in spec.figures:
        path = os.path.join(out, f"{figure.file}.{fmt}")
        if figure.kind == "final-vs":
            fig = plot_final_against(runs, figure.metric, figure.against)
        else:
            fig = plot_runs(runs, figure.metric, figure.x, figure.panels, figure.log_x)
        save_figure(fig, path)
        figures.append(path)
    summary = os.path.join(out, "summary.md")
    rows = [summarize(run) for run in runs]
    write_summary(summary, spec, command, g0, rows, figures, skipped)
    return summary
