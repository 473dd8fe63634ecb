"""The Clip21 family: special cases that coincide, reference loops of the
stochastic, momentum, normalised and local-step methods, and the noise."""

import itertools

import numpy as np
import pytest

from clip21mpi.comm import World
from clip21mpi.config import ConfigError, RunConfig
from clip21mpi.methods import METHODS, Method
from clip21mpi.runlog import read_log
from clip21mpi.runner import prepare, run
from clip21mpi.streams import stream
from problems.data import load_dataset, map_labels
from problems.split import client_offsets

DATA = "synthetic:rows=240,features=6,heterogeneity=2"
LAM = 0.1


def run_library(tmp_path, name="run", **options):
    cfg = RunConfig(out=str(tmp_path / f"{name}.h5"), **options)
    result = run(prepare(cfg, 0, 1), World())
    return result, read_log(cfg.out)


def shards(clients, data=DATA, seed=0):
    dataset = load_dataset(data, seed, clients)
    y = map_labels(dataset.labels, (-1.0, 1.0), data)
    offsets = client_offsets(len(y), clients)
    return [(dataset.features[a:b], y[a:b]) for a, b in itertools.pairwise(offsets)]


def grad(shard, x, rows=None):
    A, b = shard
    if rows is not None:
        A, b = A[rows], b[rows]
    sig = 1 / (1 + np.exp(b * (A @ x)))
    return A.T @ (-b * sig) / len(b) + LAM * 2 * x / (1 + x**2) ** 2


def clip(v, tau):
    norm = np.linalg.norm(v)
    return v if norm <= tau else v * (tau / norm)


def final_x(tmp_path, name, **options):
    return run_library(tmp_path, name, data=DATA, **options)[0].x_final


COMMON = {"clients": 4, "iters": 50, "step_size": 0.5, "tau": 0.05}


def test_sgd2m_with_unit_weights_and_full_batches_is_clip21(tmp_path):
    a = final_x(tmp_path, "a", method="clip21", **COMMON)
    b = final_x(tmp_path, "b", method="clip21-sgd2m", beta=1.0, beta_hat=1.0, **COMMON)
    np.testing.assert_array_equal(a, b)


def test_press_clip21_with_k_equal_d_is_clip21(tmp_path):
    a = final_x(tmp_path, "a", method="clip21", **COMMON)
    b = final_x(tmp_path, "b", method="press-clip21", k=6, **COMMON)
    np.testing.assert_array_equal(a, b)


def test_clip21_sgd_with_whole_clients_as_batches_is_clip21(tmp_path):
    a = final_x(tmp_path, "a", method="clip21", **COMMON)
    b = final_x(tmp_path, "b", method="clip21-sgd", batch_size=60, **COMMON)
    np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("eta,server", [(1.0, 0.5), (0.25, 2.0)])
def test_fedavg_with_one_local_step_is_clip_gd(tmp_path, eta, server):
    """clip_tau(x - eta g - x) = -eta clip_{tau/eta}(g): one local step of size
    eta and a server step gamma_s is Clip-GD with step eta gamma_s and
    threshold tau / eta."""
    common = {"clients": 4, "iters": 50}
    a = final_x(
        tmp_path,
        "a",
        method="clip-gd",
        step_size=eta * server,
        tau=0.05 / eta,
        **common,
    )
    b = final_x(
        tmp_path,
        "b",
        method="clip-fedavg",
        local_steps=1,
        local_step_size=eta,
        server_step_size=server,
        tau=0.05,
        **common,
    )
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_normec_with_unit_beta_and_zero_alpha_sends_unit_vectors():
    method = Method(METHODS["normec"], alpha=0.0, beta=1.0)
    state = method.init_state(range(5), 4, seed=0)
    rng = np.random.default_rng(0)
    for first in (True, False, False):
        V = rng.standard_normal((5, 4)) * rng.uniform(0.01, 100, (5, 1))
        C, active = method.messages(V, state, first)
        np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1.0, rtol=1e-14)
        assert active.all()
    assert method.norm_bound == 1.0


def test_clip21_sgd2m_equals_a_per_client_loop(tmp_path):
    """Momentum, minibatches from each client's own stream, and noise."""
    n, b, beta, beta_hat, tau, gamma, sigma, iters = 4, 8, 0.3, 0.6, 0.05, 0.5, 0.01, 30
    result, _ = run_library(
        tmp_path,
        data=DATA,
        method="clip21-sgd2m",
        clients=n,
        batch_size=b,
        beta=beta,
        beta_hat=beta_hat,
        tau=tau,
        step_size=gamma,
        noise_sigma=sigma,
        iters=iters,
    )
    data = shards(n)
    batch = [stream(0, "batch", i) for i in range(n)]
    noise = [stream(0, "noise", i) for i in range(n)]
    x = np.zeros(6)
    v = [np.zeros(6) for _ in range(n)]
    g_i = [np.zeros(6) for _ in range(n)]
    g = np.zeros(6)
    for _ in range(iters):
        received = []
        for i in range(n):
            rows = batch[i].choice(len(data[i][1]), size=b, replace=False)
            v[i] = (1 - beta) * v[i] + beta * grad(data[i], x, rows)
            c = clip(v[i] - g_i[i], tau)
            g_i[i] = g_i[i] + beta_hat * c
            received.append(c + sigma * noise[i].standard_normal(6))
        g = g + beta_hat * np.mean(received, axis=0)
        x = x - gamma * g
    np.testing.assert_allclose(result.x_final, x, rtol=1e-10, atol=1e-14)


def test_normec_equals_a_per_client_loop(tmp_path):
    n, alpha, beta, gamma, iters = 3, 0.1, 0.5, 0.2, 40
    result, log = run_library(
        tmp_path,
        data=DATA,
        method="normec",
        clients=n,
        alpha=alpha,
        beta=beta,
        step_size=gamma,
        iters=iters,
    )
    data = shards(n)
    x, g = np.zeros(6), np.zeros(6)
    g_i = [np.zeros(6) for _ in range(n)]
    for _ in range(iters):
        deltas = []
        for i in range(n):
            u = grad(data[i], x) - g_i[i]
            deltas.append(u / (alpha + np.linalg.norm(u)))
            g_i[i] = g_i[i] + beta * deltas[-1]
        g = g + beta * np.mean(deltas, axis=0)
        x = x - gamma * g
    np.testing.assert_allclose(result.x_final, x, rtol=1e-10, atol=1e-14)
    assert np.all(log["metrics"]["clip_fraction"] == 1.0)


def test_clip_fedavg_equals_a_per_client_loop(tmp_path):
    n, q, eta, server, tau, iters = 4, 3, 0.3, 0.8, 0.05, 30
    result, log = run_library(
        tmp_path,
        data=DATA,
        method="clip-fedavg",
        clients=n,
        local_steps=q,
        local_step_size=eta,
        server_step_size=server,
        tau=tau,
        iters=iters,
    )
    data = shards(n)
    x = np.zeros(6)
    history = []
    for _ in range(iters + 1):
        history.append(np.linalg.norm(np.mean([grad(s, x) for s in data], axis=0)) ** 2)
        sent = []
        for i in range(n):
            xi = x.copy()
            for _ in range(q):
                xi = xi - eta * grad(data[i], xi)
            sent.append(clip(xi - x, tau))
        x_next = x + server * np.mean(sent, axis=0)
        if len(history) == iters + 1:
            break
        x = x_next
    np.testing.assert_allclose(result.x_final, x, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(log["metrics"]["grad_norm_sq"], history, rtol=1e-10)


def test_press_clip21_equals_a_per_client_loop(tmp_path):
    n, k, tau, gamma, iters = 4, 2, 0.05, 0.5, 40
    result, log = run_library(
        tmp_path,
        data=DATA,
        method="press-clip21",
        clients=n,
        k=k,
        tau=tau,
        step_size=gamma,
        iters=iters,
    )
    data = shards(n)
    x, g = np.zeros(6), np.zeros(6)
    g_i = [np.zeros(6) for _ in range(n)]
    for _ in range(iters):
        for i in range(n):
            c = clip(grad(data[i], x) - g_i[i], tau)
            keep = np.argsort(-np.abs(c), kind="stable")[:k]
            c_k = np.zeros(6)
            c_k[keep] = c[keep]
            assert np.linalg.norm(c_k) <= tau * (1 + 1e-14)
            g_i[i] = g_i[i] + c_k
            g = g + c_k / n
        x = x - gamma * g
    np.testing.assert_allclose(result.x_final, x, rtol=1e-10, atol=1e-14)
    bits = log["metrics"]["bits_sent"]
    np.testing.assert_array_equal(np.diff(bits), k * 96)


def test_injected_noise_has_the_requested_variance():
    sigma = 0.7
    method = Method(METHODS["clip21"], tau=1.0, noise_sigma=sigma)
    state = method.init_state(range(3, 8), 50, seed=11)
    draws = np.concatenate([method.noise(state, 50) for _ in range(400)])
    assert draws.shape == (2000, 50)
    # The sample variance of 100000 normals is within 2% of sigma^2 (about 4.5
    # standard errors) and the mean within 0.01.
    assert abs(draws.var() / sigma**2 - 1) < 0.02
    assert abs(draws.mean()) < 0.01
    # Client 5's noise is its own stream, whichever rank holds it.
    alone = Method(METHODS["clip21"], tau=1.0, noise_sigma=sigma)
    state5 = alone.init_state(range(5, 6), 50, seed=11)
    np.testing.assert_array_equal(alone.noise(state5, 50)[0], draws[2])


def test_noise_reaches_the_server_but_not_the_client_estimates(tmp_path):
    n = 3
    quiet, _ = run_library(
        tmp_path,
        "q",
        data=DATA,
        method="clip21",
        clients=n,
        iters=5,
        tau=0.05,
        step_size=0.5,
    )
    noisy, log = run_library(
        tmp_path,
        "n",
        data=DATA,
        method="clip21",
        clients=n,
        iters=5,
        tau=0.05,
        step_size=0.5,
        noise_sigma=0.1,
    )
    assert not np.allclose(quiet.x_final, noisy.x_final)
    assert log["attrs"]["noise_sigma"] == 0.1
    np.testing.assert_array_equal(np.diff(log["metrics"]["bits_sent"]), 64 * 6)
    assert log["metrics"]["epsilon"][0] == 0
    assert np.all(np.diff(log["metrics"]["epsilon"]) > 0)


@pytest.mark.parametrize(
    "options,option,message",
    [
        (
            {"method": "gd", "noise_sigma": 0.1},
            "--method",
            "--method gd sends messages of unbounded norm",
        ),
        (
            {"method": "ef21", "epsilon": 1.0},
            "--method",
            "--method ef21 sends messages of unbounded norm",
        ),
        (
            {"method": "clip21-sgd"},
            "--batch-size",
            "--method clip21-sgd needs --batch-size",
        ),
        (
            {"method": "clip21", "noise_sigma": 0.1, "epsilon": 1.0},
            "--epsilon",
            "pass --noise-sigma or --epsilon, not both",
        ),
        (
            {"method": "clip21-sgd2m", "beta": 1.5},
            "--beta",
            "--beta must be in (0, 1], got 1.5",
        ),
        (
            {"problem": "mlp", "step_size": "auto"},
            "--step-size",
            "--step-size auto needs a smoothness constant",
        ),
        ({"delta": 1.0, "epsilon": 1.0}, "--delta", "--delta must be in (0, 1)"),
    ],
)
def test_family_options_are_validated(options, option, message):
    with pytest.raises(ConfigError) as err:
        RunConfig(**options).validate(1)
    assert err.value.option == option
    assert err.value.message.startswith(message)


def test_batch_size_larger_than_a_client_is_refused():
    cfg = RunConfig(data=DATA, clients=4, method="clip-sgd", batch_size=61)
    with pytest.raises(ConfigError) as err:
        prepare(cfg, 0, 1)
    assert err.value.message == (
        "--batch-size 61 exceeds the 60 rows of the smallest client; pass at "
        "most 60 or fewer --clients"
    )


def test_stochastic_methods_evaluate_full_gradients_every_eval_every(tmp_path):
    _, log = run_library(
        tmp_path,
        data=DATA,
        method="clip-sgd",
        clients=2,
        batch_size=4,
        iters=20,
        eval_every=5,
    )
    gns = log["metrics"]["grad_norm_sq"]
    assert np.isfinite(gns[::5]).all()
    assert np.isnan(np.delete(gns, np.arange(0, 21, 5))).all()


def test_mlp_learns_digits_with_clip21_sgd2m(tmp_path):
    result, log = run_library(
        tmp_path,
        data="digits",
        problem="mlp",
        method="clip21-sgd2m",
        clients=5,
        batch_size=32,
        beta=0.5,
        tau=1.0,
        step_size=0.5,
        iters=150,
        hidden=16,
    )
    loss = log["metrics"]["loss"]
    assert loss[0] > 2.0 and result.loss < 0.5
    assert np.isnan(log["attrs"]["L"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_documents_its_rule_and_options(name):
    spec = METHODS[name]
    assert spec.summary and spec.paper and spec.sends
    step = "--server-step-size" if spec.estimator == "local-steps" else "--step-size"
    for option in (*spec.options, step):
        assert option in spec.notation, option
