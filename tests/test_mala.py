"""MALA corrector rows (:mod:`fastdia.mala`): the acceptance ratio against its exact value,
exactness where the unadjusted step is biased, and the rows inside the block loop."""

from __future__ import annotations

import math

import pytest
import torch

from fastdia import mala
from fastdia.errors import ConfigError
from fastdia.models.critic import CriticConfig, build_critic
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic
from fastdia.schedules import SQRT_1M_ABAR, coefficient_table
from fastdia.window import WindowDiffusion

# ---- the math ----------------------------------------------------------------------------


def _gaussian_log_target(z, mu, var, w, lam):
    """log N(z; mu, var I) + lam * w . z per chain (unnormalised), z [B, L, d]."""
    return (-0.5 * (z - mu) ** 2 / var).flatten(1).sum(1) + lam * (w * z).flatten(1).sum(1)


def test_log_accept_is_the_exact_mh_ratio_for_a_gaussian_target():
    """A Gaussian data density has a linear score, so the trapezoid line integral is exact:
    log alpha must equal log pi(z') - log pi(z) + log q(z | z') - log q(z' | z) computed
    from the densities themselves, with fixed (context) positions left out."""
    g = torch.Generator().manual_seed(0)
    b, length, d = 5, 4, 3
    mu, var, lam, delta = 0.7, 0.5, 1.3, 0.2
    w = torch.randn(length, d, generator=g)
    free = torch.ones(b, length, 1)
    free[:, 0] = 0.0  # position 0 is context
    z = torch.randn(b, length, d, generator=g)

    def terms(x):
        score = -(x - mu) / var
        drift = score + lam * w
        return score, lam * (w * x).flatten(1).sum(1), drift

    s0, v0, g0 = terms(z)
    zeta = torch.randn(b, length, d, generator=g)
    prop = mala.propose(z, g0, zeta, delta, free)
    assert torch.equal(prop[:, 0], z[:, 0])  # context untouched
    s1, v1, g1 = terms(prop)
    got = mala.log_accept(z, prop, (s0, s1), (g0, g1), (v0, v1), delta, free)

    def log_q(to, frm, drift):  # the proposal density on the free positions
        diff = (to - frm - delta * drift) * free
        return -(diff**2).flatten(1).sum(1) / (4 * delta)

    want = (
        _gaussian_log_target(prop, mu, var, w, lam)
        - _gaussian_log_target(z, mu, var, w, lam)
        + log_q(z, prop, g1)
        - log_q(prop, z, g0)
    )
    assert got.shape == (b,)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_accept_compares_a_uniform_with_alpha():
    normal = torch.tensor([-3.0, 0.0, 3.0])
    u = torch.distributions.Normal(0.0, 1.0).cdf(normal)
    log_alpha = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    assert mala.accept(log_alpha, normal).tolist() == (u < 0.5).tolist()
    assert mala.accept(torch.full((3,), math.inf), normal).all()
    assert not mala.accept(torch.full((3,), -math.inf), normal).any()


# a 1-D toy of one level: the data are three token embeddings, p_t their diffused mixture
# (exact score), tilted by exp(lam z); the tilted density is a Gaussian mixture again
_EMB, _PROBS, _AB, _LAM = torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0.5, 0.3, 0.2]), 0.5, 1.0


def _mixture_score(z):
    sab, var = math.sqrt(_AB), 1 - _AB
    logits = _PROBS.log() - 0.5 * (z[..., None] - sab * _EMB) ** 2 / var
    resp = torch.softmax(logits, dim=-1)
    return (resp * (sab * _EMB - z[..., None])).sum(-1) / var


def _tilted_cdf(x):
    sab, var = math.sqrt(_AB), 1 - _AB
    means = sab * _EMB + _LAM * var  # each component shifts by lam var
    weights = _PROBS * torch.exp(_LAM * sab * _EMB)
    weights = weights / weights.sum()
    normal = torch.distributions.Normal(means, math.sqrt(var))
    return (weights * normal.cdf(x[:, None])).sum(-1)


def _tv_to_target(samples):
    edges = torch.linspace(-4.0, 5.0, 46)
    counts = torch.histogram(samples.clamp(-3.99, 4.99), bins=edges).hist / samples.numel()
    mass = _tilted_cdf(edges[1:]) - _tilted_cdf(edges[:-1])
    return 0.5 * (counts - mass).abs().sum().item()


def _token_tv(samples):
    """TV between the tokens the samples round to (nearest of the three scaled embeddings)
    and the exact token distribution the tilted density puts on their cells."""
    sab = math.sqrt(_AB)
    edges = torch.tensor([-sab / 2, sab / 2])
    freq = torch.bincount(torch.bucketize(samples, edges), minlength=3) / samples.numel()
    cdf = _tilted_cdf(edges)
    mass = torch.stack([cdf[0], cdf[1] - cdf[0], 1 - cdf[1]])
    return 0.5 * (freq - mass).abs().sum().item()


def _chains(steps, delta, *, adjusted, n=20000, seed=0):
    """``n`` chains from the point -3, ``steps`` Langevin moves at step ``delta``,
    Metropolis-adjusted or not; one score evaluation per move either way (MALA reuses the
    accepted state's)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.full((n, 1, 1), -3.0)
    free = torch.ones(n, 1, 1)

    def terms(x):
        score = _mixture_score(x)
        return score, _LAM * x.flatten(1).sum(1), score + _LAM

    current = terms(z)
    for _ in range(steps):
        zeta = torch.randn(z.shape, generator=g)
        prop = mala.propose(z, current[2], zeta, delta, free)
        if not adjusted:
            z, current = prop, terms(prop)
            continue
        moved = terms(prop)
        log_alpha = mala.log_accept(
            z,
            prop,
            (current[0], moved[0]),
            (current[2], moved[2]),
            (current[1], moved[1]),
            delta,
            free,
        )
        ok = mala.accept(log_alpha, torch.randn(n, generator=g))
        keep = ok[:, None, None]
        z = torch.where(keep, prop, z)
        current = tuple(
            torch.where(keep if c.dim() == 3 else ok, m, c)
            for c, m in zip(current, moved, strict=True)
        )
    return z.flatten()


def test_mala_reaches_the_tilted_target_where_ula_stays_biased():
    """At a large step (snr 1: delta = 2 sigma^2) the unadjusted chain settles on a
    distribution far too wide; the adjusted chain's distance to the exact tilted density
    shrinks with steps to the histogram's own noise (about 0.03 at 20,000 samples) and ends
    far below the unadjusted one's at the same number of score evaluations. With a small
    step the unadjusted chain is nearly right, but needs many more steps to get there."""
    var = 1 - _AB
    delta = 2 * 1.0**2 * var
    mala_runs = [_chains(k, delta, adjusted=True) for k in (2, 8, 64)]
    ula = _chains(64, delta, adjusted=False)
    tv_mala = [_tv_to_target(x) for x in mala_runs]
    tv_ula = _tv_to_target(ula)
    assert tv_mala[0] > 3 * tv_mala[1]
    assert max(tv_mala[1:]) < 0.05
    assert tv_ula > 0.15
    assert tv_ula > 4 * tv_mala[2]
    # the same on the discrete target: the tokens the states round to (measured: MALA
    # 0.15, 0.010, 0.014 after 2, 8, 64 steps; ULA 0.12; sampling noise about 0.005)
    token_mala = [_token_tv(x) for x in mala_runs]
    assert token_mala[0] > 0.08 and max(token_mala[1:]) < 0.03
    assert _token_tv(ula) > 0.08
    small = 2 * 0.1**2 * var
    assert _tv_to_target(_chains(64, small, adjusted=False)) > 0.3  # not there yet
    assert _tv_to_target(_chains(400, small, adjusted=False)) < 0.04


def test_mh_rows_in_the_table():
    table = coefficient_table("cosine", "dia", 4, corrector_steps=1, mh_steps=2, mh_snr=0.3)
    assert len(table) == 4 + 3 * 3
    assert table.predictor == [True, False, False, False] * 3 + [True]
    assert table.adjusted == [False, False, True, True] * 3 + [False]
    assert [table.is_adjusted(r) for r in range(len(table))] == table.adjusted
    sigma = table.rows[2, SQRT_1M_ABAR].item()
    delta = 2 * 0.3**2 * sigma**2
    assert table.coef[2].double().tolist() == pytest.approx(
        [1.0, -delta / sigma, delta, math.sqrt(2 * delta)], rel=1e-5
    )
    assert not coefficient_table("cosine", "dia", 4).is_adjusted(1)
    for steps, snr in ((-1, 0.1), (1.5, 0.1), (True, 0.1), (1, 0.0), (1, math.nan), (1, "0.1")):
        with pytest.raises(ConfigError, match="mh_steps must be an integer >= 0 and mh_snr"):
            coefficient_table("cosine", "dia", 4, mh_steps=steps, mh_snr=snr)


# ---- in the block loop -------------------------------------------------------------------

PROMPTS = ["The movie was", "I"]


def _sampler(space, *, clean=True, context=True, self_condition=True, **cfg) -> Sampler:
    torch.manual_seed(0)
    den = Denoiser(
        DenoiserConfig(
            dim=space.dim,
            max_length=16,
            hidden=16,
            layers=1,
            heads=2,
            clean_prompt=clean,
            self_condition=self_condition,
        )
    ).eval()
    torch.manual_seed(1)
    critics = [
        WeightedCritic(
            "sentiment", build_critic(CriticConfig(dim=space.dim, hidden=8, reward="s")), 1.0
        )
    ]
    if context:
        ctx = CriticConfig(dim=space.dim, kind="context", hidden=8, heads=2, layers=1, reward="n")
        critics.append(WeightedCritic("nontoxic", build_critic(ctx).eval(), 0.5))
    config = SamplerConfig(steps=4, backend="reference", guidance=2.0, **cfg)
    return Sampler(den, space, critics, config, device="cpu")


def _run(sampler, prompts=PROMPTS, seeds=(3, 4)):
    plan = sampler.plan(len(prompts), 2 * sampler.block_size, prompt_tokens=4)
    return plan.run(prompts, seed=list(seeds))


@pytest.mark.parametrize("clean", [True, False])
def test_an_always_accepted_mala_row_is_the_langevin_corrector_row(tiny_base, monkeypatch, clean):
    """The proposal is exactly the corrector's move (same coefficients, same noise, the
    critics' gradient included): accept every move, and the run is the ULA run (without
    self-conditioning, whose input a MALA row leaves at the predictor's estimate)."""
    kw = {"clean": clean, "self_condition": False}
    ula = _run(_sampler(tiny_base.space, **kw, corrector_steps=1, corrector_snr=0.3))
    monkeypatch.setattr(mala, "accept", lambda log_alpha, normal: torch.ones_like(normal) > 0)
    out = _run(_sampler(tiny_base.space, **kw, mh_steps=1, mh_snr=0.3))
    assert ula.mh is None and out.steps == ula.steps
    torch.testing.assert_close(out.z, ula.z, rtol=1e-5, atol=1e-3)  # |z| reaches 1e3 here
    assert torch.equal(out.tokens, ula.tokens)
    assert out.mh["accepted"] == out.mh["proposed"] == [3 * 2] * 2  # 3 rows a block, 2 blocks
    assert out.mh_acceptance == 1.0


def test_acceptance_falls_with_the_step_and_rejected_moves_stay(tiny_base, monkeypatch):
    small = _run(_sampler(tiny_base.space, mh_steps=2, mh_snr=0.01))
    large = _run(_sampler(tiny_base.space, mh_steps=2, mh_snr=20.0))
    assert small.mh_acceptance > 0.9
    assert large.mh_acceptance < 0.5  # a near-constant random score accepts big steps too
    assert small.mh["snr"] == 0.01 and small.mh["steps"] == 2
    # every move rejected: each MALA row hands on its input unchanged
    seen = []
    original = WindowDiffusion._mh_row

    def spy(self, z, r, out):
        original(self, z, r, out)
        seen.append(torch.equal(out, z))

    monkeypatch.setattr(WindowDiffusion, "_mh_row", spy)
    monkeypatch.setattr(mala, "accept", lambda log_alpha, normal: torch.zeros_like(normal) > 0)
    out = _run(_sampler(tiny_base.space, mh_steps=2))
    assert seen and all(seen)
    assert out.mh_acceptance == 0.0


def test_consecutive_rows_reuse_the_accepted_evaluation(tiny_base, monkeypatch):
    """With a clean prompt the second and third MALA rows of a level start from the first's
    accepted evaluation: 4 evaluations a level instead of 6, and the same samples."""
    calls = []
    evaluate = WindowDiffusion._mh_eval

    def counting(self, z, r):
        calls.append(r)
        return evaluate(self, z, r)

    monkeypatch.setattr(WindowDiffusion, "_mh_eval", counting)
    cached = _run(_sampler(tiny_base.space, mh_steps=3, mh_snr=0.3))
    assert len(calls) == 2 * 3 * 4  # 2 blocks x 3 levels x 4
    row = WindowDiffusion._mh_row

    def uncached(self, z, r, out):
        self._mh_cache = None
        row(self, z, r, out)

    monkeypatch.setattr(WindowDiffusion, "_mh_row", uncached)
    calls.clear()
    fresh = _run(_sampler(tiny_base.space, mh_steps=3, mh_snr=0.3))
    assert len(calls) == 2 * 3 * 6
    torch.testing.assert_close(cached.z, fresh.z, rtol=0, atol=1e-5)
    assert torch.equal(cached.tokens, fresh.tokens)
    assert cached.mh["accepted"] == fresh.mh["accepted"]


def test_a_row_does_not_depend_on_the_rest_of_the_batch(tiny_base):
    s = _sampler(tiny_base.space, mh_steps=2, mh_snr=0.3)
    both = _run(s)
    alone = _run(s, prompts=PROMPTS[:1], seeds=(3,))
    assert torch.equal(both.tokens[:1], alone.tokens)
    assert both.mh["accepted"][:1] == alone.mh["accepted"]
    again = _run(s)  # and a second run of the same plan resets the counts
    assert again.mh == both.mh


def test_the_acceptance_survives_concat_and_subset(tiny_base):
    out = _run(_sampler(tiny_base.space, mh_steps=1, mh_snr=0.5))
    both = type(out).concat([out, out])
    assert both.mh["accepted"] == out.mh["accepted"] * 2
    assert both.mh_acceptance == out.mh_acceptance
    assert out.subset(1).mh["proposed"] == out.mh["proposed"][:1]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mh_steps": -1}, "mh_steps must be an integer >= 0"),
        ({"mh_steps": 1, "mh_snr": 0}, "mh_steps must be an integer >= 0"),
        ({"mh_steps": 1, "noise_kappa": 0.5}, "adaptive noise"),
        ({"corrector_steps": -1}, "corrector_steps must be an integer >= 0"),
        ({"corrector_steps": 1, "corrector_snr": float("inf")}, "corrector_steps must be"),
        ({"mh_steps": 1, "guidance_estimator": "zo"}, "zeroth-order"),
    ],
)
def test_bad_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        SamplerConfig(**kw)


def test_cli_rejects_bad_mh_steps(capsys):
    from fastdia.cli import main

    code = main(["sample", "--random-init", "--prompt", "x", "--mh-steps", "-2"])
    assert code == 2
    assert "mh_steps must be an integer >= 0" in capsys.readouterr().err
