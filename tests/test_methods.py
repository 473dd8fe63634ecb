"""Each method's trajectory against a plain per-client numpy loop, and the
central claim of Clip21: error feedback removes the bias of clipping."""

import itertools

import numpy as np
import pytest

from clip21mpi.comm import World
from clip21mpi.config import RunConfig
from clip21mpi.runlog import read_log
from clip21mpi.runner import prepare, run
from problems.data import load_dataset, map_labels
from problems.split import client_offsets

DATA = "synthetic:rows=240,features=6,heterogeneity=2"


def run_library(tmp_path, **options):
    cfg = RunConfig(out=str(tmp_path / "run.h5"), **options)
    result = run(prepare(cfg, 0, 1), World())
    return result, read_log(cfg.out)


def reference(method, data, clients, tau, k, gamma, iters, lam=0.1, seed=0):
    """Clip21, Clip-GD, GD and EF21 written out client by client."""
    dataset = load_dataset(data, seed, clients)
    X = dataset.features
    X = X.toarray() if hasattr(X, "toarray") else X
    y = map_labels(dataset.labels, (-1.0, 1.0), data)
    offsets = client_offsets(len(y), clients)
    shards = [(X[a:b], y[a:b]) for a, b in itertools.pairwise(offsets)]

    def grad_i(i, x):
        A, b = shards[i]
        sig = 1 / (1 + np.exp(b * (A @ x)))
        return A.T @ (-b * sig) / len(b) + lam * 2 * x / (1 + x**2) ** 2

    def clip(v):
        norm = np.linalg.norm(v)
        return v if norm <= tau else v * (tau / norm)

    def top_k(v):
        out = np.zeros_like(v)
        keep = np.argsort(-np.abs(v), kind="stable")[:k]
        out[keep] = v[keep]
        return out

    x = np.zeros(X.shape[1])
    g_i = [np.zeros_like(x) for _ in range(clients)]
    g = np.zeros_like(x)
    history = []
    for step in range(iters + 1):
        grads = [grad_i(i, x) for i in range(clients)]
        history.append(np.linalg.norm(np.mean(grads, axis=0)) ** 2)
        if step == iters:
            break
        if method == "gd":
            g = np.mean(grads, axis=0)
        elif method == "clip-gd":
            g = np.mean([clip(gr) for gr in grads], axis=0)
        else:
            for i in range(clients):
                if method == "ef21":
                    c = grads[i] if step == 0 else top_k(grads[i] - g_i[i])
                else:
                    c = clip(grads[i] - g_i[i])
                g_i[i] = g_i[i] + c
                g = g + c / clients
        x = x - gamma * g
    return x, np.array(history)


@pytest.mark.parametrize("method", ["gd", "clip-gd", "clip21", "ef21"])
def test_trajectory_equals_per_client_loop(tmp_path, method):
    options = {
        "data": DATA,
        "clients": 4,
        "method": method,
        "tau": 0.05,
        "k": 2,
        "step_size": 0.5,
        "iters": 60,
    }
    result, log = run_library(tmp_path, **options)
    x_ref, history = reference(method, DATA, 4, 0.05, 2, 0.5, 60)
    assert result.status == "max_iters" and result.iterations == 60
    np.testing.assert_allclose(log["metrics"]["grad_norm_sq"], history, rtol=1e-10)
    np.testing.assert_allclose(result.x_final, x_ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(log["x_final"], result.x_final)
    if method in ("clip-gd", "clip21"):
        assert log["metrics"]["clip_fraction"][0] == 1.0


def test_clip21_with_a_large_threshold_is_gd(tmp_path):
    common = {"data": DATA, "clients": 3, "step_size": 0.4, "iters": 40}
    gd, _ = run_library(tmp_path / "gd", method="gd", **common)
    clip21, log = run_library(tmp_path / "c", method="clip21", tau=1e6, **common)
    np.testing.assert_allclose(clip21.x_final, gd.x_final, rtol=1e-13)
    assert np.all(log["metrics"]["clip_fraction"] == 0)


def test_clipping_removes_bias_only_with_error_feedback(tmp_path):
    """On heterogeneous clients with clipping active, Clip-GD stalls orders of
    magnitude above Clip21, which reaches GD's accuracy."""
    common = {
        "data": "synthetic:rows=400,features=10,heterogeneity=2",
        "clients": 4,
        "tau": 0.1,
        "iters": 500,
    }
    final = {}
    for method in ("gd", "clip-gd", "clip21"):
        result, log = run_library(tmp_path / method, method=method, **common)
        final[method] = result.grad_norm_sq
        if method == "clip21":
            fraction = log["metrics"]["clip_fraction"]
    assert fraction[0] == 1.0 and fraction[-1] == 0.0  # clipping active, then off
    assert final["gd"] < 1e-20
    assert final["clip21"] < 1e-20
    assert final["clip-gd"] > 1e6 * final["clip21"]
    assert final["clip-gd"] > 1e-4


def test_tolerance_stops_all_methods(tmp_path):
    result, log = run_library(
        tmp_path, data=DATA, clients=2, method="clip21", tau=0.1, tol=1e-8, iters=5000
    )
    assert result.status == "converged"
    gns = log["metrics"]["grad_norm_sq"]
    assert gns[-1] <= 1e-8 < gns[-2]
    assert len(gns) == result.iterations + 1 < 5001


def test_auto_step_size_is_one_over_L(tmp_path):
    result, log = run_library(tmp_path, data=DATA, clients=4, method="gd", iters=3)
    assert result.step_size == pytest.approx(1 / log["attrs"]["L"], rel=1e-15)
    assert log["attrs"]["L"] <= np.mean(log["attrs"]["L_i"]) + 1e-12
