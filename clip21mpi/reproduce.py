"""Named experiments: a grid of runs, its figures and a markdown summary.

A preset is a TOML file: a sweep grid (``[base]`` and ``[grid]``, as for
``clip21mpi sweep --grid-file``) plus a ``description`` and ``[[figure]]``
tables. Values may be written relative to

    G0 = max_i ||grad f_i(x0)||

as ``"G0/100"`` or ``"G0*0.5"`` (resolved to 4 significant digits once the
data is known), so thresholds mean the same on every dataset. A figure
table has ``file`` (no suffix), ``metric``, and either ``x`` (``iteration``,
``bits`` or ``time``), ``panels`` and ``log_x`` for curves, or
``kind = "final-vs"`` with ``against`` (a config key, e.g. ``epsilon``) for
the final value of each run against a setting. The bundled presets live
beside this module; ``clip21mpi reproduce FILE.toml`` runs a copy.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clip21mpi.config import RunConfig
from clip21mpi.sweep import Grid, SweepError, convert

__all__ = [
    "FigureSpec",
    "Preset",
    "PresetError",
    "build_grid",
    "gradient_scale",
    "load_preset",
    "preset_names",
    "write_summary",
]

PRESET_DIR = Path(__file__).with_name("presets")
_RELATIVE = re.compile(r"^\s*G0\s*([/*])\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")


class PresetError(ValueError):
    """A preset that cannot be read or used; the message says why."""


@dataclass(frozen=True)
class FigureSpec:
    """One figure of a preset."""

    file: str
    metric: str = "grad_norm_sq"
    x: str = "iteration"
    panels: str | None = None
    log_x: bool = False
    kind: str = "lines"  # or "final-vs"
    against: str = "epsilon"


@dataclass(frozen=True)
class Preset:
    """A named experiment: its grid (raw TOML values) and its figures."""

    name: str
    description: str
    base: dict
    grid: dict
    figures: tuple = field(default_factory=tuple)


def preset_names() -> list[str]:
    """Return the names of the bundled presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name_or_path: str) -> Preset:
    """Read a bundled preset by name, or a preset file by path.

    Raises:
        PresetError: unknown name, unreadable file, or a malformed table.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.toml"
        if not path.exists():
            names = ", ".join(preset_names())
            raise PresetError(
                f"no preset {name_or_path!r}; bundled presets: {names} "
                "(or pass the path of a preset .toml file)"
            )
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except OSError as err:
        raise PresetError(f"cannot read {str(path)!r}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise PresetError(f"{str(path)!r} is not valid TOML: {err}") from err
    unknown = set(document) - {"description", "base", "grid", "figure"}
    if unknown:
        raise PresetError(
            f"{str(path)!r}: unknown entries {sorted(unknown)}; a preset has "
            "description, [base], [grid] and [[figure]] tables"
        )
    try:
        figures = tuple(FigureSpec(**table) for table in document.get("figure", []))
    except TypeError as err:
        raise PresetError(f"{str(path)!r}: bad [[figure]] table: {err}") from err
    return Preset(
        path.stem,
        " ".join(document.get("description", "").split()),
        dict(document.get("base", {})),
        dict(document.get("grid", {})),
        figures,
    )


def _resolve(value, g0: float):
    """Return ``value`` with a ``G0/x`` or ``G0*x`` text replaced by a number."""
    if not isinstance(value, str):
        return value
    match = _RELATIVE.match(value)
    if match is None:
        return value
    op, number = match.group(1), float(match.group(2))
    return float(f"{(g0 / number if op == '/' else g0 * number):.4g}")


def uses_g0(preset: Preset) -> bool:
    """Whether any value of the preset is relative to G0."""
    values = [*preset.base.values()]
    for items in preset.grid.values():
        values.extend(items if isinstance(items, list) else [items])
    return any(isinstance(v, str) and _RELATIVE.match(v) for v in values)


def build_grid(preset: Preset, g0: float, fixed: dict) -> Grid:
    """Return the preset's sweep grid with G0 resolved and ``fixed`` winning.

    Raises:
        PresetError: a value that does not fit its option.
    """
    try:
        base = {
            k.replace("-", "_"): convert(k.replace("-", "_"), _resolve(v, g0), k)
            for k, v in preset.base.items()
        }
        axes = {
            k.replace("-", "_"): tuple(
                convert(k.replace("-", "_"), _resolve(v, g0), k) for v in values
            )
            for k, values in preset.grid.items()
        }
    except (SweepError, KeyError) as err:
        raise PresetError(f"preset {preset.name!r}: {err}") from err
    return Grid(base, axes).merged_with(Grid(fixed, {}))


def base_config(preset: Preset, fixed: dict) -> RunConfig:
    """Return the configuration that G0 is measured with (the base options)."""
    options = {
        k.replace("-", "_"): v
        for k, v in preset.base.items()
        if not (isinstance(v, str) and _RELATIVE.match(v))
    }
    options = {k: convert(k, v, k) for k, v in options.items()}
    options.update(fixed)
    return RunConfig(**options)


def gradient_scale(setup, x0: np.ndarray, world) -> float:
    """Return ``G0 = max_i ||grad f_i(x0)||`` over all clients (a collective)."""
    grads = setup.objectives.grads(x0)
    local = float(np.sqrt(np.einsum("ij,ij->i", grads, grads)).max())
    return max(world.gather_to_all(local))


def _markdown_table(rows: list[dict]) -> str:
    header = (
        "| run | method | tau | step size | status | iterations | final "
        "\\|\\|grad f\\|\\|^2 | bits to tol | epsilon |"
    )
    lines = [header, "|" + "---|" * 9]

    def number(value, fmt):
        return (
            ""
            if value is None or (isinstance(value, float) and math.isnan(value))
            else fmt.format(value)
        )

    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    os.path.basename(row["file"]),
                    row["method"],
                    number(row["tau"], "{:.4g}"),
                    number(row["step_size"], "{:.4g}"),
                    row["status"],
                    str(row["iterations"]),
                    number(row["final_grad_norm_sq"], "{:.3e}"),
                    number(row["bits_to_tol"], "{:.4g}") or "not reached",
                    number(row["epsilon"], "{:.3g}"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def write_summary(
    path, preset: Preset, command: str, g0: float | None, rows, figures, skipped
) -> None:
    """Write the markdown summary of a reproduced preset."""
    parts = [
        f"# {preset.name}",
        "",
        preset.description,
        "",
        f"Command: `{command}`",
        "",
        f"Written {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}.",
    ]
    if g0 is not None:
        parts += ["", f"G0 = max_i ||grad f_i(x0)|| = {g0:.6g}."]
    tol = rows[0]["tol"] if rows else None
    parts += ["", "## Runs", ""]
    if tol is not None:
        parts += [
            f"'bits to tol' is the bits per client sent until ||grad f||^2 <= {tol:g}.",
            "",
        ]
    parts += [_markdown_table(rows)]
    if skipped:
        parts += ["", "Not read: " + "; ".join(str(s) for s in skipped)]
    parts += ["", "## Figures", ""]
    for figure in figures:
        name = os.path.basename(figure)
        parts += [f"![{name}]({name})", ""]
    Path(path).write_text("\n".join(parts) + "\n")
