"""The local clients' objectives f_i, their gradients and smoothness."""

from __future__ import annotations

import numpy as np

from problems.design import ClientDesign
from problems.losses import Loss, Regulariser

__all__ = ["ClientObjectives"]


class ClientObjectives:
    """The objectives ``f_i(x) = (1/m_i) sum_j phi(a_j^T x, b_j) + r(x)``.

    One instance holds every client of one rank and evaluates them all at
    once (no loop over clients).

    Args:
        loss: the row loss ``phi``.
        reg: the regulariser ``r``.
        design: the stacked rows of the local clients.
        labels: one label per row, already mapped to ``loss.labels``.

    Example:
        >>> from problems.losses import LOSSES, make_regulariser
        >>> design = ClientDesign(np.eye(2), [0, 1, 2])
        >>> obj = ClientObjectives(
        ...     LOSSES["logreg"], make_regulariser("none", 0.0), design,
        ...     np.array([1.0, -1.0]))
        >>> obj.grads(np.zeros(2)).round(3)
        array([[-0.5,  0. ],
               [ 0. ,  0.5]])
    """

    def __init__(self, loss: Loss, reg: Regulariser, design: ClientDesign, labels):
        self.loss = loss
        self.reg = reg
        self.design = design
        self.labels = np.asarray(labels, dtype=np.float64)
        self.n_local = design.n_local
        self.dim = design.n_features

    def _margins(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 2:
            return self.design.margins_at(x)
        return self.design.margins(x)

    def grads(self, x: np.ndarray) -> np.ndarray:
        """Return the ``(n_local, d)`` gradients ``grad f_i(x_i)``.

        ``x`` is one point ``(d,)`` for every client, or one point per
        client ``(n_local, d)``.
        """
        s = self.loss.derivative(self._margins(x), self.labels) * self.design.row_weight
        return self.design.client_sums(s) + self.reg.grad(x)

    def values_and_grads(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the ``(n_local,)`` values ``f_i(x_i)`` and the gradients."""
        phi, dphi = self.loss.value_and_derivative(self._margins(x), self.labels)
        w = self.design.row_weight
        values = self.design.client_totals(phi * w) + self.reg.value(x)
        return values, self.design.client_sums(dphi * w) + self.reg.grad(x)

    def values(self, x: np.ndarray) -> np.ndarray:
        """Return the ``(n_local,)`` values ``f_i(x_i)``."""
        return self.values_and_grads(x)[0]

    @property
    def rows_per_client(self) -> np.ndarray:
        return self.design.counts

    def subset(self, rows: np.ndarray, offsets: np.ndarray) -> ClientObjectives:
        """Return the objectives on local ``rows`` only (minibatches).

        ``rows`` are local row indices, client after client, and ``offsets``
        cut them into the clients' blocks.
        """
        design = ClientDesign(self.design.A[rows], offsets)
        return ClientObjectives(self.loss, self.reg, design, self.labels[rows])

    def gram_sum(self) -> np.ndarray | None:
        """Return this rank's part of ``sum_i A_i^T A_i / m_i`` (None if d is large)."""
        return self.design.weighted_gram_sum()

    def smoothness(self) -> np.ndarray:
        """Return ``L_i = curvature(phi) lambda_max(A_i^T A_i) / m_i + L_r``."""
        return (
            self.loss.curvature * self.design.client_curvatures() + self.reg.smoothness
        )

    def smoothness_of_mean(self, gram_mean: np.ndarray) -> float:
        """Return L for ``f = mean_i f_i`` from ``mean_i A_i^T A_i / m_i``."""
        return (
            self.loss.curvature * float(np.linalg.eigvalsh(gram_mean)[-1])
            + self.reg.smoothness
        )
