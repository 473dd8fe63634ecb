"""Grids of runs: parse them, expand them into cells and name each cell's log.

A grid holds fixed options (``base``) and varied ones (``axes``: a list of
values per option). Its cells are the Cartesian product of the axes in the
order they were given, the last axis fastest. Options that a cell's method
does not use are dropped from the cell, and cells that become identical run
once. Each cell's log is named after its varied options, e.g.
``method-clip21_tau-0.01_seed-0.h5``. Nothing here starts MPI or runs a cell.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
import typing
from dataclasses import dataclass, field

from clip21mpi.config import ConfigError, RunConfig, suggest, unused_options

__all__ = [
    "OPTIONS",
    "Cell",
    "Grid",
    "SweepError",
    "convert",
    "count",
    "expand",
    "file_value",
    "format_listing",
    "load_grid_file",
    "log_name",
    "parse_command_line",
    "unused_options",
    "validate_cells",
]

# Set by the sweep itself: the folder of the logs and whether to replace them.
_SWEEP_OWNED = ("out", "overwrite")

OPTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(RunConfig) if f.name not in _SWEEP_OWNED
)
_TYPES = {
    name: typing.get_args(hint) or (hint,)
    for name, hint in typing.get_type_hints(RunConfig).items()
}
_WHAT = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "text",
    type(None): "none",
}


# Characters kept in log names; every other one becomes "-".
_NAME_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-"
)
_MAX_NAME = 255

# What a value that fits no type of its field converts to.
_INVALID = object()


class SweepError(ValueError):
    """A bad grid, option or value; the message says where and what is valid."""


@dataclass(frozen=True)
class Grid:
    """Fixed options and varied ones, values converted to RunConfig's types.

    Attributes:
        base: option -> value, the same in every cell.
        axes: option -> tuple of values, in the order the grid was given.
    """

    base: dict = field(default_factory=dict)
    axes: dict = field(default_factory=dict)

    def merged_with(self, later: Grid) -> Grid:
        """Return this grid with ``later``'s options winning.

        An option that ``later`` varies keeps its place among the axes if it
        was varied here too; new axes come after the old ones.

        Example:
            >>> file = Grid({"iters": 100}, {"tau": (0.1, 1.0), "seed": (0, 1)})
            >>> line = Grid({"tau": 0.5}, {"iters": (5, 10), "seed": (2,)})
            >>> merged = file.merged_with(line)
            >>> merged.base, merged.axes
            ({'tau': 0.5}, {'seed': (2,), 'iters': (5, 10)})
        """
        base = {k: v for k, v in self.base.items() if k not in later.axes}
        axes = {k: v for k, v in self.axes.items() if k not in later.base}
        base.update(later.base)
        axes.update(later.axes)
        return Grid(base, axes)


@dataclass(frozen=True)
class Cell:
    """One run of a grid.

    Attributes:
        index: position among the cells (what ``--task-index`` selects).
        options: the RunConfig fields of the run (the others keep defaults).
        varied: the varied options the run uses, in grid order.
        name: file name of the run's log, built from ``varied``.
        points: the grid points (in product order) this cell runs.
        unused: varied options dropped because the run does not use them.
    """

    index: int
    options: dict
    varied: dict
    name: str
    points: tuple[int, ...]
    unused: tuple[str, ...]

    def config(self) -> RunConfig:
        return RunConfig(**self.options)

    def describe(self) -> str:
        """Return the varied options as ``key=value`` words (``--set`` syntax)."""
        return " ".join(f"{k}={_shown(v)}" for k, v in self.varied.items())


def _option_name(key: str, where: str) -> str:
    """Return the RunConfig field for ``key`` (dashes or underscores)."""
    name = str(key).strip().replace("-", "_")
    if name in _SWEEP_OWNED:
        raise SweepError(
            f"{where}: {key!r} is set by the sweep, not per run: --out FOLDER "
            "holds the logs, each named after its run's options, and --overwrite "
            "replaces existing ones"
        )
    if name not in OPTIONS:
        raise SweepError(
            f"{where}: unknown option {key!r}{suggest(name, OPTIONS)} "
            f"(valid: {', '.join(sorted(OPTIONS))})"
        )
    return name


def convert(name: str, value, where: str = ""):
    """Return ``value`` as the type of RunConfig's field ``name``.

    Text is parsed (``none`` gives None where the field is optional; a
    number or ``auto`` for step sizes); TOML values are checked, and a
    whole number is accepted where a number is.

    Raises:
        SweepError: the value does not fit the field.

    Example:
        >>> convert("tau", "1e-2"), convert("seed", "3"), convert("tau", 1)
        (0.01, 3, 1.0)
        >>> convert("step_size", "Auto"), convert("clients", "none")
        ('auto', None)
        >>> convert("seed", "1.5", "--grid seed")
        Traceback (most recent call last):
        ...
        clip21mpi.sweep.SweepError: --grid seed: '1.5' is not a whole number
    """
    kinds = _TYPES[name]
    if isinstance(value, str):
        converted = _from_text(value.strip(), kinds)
    elif isinstance(value, bool):
        converted = value if bool in kinds else _INVALID
    elif isinstance(value, int):
        converted = (
            value if int in kinds else (float(value) if float in kinds else _INVALID)
        )
    elif isinstance(value, float):
        converted = value if float in kinds else _INVALID
    else:
        converted = _INVALID
    if converted is _INVALID:
        what = " or ".join(_WHAT[kind] for kind in kinds)
        raise SweepError(f"{where or name}: {value!r} is not {what}")
    return converted


def _from_text(text: str, kinds: tuple):
    if type(None) in kinds and text.lower() == "none":
        return None
    if bool in kinds:
        return {"true": True, "false": False}.get(text.lower(), _INVALID)
    for number in (int, float):
        if number in kinds:
            try:
                return number(text)
            except ValueError:
                pass
    if str in kinds:
        # Next to a number, text is a keyword such as 'auto'.
        return text.lower() if (int in kinds or float in kinds) else text
    return _INVALID


def _assignment(item: str, flag: str) -> tuple[str, str, str]:
    """Split ``KEY=VALUE`` into the field name, the value text and its origin."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        shape = "KEY=VALUE" if flag == "--set" else "KEY=V1,V2,..."
        raise SweepError(f"{flag} expects {shape}, got {item!r}")
    name = _option_name(key, flag)
    return name, text, f"{flag} {name}"


def parse_command_line(fixed: tuple = (), varied: tuple = ()) -> Grid:
    """Return the grid of ``--set KEY=VALUE`` and ``--grid KEY=V1,V2,...`` items.

    ``--grid`` splits its values at commas: values that hold a comma, such
    as ``synthetic:rows=200,features=5``, go in a grid file's list instead.

    Raises:
        SweepError: a malformed item, an unknown option, a bad value, or an
            option given twice.

    Example:
        >>> grid = parse_command_line(["iters=50"], ["method=gd,clip21", "tau=1"])
        >>> grid.base, grid.axes
        ({'iters': 50}, {'method': ('gd', 'clip21'), 'tau': (1.0,)})
    """
    base, axes, origin = {}, {}, {}
    for item in fixed:
        name, text, where = _assignment(item, "--set")
        _once(name, where, origin)
        base[name] = convert(name, text, where)
    for item in varied:
        name, text, where = _assignment(item, "--grid")
        _once(name, where, origin)
        pieces = text.split(",")
        if any(not piece.strip() for piece in pieces):
            raise SweepError(
                f"{where}: empty value in {item!r}; separate values by commas"
            )
        axes[name] = tuple(convert(name, piece, where) for piece in pieces)
    return Grid(base, axes)


def _once(name: str, where: str, origin: dict) -> None:
    if name in origin:
        raise SweepError(
            f"{where}: {name!r} is also given by {origin[name]}; give it once"
        )
    origin[name] = where


def load_grid_file(path) -> Grid:
    """Read a TOML grid file: ``[base]`` fixed options, ``[grid]`` lists of values.

    Example file::

        [base]
        data = "breast_cancer"
        iters = 500

        [grid]
        method = ["clip21", "clip-gd"]
        tau = [0.01, 0.1, 1.0]

    Raises:
        SweepError: the file cannot be read or parsed, or holds an unknown
            table or option, a bad value, or an option given twice.
    """
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except OSError as err:
        raise SweepError(
            f"--grid-file: cannot read {str(path)!r}: {err.strerror}"
        ) from err
    except tomllib.TOMLDecodeError as err:
        raise SweepError(
            f"--grid-file: {str(path)!r} is not valid TOML: {err}"
        ) from err

    for key, table in document.items():
        if key not in ("base", "grid") or not isinstance(table, dict):
            raise SweepError(
                f"--grid-file: unknown entry {key!r} in {str(path)!r}; a grid file "
                "has a [base] table of fixed options and a [grid] table of lists"
            )

    base, axes, origin = {}, {}, {}
    for key, value in document.get("base", {}).items():
        where = f"[base] {key} in {str(path)!r}"
        name = _option_name(key, f"[base] in {str(path)!r}")
        _once(name, where, origin)
        if isinstance(value, list):
            raise SweepError(
                f"{where}: {value!r} is a list; lists of values go under [grid]"
            )
        base[name] = convert(name, value, where)
    for key, values in document.get("grid", {}).items():
        where = f"[grid] {key} in {str(path)!r}"
        name = _option_name(key, f"[grid] in {str(path)!r}")
        _once(name, where, origin)
        if not isinstance(values, list) or not values:
            raise SweepError(
                f"{where}: expected a non-empty list of values, got {values!r}; "
                "fixed options go under [base]"
            )
        axes[name] = tuple(convert(name, value, where) for value in values)
    return Grid(base, axes)


def file_value(value) -> str:
    """Return ``value`` as text for a file name: repr-like, with only letters,
    digits and ``._+-`` (any other character becomes ``-``).

    Example:
        >>> [file_value(v) for v in (0.01, -1e-05, 3, None, "data/a9a.txt")]
        ['0.01', '-1e-05', '3', 'none', 'data-a9a.txt']
    """
    if isinstance(value, str):
        text = value
    elif value is None:
        text = "none"
    else:
        text = repr(value)
    return "".join(c if c in _NAME_CHARS else "-" for c in text)


def log_name(varied: dict) -> str:
    """Return the log's file name: ``key-value`` pairs joined by ``_``.

    Example:
        >>> log_name({"method": "clip21", "tau": 0.01, "seed": 0})
        'method-clip21_tau-0.01_seed-0.h5'
        >>> log_name({})
        'run.h5'
    """
    stem = "_".join(f"{key}-{file_value(value)}" for key, value in varied.items())
    return f"{stem or 'run'}.h5"


def expand(grid: Grid) -> list[Cell]:
    """Return the cells of ``grid``: its product, unused options dropped, once each.

    Raises:
        SweepError: two cells would write the same file, or a name is too
            long for a file system.

    Example:
        >>> grid = Grid({"iters": 50}, {"method": ("gd", "ef21"), "k": (1, 2)})
        >>> for cell in expand(grid):
        ...     print(cell.index, cell.name, cell.points, cell.unused)
        0 method-gd.h5 (0, 1) ('k',)
        1 method-ef21_k-1.h5 (2,) ()
        2 method-ef21_k-2.h5 (3,) ()
    """
    keys = tuple(grid.axes)
    found: dict[frozenset, dict] = {}
    for point, values in enumerate(itertools.product(*grid.axes.values())):
        options = {**grid.base, **dict(zip(keys, values))}
        unused = unused_options(options)
        options = {k: v for k, v in options.items() if k not in unused}
        identity = frozenset(options.items())
        if identity in found:
            found[identity]["points"].append(point)
            continue
        found[identity] = {
            "options": options,
            "varied": {k: options[k] for k in keys if k in options},
            "points": [point],
            "unused": tuple(k for k in keys if k in unused),
        }

    cells, names = [], {}
    for index, entry in enumerate(found.values()):
        name = log_name(entry["varied"])
        if len(name.encode()) > _MAX_NAME:
            raise SweepError(
                f"the log name of cell {index} has {len(name.encode())} bytes, more "
                f"than a file name may ({_MAX_NAME}): {name!r}; vary fewer options "
                "or use shorter values"
            )
        # Case-insensitive file systems would merge names that differ in case.
        if name.lower() in names:
            raise SweepError(
                f"cells {names[name.lower()]} and {index} would both write {name!r}; "
                "make the varied values differ in letters, digits or '._+-'"
            )
        names[name.lower()] = index
        cells.append(
            Cell(
                index,
                entry["options"],
                entry["varied"],
                name,
                tuple(entry["points"]),
                entry["unused"],
            )
        )
    return cells


def validate_cells(cells: list[Cell], n_ranks: int) -> list[RunConfig]:
    """Return every cell's validated RunConfig (without ``out``), or raise.

    Raises:
        SweepError: the first invalid cell, named with its index and log.
    """
    configs = []
    for cell in cells:
        try:
            configs.append(cell.config().validate(n_ranks))
        except ConfigError as err:
            raise SweepError(f"cell {cell.index} ({cell.name}): {err.message}") from err
    return configs


def count(n: int, noun: str) -> str:
    """Return ``"1 run"``, ``"2 runs"``: ``n`` and the noun, plural unless 1."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _shown(value) -> str:
    """Return ``value`` as it would be typed after ``--set KEY=``."""
    if isinstance(value, str):
        return value
    return "none" if value is None else repr(value)


def format_listing(
    grid: Grid, cells: list[Cell], shown: list[Cell] | None = None
) -> str:
    """Return the table that ``--list`` prints: cell, file and varied options.

    Args:
        grid: the grid the cells come from.
        cells: all its cells.
        shown: the cells to list (all of them by default).

    Example:
        >>> grid = Grid({"iters": 50}, {"method": ("gd", "ef21"), "k": (1, 2)})
        >>> print(format_listing(grid, expand(grid)))
        fixed: iters=50
        cell  file                options
        0     method-gd.h5        method=gd        (2 grid points; k unused)
        1     method-ef21_k-1.h5  method=ef21 k=1
        2     method-ef21_k-2.h5  method=ef21 k=2
        3 runs from 4 grid points
    """
    shown = cells if shown is None else shown
    rows = [("cell", "file", "options", "")]
    for cell in shown:
        note = ""
        if len(cell.points) > 1:
            why = f"{', '.join(cell.unused)} unused" if cell.unused else "same options"
            note = f"({len(cell.points)} grid points; {why})"
        rows.append((str(cell.index), cell.name, cell.describe(), note))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]

    lines = []
    if grid.base:
        lines.append(
            "fixed: " + " ".join(f"{k}={_shown(v)}" for k, v in grid.base.items())
        )
    for row in rows:
        lines.append(
            "  ".join(text.ljust(w) for text, w in zip(row, [*widths, 0])).rstrip()
        )
    n_points = sum(len(cell.points) for cell in cells)
    lines.append(f"{count(len(cells), 'run')} from {count(n_points, 'grid point')}")
    return "\n".join(lines)
