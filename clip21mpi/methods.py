"""Methods as compositions: a gradient estimator, a message operator, and
error feedback or not.

Every method runs the same round. At step k each client i forms a message
from its gradient estimate and the server averages the messages:

    without error feedback (gd, clip-gd):
        c_i^k   = C(grad f_i(x^k))
        g^k     = mean_i c_i^k
    with error feedback (clip21, ef21), g_i^{-1} = 0, g^{-1} = 0:
        c_i^k   = C(grad f_i(x^k) - g_i^{k-1})      (C_0 at k = 0)
        g_i^k   = g_i^{k-1} + c_i^k
        g^k     = g^{k-1} + mean_i c_i^k
    then
        x^{k+1} = x^k - gamma g^k

With error feedback the first round gives ``g_i^0 = C_0(grad f_i(x^0))``:
clip21 has ``C_0 = C = clip_tau``; ef21 has ``C_0 = identity`` and
``C = Top-k``, as in the EF21 experiments.

    x       iterate            x
    gamma   step size          step_size       --step-size
    tau     clip threshold     tau             --tau
    k       Top-k coordinates  k               --k
    g_i     client estimate    state.g_local   (per client)
    g       server aggregate   state.g
    c_i     message            messages
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clip21mpi.operators import Clip, Identity, TopK

__all__ = ["METHODS", "Method", "MethodSpec", "MethodState", "auto_step_size"]


@dataclass(frozen=True)
class MethodSpec:
    """What a method is made of, and where it comes from."""

    name: str
    operator: str  # "identity", "clip" or "topk"
    error_feedback: bool
    first_operator: str | None = None  # operator of the round k = 0, if other
    estimator: str = "full"  # the gradient estimator
    summary: str = ""
    paper: str = ""


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "gd",
            "identity",
            False,
            summary="x <- x - gamma mean_i grad f_i(x)",
            paper="gradient descent",
        ),
        MethodSpec(
            "clip-gd",
            "clip",
            False,
            summary="x <- x - gamma mean_i clip_tau(grad f_i(x))",
            paper="clipped gradient descent (biased baseline)",
        ),
        MethodSpec(
            "clip21",
            "clip",
            True,
            summary="c_i = clip_tau(grad f_i(x) - g_i); g_i += c_i; g += mean c_i",
            paper="Khirirat, Gorbunov, Horvath, Islamov, Karray, Richtarik (2023)",
        ),
        MethodSpec(
            "ef21",
            "topk",
            True,
            first_operator="identity",
            summary="c_i = TopK(grad f_i(x) - g_i); g_i += c_i; g += mean c_i",
            paper="Richtarik, Sokolov, Fatkhullin (2021)",
        ),
    )
}


@dataclass
class MethodState:
    """Everything a method carries between rounds (updated in place).

    Attributes:
        g_local: ``(n_local, d)`` client estimates ``g_i`` (error feedback).
        g: ``(d,)`` server aggregate ``g``, identical on every rank.
    """

    g_local: np.ndarray
    g: np.ndarray


class Method:
    """A method built from its spec and its parameters.

    Args:
        spec: what the method is made of.
        tau: clip threshold (methods that clip).
        k: Top-k coordinates (methods that sparsify).

    Example:
        >>> m = Method(METHODS["clip21"], tau=1.0)
        >>> state = m.init_state(n_local=1, dim=2)
        >>> C, active = m.client_round(np.array([[3.0, 4.0]]), state, first=True)
        >>> C.round(2).tolist(), state.g_local.round(2).tolist()
        ([[0.6, 0.8]], [[0.6, 0.8]])
    """

    def __init__(
        self, spec: MethodSpec, tau: float | None = None, k: int | None = None
    ):
        self.spec = spec
        self.name = spec.name
        self.error_feedback = spec.error_feedback
        self.operator = _make_operator(spec.operator, tau, k)
        self.first_operator = (
            _make_operator(spec.first_operator, tau, k)
            if spec.first_operator
            else self.operator
        )

    def init_state(self, n_local: int, dim: int) -> MethodState:
        return MethodState(np.zeros((n_local, dim)), np.zeros(dim))

    def client_round(self, grads: np.ndarray, state: MethodState, first: bool):
        """Return the messages ``c_i`` and the mask of clients whose operator
        was active; with error feedback, also add ``c_i`` to ``g_i``."""
        op = self.first_operator if first else self.operator
        if not self.error_feedback:
            return op(grads)
        messages, active = op(grads - state.g_local)
        state.g_local += messages
        return messages, active

    def server_round(self, state: MethodState, message_mean: np.ndarray) -> None:
        """Fold ``mean_i c_i`` into the server aggregate ``g``."""
        if self.error_feedback:
            state.g += message_mean
        else:
            state.g[:] = message_mean

    def bits_per_message(self, dim: int, first: bool) -> int:
        return (self.first_operator if first else self.operator).bits(dim)

    def uses_clipping(self) -> bool:
        return isinstance(self.operator, Clip)


def _make_operator(kind: str, tau, k):
    if kind == "identity":
        return Identity()
    if kind == "clip":
        return Clip(float(tau))
    if kind == "topk":
        return TopK(int(k))
    raise ValueError(f"unknown operator {kind!r}")


def auto_step_size(
    name: str, L: float, L_tilde: float, k: int | None, dim: int
) -> float:
    """Return the step size that ``--step-size auto`` means for ``name``.

    * gd, clip-gd, clip21: ``1 / L`` (clip21 is exactly GD once clipping
      stops; the worst-case bound of its analysis is smaller);
    * ef21: ``1 / (L + L_tilde sqrt(beta / theta))`` with ``alpha = k / d``,
      ``theta = 1 - sqrt(1 - alpha)``,
      ``beta = (1 - alpha) / (1 - sqrt(1 - alpha))`` and
      ``L_tilde = sqrt(mean_i L_i^2)`` (EF21, Theorem 1).

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
