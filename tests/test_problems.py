"""Losses, gradients, smoothness constants, data loading and splitting."""

import gzip

import numpy as np
import pytest
import scipy.sparse as sp

from problems.data import DataError, load_dataset, map_labels
from problems.design import ClientDesign
from problems.losses import LOSSES, make_regulariser
from problems.objective import ClientObjectives
from problems.split import client_offsets, rank_clients, row_order


def make_objectives(problem, reg, sparse, seed=0, lam=0.1):
    rng = np.random.default_rng(seed)
    m, d = 40, 6
    A = rng.standard_normal((m, d)) * (rng.random((m, d)) < 0.6)
    A = sp.csr_matrix(A) if sparse else A
    loss = LOSSES[problem]
    b = np.where(rng.random(m) < 0.5, *loss.labels[::-1])
    offsets = np.array([0, 7, 20, 21, 40])
    return ClientObjectives(
        loss, make_regulariser(reg, lam), ClientDesign(A, offsets), b
    )


def dense_rows(obj, i):
    A = obj.design.A
    A = A.toarray() if sp.issparse(A) else A
    rows = slice(obj.design.offsets[i], obj.design.offsets[i + 1])
    return A[rows], obj.labels[rows]


CASES = [
    (problem, reg, sparse)
    for problem in ("logreg", "nls")
    for reg in ("none", "l2", "nonconvex")
    for sparse in (False, True)
]


@pytest.mark.parametrize("problem,reg,sparse", CASES)
def test_gradients_match_finite_differences(problem, reg, sparse):
    obj = make_objectives(problem, reg, sparse)
    x = np.random.default_rng(3).standard_normal(obj.dim)
    _values, grads = obj.values_and_grads(x)
    np.testing.assert_allclose(obj.grads(x), grads, rtol=1e-14, atol=1e-16)
    h = 1e-6
    for l in range(obj.dim):
        e = np.zeros(obj.dim)
        e[l] = h
        fd = (obj.values(x + e) - obj.values(x - e)) / (2 * h)
        np.testing.assert_allclose(grads[:, l], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("problem,reg,sparse", CASES)
def test_values_match_the_definition(problem, reg, sparse):
    obj = make_objectives(problem, reg, sparse)
    x = np.random.default_rng(4).standard_normal(obj.dim)
    lam = 0.1
    r = {
        "none": 0.0,
        "l2": lam / 2 * x @ x,
        "nonconvex": lam * np.sum(x**2 / (1 + x**2)),
    }
    for i, value in enumerate(obj.values(x)):
        A, b = dense_rows(obj, i)
        z = A @ x
        if problem == "logreg":
            phi = np.logaddexp(0, -b * z)
        else:
            phi = (b - 1 / (1 + np.exp(-z))) ** 2
        assert value == pytest.approx(phi.mean() + r[reg], rel=1e-13)


def test_logistic_loss_is_accurate_at_extreme_margins():
    loss = LOSSES["logreg"]
    z = np.array([-1000.0, -40.0, 0.0, 40.0, 800.0])
    b = np.ones(5)
    phi, dphi = loss.value_and_derivative(z, b)
    np.testing.assert_allclose(phi, np.logaddexp(0, -z), rtol=1e-15)
    with np.errstate(over="ignore"):
        expected = -1 / (1 + np.exp(z))  # -sigmoid(-z); exp(800) = inf gives -0
    np.testing.assert_allclose(dphi, expected, rtol=1e-15)
    assert np.all(np.isfinite(phi)) and phi[-1] == 0.0 and phi[-2] > 0


@pytest.mark.parametrize("problem", ["logreg", "nls"])
def test_curvature_bounds_the_second_derivative(problem):
    loss = LOSSES[problem]
    z = np.linspace(-30, 30, 600_001)
    h = 1e-4
    for label in loss.labels:
        b = np.full_like(z, label)
        d2 = (loss.derivative(z + h, b) - loss.derivative(z - h, b)) / (2 * h)
        assert np.abs(d2).max() <= loss.curvature
        assert np.abs(d2).max() >= 0.999 * loss.curvature


@pytest.mark.parametrize("problem,reg,sparse", CASES)
def test_smoothness_constants_bound_gradient_changes(problem, reg, sparse):
    obj = make_objectives(problem, reg, sparse)
    L_i = obj.smoothness()
    rng = np.random.default_rng(5)
    for _ in range(200):
        x, y = rng.standard_normal((2, obj.dim)) * rng.uniform(0.01, 3)
        ratio = np.linalg.norm(obj.grads(x) - obj.grads(y), axis=1) / np.linalg.norm(
            x - y
        )
        assert np.all(ratio <= L_i * (1 + 1e-12))
    # For the logistic loss the data term of L_i is lambda_max(A_i^T A_i)/(4 m_i).
    if problem == "logreg" and reg == "none":
        for i in range(obj.n_local):
            A, _ = dense_rows(obj, i)
            lam_max = np.linalg.eigvalsh(A.T @ A)[-1]
            assert L_i[i] == pytest.approx(lam_max / (4 * A.shape[0]), rel=1e-12)


def test_smoothness_of_the_mean_objective():
    obj = make_objectives("logreg", "nonconvex", sparse=True)
    gram = obj.design.weighted_gram_sum() / obj.n_local
    L = obj.smoothness_of_mean(gram)
    L_i = obj.smoothness()
    assert L <= L_i.mean() + 1e-12
    rng = np.random.default_rng(6)
    for _ in range(200):
        x, y = rng.standard_normal((2, obj.dim))
        diff = obj.grads(x).mean(axis=0) - obj.grads(y).mean(axis=0)
        assert np.linalg.norm(diff) <= L * np.linalg.norm(x - y) * (1 + 1e-12)


def test_dense_and_sparse_designs_agree():
    dense = make_objectives("logreg", "l2", sparse=False)
    sparse = make_objectives("logreg", "l2", sparse=True)
    x = np.random.default_rng(7).standard_normal(dense.dim)
    np.testing.assert_allclose(dense.grads(x), sparse.grads(x), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dense.values(x), sparse.values(x), rtol=1e-14)
    np.testing.assert_allclose(dense.smoothness(), sparse.smoothness(), rtol=1e-12)


def test_client_offsets_follow_the_contiguous_convention():
    np.testing.assert_array_equal(client_offsets(10, 3), [0, 3, 6, 10])
    np.testing.assert_array_equal(client_offsets(32561, 20)[-2:], [30932, 32561])
    with pytest.raises(ValueError):
        client_offsets(3, 4)


@pytest.mark.parametrize("n,p", [(1, 1), (7, 3), (20, 2), (100, 4), (5, 5)])
def test_rank_clients_cover_every_client_once(n, p):
    blocks = [rank_clients(n, p, r) for r in range(p)]
    assert [c for b in blocks for c in b] == list(range(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_row_orders():
    labels = np.array([1.0, -1.0, 1.0, -1.0, -1.0])
    np.testing.assert_array_equal(row_order("contiguous", labels, 0), np.arange(5))
    np.testing.assert_array_equal(row_order("by-label", labels, 0), [1, 3, 4, 0, 2])
    shuffled = row_order("shuffled", labels, 3)
    assert sorted(shuffled) == list(range(5))
    np.testing.assert_array_equal(shuffled, row_order("shuffled", labels, 3))


def test_map_labels():
    np.testing.assert_array_equal(
        map_labels(np.array([0.0, 1.0, 1.0]), (-1.0, 1.0), "x"), [-1, 1, 1]
    )
    np.testing.assert_array_equal(
        map_labels(np.array([2.0, 1.0]), (0.0, 1.0), "x"), [1, 0]
    )
    with pytest.raises(DataError, match=r"x has 3 \(1, 2, 3\)"):
        map_labels(np.array([1.0, 2.0, 3.0]), (-1.0, 1.0), "x")


def test_libsvm_files_plain_and_gzip(tmp_path):
    text = "-1 1:0.5 3:1\n+1 2:2\n-1 1:1 2:1 3:1\n"
    plain = tmp_path / "tiny.txt"
    plain.write_text(text)
    packed = tmp_path / "tiny.txt.gz"
    with gzip.open(packed, "wt") as fh:
        fh.write(text)
    for path in (plain, packed):
        data = load_dataset(str(path))
        assert data.name == "tiny"
        assert sp.issparse(data.features) and data.features.shape == (3, 3)
        np.testing.assert_array_equal(data.labels, [-1, 1, -1])
        np.testing.assert_array_equal(data.features.toarray()[0], [0.5, 0, 1])


@pytest.mark.parametrize(
    "line,reason",
    [
        ("x 1:2", "label 'x' is not a number"),
        ("1 1:2 a:3", "'a:3' is not of the form index:value"),
        ("1 3:1 2:1", "feature index 2 is negative or out of order"),
    ],
)
def test_malformed_libsvm_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.txt"
    path.write_text(f"1 1:1\n-1 2:1\n{line}\n1 1:1\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(path))
    assert str(err.value) == f"malformed LibSVM data in {path}, line 3: {reason}"


def test_synthetic_data_is_seeded_and_heterogeneous():
    a = load_dataset(
        "synthetic:rows=300,features=4,heterogeneity=2", seed=1, n_clients=3
    )
    b = load_dataset(
        "synthetic:rows=300,features=4,heterogeneity=2", seed=1, n_clients=3
    )
    np.testing.assert_array_equal(a.features, b.features)
    assert set(np.unique(a.labels)) == {-1.0, 1.0}
    means = [a.features[i * 100 : (i + 1) * 100].mean(axis=0) for i in range(3)]
    assert np.linalg.norm(means[0] - means[1]) > 1.0
    with pytest.raises(DataError, match="bad synthetic parameter 'size=3'"):
        load_dataset("synthetic:size=3")


def test_bundled_breast_cancer_is_standardised():
    data = load_dataset("breast_cancer")
    assert data.features.shape == (569, 30)
    np.testing.assert_allclose(data.features.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(data.features.std(axis=0), 1, rtol=1e-12)
