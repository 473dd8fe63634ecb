"""Figures of run logs: one metric of many runs against iterations, bits or time.

One line per run, labelled by the settings that differ between the runs;
the settings they share make the title. Lines differ in colour, line style
and marker at once, so a figure printed in grey still tells them apart.
Figures are made without pyplot, on matplotlib's Agg canvas: nothing needs
a display, and no global state of the caller's matplotlib is touched.

    x axis      metric of the log   --x
    iteration   iteration           iteration
    bits        bits_sent           bits
    time        wall_time           time
"""

from __future__ import annotations

import math
import os
import textwrap

import numpy as np

from clip21mpi.analysis import (
    FINISHED,
    SETTINGS,
    Run,
    compare_settings,
    format_value,
    run_labels,
    run_settings,
)

__all__ = [
    "FORMATS",
    "X_AXES",
    "available_metrics",
    "figure_format",
    "plot_final_against",
    "plot_runs",
    "save_figure",
]

FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
X_AXES = {"iteration": "iteration", "bits": "bits_sent", "time": "wall_time"}
X_LABELS = {
    "iteration": "iteration k",
    "bits": "bits sent per client",
    "time": "wall time (s)",
}
Y_LABELS = {
    "grad_norm_sq": r"$\|\nabla f(x^k)\|^2$",
    "loss": r"$f(x^k)$",
    "clip_fraction": "share of clients clipped",
    "bits_sent": "bits sent per client",
    "wall_time": "wall time (s)",
    "epsilon": r"$\varepsilon$ spent (RDP)",
}
# Metrics shown on a linear scale whatever their range.
LINEAR_METRICS = ("clip_fraction",)
# A log scale on y from this many decades between the extreme values on.
LOG_DECADES = 2.0
NOT_USED = "not used"

# Okabe-Ito colours without yellow, which vanishes on white paper.
COLOURS = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "x", "*", "P")


def figure_format(path) -> str:
    """Return the format that the suffix of ``path`` asks for.

    Raises:
        ValueError: for a suffix other than .png, .pdf or .svg.

    Example:
        >>> figure_format("runs/fig.PDF")
        'pdf'
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1]
    if suffix.lower() not in FORMATS:
        what = f"unknown figure format {suffix!r}" if suffix else "no suffix"
        raise ValueError(f"{path!r}: {what}; end the name with .png, .pdf or .svg")
    return FORMATS[suffix.lower()]


def available_metrics(runs) -> list[str]:
    """Return the metrics found in any of ``runs``, sorted."""
    names = {name for run in runs for name in run.metrics}
    return sorted(names - {"iteration"})


def _style(i: int) -> dict:
    # Markers every tenth of the line, each style starting elsewhere, so
    # lines that coincide (clip21 once it stops clipping, and gd) show both.
    return {
        "color": COLOURS[i % len(COLOURS)],
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
        "marker": MARKERS[i % len(MARKERS)],
        "markevery": (0.02 * (i % 5), 0.1),
    }


def _panel_order(value: str):
    """Panels in numeric order where values are numbers; 'not used' last."""
    if value == NOT_USED:
        return (2, 0.0, value)
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _log_scale(metric: str, values: np.ndarray) -> bool:
    if metric in LINEAR_METRICS or values.size == 0 or not (values > 0).all():
        return False
    return math.log10(values.max() / values.min()) > LOG_DECADES


def plot_runs(
    runs: list[Run],
    metric: str = "grad_norm_sq",
    x: str = "iteration",
    panels: str | None = None,
    log_x: bool = False,
):
    """Draw ``metric`` of every run against ``x``, one line per run.

    Rows where the metric or ``x`` is NaN (stochastic methods evaluate
    only some iterations) are left out, so a line joins the rows that have
    a value. The y axis is logarithmic when every value is positive and
    they span more than two decades (``clip_fraction`` never is). A run
    that has not finished has its status after its label, e.g.
    ``[failed]``.

    Args:
        runs: the runs (see ``clip21mpi.analysis.load_runs``); each must
            have ``metric``.
        metric: a column of ``/metrics``: ``grad_norm_sq``, ``loss``,
            ``clip_fraction``, ``bits_sent``, ``wall_time``, ``epsilon``.
        x: ``iteration``, ``bits`` (bits_sent) or ``time`` (wall_time).
        panels: a config key (e.g. ``tau``): one panel per value, sharing
            both axes; None for one panel. Runs whose method does not use
            the option share a panel titled ``tau: not used``.
        log_x: a logarithmic x axis (rows at x <= 0 are left out).

    Returns:
        A ``matplotlib.figure.Figure`` with one axes per panel and a figure
        legend.

    Raises:
        ValueError: no runs, an unknown ``x`` or ``panels``, or a run
            without ``metric``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = list(runs)
    if not runs:
        raise ValueError("no runs to plot")
    if x not in X_AXES:
        raise ValueError(f"x {x!r} is not one of {', '.join(X_AXES)}")
    if panels is not None and panels not in SETTINGS:
        raise ValueError(f"panels {panels!r} is not one of {', '.join(SETTINGS)}")
    for run in runs:
        for name in (metric, X_AXES[x]):
            if name not in run.metrics:
                raise ValueError(
                    f"{run.path} has no metric {name!r}; it has "
                    f"{', '.join(available_metrics([run]))}"
                )

    # What tells the runs apart: labels, their styles, and the panels.
    exclude = (panels,) if panels else ()
    common, _ = compare_settings(runs, exclude)
    labels = run_labels(runs, exclude)
    styles = {}
    for label in labels:
        styles.setdefault(label, _style(len(styles)))
    if panels:
        keys = [run_settings(run)[panels] for run in runs]
        keys = [NOT_USED if k is None else format_value(k) for k in keys]
    else:
        keys = [""] * len(runs)
    values = sorted(set(keys), key=_panel_order)

    # The grid: at most three panels a row (two for four), the legend on
    # the right, as wide as its longest label.
    ncols = 2 if len(values) == 4 else min(3, len(values))
    nrows = math.ceil(len(values) / ncols)
    legend_width = max(2.0, 0.075 * max(len(label) for label in labels) + 1.0)
    fig = Figure(
        figsize=(4.0 * ncols + legend_width, 3.2 * nrows + 0.8), layout="constrained"
    )
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    axes = list(grid.ravel()[: len(values)])
    for extra in grid.ravel()[len(values) :]:
        extra.remove()

    drawn_y, entries = [], {}
    for run, label, key in zip(runs, labels, keys):
        xs = np.asarray(run.metrics[X_AXES[x]], dtype=float)
        ys = np.asarray(run.metrics[metric], dtype=float)
        keep = np.isfinite(xs) & np.isfinite(ys)
        if log_x:
            keep &= xs > 0
        text = label if run.status in FINISHED else f"{label} [{run.status}]"
        (line,) = axes[values.index(key)].plot(
            xs[keep],
            ys[keep],
            label=text,
            markersize=4.5,
            linewidth=1.4,
            **styles[label],
        )
        entries.setdefault(text, line)
        drawn_y.append(ys[keep])

    drawn_y = np.concatenate(drawn_y)
    log_y = _log_scale(metric, drawn_y)
    if log_y:
        # Margins of 4% of the decades, within 1e-200..1e200: a diverged run
        # reaches 1e300 before its first inf, and ticks a stride beyond that
        # would overflow; its line leaves the axes at the top. Set before
        # the scale, so that autoscaling never sees the full range.
        low, high = np.log10(drawn_y.min()), np.log10(drawn_y.max())
        pad = 0.04 * (high - low)
        axes[0].set_ylim(10 ** max(low - pad, -200.0), 10 ** min(high + pad, 200.0))
    for i, (ax, value) in enumerate(zip(axes, values)):
        ax.set_yscale("log" if log_y else "linear")
        if log_x:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        if panels:
            sep = ": " if value == NOT_USED else "="
            ax.set_title(f"{panels}{sep}{value}", fontsize="medium")
        # Axis labels on the left column and under the lowest panel of each
        # column (which need not be in the last row).
        if i % ncols == 0:
            ax.set_ylabel(Y_LABELS.get(metric, metric))
        if i + ncols >= len(values):
            ax.set_xlabel(X_LABELS[x])
            ax.tick_params(labelbottom=True)
    title = ", ".join(f"{k}={v}" for k, v in common.items())
    width = int(13 * fig.get_figwidth())
    fig.suptitle(textwrap.fill(title, width), fontsize="small")
    fig.legend(
        list(entries.values()),
        list(entries),
        loc="outside right center",
        fontsize="small",
        frameon=False,
    )
    return fig


def plot_final_against(
    runs: list[Run], metric: str = "grad_norm_sq", against="epsilon"
):
    """Draw each run's last finite ``metric`` against its setting ``against``.

    One line per group of runs that agree on every other differing setting
    (e.g. one per method), points sorted by ``against``; log scales where
    the values are positive.

    Raises:
        ValueError: no runs, or ``against`` is not a numeric setting of them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [run for run in runs if metric in run.metrics]
    if not runs:
        raise ValueError(f"no runs with metric {metric!r} to plot")
    xs = [run_settings(run).get(against, run.config.get(against)) for run in runs]
    if any(not isinstance(x, (int, float)) for x in xs):
        raise ValueError(f"every run needs a numeric {against!r} setting, got {xs}")
    # With --epsilon, sigma is calibrated from it: not a setting of its own.
    exclude = (against, "noise_sigma") if against == "epsilon" else (against,)
    common, _ = compare_settings(runs, exclude)
    labels = run_labels(runs, exclude)
    groups: dict[str, list] = {}
    for run, x, label in zip(runs, xs, labels):
        values = np.asarray(run.metrics[metric], dtype=float)
        finite = values[np.isfinite(values)]
        y = finite[-1] if finite.size else np.nan
        groups.setdefault(label, []).append((float(x), y))

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (label, points) in enumerate(groups.items()):
        points.sort()
        style = {k: v for k, v in _style(i).items() if k != "markevery"}
        ax.plot(*zip(*points), label=label, markersize=6, linewidth=1.4, **style)
    all_x = np.array([p[0] for pts in groups.values() for p in pts])
    all_y = np.array([p[1] for pts in groups.values() for p in pts])
    if np.all(all_x > 0):
        ax.set_xscale("log")
    if _log_scale(metric, all_y[np.isfinite(all_y)]):
        ax.set_yscale("log")
    ax.set_xlabel(against)
    ax.set_ylabel("final " + Y_LABELS.get(metric, metric))
    ax.grid(True, alpha=0.3)
    title = ", ".join(f"{k}={v}" for k, v in common.items())
    fig.suptitle(textwrap.fill(title, 90), fontsize="small")
    ax.legend(fontsize="small", frameon=False)
    return fig


def save_figure(fig, path) -> str:
    """Write ``fig`` to ``path`` in the format of its suffix; return the format.

    Raises:
        ValueError: for a suffix other than .png, .pdf or .svg.
    """
    fmt = figure_format(path)
    fig.savefig(os.fspath(path), format=fmt, dpi=150 if fmt == "png" else None)
    return fmt
