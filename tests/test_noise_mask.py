"""Noise-masked training (``--noise-mask``): the denoiser takes one noise level per
position (``[B, L]`` times), training sets half the positions of some windows to pure
noise, and such runs resume exactly."""

from __future__ import annotations

import pytest
import torch
from interrupt import assert_same_weights, run_interrupted
from tiny import CORPUS

import fastdia.train.denoiser as train_den
from fastdia.data import windows_from_texts
from fastdia.errors import CheckpointError, ConfigError
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.schedules import alpha_bar
from fastdia.train.common import OptimConfig


@pytest.fixture
def data(tiny_base):
    return windows_from_texts(CORPUS * 2, tiny_base, 8, "tiny corpus").split(0.2, seed=0)


def _config(tiny_base, **kw):
    return DenoiserConfig(dim=tiny_base.space.dim, max_length=8, hidden=16, layers=2, heads=2, **kw)


def _optim(**kw):
    return OptimConfig(
        **{"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup": 2, "save_every": 3, **kw}
    )


@pytest.mark.parametrize("arch", ["adaln", "encoder"])
def test_shared_per_position_times_are_the_window_time(tiny_base, arch):
    torch.manual_seed(0)
    den = Denoiser(_config(tiny_base, arch=arch, self_condition=True, clean_prompt=True))
    for p in den.parameters():  # adaLN's modulation starts at zero: make time matter
        torch.nn.init.normal_(p, std=0.2)
    z, x0 = torch.randn(3, 7, tiny_base.space.dim), torch.randn(3, 7, tiny_base.space.dim)
    mask = torch.arange(7)[None, :] < torch.tensor([[0], [2], [3]])
    t = torch.tensor([0.1, 0.6, 0.95])
    kw = dict(x0_prev=x0, clean_mask=mask)
    want = den(z, t, **kw)
    torch.testing.assert_close(den(z, t[:, None].expand(3, 7), **kw), want)
    temb = den.time_embedding(t[:, None].expand(3, 7), 3, z.device)
    assert temb.shape == (3, 7, 16)
    torch.testing.assert_close(den(z, t, temb=temb, **kw), want)
    # the level of one position changes the output
    other = t[:, None].repeat(1, 7)
    other[1, 4] = 0.3
    assert not torch.allclose(den(z, other, **kw)[1], want[1])


def test_noised_takes_one_level_per_position():
    z0, eps = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    t = torch.tensor([[0.1, 0.5, 1.0], [0.9, 0.9, 0.2]])
    abar = alpha_bar("sqrt", t).float()
    want = abar.sqrt()[..., None] * z0 + (1 - abar).sqrt()[..., None] * eps
    torch.testing.assert_close(train_den.noised(z0, t, eps, "sqrt"), want)
    # the window form is the shared per-position form
    tw = torch.tensor([0.3, 0.8])
    torch.testing.assert_close(
        train_den.noised(z0, tw, eps, "sqrt"),
        train_den.noised(z0, tw[:, None].expand(2, 3), eps, "sqrt"),
    )


def test_noise_mask_draws():
    t = torch.tensor([0.2, 0.5, 0.7, 0.9, 0.1, 0.3])
    shared, masked = train_den.noise_mask_times(torch.Generator().manual_seed(0), t, 40, 0.0)
    assert not masked.any() and torch.equal(shared, t[:, None].expand(6, 40))
    times, masked = train_den.noise_mask_times(torch.Generator().manual_seed(0), t, 40, 1.0)
    assert masked.all() and times.shape == (6, 40)
    pure = times == 1.0
    assert torch.equal(times[~pure], t[:, None].expand(6, 40)[~pure])  # the rest keep t
    assert 0.3 < pure.float().mean() < 0.7  # about MASK_PROB = 1/2 of the positions
    again, _ = train_den.noise_mask_times(torch.Generator().manual_seed(0), t, 40, 1.0)
    assert torch.equal(times, again)  # a pure function of the generator
    half, masked = train_den.noise_mask_times(torch.Generator().manual_seed(3), t, 40, 0.5)
    assert masked.any() and not masked.all()
    assert torch.equal(half[~masked], t[~masked][:, None].expand(-1, 40))
    assert (half[masked] == 1.0).any()


def test_noise_masked_training_feeds_position_times_and_resumes_exactly(
    tmp_path, tiny_base, data, monkeypatch
):
    train, hold = data
    cfg = _config(tiny_base, prediction="tokens", clean_prompt=True, self_condition=True)
    kw = dict(holdout=hold, progress=False, noise_mask=0.5, train_times="warp")
    shapes, real_loss = [], train_den.window_losses

    def record(den, ids, z0, t, eps, cond=None):
        if den.training:
            shapes.append(t.clone())
        return real_loss(den, ids, z0, t, eps, cond)

    monkeypatch.setattr(train_den, "window_losses", record)
    straight = train_den.train_denoiser(tiny_base, train, tmp_path / "a", cfg, _optim(), **kw)
    assert all(t.shape == (4, 8) for t in shapes)
    varied = torch.stack([t.std(dim=1) > 0 for t in shapes])
    assert varied.any() and not varied.all()  # some windows masked, some not
    assert all(bool((t[t.std(dim=1) > 0] == 1.0).any()) for t in shapes if (t.std(dim=1) > 0).any())
    run_interrupted(
        monkeypatch,
        lambda: train_den.train_denoiser(tiny_base, train, tmp_path / "b", cfg, _optim(), **kw),
    )
    resumed = train_den.train_denoiser(
        tiny_base, train, tmp_path / "b", cfg, _optim(), resume=True, **kw
    )
    assert_same_weights(straight.denoiser, resumed.denoiser)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    with pytest.raises(CheckpointError, match=r"other settings .*noise_mask"):
        train_den.train_denoiser(
            tiny_base,
            train,
            tmp_path / "b",
            cfg,
            _optim(),
            resume=True,
            **{**kw, "noise_mask": 0.25},
        )


def test_noise_mask_out_of_range_is_refused(tmp_path, tiny_base, data):
    train, _ = data
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"noise_mask must lie in \[0, 1\]"):
            train_den.train_denoiser(
                tiny_base, train, tmp_path, _config(tiny_base), _optim(), noise_mask=bad
            )
