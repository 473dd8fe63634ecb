"""Random streams keyed by purpose and client, independent of the rank count.

Every random draw in a run comes from ``stream(seed, purpose, client)``: a
``numpy.random.Generator`` seeded by a ``SeedSequence`` whose spawn key
names the purpose and, for per-client draws, the client. A client's stream
is therefore the same whichever rank holds it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PURPOSES", "seed_sequence", "stream"]

# Fixed codes: changing one changes every result that used it.
PURPOSES = {
    "x0": 0,
    "data": 1,
    "split": 2,
    "noise": 3,
    "batch": 4,
    "model": 5,
}


def seed_sequence(
    seed: int, purpose: str, client: int | None = None
) -> np.random.SeedSequence:
    """Return the SeedSequence for ``purpose`` (and ``client``) of run ``seed``."""
    if purpose not in PURPOSES:
        raise ValueError(
            f"unknown random purpose {purpose!r}; valid: {sorted(PURPOSES)}"
        )
    key = (PURPOSES[purpose],) if client is None else (PURPOSES[purpose], 1 + client)
    return np.random.SeedSequence(entropy=seed, spawn_key=key)


def stream(seed: int, purpose: str, client: int | None = None) -> np.random.Generator:
    """Return a Generator for ``purpose`` (and ``client``) of run ``seed``.

    Example:
        >>> a = stream(0, "noise", client=7).standard_normal(2)
        >>> b = stream(0, "noise", client=7).standard_normal(2)
        >>> bool((a == b).all())
        True
    """
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, purpose, client)))
