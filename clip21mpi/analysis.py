"""Run logs side by side: their settings, their summaries, their metrics.

A folder of runs becomes a list of ``Run`` records (files that are not run
logs are set aside with a reason), each run a row of a summary table, and
one run's metrics a pandas DataFrame indexed by iteration.

    tol         tolerance on ||grad f||^2   --tol of ``clip21mpi report``
    bits_to_tol bits_sent at the first row with grad_norm_sq <= tol
    time_to_tol wall_time at that row

Without ``--tol`` a run is judged by its own ``--tol`` when it had one
(> 0), and by ``DEFAULT_TOL`` otherwise.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass

import numpy as np

from clip21mpi.config import unused_options
from clip21mpi.methods import BETA_DEFAULTS, METHODS
from clip21mpi.runlog import read_log

__all__ = [
    "DEFAULT_TOL",
    "FINISHED",
    "SETTINGS",
    "STALE_AFTER",
    "STATUS_ORDER",
    "LogError",
    "Run",
    "compare_settings",
    "describe",
    "find_logs",
    "format_table",
    "format_value",
    "load_run",
    "load_runs",
    "run_labels",
    "run_settings",
    "run_tol",
    "runs_dataframe",
    "status_text",
    "summarize",
    "to_dataframe",
]

DEFAULT_TOL = 1e-6
STALE_AFTER = 600.0
FINISHED = ("converged", "max_iters")
STATUS_ORDER = (
    "converged",
    "max_iters",
    "running",
    "checkpointed",
    "failed",
    "diverged",
)

# The settings compared between runs (config keys), in the order shown.
SETTINGS = (
    "method",
    "problem",
    "data",
    "reg",
    "lam",
    "clients",
    "split",
    "tau",
    "k",
    "step_size",
    "batch_size",
    "alpha",
    "beta",
    "beta_hat",
    "local_steps",
    "local_step_size",
    "server_step_size",
    "hidden",
    "noise_sigma",
    "epsilon",
    "delta",
    "neighbouring",
    "iters",
    "tol",
    "eval_every",
    "seed",
    "x0",
)
PRIVACY_ATTRS = (
    "noise_sigma",
    "noise_multiplier",
    "delta",
    "neighbouring",
    "sensitivity",
    "privacy_unit",
    "accountant",
    "epsilon",
    "epsilon_accountant",
)

# Columns of the summary table: (name in the DataFrame and CSV, header).
COLUMNS = (
    ("file", "file"),
    ("problem", "problem"),
    ("data", "data"),
    ("clients", "clients"),
    ("method", "method"),
    ("tau", "tau"),
    ("step_size", "step size"),
    ("status", "status"),
    ("iterations", "iters"),
    ("final_grad_norm_sq", "||grad f||^2"),
    ("final_loss", "loss"),
    ("tol", "tol"),
    ("bits_to_tol", "bits to tol"),
    ("time_to_tol", "time to tol (s)"),
    ("epsilon", "epsilon"),
    ("stale", "stale"),
)


class LogError(ValueError):
    """A file that is not a readable run log; ``reason`` says why."""

    def __init__(self, path, reason: str):
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


@dataclass(frozen=True)
class Run:
    """One run log, read into memory.

    Attributes:
        path: the file, as it was named or found.
        attrs: the root attributes (``status``, ``step_size``, ...).
        config: the resolved configuration (the attribute ``config``).
        metrics: name -> array, ``iteration`` included, every column cut to
            the shortest (a log read while its run writes can be a row
            short in some of them).
        mtime: last modification, in seconds since the epoch.
        size: bytes on disk.
    """

    path: str
    attrs: dict
    config: dict
    metrics: dict
    mtime: float
    size: int

    @property
    def status(self) -> str:
        return str(self.attrs.get("status", "unknown"))

    @property
    def method(self) -> str:
        return str(self.config.get("method", ""))

    @property
    def n_rows(self) -> int:
        return len(self.metrics["iteration"])

    @property
    def iterations(self) -> int:
        """Iterations done: the attribute, or the last row of a running log."""
        if "iterations" in self.attrs:
            return int(self.attrs["iterations"])
        return int(self.metrics["iteration"][-1]) if self.n_rows else 0

    def is_stale(self, now: float | None = None, stale_after=STALE_AFTER) -> bool:
        """Whether a ``running`` log was not written for ``stale_after`` s."""
        now = time.time() if now is None else now
        return self.status == "running" and now - self.mtime > stale_after


def find_logs(paths) -> list[str]:
    """Return the files named in ``paths``, folders replaced by their logs.

    A folder stands for every ``*.h5`` below it (recursively, sorted;
    names starting with a dot are not searched); a file is taken as named,
    whatever its suffix. A file named twice is listed once.

    Raises:
        FileNotFoundError: if a path does not exist.
    """
    found = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            pattern = os.path.join(path, "**", "*.h5")
            found.extend(
                p
                for p in sorted(glob.glob(pattern, recursive=True))
                if os.path.isfile(p)
            )
        elif os.path.exists(path):
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path!r}")
    seen, unique = set(), []
    for path in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def load_run(path) -> Run:
    """Read one run log.

    Raises:
        LogError: if the file is not HDF5, or HDF5 without the ``metrics``,
            ``x0`` or ``config`` of a run log.
    """
    path = os.fspath(path)
    try:
        stat = os.stat(path)
        record = _read_log_retrying(path, stat.st_mtime)
    except KeyError as err:
        raise LogError(path, f"not a clip21mpi run log ({_missing(err)})") from err
    except OSError as err:
        raise LogError(path, _unreadable(err)) from err
    except Exception as err:  # any other failure: skip the file, say why
        raise LogError(path, f"cannot be read: {type(err).__name__}: {err}") from err

    attrs, metrics = record["attrs"], record["metrics"]
    if "config" not in attrs:
        raise LogError(path, "not a clip21mpi run log (no attribute 'config')")
    try:
        config = json.loads(attrs["config"])
    except (TypeError, ValueError) as err:
        raise LogError(path, f"the attribute 'config' is not JSON: {err}") from err
    if not isinstance(config, dict):
        raise LogError(path, "the attribute 'config' is not a JSON object")
    if "iteration" not in metrics:
        raise LogError(path, "not a clip21mpi run log (no 'metrics/iteration')")

    n_rows = min(len(column) for column in metrics.values())
    metrics = {name: np.asarray(column[:n_rows]) for name, column in metrics.items()}
    return Run(path, attrs, config, metrics, stat.st_mtime, stat.st_size)


def _read_log_retrying(path: str, mtime: float, attempts: int = 3):
    """``read_log``, tried again when a run may be writing the file now."""
    for attempt in range(attempts):
        try:
            return read_log(path)
        except OSError:
            recent = time.time() - mtime < 30.0
            if not recent or attempt == attempts - 1:
                raise
            time.sleep(0.2)


def _missing(err: KeyError) -> str:
    match = re.search(r"object '([^']+)' doesn't exist", str(err))
    return f"no {match.group(1)!r}" if match else f"missing {err}"


def _unreadable(err: OSError) -> str:
    text = str(err)
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if "signature not found" in text:
        return "not an HDF5 file (file signature not found)"
    match = re.search(r"\(([^()]*)\)\s*$", text)
    return f"unreadable HDF5 file ({match.group(1) if match else text})"


def load_runs(paths) -> tuple[list[Run], list[LogError]]:
    """Read every log named in ``paths`` (see ``find_logs``).

    Returns:
        The runs read, in order, and a LogError for every file set aside.
    """
    runs, skipped = [], []
    for path in find_logs(paths):
        try:
            runs.append(load_run(path))
        except LogError as err:
            skipped.append(err)
    return runs, skipped


def to_dataframe(path):
    """Return the metrics of one run log as a DataFrame indexed by iteration.

    Columns are the metrics of the log (``grad_norm_sq``, ``loss``,
    ``clip_fraction``, ``bits_sent``, ``wall_time``, and ``epsilon`` for
    noisy runs), NaN where a row was not evaluated. It holds the same
    numbers as ``xarray.open_dataset(path, engine="h5netcdf",
    group="metrics").to_dataframe()``.

    Args:
        path: a run log (a running one gives the rows flushed so far), or
            a Run already read.

    Returns:
        A ``pandas.DataFrame`` with an int64 index named ``iteration``.

    Raises:
        LogError: if ``path`` is not a readable run log.

    Example:
        >>> import tempfile
        >>> from clip21mpi.runlog import METRICS, RunLog
        >>> path = os.path.join(tempfile.mkdtemp(), "run.h5")
        >>> log = RunLog.create(path, {"config": {"method": "gd"}}, np.zeros(2))
        >>> log.append(np.arange(3), {m: np.ones(3) for m in METRICS})
        >>> df = to_dataframe(path)
        >>> df.index.name, len(df), df["loss"].sum()
        ('iteration', 3, np.float64(3.0))
    """
    import pandas as pd

    run = load_run(path) if not isinstance(path, Run) else path
    columns = {k: v for k, v in run.metrics.items() if k != "iteration"}
    index = pd.Index(run.metrics["iteration"], name="iteration")
    return pd.DataFrame(columns, index=index)


def _last_finite(values) -> float:
    finite = np.flatnonzero(np.isfinite(values))
    return float(values[finite[-1]]) if finite.size else math.nan


def run_tol(run: Run, tol: float | None = None) -> float:
    """The tolerance ``run`` is judged by: ``tol``, else its own ``--tol``
    if positive, else DEFAULT_TOL."""
    if tol is not None:
        return float(tol)
    own = run.config.get("tol") or 0.0
    return float(own) if own > 0 else DEFAULT_TOL


def summarize(
    run: Run, tol: float | None = None, now=None, stale_after=STALE_AFTER
) -> dict:
    """Return the summary row of ``run`` (the columns of ``runs_dataframe``).

    Numbers a run does not have are NaN: ``tau`` where its method does not
    clip, ``bits_to_tol`` and ``time_to_tol`` where ``grad_norm_sq`` never
    reached the tolerance, ``epsilon`` where it was not noisy (or has not
    finished).
    """
    metrics = run.metrics
    gns = metrics.get("grad_norm_sq", np.empty(0))
    tol_used = run_tol(run, tol)
    with np.errstate(invalid="ignore"):
        reached = np.flatnonzero(gns <= tol_used)
    first = reached[0] if reached.size else None

    def at_first(name):
        if first is None or name not in metrics:
            return math.nan
        return float(metrics[name][first])

    tau = run_settings(run)["tau"]
    return {
        "file": run.path,
        "problem": run.config.get("problem", ""),
        "data": str(run.attrs.get("data_name", run.config.get("data", ""))),
        "clients": run.attrs.get("clients", run.config.get("clients")),
        "method": run.method,
        "tau": math.nan if tau is None else float(tau),
        "step_size": float(run.attrs.get("step_size", math.nan)),
        "status": run.status,
        "iterations": run.iterations,
        "final_grad_norm_sq": _last_finite(gns),
        "final_loss": _last_finite(metrics.get("loss", np.empty(0))),
        "tol": tol_used,
        "bits_to_tol": at_first("bits_sent"),
        "time_to_tol": at_first("wall_time"),
        "epsilon": float(run.attrs.get("epsilon", math.nan)),
        "stale": run.is_stale(now, stale_after),
    }


def runs_dataframe(logs, tol: float | None = None, now=None, stale_after=STALE_AFTER):
    """Return the summary table of many runs, one row per run.

    Args:
        logs: Run records, or paths of logs and folders of logs (files that
            are not run logs are left out with a warning).
        tol: the tolerance on ``grad_norm_sq`` for ``bits_to_tol`` and
            ``time_to_tol``; None: each run's own ``--tol`` if positive,
            else ``DEFAULT_TOL`` (the column ``tol`` says which).
        now, stale_after: a ``running`` log older than ``stale_after``
            seconds at time ``now`` (default: now) is marked ``stale``.

    Returns:
        A ``pandas.DataFrame`` with the columns ``file``, ``problem``,
        ``data``, ``clients``, ``method``, ``tau``, ``step_size``,
        ``status``, ``iterations``, ``final_grad_norm_sq``, ``final_loss``,
        ``tol``, ``bits_to_tol``, ``time_to_tol``, ``epsilon``, ``stale``.

    Example:
        >>> runs_dataframe([]).columns[:5].tolist()
        ['file', 'problem', 'data', 'clients', 'method']
    """
    import pandas as pd

    runs = [log for log in logs if isinstance(log, Run)]
    paths = [log for log in logs if not isinstance(log, Run)]
    if paths:
        more, skipped = load_runs(paths)
        runs.extend(more)
        for err in skipped:
            warnings.warn(
                f"skipped {err.path}: {err.reason}", UserWarning, stacklevel=2
            )
    rows = [summarize(run, tol, now, stale_after) for run in runs]
    return pd.DataFrame(rows, columns=[name for name, _ in COLUMNS])


def format_value(value) -> str:
    """A setting as shown in legends and titles: numbers with ``:g``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_settings(run: Run) -> dict:
    """Return the settings that matter for ``run``, by config key.

    A setting its method does not use is None (``tau`` of ``gd``, ``k`` of
    ``clip21``, ``delta`` of a run without noise). ``step_size`` is the
    resolved gamma (the attribute), ``noise_sigma`` the calibrated sigma,
    ``beta`` and ``beta_hat`` the defaults the method applies, a missing
    ``batch_size`` is ``"full"``, and a data file is shown by its name.
    """
    cfg, attrs = run.config, run.attrs
    spec = METHODS.get(run.method)
    settings = {name: cfg.get(name) for name in SETTINGS}
    for name in unused_options({k: v for k, v in cfg.items() if k in SETTINGS}):
        settings[name] = None
    if spec is not None:
        if settings["beta"] is None and "--beta" in spec.options:
            settings["beta"] = BETA_DEFAULTS.get(spec.name)
        if settings["beta_hat"] is None and "--beta-hat" in spec.options:
            settings["beta_hat"] = settings["beta"]
    if spec is None or spec.estimator != "local-steps":
        settings["step_size"] = attrs.get("step_size", settings["step_size"])
    if settings["batch_size"] is None:
        settings["batch_size"] = "full"
    settings["noise_sigma"] = attrs.get("noise_sigma", settings["noise_sigma"])
    data = settings["data"]
    if isinstance(data, str) and os.sep in data:
        settings["data"] = os.path.basename(data)
    return settings


def compare_settings(runs, exclude=()) -> tuple[dict, list[str]]:
    """Split the settings of ``runs`` into the common and the differing.

    A setting is common when every run uses it with the same value, and
    differing when the runs show more than one value (not using it counts
    as a value: ``gd`` next to ``clip21`` makes ``tau`` differ).

    Returns:
        ``(common, differing)``: the common settings as ``{key: text}``, and
        the keys of the differing ones, in the order of SETTINGS.
    """
    shown = [
        {k: None if v is None else format_value(v) for k, v in run_settings(r).items()}
        for r in runs
    ]
    common, differing = {}, []
    for name in SETTINGS:
        if name in exclude:
            continue
        values = {s[name] for s in shown}
        if values == {None}:
            continue
        if len(values) == 1:
            common[name] = values.pop()
        else:
            differing.append(name)
    return common, differing


def run_labels(runs, exclude=()) -> list[str]:
    """Return one label per run from the settings that differ between runs,
    e.g. ``"method=clip21, tau=0.01"``; the file name when none differs."""
    _, differing = compare_settings(runs, exclude)
    labels = []
    for run in runs:
        settings = run_settings(run)
        parts = [
            f"{name}={format_value(settings[name])}"
            for name in differing
            if settings[name] is not None
        ]
        labels.append(", ".join(parts) or os.path.basename(run.path))
    return labels


def describe(run: Run) -> dict:
    """Return what ``clip21mpi info`` shows: status, provenance, constants,
    privacy, rows and size, and the configuration (JSON-serialisable)."""
    attrs = run.attrs
    versions = attrs.get("versions")
    try:
        versions = json.loads(versions) if isinstance(versions, str) else versions
    except ValueError:
        pass
    info = {
        "file": run.path,
        "size_bytes": run.size,
        "status": run.status,
        "message": attrs.get("message", ""),
        "iterations": run.iterations,
        "rows": run.n_rows,
        "metrics": [name for name in run.metrics if name != "iteration"],
        "command": attrs.get("command", ""),
        "created": attrs.get("created", ""),
        "versions": versions,
        "ranks": attrs.get("ranks"),
        "clients": attrs.get("clients"),
        "data_name": attrs.get("data_name"),
        "rows_of_data": attrs.get("rows"),
        "dim": attrs.get("dim"),
        "L": attrs.get("L"),
        "L_i": attrs.get("L_i"),
        "step_size": attrs.get("step_size"),
        "wall_time_total": attrs.get("wall_time_total"),
        "privacy": {k: attrs[k] for k in PRIVACY_ATTRS if k in attrs},
        "config": run.config,
    }
    return {k: _jsonable(v) for k, v in info.items()}


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def status_text(status: str, stale: bool) -> str:
    """The status as the table shows it: ``running (stale?)`` when stale."""
    return f"{status} (stale?)" if stale else status


def format_table(frame) -> str:
    """Return the summary table as aligned text, one line per run.

    Blank cells are numbers a run does not have; ``not reached`` says that
    a run's ``grad_norm_sq`` never came down to the tolerance.
    """
    formats = {
        "tau": "{:g}",
        "step_size": "{:.4g}",
        "final_grad_norm_sq": "{:.3e}",
        "final_loss": "{:.6g}",
        "tol": "{:g}",
        "bits_to_tol": "{:.4g}",
        "time_to_tol": "{:.3g}",
        "epsilon": "{:.4g}",
    }
    columns = [(name, header) for name, header in COLUMNS if name != "stale"]
    cells = [[header for _, header in columns]]
    for row in frame.to_dict("records"):
        line = []
        for name, _ in columns:
            value = row[name]
            if name == "status":
                text = status_text(value, bool(row["stale"]))
            elif name in ("bits_to_tol", "time_to_tol") and _is_nan(value):
                has_grad = not _is_nan(row["final_grad_norm_sq"])
                text = "not reached" if has_grad else ""
            elif _is_nan(value) or value is None:
                text = ""
            else:
                text = formats.get(name, "{}").format(value)
            line.append(text)
        cells.append(line)
    numeric = {"clients", "iterations", *formats}
    widths = [max(len(line[j]) for line in cells) for j in range(len(columns))]
    lines = []
    for line in cells:
        texts = [
            text.rjust(w) if name in numeric else text.ljust(w)
            for (name, _), text, w in zip(columns, line, widths)
        ]
        lines.append("  ".join(texts).rstrip())
    return "\n".join(lines)


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)
