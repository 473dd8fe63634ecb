"""Privacy accounting against the closed form of composed Gaussian mechanisms."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from clip21mpi.privacy import GaussianPrivacy, calibrate_noise_sigma


def closed_form_epsilon(sigma, sensitivity, rounds, delta):
    """k Gaussian mechanisms with sensitivity s and noise sigma are exactly
    mu-GDP with mu = sqrt(k) s / sigma, whose privacy profile is
    delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2)."""
    mu = math.sqrt(rounds) * sensitivity / sigma

    def profile(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(
            -eps / mu - mu / 2
        )

    return brentq(lambda eps: profile(eps) - delta, 0.0, 500.0, xtol=1e-12)


@pytest.mark.parametrize(
    "sigma,bound,rounds,relation",
    [
        (5.0, 1.0, 100, "add-remove"),
        (1.0, 0.1, 500, "add-remove"),
        (16.0, 1.0, 200, "replace"),
        (0.5, 0.01, 1000, "replace"),
    ],
)
def test_pld_epsilon_matches_the_closed_form(sigma, bound, rounds, relation):
    privacy = GaussianPrivacy(sigma, bound, 1e-5, relation)
    expected = closed_form_epsilon(sigma, privacy.sensitivity, rounds, 1e-5)
    epsilon, accountant = privacy.report(rounds)
    assert accountant == "PLD"
    assert epsilon == pytest.approx(expected, abs=1e-3)
    assert privacy.exact_epsilon(rounds) == pytest.approx(expected, abs=1e-6)


def test_sensitivity_follows_the_neighbouring_relation():
    assert GaussianPrivacy(1.0, 0.3, 1e-5, "add-remove").sensitivity == 0.3
    assert GaussianPrivacy(1.0, 0.3, 1e-5, "replace").sensitivity == 0.6
    add = GaussianPrivacy(2.0, 1.0, 1e-5, "add-remove").epsilon(50)
    replace = GaussianPrivacy(4.0, 1.0, 1e-5, "replace").epsilon(50)
    assert add == pytest.approx(replace, abs=1e-3)


def test_huge_epsilon_uses_the_exact_composition():
    privacy = GaussianPrivacy(1.5, 1.0, 1e-5, "add-remove")
    epsilon, accountant = privacy.report(300)
    assert accountant == "exact Gaussian"
    assert epsilon > 50
    assert epsilon == pytest.approx(closed_form_epsilon(1.5, 1.0, 300, 1e-5), rel=1e-6)


def test_rdp_column_grows_and_bounds_the_pld_figure():
    privacy = GaussianPrivacy(4.0, 1.0, 1e-6, "add-remove")
    column = privacy.epsilon_column(200)
    assert column.shape == (201,) and column[0] == 0
    assert np.all(np.diff(column) > 0)
    for k in (1, 50, 200):
        # RDP is an upper bound, within a modest factor of the tight figure.
        tight = privacy.epsilon(k)
        assert tight <= column[k] <= 1.6 * tight + 0.1


@pytest.mark.parametrize(
    "target,rounds,relation", [(1.0, 100, "add-remove"), (4.0, 1000, "replace")]
)
def test_calibrated_sigma_meets_the_target(target, rounds, relation):
    sigma = calibrate_noise_sigma(target, 1e-5, rounds, 0.5, relation)
    spent = GaussianPrivacy(sigma, 0.5, 1e-5, relation).epsilon(rounds)
    assert spent <= target
    assert spent >= 0.99 * target  # and little noise is wasted
