"""A one-hidden-layer tanh network with softmax cross-entropy, per client.

Row ``j`` with features ``a_j`` (``p`` of them) and class ``y_j`` in
``0..C-1`` has the forward pass and loss

    h_j    = tanh(W1 a_j + b1)
    s_j    = W2 h_j + b2
    ell_j  = log sum_c exp(s_jc) - s_{j y_j}

and client ``i`` with rows ``J_i`` (``m_i`` of them) has the objective

    f_i(x) = (1/m_i) sum_{j in J_i} ell_j(x) + r(x)

The gradient is back-propagated by hand, with ``e_y`` the unit vector of
class ``y``:

    delta2_j     = (softmax(s_j) - e_{y_j}) / m_i
    delta1_j     = (W2^T delta2_j) * (1 - h_j^2)
    grad_W2 f_i  = sum_{j in J_i} delta2_j h_j^T     grad_b2 f_i = sum delta2_j
    grad_W1 f_i  = sum_{j in J_i} delta1_j a_j^T     grad_b1 f_i = sum delta1_j

plus ``grad r(x)``. At a point shared by all clients, each per-client sum of
outer products is one sparse-times-dense product for every local client at
once, and no ``(m, hidden * p)`` array is formed:

    U_{(l, i), j}  = delta2_jl  if row j is client i's, else 0
    B_{(i, c), j}  = a_jc       if row j is client i's, else 0
    grad_W2 f_i    = (U H)_{(., i)}        grad_W1 f_i = ((B Delta1)_{(i, .)})^T

with ``H`` and ``Delta1`` the ``(m, hidden)`` arrays of the ``h_j`` and the
``delta1_j``. ``B`` stores the nonzeros of ``A`` once, with the objectives.
At one point per client (methods with local steps) the clients are looped
over, each with its own matrix products.

The parameters are one flat vector of length
``d = hidden (p + 1) + C (hidden + 1)``, the matrices row-major:

    x = [W1.ravel(), b1, W2.ravel(), b2]

    a_j       features of row j           design.A[j]
    y_j       class of row j              classes[j]
    m_i       rows of client i            design.counts[i]
    p, C      features, classes           n_features, n_classes
    W1, b1    hidden layer (hidden x p)   unpack(x)[:2]
    W2, b2    output layer (C x hidden)   unpack(x)[2:]
    h_j, s_j  activations, logits         H[j], S[j]
    delta2_j  output error                D2[j]
    delta1_j  hidden error                D1[j]
    r         regulariser                 reg
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from problems.design import ClientDesign
from problems.losses import Regulariser

__all__ = ["MLPObjectives"]


class MLPObjectives:
    """The objectives ``f_i`` of a tanh network with one hidden layer.

    Same interface as ``ClientObjectives``: one instance holds every client
    of one rank and evaluates them all at once.

    Args:
        design: the stacked rows of the local clients.
        classes: one class index in ``0..n_classes-1`` per row.
        n_classes: the number of classes ``C`` (at least 2).
        hidden: the width of the hidden layer (at least 1).
        reg: the regulariser ``r``, applied to the whole flat vector ``x``.

    Raises:
        ValueError: for class indices out of range or of the wrong length,
            fewer than two classes, or a hidden width below 1.

    Example:
        >>> from problems.losses import make_regulariser
        >>> design = ClientDesign(np.eye(3), [0, 1, 3])
        >>> obj = MLPObjectives(
        ...     design, np.array([0, 1, 1]), n_classes=2, hidden=4,
        ...     reg=make_regulariser("none", 0.0))
        >>> obj.dim
        26
        >>> obj.values(np.zeros(obj.dim)).round(4)  # log 2 at x = 0
        array([0.6931, 0.6931])
        >>> obj.grads(obj.init_params(np.random.default_rng(0))).shape
        (2, 26)
    """

    def __init__(
        self,
        design: ClientDesign,
        classes: np.ndarray,
        n_classes: int,
        hidden: int,
        reg: Regulariser,
    ):
        classes = np.asarray(classes)
        if n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes!r}")
        if hidden < 1:
            raise ValueError(
                f"hidden must be at least 1, got {hidden!r}; it is the number "
                "of hidden units"
            )
        if classes.shape != (design.n_rows,):
            raise ValueError(
                f"classes must hold one index per row, shape ({design.n_rows},), "
                f"got shape {classes.shape}"
            )
        if not np.array_equal(classes, np.round(classes)):
            bad = classes[classes != np.round(classes)][0]
            raise ValueError(
                f"classes must be integer indices, got {bad!r}; map labels with "
                "problems.data.class_indices"
            )
        classes = classes.astype(np.intp)
        if classes.min() < 0 or classes.max() >= n_classes:
            raise ValueError(
                f"classes must lie in 0..{n_classes - 1}, got values in "
                f"{classes.min()}..{classes.max()}; map labels with "
                "problems.data.class_indices"
            )
        self.design = design
        self.classes = classes
        self.n_classes = int(n_classes)
        self.hidden = int(hidden)
        self.reg = reg
        self.n_local = design.n_local
        self.n_features = design.n_features
        p, q, C = self.n_features, self.hidden, self.n_classes
        self.dim = q * (p + 1) + C * (q + 1)
        self._U = _block_sum_matrix(design.offsets, C)
        self._B = _scatter_matrix(design)

    @property
    def rows_per_client(self) -> np.ndarray:
        """The number of rows ``m_i`` of each local client."""
        return self.design.counts

    def unpack(self, x: np.ndarray):
        """Return the parameters in ``x`` as the views ``(W1, b1, W2, b2)``.

        Args:
            x: one point ``(d,)``, or a stack of points ``(n, d)``; for a
                stack every view has the leading axis ``n``.

        Raises:
            ValueError: if the last axis of ``x`` is not of length ``d``.

        Example:
            >>> from problems.losses import make_regulariser
            >>> obj = MLPObjectives(
            ...     ClientDesign(np.eye(3), [0, 3]), np.array([0, 1, 1]),
            ...     n_classes=2, hidden=4, reg=make_regulariser("none", 0.0))
            >>> [v.shape for v in obj.unpack(np.zeros(obj.dim))]
            [(4, 3), (4,), (2, 4), (2,)]
        """
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have {self.dim} parameters in its last axis, got shape "
                f"{x.shape}"
            )
        lead = x.shape[:-1]
        p, q, C = self.n_features, self.hidden, self.n_classes
        end_W1, end_b1, end_W2 = q * p, q * (p + 1), q * (p + 1) + C * q
        W1 = x[..., :end_W1].reshape(*lead, q, p)
        W2 = x[..., end_b1:end_W2].reshape(*lead, C, q)
        return W1, x[..., end_W1:end_b1], W2, x[..., end_W2:]

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        """Return a starting point: Glorot-uniform weights and zero biases.

        ``W1`` and ``W2`` are drawn, in this order, uniformly on ``[-u, u]``
        with ``u = sqrt(6 / (fan_in + fan_out))``. A random start breaks the
        symmetry of ``x = 0``, a saddle at which every hidden unit is alike.

        Args:
            rng: the random stream; the same stream state gives the same
                point on every rank.

        Returns:
            The flat parameter vector ``(d,)``.
        """
        p, q, C = self.n_features, self.hidden, self.n_classes
        x = np.zeros(self.dim)
        W1, _b1, W2, _b2 = self.unpack(x)
        W1[...] = rng.uniform(-1.0, 1.0, W1.shape) * np.sqrt(6.0 / (p + q))
        W2[...] = rng.uniform(-1.0, 1.0, W2.shape) * np.sqrt(6.0 / (q + C))
        return x

    def grads(self, x: np.ndarray) -> np.ndarray:
        """Return the ``(n_local, d)`` gradients ``grad f_i(x_i)``.

        ``x`` is one point ``(d,)`` for every client, or one point per
        client ``(n_local, d)``.
        """
        return self._evaluate(x, want_values=False)[1]

    def values_and_grads(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the ``(n_local,)`` values ``f_i(x_i)`` and the gradients."""
        return self._evaluate(x, want_values=True)

    def values(self, x: np.ndarray) -> np.ndarray:
        """Return the ``(n_local,)`` values ``f_i(x_i)``."""
        if x.ndim == 2:
            self._check_points(x)
            ell = np.concatenate(
                [
                    _row_losses(self._forward(A_i, *self.unpack(x_i))[1], y_i)[0]
                    for A_i, y_i, x_i in zip(*self._client_blocks(), x)
                ]
            )
        else:
            ell = _row_losses(
                self._forward(self.design.A, *self.unpack(x))[1], self.classes
            )[0]
        w = self.design.row_weight
        return self.design.client_totals(ell * w) + self.reg.value(x)

    def subset(self, rows: np.ndarray, offsets: np.ndarray) -> MLPObjectives:
        """Return the objectives on local ``rows`` only (minibatches).

        ``rows`` are local row indices, client after client, and ``offsets``
        cut them into the clients' blocks.
        """
        design = ClientDesign(self.design.A[rows], offsets)
        return MLPObjectives(
            design, self.classes[rows], self.n_classes, self.hidden, self.reg
        )

    def gram_sum(self) -> np.ndarray | None:
        """Return None: the network has no Gram-matrix smoothness bound."""
        return None

    def smoothness(self) -> np.ndarray | None:
        """Return None: the network has no closed-form smoothness constant."""
        return None

    def _evaluate(self, x, want_values):
        if x.ndim == 2:
            return self._evaluate_per_client(x, want_values)
        W1, b1, W2, b2 = self.unpack(x)
        A, w, q = self.design.A, self.design.row_weight, self.hidden

        # Forward pass and the output error delta2, every row at once.
        H, S = self._forward(A, W1, b1, W2, b2)
        ell, D2 = _row_losses(S, self.classes)
        D2 *= w[:, None]

        # Back through W2 and tanh to the hidden error delta1.
        D1 = (D2 @ W2) * (1.0 - H * H)

        # Per-client sums of outer products and of errors.
        out = np.empty((self.n_local, self.dim))
        gW1, gb1, gW2, gb2 = self.unpack(out)
        gW2[...] = _client_outer_sums(self._U, D2, H)
        gW1[...] = (self._B @ D1).reshape(self.n_local, -1, q).transpose(0, 2, 1)
        starts = self.design.offsets[:-1]
        gb2[...] = np.add.reduceat(D2, starts, axis=0)
        gb1[...] = np.add.reduceat(D1, starts, axis=0)
        out += self.reg.grad(x)

        values = None
        if want_values:
            values = self.design.client_totals(ell * w) + self.reg.value(x)
        return values, out

    def _check_points(self, X):
        if X.shape != (self.n_local, self.dim):
            raise ValueError(
                f"per-client points must have shape ({self.n_local}, {self.dim}), "
                f"got {X.shape}"
            )

    def _evaluate_per_client(self, X, want_values):
        self._check_points(X)
        values = np.empty(self.n_local)
        out = np.empty((self.n_local, self.dim))
        for i, (A_i, y_i, x_i) in enumerate(zip(*self._client_blocks(), X)):
            W1, b1, W2, b2 = self.unpack(x_i)
            gW1, gb1, gW2, gb2 = self.unpack(out[i])
            H, S = self._forward(A_i, W1, b1, W2, b2)
            ell, D2 = _row_losses(S, y_i)
            D2 /= y_i.size
            D1 = (D2 @ W2) * (1.0 - H * H)
            gW2[...] = D2.T @ H
            gW1[...] = (A_i.T @ D1).T
            gb2[...] = D2.sum(axis=0)
            gb1[...] = D1.sum(axis=0)
            values[i] = ell.mean()
        out += self.reg.grad(X)
        return (values + self.reg.value(X) if want_values else None), out

    def _client_blocks(self):
        """Return the per-client row blocks of ``A`` and of the classes."""
        bounds = list(zip(self.design.offsets[:-1], self.design.offsets[1:]))
        A, y = self.design.A, self.classes
        return [A[a:b] for a, b in bounds], [y[a:b] for a, b in bounds]

    @staticmethod
    def _forward(A, W1, b1, W2, b2):
        """Return the activations ``H`` and the logits ``S`` of rows ``A``."""
        H = np.tanh(A @ W1.T + b1)
        return H, H @ W2.T + b2


def _row_losses(S: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``ell_j`` and ``softmax(s_j) - e_{y_j}`` for each row of ``S``."""
    rows = np.arange(S.shape[0])
    S_max = S.max(axis=1, keepdims=True)
    E = np.exp(S - S_max)
    Z = E.sum(axis=1, keepdims=True)
    ell = (S_max + np.log(Z))[:, 0] - S[rows, y]
    G = E / Z
    G[rows, y] -= 1.0
    return ell, G


def _block_sum_matrix(offsets: np.ndarray, q: int) -> sp.csr_matrix:
    """Return the CSR pattern ``U`` of shape ``(q * n_local, m)`` (data unset).

    Row ``l * n_local + i`` covers the columns of the rows of client ``i``.
    As the clients' rows are contiguous and in order, ``U.data`` for a
    ``(m, q)`` array ``D`` is ``D`` in column-major order: column ``l`` of
    ``D`` fills rows ``(l, 0), ..., (l, n_local - 1)``.
    """
    m = int(offsets[-1])
    n_local = offsets.size - 1
    starts = (np.arange(q)[:, None] * m + offsets[None, :-1]).ravel()
    indptr = np.append(starts, q * m)
    indices = np.tile(np.arange(m), q)
    return sp.csr_matrix((np.zeros(q * m), indices, indptr), shape=(q * n_local, m))


def _client_outer_sums(U: sp.csr_matrix, D: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Return ``(n_local, q, k)``: ``sum_{j in J_i} d_j v_j^T`` for each client.

    ``D`` is ``(m, q)``, ``V`` is ``(m, k)``, and ``U`` the pattern from
    ``_block_sum_matrix`` for width ``q``.
    """
    q = D.shape[1]
    U.data = D.ravel(order="F")
    return (U @ V).reshape(q, -1, V.shape[1]).transpose(1, 0, 2)


def _scatter_matrix(design: ClientDesign) -> sp.csc_matrix:
    """Return ``B`` of shape ``(n_local * p, m)``: row ``(i, c)`` holds ``a_jc``
    for the rows ``j`` of client ``i``, so ``(B D)_{(i, c)} = sum_{j in J_i}
    a_jc d_j``.

    ``B^T`` is ``A`` with the columns of client ``i``'s rows moved to the
    block ``i``; only the nonzeros of ``A`` are stored, dense or CSR alike.
    """
    A = design.A if design.sparse else sp.csr_matrix(design.A)
    p = design.n_features
    shift = np.repeat(design.row_client * p, np.diff(A.indptr))
    BT = sp.csr_matrix(
        (A.data, A.indices + shift, A.indptr),
        shape=(design.n_rows, design.n_local * p),
    )
    return BT.T
