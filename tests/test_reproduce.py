"""Presets: G0-relative settings, the runs they make, figures and summary."""

import os

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from clip21mpi.comm import World
from clip21mpi.config import RunConfig
from clip21mpi.reproduce import (
    PresetError,
    build_grid,
    gradient_scale,
    load_preset,
    preset_names,
)
from clip21mpi.runlog import read_log
from clip21mpi.runner import initial_point, prepare
from problems.data import load_dataset, map_labels


def test_bundled_presets_load():
    assert preset_names() == ["clip21-logreg", "clip21-phases", "dp-tradeoff"]
    for name in preset_names():
        preset = load_preset(name)
        assert preset.description and preset.figures
    with pytest.raises(PresetError, match="no preset 'nope'; bundled presets: "):
        load_preset("nope")


def test_g0_is_the_largest_client_gradient_at_x0():
    cfg = RunConfig(data="breast_cancer", clients=5, x0="normal", seed=3)
    setup = prepare(cfg, 0, 1)
    x0 = initial_point(setup.config, setup.objectives)
    g0 = gradient_scale(setup, x0, World())
    # Independently: logistic loss plus the nonconvex regulariser, 5 blocks.
    data = load_dataset("breast_cancer")
    A, b = data.features, map_labels(data.labels, (-1.0, 1.0), "bc")
    per = len(b) // 5
    norms = []
    for i in range(5):
        rows = slice(i * per, len(b) if i == 4 else (i + 1) * per)
        Ai, bi = A[rows], b[rows]
        g = Ai.T @ (-bi / (1 + np.exp(bi * (Ai @ x0)))) / len(bi)
        g += 0.1 * 2 * x0 / (1 + x0**2) ** 2
        norms.append(np.linalg.norm(g))
    assert g0 == pytest.approx(max(norms), rel=1e-12)


def test_relative_values_resolve_to_four_digits():
    grid = build_grid(load_preset("clip21-logreg"), 3.14159, {"iters": 5})
    assert grid.axes["tau"] == (0.03142, 0.3142, 1.571)
    assert grid.base["iters"] == 5


def test_reproduce_writes_runs_figures_and_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli,
        [
            "reproduce",
            "clip21-phases",
            "--data",
            "breast_cancer",
            "--out",
            "out",
            "--set",
            "iters=40",
            "--set",
            "clients=4",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    runs = sorted(os.listdir(tmp_path / "out" / "runs"))
    assert len(runs) == 5 and "method-gd.h5" in runs
    assert sorted(p for p in os.listdir(tmp_path / "out") if p != "runs") == [
        "clip-fraction.png",
        "grad-norm-vs-iterations.png",
        "summary.md",
    ]
    assert (tmp_path / "out" / "clip-fraction.png").read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("# clip21-phases\n")
    assert "![clip-fraction.png](clip-fraction.png)" in summary
    assert summary.count("| max_iters |") == 5
    log = read_log(tmp_path / "out" / "runs" / runs[0])
    assert log.config["clients"] == 4 and log.config["iters"] == 40
    # The smallest threshold is G0/1000 and clips at the first step.
    assert log["metrics"]["clip_fraction"][0] == 1.0


def test_reproduce_needs_data_and_out(tmp_path):
    result = CliRunner().invoke(cli, ["reproduce", "clip21-phases"])
    assert result.exit_code == 2
    assert "Error: --data is required (see --list for presets)" in result.output
