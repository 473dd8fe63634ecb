"""The one-hidden-layer network: values, gradients, subsets and training."""

import re

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import logsumexp

from problems.data import class_indices, load_dataset
from problems.design import ClientDesign
from problems.losses import make_regulariser
from problems.mlp import MLPObjectives
from problems.split import client_offsets

LAM = 0.1
OFFSETS = np.array([0, 7, 20, 21, 33])
N_FEATURES, N_CLASSES, HIDDEN = 5, 3, 4


def make_mlp(reg, sparse, seed=0, offsets=OFFSETS):
    rng = np.random.default_rng(seed)
    m = int(offsets[-1])
    A = rng.standard_normal((m, N_FEATURES)) * (rng.random((m, N_FEATURES)) < 0.6)
    A = sp.csr_matrix(A) if sparse else A
    classes = rng.integers(0, N_CLASSES, m)
    return MLPObjectives(
        ClientDesign(A, offsets),
        classes,
        N_CLASSES,
        HIDDEN,
        make_regulariser(reg, LAM),
    )


def dense(A):
    return A.toarray() if sp.issparse(A) else np.asarray(A)


def reference_values(A, classes, offsets, x, reg):
    """f_i(x_i) by a loop over clients and rows, for one point per client."""
    A = dense(A)
    p, q, C = A.shape[1], HIDDEN, N_CLASSES
    r = {
        "none": lambda v: 0.0,
        "l2": lambda v: LAM / 2 * v @ v,
        "nonconvex": lambda v: LAM * np.sum(v**2 / (1 + v**2)),
    }[reg]
    values = []
    for i in range(len(offsets) - 1):
        xi = x[i]
        W1 = xi[: q * p].reshape(q, p)
        b1 = xi[q * p : q * p + q]
        W2 = xi[q * p + q : q * p + q + C * q].reshape(C, q)
        b2 = xi[q * p + q + C * q :]
        losses = []
        for j in range(offsets[i], offsets[i + 1]):
            s = W2 @ np.tanh(W1 @ A[j] + b1) + b2
            losses.append(logsumexp(s) - s[classes[j]])
        values.append(np.mean(losses) + r(xi))
    return np.array(values)


CASES = [
    (reg, sparse) for reg in ("none", "l2", "nonconvex") for sparse in (False, True)
]


def point(obj, seed, per_client):
    shape = (obj.n_local, obj.dim) if per_client else (obj.dim,)
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("per_client", [False, True], ids=["shared", "per-client"])
@pytest.mark.parametrize("reg,sparse", CASES)
def test_gradients_match_finite_differences(reg, sparse, per_client):
    obj = make_mlp(reg, sparse)
    x = point(obj, 3, per_client)
    grads = obj.grads(x)
    assert grads.shape == (obj.n_local, obj.dim)
    h = 1e-6
    for l in range(obj.dim):
        e = np.zeros(obj.dim)
        e[l] = h
        # f_i depends on x_i only, so one shift of every x_i gives every client.
        fd = (obj.values(x + e) - obj.values(x - e)) / (2 * h)
        np.testing.assert_allclose(grads[:, l], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("per_client", [False, True], ids=["shared", "per-client"])
@pytest.mark.parametrize("reg,sparse", CASES)
def test_values_match_a_row_by_row_reference(reg, sparse, per_client):
    obj = make_mlp(reg, sparse)
    x = point(obj, 4, per_client)
    X = x if per_client else np.tile(x, (obj.n_local, 1))
    expected = reference_values(obj.design.A, obj.classes, OFFSETS, X, reg)
    np.testing.assert_allclose(obj.values(x), expected, rtol=1e-13)


@pytest.mark.parametrize("reg,sparse", CASES)
def test_shared_point_equals_the_point_repeated_per_client(reg, sparse):
    obj = make_mlp(reg, sparse)
    x = point(obj, 5, per_client=False)
    X = np.tile(x, (obj.n_local, 1))
    np.testing.assert_allclose(obj.grads(x), obj.grads(X), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(obj.values(x), obj.values(X), rtol=1e-13)


@pytest.mark.parametrize("per_client", [False, True], ids=["shared", "per-client"])
@pytest.mark.parametrize("reg,sparse", CASES)
def test_values_and_grads_agree_with_values_and_grads(reg, sparse, per_client):
    obj = make_mlp(reg, sparse)
    x = point(obj, 6, per_client)
    values, grads = obj.values_and_grads(x)
    np.testing.assert_allclose(values, obj.values(x), rtol=1e-14)
    np.testing.assert_allclose(grads, obj.grads(x), rtol=1e-14, atol=1e-17)


@pytest.mark.parametrize("sparse", [False, True])
def test_subset_on_all_rows_is_the_full_objective(sparse):
    obj = make_mlp("l2", sparse)
    sub = obj.subset(np.arange(obj.design.n_rows), obj.design.offsets)
    x = point(obj, 7, per_client=False)
    assert sub.dim == obj.dim
    np.testing.assert_array_equal(sub.rows_per_client, obj.rows_per_client)
    np.testing.assert_allclose(sub.values(x), obj.values(x), rtol=1e-15)
    np.testing.assert_allclose(sub.grads(x), obj.grads(x), rtol=1e-15, atol=1e-18)


@pytest.mark.parametrize("sparse", [False, True])
def test_subset_of_rows_is_the_objective_on_those_rows(sparse):
    obj = make_mlp("nonconvex", sparse)
    # Any local rows, in any order, cut into new clients; one has one row.
    rows = np.array([1, 5, 7, 20, 30, 22, 21])
    offsets = np.array([0, 2, 4, 5, 7])
    sub = obj.subset(rows, offsets)
    A, classes = dense(obj.design.A)[rows], obj.classes[rows]
    x = point(obj, 8, per_client=False)

    def reference(v):
        X = np.tile(v, (offsets.size - 1, 1))
        return reference_values(A, classes, offsets, X, "nonconvex")

    np.testing.assert_array_equal(sub.rows_per_client, [2, 2, 1, 2])
    np.testing.assert_allclose(sub.values(x), reference(x), rtol=1e-13)
    h = 1e-6
    fd = np.stack(
        [
            (reference(x + h * e) - reference(x - h * e)) / (2 * h)
            for e in np.eye(x.size)
        ],
        axis=1,
    )
    np.testing.assert_allclose(sub.grads(x), fd, rtol=1e-6, atol=1e-8)


def test_values_are_finite_at_huge_logits():
    obj = make_mlp("none", sparse=False)
    x = 1e3 * point(obj, 9, per_client=False)
    values, grads = obj.values_and_grads(x)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
    assert np.all(values >= 0.0)


def test_unpack_returns_views_in_the_documented_layout():
    obj = make_mlp("none", sparse=False)
    x = np.arange(obj.dim, dtype=float)
    W1, b1, W2, b2 = obj.unpack(x)
    p, q, C = N_FEATURES, HIDDEN, N_CLASSES
    assert obj.dim == q * (p + 1) + C * (q + 1)
    assert (W1.shape, b1.shape, W2.shape, b2.shape) == ((q, p), (q,), (C, q), (C,))
    np.testing.assert_array_equal(np.concatenate([W1.ravel(), b1, W2.ravel(), b2]), x)
    for view in (W1, b1, W2, b2):
        assert np.shares_memory(view, x)


def test_init_params_is_seeded_glorot_with_zero_biases():
    obj = make_mlp("none", sparse=False)
    x = obj.init_params(np.random.default_rng(11))
    np.testing.assert_array_equal(x, obj.init_params(np.random.default_rng(11)))
    assert not np.array_equal(x, obj.init_params(np.random.default_rng(12)))
    W1, b1, W2, b2 = obj.unpack(x)
    assert not b1.any() and not b2.any()
    p, q, C = N_FEATURES, HIDDEN, N_CLASSES
    assert 0 < np.abs(W1).max() <= np.sqrt(6 / (p + q))
    assert 0 < np.abs(W2).max() <= np.sqrt(6 / (q + C))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"classes": np.array([0, 1, 3])},
            "classes must lie in 0..2, got values in 0..3",
        ),
        ({"classes": np.array([0, 1.5, 1])}, "classes must be integer indices, got"),
        ({"classes": np.array([0, 1])}, "one index per row, shape (3,)"),
        ({"n_classes": 1}, "n_classes must be at least 2, got 1"),
        ({"hidden": 0}, "hidden must be at least 1, got 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {
        "design": ClientDesign(np.eye(3), [0, 1, 3]),
        "classes": np.array([0, 1, 2]),
        "n_classes": 3,
        "hidden": 2,
        "reg": make_regulariser("none", 0.0),
    }
    with pytest.raises(ValueError, match=re.escape(message)):
        MLPObjectives(**{**args, **kwargs})


def test_gradient_descent_learns_digits():
    # 100 steps reach a mean loss near 0.12 and 98% training accuracy.
    data = load_dataset("digits")
    classes, n_classes = class_indices(data.labels, data.source)
    order = np.random.default_rng(0).permutation(data.n_rows)
    design = ClientDesign(data.features[order], client_offsets(data.n_rows, 5))
    obj = MLPObjectives(
        design, classes[order], n_classes, 32, make_regulariser("l2", 1e-4)
    )
    x = obj.init_params(np.random.default_rng(0))
    assert obj.values(x).mean() > 0.9 * np.log(10)

    for _ in range(100):
        x -= 1.0 * obj.grads(x).mean(axis=0)

    W1, b1, W2, b2 = obj.unpack(x)
    logits = np.tanh(data.features @ W1.T + b1) @ W2.T + b2
    accuracy = np.mean(logits.argmax(axis=1) == classes)
    assert obj.values(x).mean() < 0.15 * np.log(10)
    assert accuracy > 0.95
