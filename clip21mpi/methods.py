"""Methods as compositions: a gradient estimator, a message operator, error
feedback or not, and Gaussian noise or not.

Every method runs the same round. At step k each client i turns its
estimator output ``V_i`` (see ``estimators``) into a message, adds noise,
and the server averages what it receives:

    without error feedback:
        c_i^k   = C(V_i^k)
        g^k     = mean_i (c_i^k + xi_i^k)
    with error feedback (g_i^{-1} = 0, g^{-1} = 0):
        c_i^k   = C(V_i^k - g_i^{k-1})            (C_0 at k = 0)
        g_i^k   = g_i^{k-1} + w c_i^k             (noise-free)
        g^k     = g^{k-1} + w mean_i (c_i^k + xi_i^k)
    then
        x^{k+1} = x^k - gamma g^k

with ``xi_i^k ~ N(0, sigma^2 I)`` drawn from client i's own stream
(``sigma = 0``: no noise) and ``w`` the error-feedback weight (1, or
``beta_hat`` for clip21-sgd2m, ``beta`` for normec).

    x       iterate              x
    gamma   step size            step_size        --step-size
    tau     clip threshold       tau              --tau
    k       Top-k coordinates    k                --k
    alpha   normalisation shift  alpha            --alpha
    w       feedback weight      feedback_weight  --beta-hat / --beta
    sigma   noise std            noise_sigma      --noise-sigma
    V_i     estimator output     est.V
    g_i     client estimate      state.g_local    (per client)
    g       server aggregate     state.g
    c_i     message              messages
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from clip21mpi.estimators import FullGradient, LocalSteps, Minibatch, Momentum
from clip21mpi.operators import Chain, Clip, Identity, Normalize, TopK
from clip21mpi.streams import stream

__all__ = ["METHODS", "Method", "MethodSpec", "MethodState", "auto_step_size"]


@dataclass(frozen=True)
class MethodSpec:
    """What a method is made of, and where it comes from."""

    name: str
    estimator: str  # "full", "minibatch", "momentum" or "local-steps"
    operator: str  # "identity", "clip", "topk", "clip-topk" or "normalize"
    error_feedback: bool
    feedback_weight: str | None = None  # config field giving w, else w = 1
    first_operator: str | None = None  # operator of the round k = 0, if other
    summary: str = ""
    sends: str = ""
    paper: str = ""
    options: tuple = ()
    notation: str = ""  # the update rule and its symbols, option by option


_CLIP21 = "Khirirat, Gorbunov, Horvath, Islamov, Karray, Richtarik (2023)"

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "gd",
            "full",
            "identity",
            False,
            summary="x -= gamma mean_i grad f_i(x)",
            sends="grad f_i(x)",
            paper="gradient descent",
            notation=(
                "x <- x - gamma mean_i grad f_i(x)\ngamma  step size   --step-size"
            ),
        ),
        MethodSpec(
            "clip-gd",
            "full",
            "clip",
            False,
            summary="x -= gamma mean_i clip_tau(grad f_i(x))",
            sends="clip_tau(grad f_i(x))",
            paper="clipped GD, the biased baseline of " + _CLIP21,
            options=("--tau",),
            notation=(
                "x <- x - gamma mean_i clip_tau(grad f_i(x))\n"
                "gamma  step size        --step-size\n"
                "tau    clip threshold   --tau"
            ),
        ),
        MethodSpec(
            "clip-sgd",
            "minibatch",
            "clip",
            False,
            summary="x -= gamma mean_i clip_tau(grad f_i(x; xi_i))",
            sends="clip_tau(grad f_i(x; xi_i))",
            paper="clipped SGD, baseline of " + _CLIP21,
            options=("--tau", "--batch-size"),
            notation=(
                "x <- x - gamma mean_i clip_tau(grad f_i(x; xi_i))\n"
                "gamma  step size        --step-size\n"
                "tau    clip threshold   --tau\n"
                "xi_i   b rows of client i, from its own stream   --batch-size"
            ),
        ),
        MethodSpec(
            "clip21",
            "full",
            "clip",
            True,
            summary="c_i = clip_tau(grad f_i(x) - g_i); g_i += c_i; g += mean c_i",
            sends="c_i",
            paper=_CLIP21,
            options=("--tau",),
            notation=(
                "c_i = clip_tau(grad f_i(x) - g_i); g_i += c_i; g += mean_i c_i; x <- x - gamma g\n"
                "gamma  step size        --step-size\n"
                "tau    clip threshold   --tau\n"
                "g_i    client estimate  (starts at 0; checkpointed)"
            ),
        ),
        MethodSpec(
            "clip21-sgd",
            "minibatch",
            "clip",
            True,
            summary="c_i = clip_tau(grad f_i(x; xi_i) - g_i); g_i += c_i; g += mean c_i",
            sends="c_i",
            paper=_CLIP21,
            options=("--tau", "--batch-size"),
            notation=(
                "c_i = clip_tau(grad f_i(x; xi_i) - g_i); g_i += c_i; g += mean_i c_i; x <- x - gamma g\n"
                "gamma  step size        --step-size\n"
                "tau    clip threshold   --tau\n"
                "xi_i   b rows of client i, from its own stream   --batch-size\n"
                "g_i    client estimate  (checkpointed)"
            ),
        ),
        MethodSpec(
            "press-clip21",
            "full",
            "clip-topk",
            True,
            summary="c_i = TopK(clip_tau(grad f_i(x) - g_i)); g_i += c_i; g += mean c_i",
            sends="c_i: k values and indices",
            paper=_CLIP21,
            options=("--tau", "--k"),
            notation=(
                "c_i = TopK(clip_tau(grad f_i(x) - g_i)); g_i += c_i; g += mean_i c_i; x <- x - gamma g\n"
                "gamma  step size        --step-size\n"
                "tau    clip threshold   --tau\n"
                "k      coordinates kept --k\n"
                "g_i    client estimate  (checkpointed)"
            ),
        ),
        MethodSpec(
            "ef21",
            "full",
            "topk",
            True,
            first_operator="identity",
            summary="c_i = TopK(grad f_i(x) - g_i); g_i += c_i; g += mean c_i",
            sends="c_i: k values and indices (the gradient at k = 0)",
            paper="Richtarik, Sokolov, Fatkhullin (2021)",
            options=("--k",),
            notation=(
                "c_i = TopK(grad f_i(x) - g_i); g_i += c_i; g += mean_i c_i; x <- x - gamma g\n"
                "gamma  step size        --step-size\n"
                "k      coordinates kept --k\n"
                "g_i    client estimate  (g_i = grad f_i(x^0) after round 0; checkpointed)"
            ),
        ),
        MethodSpec(
            "clip21-sgd2m",
            "momentum",
            "clip",
            True,
            feedback_weight="beta_hat",
            summary=(
                "v_i = (1-beta) v_i + beta grad f_i(x; xi_i); c_i = clip_tau(v_i - g_i);"
                " g_i += beta_hat c_i; g += beta_hat mean c_i"
            ),
            sends="c_i",
            paper="Islamov, Horvath, Lucchi, Richtarik, Gorbunov (2025)",
            options=("--tau", "--beta", "--beta-hat", "--batch-size"),
            notation=(
                "v_i = (1 - beta) v_i + beta grad f_i(x; xi_i); c_i = clip_tau(v_i - g_i);\n"
                "g_i += beta_hat c_i; g += beta_hat mean_i (c_i + noise_i); x <- x - gamma g\n"
                "gamma     step size        --step-size\n"
                "tau       clip threshold   --tau\n"
                "beta      momentum weight  --beta\n"
                "beta_hat  feedback weight  --beta-hat\n"
                "xi_i      minibatch (all rows without)   --batch-size\n"
                "v_i, g_i  momentum, estimate (start at 0; checkpointed)"
            ),
        ),
        MethodSpec(
            "normec",
            "full",
            "normalize",
            True,
            feedback_weight="beta",
            summary=(
                "D_i = (grad f_i(x) - g_i) / (alpha + ||grad f_i(x) - g_i||);"
                " g_i += beta D_i; g += beta mean D_i"
            ),
            sends="D_i (norm below 1)",
            paper="Shulgin, Khirirat, Richtarik (2025)",
            options=("--alpha", "--beta", "--batch-size"),
            notation=(
                "D_i = (grad f_i(x) - g_i) / (alpha + ||grad f_i(x) - g_i||);\n"
                "g_i += beta D_i; g += beta mean_i (D_i + noise_i); x <- x - gamma g\n"
                "gamma  step size        --step-size\n"
                "alpha  shift            --alpha\n"
                "beta   feedback weight  --beta\n"
                "grad f_i(x) may be a minibatch gradient   --batch-size\n"
                "g_i    client estimate  (starts at 0; checkpointed)"
            ),
        ),
        MethodSpec(
            "clip-fedavg",
            "local-steps",
            "clip",
            False,
            summary=(
                "x_i = Q local steps of size eta from x; x += gamma_s mean_i"
                " clip_tau(x_i - x)"
            ),
            sends="clip_tau(x_i - x)",
            paper="CE-FedAvg, baseline of " + _CLIP21,
            options=(
                "--tau",
                "--local-steps",
                "--local-step-size",
                "--server-step-size",
                "--batch-size",
            ),
            notation=(
                "x_i = x; Q times x_i -= eta grad f_i(x_i); x <- x + gamma_s mean_i clip_tau(x_i - x)\n"
                "Q        local steps        --local-steps\n"
                "eta      local step size    --local-step-size\n"
                "gamma_s  server step size   --server-step-size\n"
                "tau      clip threshold     --tau\n"
                "local gradients may be minibatch ones   --batch-size"
            ),
        ),
    )
}

# Defaults of the momentum weight when --beta is not given.
BETA_DEFAULTS = {"clip21-sgd2m": 0.1, "normec": 1.0}


@dataclass
class MethodState:
    """Everything a method carries between rounds (updated in place).

    Attributes:
        g_local: ``(n_local, d)`` client estimates ``g_i`` (error feedback).
        g: ``(d,)`` server aggregate ``g``, identical on every rank.
        v_local: ``(n_local, d)`` client momenta (momentum methods).
        batch_rngs: each local client's minibatch stream.
        noise_rngs: each local client's noise stream.
    """

    g_local: np.ndarray
    g: np.ndarray
    v_local: np.ndarray | None = None
    batch_rngs: list = field(default_factory=list)
    noise_rngs: list = field(default_factory=list)


class Method:
    """A method built from its spec and the run's settings.

    Args:
        spec: what the method is made of.
        tau: clip threshold. k: Top-k coordinates. alpha: normalisation shift.
        batch_size: rows per minibatch, or None for full gradients.
        beta, beta_hat: momentum and feedback weights.
        local_steps, local_step_size: local steps of ``clip-fedavg``.
        noise_sigma: standard deviation of the noise added to each message.

    Example:
        >>> m = Method(METHODS["clip21"], tau=1.0)
        >>> state = m.init_state(range(1), dim=2, seed=0)
        >>> C, active = m.messages(np.array([[3.0, 4.0]]), state, first=True)
        >>> C.round(2).tolist(), state.g_local.round(2).tolist()
        ([[0.6, 0.8]], [[0.6, 0.8]])
    """

    def __init__(
        self,
        spec: MethodSpec,
        tau: float = 1.0,
        k: int = 1,
        alpha: float = 0.0,
        batch_size: int | None = None,
        beta: float | None = None,
        beta_hat: float | None = None,
        local_steps: int = 1,
        local_step_size: float = 1.0,
        noise_sigma: float = 0.0,
    ):
        self.spec = spec
        self.name = spec.name
        self.error_feedback = spec.error_feedback
        self.noise_sigma = float(noise_sigma)
        beta = BETA_DEFAULTS.get(spec.name, 1.0) if beta is None else beta
        beta_hat = beta if beta_hat is None else beta_hat
        self.feedback_weight = {"beta": beta, "beta_hat": beta_hat}.get(
            spec.feedback_weight, 1.0
        )

        base = Minibatch(batch_size) if batch_size else FullGradient()
        if spec.estimator == "momentum":
            self.estimator = Momentum(base, beta)
        elif spec.estimator == "local-steps":
            self.estimator = LocalSteps(base, local_steps, local_step_size)
        else:
            self.estimator = base

        ops = {
            "identity": lambda: Identity(),
            "clip": lambda: Clip(float(tau)),
            "topk": lambda: TopK(int(k)),
            "clip-topk": lambda: Chain(Clip(float(tau)), TopK(int(k))),
            "normalize": lambda: Normalize(float(alpha)),
        }
        self.operator = ops[spec.operator]()
        self.first_operator = (
            ops[spec.first_operator]() if spec.first_operator else self.operator
        )

    @property
    def norm_bound(self) -> float | None:
        """The bound on every message's norm (None: unbounded)."""
        if self.first_operator is not self.operator:
            return None
        return self.operator.norm_bound

    def init_state(self, clients: range, dim: int, seed: int) -> MethodState:
        """Return the state of the local ``clients`` before the first round."""
        n_local = len(clients)
        state = MethodState(np.zeros((n_local, dim)), np.zeros(dim))
        if isinstance(self.estimator, Momentum):
            state.v_local = np.zeros((n_local, dim))
        if self.estimator.stochastic:
            state.batch_rngs = [stream(seed, "batch", i) for i in clients]
        if self.noise_sigma > 0:
            state.noise_rngs = [stream(seed, "noise", i) for i in clients]
        return state

    def messages(self, V: np.ndarray, state: MethodState, first: bool):
        """Return the noise-free messages ``c_i`` and the mask of clients whose
        operator was active; with error feedback, also ``g_i += w c_i``."""
        op = self.first_operator if first else self.operator
        if not self.error_feedback:
            return op(V)
        C, active = op(V - state.g_local)
        state.g_local += self.feedback_weight * C if self.feedback_weight != 1 else C
        return C, active

    def noise(self, state: MethodState, dim: int) -> np.ndarray | None:
        """Return this round's ``(n_local, d)`` noise, or None without noise."""
        if self.noise_sigma == 0:
            return None
        return self.noise_sigma * np.stack(
            [rng.standard_normal(dim) for rng in state.noise_rngs]
        )

    def server_round(self, state: MethodState, received_mean: np.ndarray) -> None:
        """Fold ``mean_i (c_i + xi_i)`` into the server aggregate ``g``."""
        if not self.error_feedback:
            state.g[:] = received_mean
        elif self.feedback_weight == 1:
            state.g += received_mean
        else:
            state.g += self.feedback_weight * received_mean

    def bits_per_message(self, dim: int, first: bool) -> int:
        """Bits one client sends in a round (noise makes every message dense)."""
        if self.noise_sigma > 0:
            return Identity().bits(dim)
        return (self.first_operator if first else self.operator).bits(dim)


def auto_step_size(
    name: str, L: float, L_tilde: float, k: int | None, dim: int
) -> float:
    """Return the step size that ``--step-size auto`` means for ``name``.

    * ef21: ``1 / (L + L_tilde sqrt(beta / theta))`` with ``alpha = k / d``,
      ``theta = 1 - sqrt(1 - alpha)``,
      ``beta = (1 - alpha) / (1 - sqrt(1 - alpha))`` and
      ``L_tilde = sqrt(mean_i L_i^2)`` (EF21, Theorem 1);
    * every other method: ``1 / L`` (clip21 is exactly GD once clipping
      stops; the worst-case bounds of the analyses are smaller).

    Example:
        >>> auto_step_size("gd", 4.0, 5.0, None, 10)
        0.25
    """
    if name == "ef21":
        alpha = min(1.0, k / dim)
        root = math.sqrt(1.0 - alpha)
        theta = 1.0 - root
        beta = (1.0 - alpha) / theta
        return 1.0 / (L + L_tilde * math.sqrt(beta / theta))
    return 1.0 / L
