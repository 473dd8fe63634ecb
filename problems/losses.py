"""Per-row losses and regularisers, vectorised over rows and clients.

A client objective is

    f_i(x) = (1/m_i) sum_j phi(a_j^T x, b_j) + r(x)

where ``phi`` is a loss of the margin ``z = a^T x`` and ``r`` a regulariser.
Each loss knows its label convention and a bound on ``|phi''|``, from which
the smoothness constants follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "LOSSES",
    "REGULARISERS",
    "LogisticLoss",
    "Loss",
    "Regulariser",
    "SigmoidSquaredLoss",
    "make_regulariser",
]


def _sigmoid(u: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-u))``, exact to round-off for every u (exp may overflow)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-u))


class Loss:
    """A loss ``phi(z, b)`` of the margin ``z`` and the label ``b``.

    Attributes:
        name: the CLI name (``--problem``).
        labels: the two label values the loss expects, smallest first.
        curvature: an upper bound on ``|d^2 phi / dz^2|``.
        convex: whether ``phi`` is convex in ``z``.
    """

    name: str
    labels: tuple[float, float]
    curvature: float
    convex: bool

    def derivative(self, z: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Return ``d phi / dz`` at each row."""
        raise NotImplementedError

    def value_and_derivative(
        self, z: np.ndarray, b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``phi`` and ``d phi / dz`` at each row."""
        raise NotImplementedError


class LogisticLoss(Loss):
    """``phi(z, b) = log(1 + exp(-b z))`` with ``b`` in {-1, +1}."""

    name = "logreg"
    labels = (-1.0, 1.0)
    curvature = 0.25
    convex = True

    def derivative(self, z, b):
        # -b sigmoid(-b z), with exp(b z) overflowing harmlessly to inf.
        with np.errstate(over="ignore"):
            return -b / (1.0 + np.exp(b * z))

    def value_and_derivative(self, z, b):
        u = b * z
        with np.errstate(over="ignore", divide="ignore"):
            q = np.exp(u)
            phi = np.log1p(1.0 / q)
        dphi = -b / (1.0 + q)
        # exp(u) underflows to 0 for u < -745: phi = -u + log1p(exp(u)) there.
        far = np.flatnonzero(np.isinf(phi) & np.isfinite(u))
        if far.size:
            phi[far] = -u[far] + np.log1p(np.exp(u[far]))
        return phi, dphi


# sup_z |d^2/dz^2 (y - sigmoid(z))^2| for y in {0, 1}; the supremum is
# 0.1540586 (attained near |z| = 2.3), rounded up to keep it a bound.
_NLS_CURVATURE = 0.1541


class SigmoidSquaredLoss(Loss):
    """``phi(z, y) = (y - sigmoid(z))^2`` with ``y`` in {0, 1} (nonconvex)."""

    name = "nls"
    labels = (0.0, 1.0)
    curvature = _NLS_CURVATURE
    convex = False

    def derivative(self, z, b):
        s = _sigmoid(z)
        return -2.0 * (b - s) * s * (1.0 - s)

    def value_and_derivative(self, z, b):
        s = _sigmoid(z)
        r = b - s
        return r * r, -2.0 * r * s * (1.0 - s)


LOSSES: dict[str, Loss] = {
    LogisticLoss.name: LogisticLoss(),
    SigmoidSquaredLoss.name: SigmoidSquaredLoss(),
}


@dataclass(frozen=True)
class Regulariser:
    """A separable regulariser ``r(x) = lam * sum_l rho(x_l)``.

    Attributes:
        name: ``none``, ``l2`` (rho = t^2 / 2) or ``nonconvex``
            (rho = t^2 / (1 + t^2)).
        lam: the weight ``lam`` (``--lam``).
    """

    name: str
    lam: float

    @property
    def smoothness(self) -> float:
        """An upper bound on the Lipschitz constant of ``grad r``."""
        if self.name == "l2":
            return self.lam
        if self.name == "nonconvex":
            # rho'' = (2 - 6 t^2) / (1 + t^2)^3 has its largest modulus 2 at 0.
            return 2.0 * self.lam
        return 0.0

    def value(self, x: np.ndarray):
        """Return ``r(x)``; for a stack of points ``(n, d)``, one value each."""
        if self.name == "l2":
            return 0.5 * self.lam * np.sum(x * x, axis=-1)
        if self.name == "nonconvex":
            x2 = x * x
            return self.lam * np.sum(x2 / (1.0 + x2), axis=-1)
        return np.zeros(x.shape[:-1]) if x.ndim > 1 else 0.0

    def grad(self, x: np.ndarray) -> np.ndarray:
        if self.name == "l2":
            return self.lam * x
        if self.name == "nonconvex":
            q = 1.0 + x * x
            return self.lam * 2.0 * x / (q * q)
        return np.zeros_like(x)


REGULARISERS = ("none", "l2", "nonconvex")


def make_regulariser(name: str, lam: float) -> Regulariser:
    """Return the regulariser ``name`` with weight ``lam``.

    Raises:
        ValueError: for an unknown name or a negative weight.
    """
    if name not in REGULARISERS:
        raise ValueError(
            f"unknown regulariser {name!r}; valid: {', '.join(REGULARISERS)}"
        )
    if not lam >= 0.0:
        raise ValueError(f"the regulariser weight must be >= 0, got {lam!r}")
    return Regulariser(name, 0.0 if name == "none" else float(lam))
