"""Properties of the message operators and of error feedback."""

import numpy as np
import pytest

from clip21mpi.methods import METHODS, Method, auto_step_size
from clip21mpi.operators import Clip, Identity, TopK, clip_rows, top_k_rows


@pytest.fixture
def V():
    rng = np.random.default_rng(1)
    return rng.standard_normal((50, 7)) * rng.uniform(0.01, 10, size=(50, 1))


def test_clip_norm_equals_threshold_where_active(V):
    tau = 2.0
    C, active = clip_rows(V, tau)
    norms_in = np.linalg.norm(V, axis=1)
    norms_out = np.linalg.norm(C, axis=1)
    assert active.any() and (~active).any()
    np.testing.assert_allclose(norms_out[active], tau, rtol=1e-14)
    np.testing.assert_array_equal(C[~active], V[~active])
    assert np.all(norms_out <= tau * (1 + 1e-14))
    np.testing.assert_array_equal(active, norms_in > tau)


def test_clip_keeps_direction_and_is_idempotent(V):
    C, _ = clip_rows(V, 1.0)
    cos = np.einsum("ij,ij->i", C, V) / (
        np.linalg.norm(C, axis=1) * np.linalg.norm(V, axis=1)
    )
    np.testing.assert_allclose(cos, 1.0, rtol=1e-14)
    # Clipping twice changes nothing beyond round-off.
    C2, _ = clip_rows(C, 1.0)
    np.testing.assert_allclose(C2, C, rtol=4e-16, atol=0)


def test_clip_of_zero_is_zero():
    C, active = clip_rows(np.zeros((2, 3)), 0.5)
    assert np.all(C == 0) and not active.any()


def test_top_k_keeps_the_k_largest(V):
    k = 3
    C, active = top_k_rows(V, k)
    assert np.all(np.count_nonzero(C, axis=1) == k)
    for v, c in zip(V, C):
        kept = np.flatnonzero(c)
        dropped = np.setdiff1d(np.arange(v.size), kept)
        np.testing.assert_array_equal(c[kept], v[kept])
        assert np.abs(v[kept]).min() >= np.abs(v[dropped]).max()
    assert active.all()
    # Top-k is a contraction: ||TopK(v) - v||^2 <= (1 - k/d) ||v||^2.
    d = V.shape[1]
    lhs = np.sum((C - V) ** 2, axis=1)
    assert np.all(lhs <= (1 - k / d) * np.sum(V**2, axis=1) + 1e-12)


def test_top_k_with_k_equal_d_is_identity(V):
    C, active = top_k_rows(V, V.shape[1])
    np.testing.assert_array_equal(C, V)
    assert not active.any()


def test_bits_per_message():
    assert Identity().bits(10) == 640
    assert Clip(1.0).bits(10) == 640
    assert TopK(2).bits(10) == 2 * 96
    assert TopK(10).bits(10) == 640


def test_error_feedback_identity():
    """g_i^k = g_i^{k-1} + c_i^k and g^k = mean_i g_i^k, round after round."""
    rng = np.random.default_rng(0)
    n, d = 5, 4
    method = Method(METHODS["clip21"], tau=0.3)
    state = method.init_state(range(n), d, seed=0)
    for k in range(30):
        grads = rng.standard_normal((n, d)) * 3
        before = state.g_local.copy()
        C, _active = method.messages(grads, state, first=k == 0)
        np.testing.assert_array_equal(state.g_local, before + C)
        np.testing.assert_allclose(C, clip_rows(grads - before, 0.3)[0])
        method.server_round(state, C.mean(axis=0))
        np.testing.assert_allclose(state.g, state.g_local.mean(axis=0), atol=1e-13)
        assert np.all(np.linalg.norm(C, axis=1) <= 0.3 * (1 + 1e-14))


def test_ef21_first_round_sends_the_gradient():
    method = Method(METHODS["ef21"], k=1)
    state = method.init_state(range(2), 3, seed=0)
    grads = np.array([[1.0, -2.0, 3.0], [0.5, 0.1, -0.2]])
    C, _ = method.messages(grads, state, first=True)
    np.testing.assert_array_equal(C, grads)
    C, _ = method.messages(grads + 1.0, state, first=False)
    assert np.all(np.count_nonzero(C, axis=1) == 1)
    assert method.bits_per_message(3, True) == 192
    assert method.bits_per_message(3, False) == 96


def test_methods_without_error_feedback_keep_no_state():
    method = Method(METHODS["clip-gd"], tau=1.0)
    state = method.init_state(range(2), 2, seed=0)
    C, active = method.messages(np.array([[3.0, 4.0], [0.1, 0.0]]), state, True)
    np.testing.assert_allclose(C, [[0.6, 0.8], [0.1, 0.0]])
    assert active.tolist() == [True, False]
    assert np.all(state.g_local == 0)
    method.server_round(state, C.mean(axis=0))
    method.server_round(state, C.mean(axis=0))
    np.testing.assert_allclose(state.g, C.mean(axis=0))


def test_ef21_auto_step_size_matches_theory():
    L, Lt, k, d = 2.0, 3.0, 2, 8
    alpha = k / d
    theta = 1 - np.sqrt(1 - alpha)
    beta = (1 - alpha) / (1 - np.sqrt(1 - alpha))
    expected = 1 / (L + Lt * np.sqrt(beta / theta))
    assert auto_step_size("ef21", L, Lt, k, d) == pytest.approx(expected, rel=1e-15)
    assert auto_step_size("clip21", L, Lt, k, d) == 0.5
    # Top-k with k = d is exact: the EF21 step is the GD step.
    assert auto_step_size("ef21", L, Lt, d, d) == pytest.approx(1 / L)
