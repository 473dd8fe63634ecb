"""Checkpoints: everything a run needs to continue bit for bit.

A checkpoint is taken at the end of a round, when x^{k+1} is known; it holds

    next_iteration   k + 1, the next round to run (= rows in the log)
    x                x^{k+1}
    g                the server aggregate
    g_local, v_local every client's estimate g_i and momentum v_i (by client)
    rng_batch/noise  every client's random streams, as bit-generator states
    bits_sent        cumulative bits per client
    wall_time        seconds spent so far
    config           the configuration it belongs to (JSON)

Clients are stored by their global index, so a run can resume on another
number of ranks. The file (``<out>.ckpt``, a NumPy ``.npz``) is written to a
temporary name and renamed, so a crash while writing never leaves a broken
checkpoint.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

__all__ = [
    "IGNORED_KEYS",
    "Checkpoint",
    "CheckpointError",
    "checkpoint_path",
    "load_checkpoint",
    "mismatched_keys",
    "save_checkpoint",
]

# Settings that may differ between a run and its resumption.
IGNORED_KEYS = ("out", "overwrite", "resume", "checkpoint_every")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why."""


def checkpoint_path(out: str) -> str:
    """Return the checkpoint file that belongs to the log ``out``."""
    return os.fspath(out) + ".ckpt"


@dataclass
class Checkpoint:
    """The state of a run between two rounds (all clients, by index)."""

    next_iteration: int
    x: np.ndarray
    g: np.ndarray
    g_local: np.ndarray
    v_local: np.ndarray | None
    rng_batch: list
    rng_noise: list
    bits_sent: float
    wall_time: float
    config: dict


def mismatched_keys(saved: dict, current: dict) -> list[str]:
    """Return the settings (beyond IGNORED_KEYS) on which two configs differ."""
    keys = (set(saved) | set(current)) - set(IGNORED_KEYS)
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def save_checkpoint(path: str, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically (temporary file, fsync, rename)."""
    meta = {
        "next_iteration": ckpt.next_iteration,
        "bits_sent": ckpt.bits_sent,
        "wall_time": ckpt.wall_time,
        "config": ckpt.config,
        "rng_batch": ckpt.rng_batch,
        "rng_noise": ckpt.rng_noise,
    }
    arrays = {"x": ckpt.x, "g": ckpt.g, "g_local": ckpt.g_local}
    if ckpt.v_local is not None:
        arrays["v_local"] = ckpt.v_local
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint.

    Raises:
        CheckpointError: if the file is missing, truncated or not a checkpoint.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            arrays = {k: npz[k] for k in ("x", "g", "g_local")}
            v_local = npz["v_local"] if "v_local" in npz.files else None
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path!r}") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(
            f"the checkpoint {path!r} is corrupt or not a clip21mpi checkpoint "
            f"({type(err).__name__}: {err}); delete it, or pass --overwrite to "
            "start the run afresh"
        ) from err
    return Checkpoint(
        next_iteration=int(meta["next_iteration"]),
        v_local=v_local,
        rng_batch=meta["rng_batch"],
        rng_noise=meta["rng_noise"],
        bits_sent=float(meta["bits_sent"]),
        wall_time=float(meta["wall_time"]),
        config=meta["config"],
        **arrays,
    )
