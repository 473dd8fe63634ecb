"""Message operators applied row-wise to a stack of client vectors.

Each operator maps the ``(n, d)`` array ``V`` (one row per client) to the
messages ``C`` and a boolean mask saying for which clients it changed the
vector (clipping active, coordinates dropped). It also says how many bits
one message costs:

* dense messages: ``64 d`` (float64 values);
* Top-k messages: ``k (64 + 32)`` (float64 values and int32 indices),
  or ``64 d`` when ``k = d`` (a dense vector needs no indices).

An operator whose messages have a bounded norm says so (``norm_bound``):
that bound is what differential privacy calibrates its noise to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Clip", "Identity", "TopK", "clip_rows", "top_k_rows"]

VALUE_BITS = 64
INDEX_BITS = 32


def clip_rows(V: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Return ``min(1, tau / ||v||) v`` for every row ``v`` of ``V``, and the
    mask of rows with ``||v|| > tau``.

    Example:
        >>> C, active = clip_rows(np.array([[3.0, 4.0], [0.3, 0.4]]), 1.0)
        >>> C.tolist(), active.tolist()
        ([[0.6000000000000001, 0.8], [0.3, 0.4]], [True, False])
    """
    norms = np.sqrt(np.einsum("ij,ij->i", V, V))
    active = norms > tau
    scale = np.ones_like(norms)
    np.divide(tau, norms, out=scale, where=active)
    return V * scale[:, None], active


def top_k_rows(V: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` entries of largest modulus in every row of ``V``.

    Returns the sparsified rows and the mask of rows that lost a non-zero.
    """
    d = V.shape[1]
    if k >= d:
        return V.copy(), np.zeros(V.shape[0], dtype=bool)
    keep = np.argpartition(np.abs(V), d - k, axis=1)[:, d - k :]
    C = np.zeros_like(V)
    np.put_along_axis(C, keep, np.take_along_axis(V, keep, axis=1), axis=1)
    active = np.count_nonzero(V, axis=1) > np.count_nonzero(C, axis=1)
    return C, active


def normalize_rows(V: np.ndarray, alpha: float) -> np.ndarray:
    """Return ``v / (alpha + ||v||)`` for every row ``v`` of ``V`` (0 for v = 0).

    Example:
        >>> normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]), 0.0).round(12).tolist()
        [[0.6, 0.8], [0.0, 0.0]]
    """
    norms = np.sqrt(np.einsum("ij,ij->i", V, V))
    denom = alpha + norms
    scale = np.zeros_like(norms)
    np.divide(1.0, denom, out=scale, where=denom > 0)
    return V * scale[:, None]


@dataclass(frozen=True)
class Identity:
    """The message is the vector itself."""

    norm_bound = None

    def __call__(self, V):
        return V, np.zeros(V.shape[0], dtype=bool)

    def bits(self, d: int) -> int:
        return VALUE_BITS * d


@dataclass(frozen=True)
class Clip:
    """``clip_tau(v) = min(1, tau / ||v||) v``; active where ``||v|| > tau``."""

    tau: float

    @property
    def norm_bound(self) -> float:
        return self.tau

    def __call__(self, V):
        return clip_rows(V, self.tau)

    def bits(self, d: int) -> int:
        return VALUE_BITS * d


@dataclass(frozen=True)
class TopK:
    """Keep the ``k`` coordinates of largest modulus."""

    k: int

    norm_bound = None

    def __call__(self, V):
        return top_k_rows(V, self.k)

    def bits(self, d: int) -> int:
        if self.k >= d:
            return VALUE_BITS * d
        return self.k * (VALUE_BITS + INDEX_BITS)


@dataclass(frozen=True)
class Normalize:
    """Smoothed normalisation ``v / (alpha + ||v||)``; active where v != 0.

    Messages have norm below 1 (exactly 1 for ``alpha = 0``).
    """

    alpha: float

    norm_bound = 1.0

    def __call__(self, V):
        return normalize_rows(V, self.alpha), np.any(V != 0, axis=1)

    def bits(self, d: int) -> int:
        return VALUE_BITS * d


@dataclass(frozen=True)
class Chain:
    """Apply ``first`` then ``then`` (e.g. clip, then Top-k).

    Active where ``first`` is active; the bits are those of ``then``; the
    norm bound is the smaller one (Top-k and clipping never increase a norm).
    """

    first: object
    then: object

    @property
    def norm_bound(self):
        bounds = [b for b in (self.first.norm_bound, self.then.norm_bound) if b]
        return min(bounds) if bounds else None

    def __call__(self, V):
        C, active = self.first(V)
        return self.then(C)[0], active

    def bits(self, d: int) -> int:
        return self.then.bits(d)
