"""Splitting rows into clients, and clients into ranks."""

from __future__ import annotations

import numpy as np

from clip21mpi.streams import stream

__all__ = ["SPLITS", "client_offsets", "rank_clients", "row_order"]

SPLITS = ("contiguous", "shuffled", "by-label")


def client_offsets(n_rows: int, n_clients: int) -> np.ndarray:
    """Return ``n_clients + 1`` row offsets: floor(N/n) rows each, the last
    client taking the remainder.

    Example:
        >>> client_offsets(10, 3)
        array([ 0,  3,  6, 10])
    """
    if not 1 <= n_clients <= n_rows:
        raise ValueError(
            f"cannot split {n_rows} rows into {n_clients} non-empty clients"
        )
    per = n_rows // n_clients
    offsets = np.arange(n_clients + 1, dtype=np.int64) * per
    offsets[-1] = n_rows
    return offsets


def row_order(split: str, labels: np.ndarray, seed: int) -> np.ndarray:
    """Return the order in which rows are dealt to clients.

    ``contiguous`` keeps file order, ``shuffled`` permutes with the run's
    ``split`` stream, ``by-label`` sorts by label (stably) so that clients
    see few classes each.
    """
    n = labels.shape[0]
    if split == "contiguous":
        return np.arange(n)
    if split == "shuffled":
        return stream(seed, "split").permutation(n)
    if split == "by-label":
        return np.argsort(labels, kind="stable")
    raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def rank_clients(n_clients: int, n_ranks: int, rank: int) -> range:
    """Return the contiguous block of clients held by ``rank``.

    The first ``n_clients % n_ranks`` ranks hold one client more.

    Example:
        >>> [rank_clients(5, 2, r) for r in range(2)]
        [range(0, 3), range(3, 5)]
    """
    if n_ranks > n_clients:
        raise ValueError(f"{n_ranks} ranks for {n_clients} clients")
    base, extra = divmod(n_clients, n_ranks)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
