"""Gradient estimators: what a client feeds into its message operator.

Each estimator maps the iterate ``x`` to one vector per local client, the
``(n_local, d)`` array ``V``, and passes on the full gradients and values
at ``x`` when it computed them anyway (they feed the diagnostics).

    full           V_i = grad f_i(x)
    minibatch      V_i = grad f_i(x; xi_i), xi_i: b rows of client i drawn
                   without replacement from the client's own stream
    momentum       v_i = (1 - beta) v_i + beta V_i(inner),  V_i = v_i
    local steps    x_i = x; Q times x_i -= eta V_i(inner at x_i);  V_i = x - x_i

    b      batch size            batch_size        --batch-size
    beta   momentum weight       beta              --beta
    Q      local steps           steps             --local-steps
    eta    local step size       step_size         --local-step-size
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Estimate", "FullGradient", "LocalSteps", "Minibatch", "Momentum"]


@dataclass
class Estimate:
    """One round's estimator output on one rank.

    Attributes:
        V: ``(n_local, d)`` vectors fed to the operator.
        grads: ``(n_local, d)`` full gradients at ``x``, or None.
        values: ``(n_local,)`` values at ``x``, or None.
    """

    V: np.ndarray
    grads: np.ndarray | None = None
    values: np.ndarray | None = None


class FullGradient:
    """``V_i = grad f_i(x)``: every row of every client."""

    stochastic = False

    def gradients(self, obj, x, state):
        return obj.grads(x)

    def estimate(self, obj, x, state, evaluate: bool) -> Estimate:
        if evaluate:
            values, grads = obj.values_and_grads(x)
            return Estimate(grads, grads, values)
        grads = obj.grads(x)
        return Estimate(grads, grads)


class Minibatch:
    """``V_i`` from ``b`` rows of client i, drawn anew at every call.

    Args:
        batch_size: rows per client and draw (at most every client's rows).
    """

    stochastic = True

    def __init__(self, batch_size: int):
        self.batch_size = int(batch_size)

    def sample(self, obj, rngs):
        """Return the objectives restricted to fresh minibatches."""
        b = self.batch_size
        starts = obj.design.offsets[:-1]
        rows = np.concatenate(
            [
                start + rng.choice(m, size=b, replace=False)
                for start, m, rng in zip(starts, obj.rows_per_client, rngs)
            ]
        )
        return obj.subset(rows, np.arange(obj.n_local + 1) * b)

    def gradients(self, obj, x, state):
        return self.sample(obj, state.batch_rngs).grads(x)

    def estimate(self, obj, x, state, evaluate: bool) -> Estimate:
        return Estimate(self.gradients(obj, x, state))


class Momentum:
    """``v_i = (1 - beta) v_i + beta V_i`` with ``v_i = 0`` at the start.

    Args:
        inner: the estimator whose output is averaged.
        beta: the momentum weight in (0, 1].
    """

    def __init__(self, inner, beta: float):
        self.inner = inner
        self.beta = float(beta)
        self.stochastic = inner.stochastic

    def estimate(self, obj, x, state, evaluate: bool) -> Estimate:
        est = self.inner.estimate(obj, x, state, evaluate)
        v = state.v_local
        v *= 1.0 - self.beta
        v += self.beta * est.V
        return Estimate(v, est.grads, est.values)


class LocalSteps:
    """``Q`` local gradient steps from ``x``; ``V_i = x - x_i``.

    Args:
        inner: the estimator of each local step (full or minibatch).
        steps: ``Q >= 1``.
        step_size: ``eta > 0``.
    """

    def __init__(self, inner, steps: int, step_size: float):
        self.inner = inner
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.stochastic = inner.stochastic

    def estimate(self, obj, x, state, evaluate: bool) -> Estimate:
        first = self.inner.estimate(obj, x, state, evaluate)
        X = x - self.step_size * first.V
        for _ in range(self.steps - 1):
            X -= self.step_size * self.inner.gradients(obj, X, state)
        return Estimate(x - X, first.grads, first.values)
