"""Privacy accounting of the Gaussian noise added to client messages.

The unit of privacy is a client: two runs are neighbours when one client's
whole dataset differs. Every message a client sends has norm at most ``S``
(the method's bound: ``tau`` for clipping, 1 for normalisation), so one
noisy message ``c_i + N(0, sigma^2 I)`` is a Gaussian mechanism with L2
sensitivity

    S      under add/remove (the client's message against no message),
    2 S    under replacement (two messages in the ball of radius S),

and noise multiplier ``z = sigma / S`` in dp-accounting's convention (which
doubles the sensitivity itself for ``replace``). A run of k rounds composes
k such mechanisms per client; minibatches inside a client give no
amplification at this level. The final figure comes from the PLD
accountant, the per-iteration column from the RDP accountant (cheaper,
slightly larger). Beyond epsilon = 20 the PLD accountant needs minutes and
gigabytes; there the figure is dp-accounting's exact epsilon of the
composed Gaussian mechanism (k mechanisms with multiplier z compose to one
with multiplier z / sqrt(k)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RELATIONS", "GaussianPrivacy", "calibrate_noise_sigma"]

RELATIONS = ("add-remove", "replace")
PLD_LIMIT = 20.0


def _dp():
    import dp_accounting

    return dp_accounting


def _relation(name: str):
    dp = _dp()
    if name == "add-remove":
        return dp.NeighboringRelation.ADD_OR_REMOVE_ONE
    if name == "replace":
        return dp.NeighboringRelation.REPLACE_ONE
    raise ValueError(f"unknown neighbouring relation {name!r}; valid: {RELATIONS}")


@dataclass(frozen=True)
class GaussianPrivacy:
    """The Gaussian mechanism of one client's message, composed over rounds.

    Args:
        noise_sigma: standard deviation ``sigma`` of the noise per coordinate.
        norm_bound: ``S``, the bound on every message's norm.
        delta: the target ``delta``.
        relation: ``add-remove`` or ``replace``.

    Example:
        >>> p = GaussianPrivacy(noise_sigma=2.0, norm_bound=0.5, delta=1e-5,
        ...                     relation="add-remove")
        >>> p.noise_multiplier, p.sensitivity
        (4.0, 0.5)
    """

    noise_sigma: float
    norm_bound: float
    delta: float
    relation: str = "add-remove"

    @property
    def noise_multiplier(self) -> float:
        return self.noise_sigma / self.norm_bound

    @property
    def sensitivity(self) -> float:
        return (2.0 if self.relation == "replace" else 1.0) * self.norm_bound

    def _event(self):
        return _dp().GaussianDpEvent(self.noise_multiplier)

    def epsilon(self, rounds: int) -> float:
        """Return epsilon after ``rounds`` noisy messages."""
        return self.report(rounds)[0]

    def report(self, rounds: int) -> tuple[float, str]:
        """Return epsilon after ``rounds`` noisy messages and the accountant
        that gave it: ``PLD``, or ``exact Gaussian`` beyond ``PLD_LIMIT``."""
        if rounds == 0:
            return 0.0, "none"
        exact = self.exact_epsilon(rounds)
        if exact > PLD_LIMIT:
            return exact, "exact Gaussian"
        accountant = _dp().pld.PLDAccountant(_relation(self.relation))
        accountant.compose(self._event(), int(rounds))
        return float(accountant.get_epsilon(self.delta)), "PLD"

    def exact_epsilon(self, rounds: int) -> float:
        """Return the exact epsilon of ``rounds`` composed mechanisms."""
        factor = 2.0 if self.relation == "replace" else 1.0
        z = self.noise_multiplier / factor / math.sqrt(rounds)
        return float(_dp().get_epsilon_gaussian(z, self.delta))

    def epsilon_column(self, rounds: int) -> np.ndarray:
        """Return epsilon after 0, 1, ..., ``rounds`` messages (RDP accountant)."""
        from dp_accounting.rdp import rdp_privacy_accountant as rdp

        accountant = rdp.RdpAccountant(neighboring_relation=_relation(self.relation))
        accountant.compose(self._event())
        orders, per_round = np.asarray(accountant.orders), np.asarray(accountant.rdp)
        column = np.zeros(rounds + 1)
        for k in range(1, rounds + 1):
            column[k] = rdp.compute_epsilon(orders, k * per_round, self.delta)[0]
        return column


def calibrate_noise_sigma(
    epsilon: float, delta: float, rounds: int, norm_bound: float, relation: str
) -> float:
    """Return the smallest sigma (to 0.1%) whose PLD epsilon after ``rounds``
    messages does not exceed ``epsilon``.

    The exact Gaussian calibration gives the starting bracket; the PLD
    accountant, which rounds pessimistically, decides.
    """
    dp = _dp()
    rounds = max(int(rounds), 1)
    factor = 2.0 if relation == "replace" else 1.0
    # k Gaussian mechanisms with multiplier z compose to one with z / sqrt(k).
    z_exact = dp.get_sigma_gaussian(epsilon, delta) * math.sqrt(rounds) * factor

    def pld_epsilon(z: float) -> float:
        return GaussianPrivacy(z * norm_bound, norm_bound, delta, relation).epsilon(
            rounds
        )

    lower = 0.9 * z_exact
    upper = z_exact
    while pld_epsilon(upper) > epsilon:
        lower, upper = upper, upper * 1.05
    while upper - lower > 1e-3 * upper:
        middle = 0.5 * (lower + upper)
        if pld_epsilon(middle) > epsilon:
            lower = middle
        else:
            upper = middle
    return upper * norm_bound
