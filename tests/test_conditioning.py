"""Self-conditioning, clean-prompt conditioning and the measured time warp, in training
and in sampling."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastdia.errors import ConfigError
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.sampler import Sampler, SamplerConfig
from fastdia.schedules import coefficient_table, step_times
from fastdia.train.common import step_generator
from fastdia.train.denoiser import (
    PROMPT_FREE_FRAC,
    Conditioning,
    denoiser_loss,
    draw_conditioning,
)
from fastdia.train.time_warp import time_warp


def _denoiser(space, **kw):
    torch.manual_seed(0)
    cfg = DenoiserConfig(dim=space.dim, max_length=16, hidden=32, layers=2, heads=2, **kw)
    return Denoiser(cfg)


def test_draw_conditioning_prefixes_and_coin():
    cfg = DenoiserConfig(dim=8, clean_prompt=True, self_condition=True)
    draws = [draw_conditioning(step_generator(0, s), cfg, 64, 16) for s in range(40)]
    lengths = torch.cat([d.clean_mask.sum(dim=1) for d in draws])
    masks = torch.cat([d.clean_mask for d in draws])
    # prefixes: contiguous from position 0, at most L/2, none on about a quarter
    assert torch.equal(masks, torch.arange(16)[None, :] < lengths[:, None])
    assert lengths.max() <= 8 and lengths[lengths > 0].min() >= 1
    assert abs((lengths == 0).float().mean().item() - PROMPT_FREE_FRAC) < 0.05
    coins = [d.self_cond for d in draws]
    assert 5 < sum(coins) < 35
    # a pure function of (seed, step); no draws for a plain config
    again = draw_conditioning(step_generator(0, 3), cfg, 64, 16)
    assert torch.equal(again.clean_mask, draws[3].clean_mask) and again.self_cond == coins[3]
    plain = draw_conditioning(step_generator(0, 3), DenoiserConfig(dim=8), 64, 16)
    assert plain.clean_mask is None and not plain.self_cond


@pytest.mark.parametrize("prediction", ["tokens", "x0"])
def test_loss_ignores_clean_positions_and_sees_them_clean(tiny_base, prediction):
    space = tiny_base.space
    kw = {"vocab_size": space.vocab_size} if prediction == "tokens" else {}
    den = _denoiser(space, prediction=prediction, clean_prompt=True, **kw)
    if prediction == "tokens":
        den = Denoiser(den.config, torch.arange(space.vocab_size)).bind_embeddings(space)
    ids = torch.randint(space.vocab_size, (3, 10))
    z0, t, eps = space.embed(ids), torch.full((3,), 0.7), torch.randn(3, 10, space.dim)
    mask = torch.arange(10)[None, :].expand(3, -1) < 4
    cond = Conditioning(mask, False)
    loss = denoiser_loss(den, ids, z0, t, eps, cond)
    # changing the target at a clean position changes the input there (it is clean
    # z0), but only the loss terms of noisy positions count: recompute by hand
    seen = {}
    orig = den.features

    def spy(z, tt, **kwargs):
        seen["z"], seen["mask"] = z, kwargs["clean_mask"]
        return orig(z, tt, **kwargs)

    den.features = spy
    denoiser_loss(den, ids, z0, t, eps, cond)
    assert torch.equal(seen["z"][:, :4], z0[:, :4]) and torch.equal(seen["mask"], mask)
    assert not torch.equal(seen["z"][:, 4:], z0[:, 4:])
    den.features = orig
    out = den.features(seen["z"], t, clean_mask=mask).float()
    if prediction == "tokens":
        want = torch.nn.functional.cross_entropy(out[:, 4:].flatten(0, 1), ids[:, 4:].flatten())
    else:
        want = (out[:, 4:] - z0[:, 4:]).pow(2).mean()
    torch.testing.assert_close(loss, want)


def test_self_conditioning_feeds_a_stop_gradient_estimate(tiny_base):
    space = tiny_base.space
    den = _denoiser(space, prediction="x0", self_condition=True)
    torch.nn.init.normal_(den.sc_proj.weight)
    ids = torch.randint(space.vocab_size, (2, 6))
    z0, t, eps = space.embed(ids), torch.full((2,), 0.5), torch.randn(2, 6, space.dim)
    without = denoiser_loss(den, ids, z0, t, eps, Conditioning(None, False))
    with_sc = denoiser_loss(den, ids, z0, t, eps, Conditioning(None, True))
    assert not torch.allclose(without, with_sc)
    with_sc.backward()
    assert den.sc_proj.weight.grad is not None and den.sc_proj.weight.grad.abs().sum() > 0


def test_adaln_blocks_start_as_identity_and_use_time(tiny_base):
    space = tiny_base.space
    den = _denoiser(space, arch="adaln", prediction="x0")
    z = torch.randn(2, 5, space.dim)
    a, b = den(z, 0.2), den(z, 0.9)
    torch.testing.assert_close(a, b)  # adaLN-zero: time has no effect before training
    for block in den.blocks:
        torch.nn.init.normal_(block.mod.weight, std=0.1)
    assert not torch.allclose(den(z, 0.2), den(z, 0.9))


class _Recorder(torch.nn.Module):
    """Wraps a denoiser and records the conditioning inputs of every call."""

    def __init__(self, den):
        super().__init__()
        self.den, self.calls = den, []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.den, name)

    def forward(self, z, t, **kw):
        self.calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()})
        self.calls[-1]["z"] = z.clone()
        return self.den(z, t, **kw)


def test_sampler_gives_clean_prompt_and_previous_estimate(tiny_base):
    space = tiny_base.space
    den = _denoiser(space, prediction="x0", self_condition=True, clean_prompt=True)
    rec = _Recorder(den.eval())
    prompt = space.encode("The movie")
    p = len(prompt)
    # one block: the prompt and 9 - p new tokens fill the window of 9
    s = Sampler(rec, space, [], SamplerConfig(steps=3, window=9, block_size=9 - p))
    plan = s.plan(2, 9 - p, prompt_tokens=p)
    out = plan.run(prompt, seed=1)
    clean = space.embed(torch.tensor(prompt))
    assert len(rec.calls) == 3
    for i, call in enumerate(rec.calls):
        assert torch.equal(call["clean_mask"][0], torch.arange(9) < p)
        torch.testing.assert_close(call["z"][:, :p], clean.expand(2, -1, -1))
        if i == 0:
            assert torch.count_nonzero(call["x0_prev"]) == 0
        else:  # the previous row's output
            with torch.no_grad():
                prev = rec.calls[i - 1]
                want = den(
                    prev["z"],
                    plan.diffusion.table.t[i - 1].item(),
                    x0_prev=prev["x0_prev"],
                    clean_mask=prev["clean_mask"],
                )
            torch.testing.assert_close(call["x0_prev"], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.z[:, :p], clean.expand(2, -1, -1))
    # the ablation switches turn both off
    rec.calls.clear()
    off = SamplerConfig(
        steps=2, self_condition=False, clean_prompt=False, window=9, block_size=9 - p
    )
    Sampler(rec, space, [], off).plan(2, 9 - p, prompt_tokens=p).run(prompt, seed=1)
    assert all(c["x0_prev"] is None and c["clean_mask"] is None for c in rec.calls)
    assert not torch.allclose(rec.calls[0]["z"][:, :p], clean.expand(2, -1, -1))


def test_time_warp_puts_steps_where_the_loss_rises():
    times = torch.linspace(0, 1, 41).tolist()
    losses = [8.0 * float(torch.sigmoid(torch.tensor((t - 0.8) * 60))) for t in times]
    grid = time_warp(times, losses, points=65)
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert all(b > a for a, b in itertools.pairwise(grid))
    inside = sum(0.7 <= g <= 0.9 for g in grid) / len(grid)
    assert inside > 0.6  # 90% of the mass of F rises within [0.7, 0.9]
    # a flat curve gives the uniform grid
    flat = time_warp(times, [1.0] * len(times), points=5)
    assert flat == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])


def test_step_times_follow_the_warp_and_the_stop_level():
    assert step_times(4) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert step_times(2, stop=0.5) == pytest.approx([0.5, 0.75, 1.0])
    warp = [0.0, 0.8, 0.9, 0.95, 1.0]  # quantiles of the warped coordinate
    assert step_times(4, warp) == pytest.approx(warp)
    stopped = step_times(2, warp, stop=0.9)  # u(0.9) = 0.5: steps at u = 0.5, 0.75, 1
    assert stopped == pytest.approx([0.9, 0.95, 1.0])
    table = coefficient_table("sqrt", "dia", 2, times=stopped)
    assert table.t.tolist() == pytest.approx([1.0, 0.95])
    # the run ends at the stop level's noise, not on clean data
    from fastdia.schedules import SQRT_ABAR_NEXT, alpha_bar

    end = float(table.rows[-1, SQRT_ABAR_NEXT]) ** 2
    assert end == pytest.approx(float(alpha_bar("sqrt", torch.tensor(0.9))), rel=1e-5)
    with pytest.raises(ConfigError, match="strictly ascending"):
        coefficient_table("sqrt", "dia", 2, times=[0.0, 0.5, 0.5])


def test_denoiser_time_grid_is_validated_and_saved(tmp_path, tiny_base):
    with pytest.raises(ConfigError, match="time_grid"):
        DenoiserConfig(dim=8, time_grid=[0.0, 0.5, 0.4, 1.0])
    from fastdia.models.checkpoint import DENOISER_STEM, load_model, save_model

    den = _denoiser(
        tiny_base.space,
        arch="adaln",
        self_condition=True,
        clean_prompt=True,
        time_grid=[0.0, 0.9, 1.0],
    )
    save_model(den, tmp_path, DENOISER_STEM, space=tiny_base.space, base_model="tiny")
    back = load_model(tmp_path, DENOISER_STEM, tiny_base.space)
    assert back.config == den.config
    s = Sampler(back, tiny_base.space, [], SamplerConfig(steps=2))
    assert s.plan(1, 4).diffusion.times == pytest.approx([0.0, 0.9, 1.0])
    s = Sampler(back, tiny_base.space, [], SamplerConfig(steps=2, time_warp=False))
    assert s.plan(1, 4).diffusion.times == pytest.approx([0.0, 0.5, 1.0])
