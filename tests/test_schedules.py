"""Schedules and the coefficient table against literal textbook / seed formulas."""

from __future__ import annotations

import math

import pytest
import torch

from fastdia.errors import ConfigError
from fastdia.schedules import (
    SAMPLERS,
    SCHEDULES,
    SQRT_1M_ABAR,
    SQRT_1M_ABAR_NEXT,
    SQRT_ABAR,
    SQRT_ABAR_NEXT,
    alpha_bar,
    coefficient_table,
)


def _grid(schedule, steps):
    abar = alpha_bar(schedule, torch.arange(steps + 1, dtype=torch.float64) / steps).tolist()
    abar[0] = 1.0
    return abar


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_bar_monotone_and_bounded(schedule):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    abar = alpha_bar(schedule, t)
    assert abar.dtype == torch.float64
    assert torch.all(abar <= 1) and torch.all(abar >= 1e-5)
    assert torch.all(abar[1:] <= abar[:-1])
    assert abar[0] > 0.98 and abar[-1] < 1e-3


def test_linear_matches_discrete_ddpm_betas():
    # Ho et al.: betas linspace(1e-4, 0.02, 1000); abar_T = prod(1 - beta)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    discrete = torch.cumprod(1 - betas, 0)[-1]
    continuous = alpha_bar("linear", torch.tensor(1.0))
    assert math.isclose(math.log(continuous), math.log(discrete), rel_tol=0.01)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddpm_matches_textbook(schedule, steps):
    """Ho et al. 2020, Algorithm 2, written out literally with the table's own grid."""
    torch.manual_seed(0)
    table = coefficient_table(schedule, "ddpm", steps)
    abar = _grid(schedule, steps)
    z, eps, zeta, grad = (torch.randn(64, dtype=torch.float64) for _ in range(4))
    lam = 0.7
    for r, i in enumerate(range(steps, 0, -1)):
        alpha_t = abar[i] / abar[i - 1]
        beta_t = 1 - alpha_t
        sigma2 = (1 - abar[i - 1]) / (1 - abar[i]) * beta_t  # posterior variance
        mean = 1 / math.sqrt(alpha_t) * (z - (1 - alpha_t) / math.sqrt(1 - abar[i]) * eps)
        textbook = mean + sigma2 * lam * grad + math.sqrt(sigma2) * zeta  # classifier guidance
        a, b, c, s = table.coef[r].double().tolist()
        ours = a * z + b * eps + c * lam * grad + s * zeta
        torch.testing.assert_close(ours, textbook, rtol=1e-5, atol=1e-5)
        assert table.predictor[r]
        assert table.t[r].item() == pytest.approx(i / steps)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dia_matches_seed_formula(schedule):
    """Seed 001 §2.3/§2.5, literally, with the bindings documented in fastdia.schedules."""
    steps = 20
    table = coefficient_table(schedule, "dia", steps)
    abar = _grid(schedule, steps)
    torch.manual_seed(1)
    z, eps, zeta, grad = (torch.randn(64, dtype=torch.float64) for _ in range(4))
    lam = 1.3
    for r, i in enumerate(range(steps, 0, -1)):
        alpha = math.sqrt(abar[i] / abar[i - 1])  # per-step signal factor
        sigma = math.sqrt(1 - abar[i])  # marginal noise level: -eps/sigma is the score
        big_sigma2 = 1 - alpha**2
        sig_p2 = 1 - abar[i - 1]
        eta = sigma * (math.sqrt(sigma**2 + sig_p2) - sigma) / big_sigma2
        mu = (z - sigma * eps) / alpha
        g = -eps / sigma + lam * grad
        seed = mu + eta * big_sigma2 * g + math.sqrt(big_sigma2) * math.sqrt(2 * eta) * zeta
        a, b, c, s = table.coef[r].double().tolist()
        torch.testing.assert_close(
            a * z + b * eps + c * lam * grad + s * zeta, seed, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_sampler_keeps_the_forward_marginals(sampler, schedule):
    """If eps is the true noise, z' = a z + b eps + s zeta must be distributed like the
    forward process at the next level: signal sqrt(abar_p) x0, noise variance 1 - abar_p
    (ddpm: exactly the posterior; ddim: deterministic; dia: by the choice of eta)."""
    table = coefficient_table(schedule, sampler, 25)
    for r in range(len(table)):
        a, b, c, s = table.coef[r].double().tolist()
        sab, s1m, sab_n, s1m_n = (
            table.rows[r, k].item()
            for k in (SQRT_ABAR, SQRT_1M_ABAR, SQRT_ABAR_NEXT, SQRT_1M_ABAR_NEXT)
        )
        # z = sab x0 + s1m eps  =>  z' = a sab x0 + (a s1m + b) eps + s zeta
        assert a * sab == pytest.approx(sab_n, rel=2e-4, abs=2e-5)
        assert (a * s1m + b) ** 2 + s**2 == pytest.approx(s1m_n**2, rel=2e-3, abs=2e-5)
        assert c >= 0


def test_last_step_lands_on_clean_data_without_noise():
    for sampler in SAMPLERS:
        table = coefficient_table("sqrt", sampler, 10)
        assert table.rows[-1, SQRT_ABAR_NEXT] == 1.0
        assert table.coef[-1, 3] == 0.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_tables_build_for_any_step_grid(schedule):
    """Every sampler builds a table with non-negative noise for uniform grids of 1-120
    steps and for random ascending grids (measured time warps are arbitrary): a last step
    onto clean data once gave the dia noise variance -5e-17 and a math domain error."""
    gen = torch.Generator().manual_seed(0)
    grids = [None] * 120 + [
        [0.0, *sorted(torch.rand(steps - 1, generator=gen, dtype=torch.float64).tolist()), 1.0]
        for steps in torch.randint(2, 80, (40,), generator=gen).tolist()
    ]
    for i, times in enumerate(grids):
        steps = i + 1 if times is None else len(times) - 1
        for sampler in SAMPLERS:
            table = coefficient_table(schedule, sampler, steps, times=times)
            assert torch.isfinite(table.rows).all()
            assert (table.coef[:, 3] >= 0).all() and (table.coef[:, 2] >= -1e-12).all()


def test_corrector_rows():
    table = coefficient_table("cosine", "ddpm", 5, corrector_steps=2, corrector_snr=0.2)
    assert len(table) == 5 + 2 * 4
    assert table.predictor == [True, False, False] * 4 + [True]
    a, b, c, s = table.coef[1].double().tolist()
    sigma = table.rows[1, SQRT_1M_ABAR].item()
    delta = 2 * 0.2**2 * sigma**2
    assert (a, b, c, s) == pytest.approx(
        (1.0, -delta / sigma, delta, math.sqrt(2 * delta)), rel=1e-5
    )
    assert table.t[1] == table.t[2] == pytest.approx(4 / 5)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown sampler 'foo'; known: ddpm, ddim, dia"):
        coefficient_table("sqrt", "foo", 10)
    with pytest.raises(ConfigError, match="unknown schedule"):
        coefficient_table("quadratic", "dia", 10)
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        coefficient_table("sqrt", "dia", 0)
    with pytest.raises(ConfigError, match="eta_scale"):
        coefficient_table("sqrt", "dia", 3, eta_scale=float("nan"))
