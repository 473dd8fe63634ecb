"""The local clients' rows, stacked, and the per-client sums over them.

A rank holds the rows of its clients one block after another:
``A[offsets[i]:offsets[i + 1]]`` are the rows of local client ``i``.
Every per-client quantity is computed for all local clients at once:
the margins ``z = A x`` are one product, and the per-client sums
``sum_{j in client i} s_j a_j`` another.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["ClientDesign"]

# Above this many features the d x d Gram matrices are not formed.
GRAM_MAX_FEATURES = 4096


class ClientDesign:
    """Stacked rows of the local clients, dense or CSR.

    Args:
        A: the rows, an ``(m, d)`` ndarray or scipy sparse matrix.
        offsets: ``n_local + 1`` increasing row offsets, starting at 0 and
            ending at ``m``; every client has at least one row.

    Example:
        >>> design = ClientDesign(np.eye(3), np.array([0, 1, 3]))
        >>> design.client_sums(np.ones(3))
        array([[1., 0., 0.],
               [0., 1., 1.]])
    """

    def __init__(self, A, offsets):
        offsets = np.asarray(offsets, dtype=np.int64)
        counts = np.diff(offsets)
        if offsets[0] != 0 or offsets[-1] != A.shape[0] or np.any(counts < 1):
            raise ValueError("offsets must cut the rows into non-empty blocks")
        self.sparse = sp.issparse(A)
        self.A = (
            sp.csr_matrix(A, dtype=np.float64)
            if self.sparse
            else np.asarray(A, dtype=np.float64)
        )
        self.offsets = offsets
        self.counts = counts
        self.n_local = counts.size
        self.n_rows, self.n_features = self.A.shape
        self.row_client = np.repeat(np.arange(self.n_local), counts)
        self.row_weight = 1.0 / counts[self.row_client]
        self._starts = offsets[:-1]
        if self.sparse:
            self._B = self._client_scatter_matrix()
        else:
            self._M = sp.csr_matrix(
                (np.ones(self.n_rows), np.arange(self.n_rows), offsets),
                shape=(self.n_local, self.n_rows),
            )

    def _client_scatter_matrix(self):
        """``B`` of shape ``(n_local * d, m)`` with ``B s`` the client sums.

        Stored by columns: ``B s`` then reads ``s`` in order and scatters into
        the small ``n_local * d`` output, which stays in cache.
        """
        coo = self.A.tocoo()
        rows = self.row_client[coo.row] * self.n_features + coo.col
        return sp.csc_matrix(
            (coo.data, (rows, coo.row)),
            shape=(self.n_local * self.n_features, self.n_rows),
        )

    def margins(self, x: np.ndarray) -> np.ndarray:
        """Return ``z = A x``, one margin per row."""
        return self.A @ x

    def margins_at(self, X: np.ndarray) -> np.ndarray:
        """Return ``z_j = a_j^T x_i`` with one point ``X[i]`` per client ``i``."""
        if self.sparse:
            return self._B.T @ X.ravel()
        return np.einsum("jl,jl->j", self.A, X[self.row_client])

    def client_sums(self, s: np.ndarray) -> np.ndarray:
        """Return the ``(n_local, d)`` array of ``sum_{j in i} s_j a_j``."""
        if self.sparse:
            return (self._B @ s).reshape(self.n_local, self.n_features)
        self._M.data = s
        return self._M @ self.A

    def client_totals(self, v: np.ndarray) -> np.ndarray:
        """Return ``sum_{j in i} v_j`` for each local client."""
        return np.add.reduceat(v, self._starts)

    def _client_rows(self, i: int):
        return self.A[self.offsets[i] : self.offsets[i + 1]]

    def client_curvatures(self) -> np.ndarray:
        """Return ``lambda_max(A_i^T A_i) / m_i`` for each local client."""
        out = np.empty(self.n_local)
        for i in range(self.n_local):
            Ai = self._client_rows(i)
            if self.n_features <= GRAM_MAX_FEATURES:
                gram = Ai.T @ Ai
                gram = gram.toarray() if sp.issparse(gram) else gram
                out[i] = np.linalg.eigvalsh(gram)[-1]
            else:
                out[i] = _largest_singular_value(Ai) ** 2
        return out / self.counts

    def weighted_gram_sum(self) -> np.ndarray | None:
        """Return ``sum_i A_i^T A_i / m_i`` over local clients, or None if d is large."""
        if self.n_features > GRAM_MAX_FEATURES:
            return None
        scaled = sp.diags(np.sqrt(self.row_weight)) @ self.A
        gram = scaled.T @ scaled
        return gram.toarray() if sp.issparse(gram) else np.asarray(gram)


def _largest_singular_value(Ai) -> float:
    from scipy.sparse.linalg import svds

    if min(Ai.shape) < 2:
        return float(np.sqrt((Ai.multiply(Ai) if sp.issparse(Ai) else Ai**2).sum()))
    return float(svds(sp.csr_matrix(Ai), k=1, return_singular_vectors=False)[0])
