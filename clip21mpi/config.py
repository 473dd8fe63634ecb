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

from clip21mpi.checkpoint import checkpoint_path
from clip21mpi.methods import METHODS
from clip21mpi.privacy import RELATIONS
from problems.losses import LOSSES, REGULARISERS
from problems.split import SPLITS

__all__ = [
    "PROBLEMS",
    "X0_CHOICES",
    "ConfigError",
    "RunConfig",
    "suggest",
    "unused_options",
]

X0_CHOICES = ("auto", "zeros", "normal")
PROBLEMS = (*LOSSES, "mlp")
BOUNDED_OPERATORS = ("clip", "clip-topk", "normalize")


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
    reg: str = "auto"
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
    x0: str = "auto"
    out: str | None = None
    overwrite: bool = False
    batch_size: int | None = None
    noise_sigma: float = 0.0
    epsilon: float | None = None
    delta: float = 1e-5
    neighbouring: str = "add-remove"
    alpha: float = 0.01
    beta: float | None = None
    beta_hat: float | None = None
    local_steps: int = 5
    local_step_size: float | str = "auto"
    server_step_size: float = 1.0
    hidden: int = 32
    checkpoint_every: int = 0
    resume: bool = False

    @property
    def noisy(self) -> bool:
        return self.noise_sigma > 0 or self.epsilon is not None

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, n_ranks: int = 1) -> RunConfig:
        """Return the config with ``clients`` resolved, or raise ConfigError."""
        _choice("--problem", self.problem, PROBLEMS)
        _choice("--reg", self.reg, ("auto", *REGULARISERS))
        _choice("--method", self.method, METHODS)
        _choice("--split", self.split, SPLITS)
        _choice("--x0", self.x0, X0_CHOICES)
        _choice("--neighbouring", self.neighbouring, RELATIONS)
        _validate_family(self)
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
        if self.checkpoint_every < 0:
            raise ConfigError(
                "--checkpoint-every",
                f"--checkpoint-every must be >= 0, got {self.checkpoint_every!r}",
            )
        if self.resume and self.out is None:
            raise ConfigError(
                "--resume", "--resume needs --out: the log whose checkpoint to resume"
            )
        if (
            self.out is not None
            and os.path.exists(self.out)
            and not self.overwrite
            and not os.path.exists(checkpoint_path(self.out))
        ):
            raise ConfigError(
                "--out",
                f"the log {self.out!r} exists; pass --overwrite to replace it "
                "or choose another --out",
            )
        reg = self.reg
        if reg == "auto":
            # The EF21 and Clip21 experiments' regulariser; none for the network.
            reg = "none" if self.problem == "mlp" else "nonconvex"
        return self.replace(clients=clients, reg=reg)


def _positive(option: str, value, what: str = "a number > 0") -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(option, f"{option} must be {what}, got {value!r}")


def _unit_interval(option: str, value) -> None:
    if value is not None and not (0 < value <= 1):
        raise ConfigError(option, f"{option} must be in (0, 1], got {value!r}")


def _validate_family(cfg: RunConfig) -> None:
    """Checks of the options of the methods beyond GD (run by ``validate``)."""
    spec = METHODS[cfg.method]
    if cfg.batch_size is not None:
        _positive("--batch-size", cfg.batch_size, "a whole number >= 1")
    elif spec.estimator == "minibatch":
        raise ConfigError(
            "--batch-size",
            f"--method {cfg.method} needs --batch-size (rows per client and step)",
        )
    if not (math.isfinite(cfg.noise_sigma) and cfg.noise_sigma >= 0):
        raise ConfigError(
            "--noise-sigma", f"--noise-sigma must be >= 0, got {cfg.noise_sigma!r}"
        )
    if cfg.epsilon is not None:
        _positive("--epsilon", cfg.epsilon)
        if cfg.noise_sigma > 0:
            raise ConfigError(
                "--epsilon",
                "pass --noise-sigma or --epsilon, not both: --epsilon calibrates sigma",
            )
    if not 0 < cfg.delta < 1:
        raise ConfigError("--delta", f"--delta must be in (0, 1), got {cfg.delta!r}")
    bounded = spec.operator in BOUNDED_OPERATORS and spec.first_operator is None
    if cfg.noisy and not bounded:
        valid = [
            name
            for name, s in METHODS.items()
            if s.operator in BOUNDED_OPERATORS and s.first_operator is None
        ]
        raise ConfigError(
            "--method",
            f"--method {cfg.method} sends messages of unbounded norm, so noise "
            f"gives no privacy guarantee; with --noise-sigma or --epsilon use one "
            f"of {', '.join(valid)}",
        )
    if not (math.isfinite(cfg.alpha) and cfg.alpha >= 0):
        raise ConfigError("--alpha", f"--alpha must be >= 0, got {cfg.alpha!r}")
    _unit_interval("--beta", cfg.beta)
    _unit_interval("--beta-hat", cfg.beta_hat)
    _positive("--local-steps", cfg.local_steps, "a whole number >= 1")
    if cfg.local_step_size != "auto":
        _positive("--local-step-size", cfg.local_step_size, "a number > 0 or 'auto'")
    _positive("--server-step-size", cfg.server_step_size)
    _positive("--hidden", cfg.hidden, "a whole number >= 1")
    if cfg.problem == "mlp":
        # The step that 'auto' would set: the local one for local-step methods.
        local = spec.estimator == "local-steps"
        option = "--local-step-size" if local else "--step-size"
        if (cfg.local_step_size if local else cfg.step_size) == "auto":
            raise ConfigError(
                option,
                f"{option} auto needs a smoothness constant, which --problem mlp "
                f"does not have; pass a number, e.g. {option} 0.5",
            )


def _choice(option: str, value: str, valid) -> None:
    if value not in valid:
        raise ConfigError(
            option,
            f"{option} {value!r} is not one of {', '.join(valid)}{suggest(value, valid)}",
        )


def _fields_of(spec) -> set[str]:
    """Return the RunConfig fields of a method's CLI options (``--beta-hat``)."""
    return {option.removeprefix("--").replace("-", "_") for option in spec.options}


# Options that some methods use and others ignore (any method takes minibatches).
_PER_METHOD = set().union(*map(_fields_of, METHODS.values())) - {"batch_size"}


def unused_options(options: dict) -> set[str]:
    """Return the options a run with ``options`` does not use.

    Method options (``MethodSpec.options``) unused by its method; the step
    size of local-step methods (the server step replaces it); ``hidden``
    unless the problem is ``mlp``; ``delta`` and ``neighbouring`` without
    noise. Nothing is dropped for an unknown method, so validation sees it.

    Example:
        >>> sorted(unused_options({"method": "clip21", "noise_sigma": 0.5}))[:4]
        ['alpha', 'beta', 'beta_hat', 'hidden']
        >>> {"tau", "delta"} <= unused_options({"method": "gd"})
        True
    """
    default = RunConfig()
    method = options.get("method", default.method)
    if method not in METHODS:
        return set()
    spec = METHODS[method]
    unused = _PER_METHOD - _fields_of(spec)
    if spec.estimator == "local-steps":
        unused.add("step_size")
    if options.get("problem", default.problem) != "mlp":
        unused.add("hidden")
    noise = {k: v for k, v in options.items() if k in ("noise_sigma", "epsilon")}
    if not default.replace(**noise).noisy:
        unused.update(("delta", "neighbouring"))
    return unused
