"""The configuration of one run: its fields, defaults and validation.

Field names are the CLI option names with underscores (``--step-size`` is
``step_size``); a TOML file given with ``--config`` uses the same keys.
Validation needs no MPI and gives the same answer on every rank.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass

from clip21mpi.methods import METHODS
from problems.losses import LOSSES, REGULARISERS
from problems.split import SPLITS

__all__ = ["X0_CHOICES", "ConfigError", "RunConfig", "suggest"]

X0_CHOICES = ("zeros", "normal")


class ConfigError(ValueError):
    """An invalid setting; ``option`` names the CLI option it came from."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option
        self.message = message


def suggest(value: str, valid) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(value, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one run (see ``clip21mpi run --help``)."""

    problem: str = "logreg"
    reg: str = "nonconvex"
    lam: float = 0.1
    data: str = "breast_cancer"
    clients: int | None = None
    split: str = "contiguous"
    method: str = "clip21"
    tau: float = 0.1
    k: int = 1
    step_size: float | str = "auto"
    iters: int = 1000
    tol: float = 0.0
    eval_every: int = 1
    seed: int = 0
    x0: str = "zeros"
    out: str | None = None
    overwrite: bool = False

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, n_ranks: int = 1) -> RunConfig:
        """Return the config with ``clients`` resolved, or raise ConfigError."""
        _choice("--problem", self.problem, LOSSES)
        _choice("--reg", self.reg, REGULARISERS)
        _choice("--method", self.method, METHODS)
        _choice("--split", self.split, SPLITS)
        _choice("--x0", self.x0, X0_CHOICES)
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError("--lam", f"--lam must be >= 0, got {self.lam!r}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(
                "--tau",
                f"--tau must be positive, got {self.tau!r}; pass a threshold > 0 "
                "(it bounds each message's norm)",
            )
        if self.k < 1:
            raise ConfigError("--k", f"--k must be >= 1, got {self.k!r}")
        if self.step_size != "auto" and not (
            isinstance(self.step_size, (int, float))
            and math.isfinite(self.step_size)
            and self.step_size > 0
        ):
            raise ConfigError(
                "--step-size",
                f"--step-size must be a positive number or 'auto', got {self.step_size!r}",
            )
        if self.iters < 0:
            raise ConfigError("--iters", f"--iters must be >= 0, got {self.iters!r}")
        if not self.tol >= 0:
            raise ConfigError("--tol", f"--tol must be >= 0, got {self.tol!r}")
        if self.eval_every < 1:
            raise ConfigError(
                "--eval-every", f"--eval-every must be >= 1, got {self.eval_every!r}"
            )
        if self.seed < 0:
            raise ConfigError("--seed", f"--seed must be >= 0, got {self.seed!r}")
        clients = n_ranks if self.clients is None else self.clients
        if clients < 1:
            raise ConfigError("--clients", f"--clients must be >= 1, got {clients!r}")
        if n_ranks > clients:
            raise ConfigError(
                "--clients",
                f"{n_ranks} MPI ranks but only {clients} clients; every rank needs "
                f"a client: pass --clients >= {n_ranks} or start at most {clients} ranks",
            )
        if self.out is not None and os.path.exists(self.out) and not self.overwrite:
            raise ConfigError(
                "--out",
                f"the log {self.out!r} exists; pass --overwrite to replace it "
                "or choose another --out",
            )
        return self.replace(clients=clients)


def _choice(option: str, value: str, valid) -> None:
    if value not in valid:
        raise ConfigError(
            option,
            f"{option} {value!r} is not one of {', '.join(valid)}{suggest(value, valid)}",
        )
