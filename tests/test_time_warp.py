"""CDCD time warping in training: the running loss curve, times drawn from it, exact resume
with it, and fine-tuning from a checkpoint (``--init``)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from interrupt import assert_same_weights, run_interrupted
from tiny import CORPUS

import fastdia.train.common as common
import fastdia.train.denoiser as train_den
from fastdia.data import windows_from_texts
from fastdia.errors import CheckpointError, ConfigError
from fastdia.models.checkpoint import DENOISER_STEM, load_model
from fastdia.models.denoiser import DenoiserConfig
from fastdia.train.common import OptimConfig
from fastdia.train.time_warp import OnlineTimeWarp, time_warp, warped


@pytest.fixture
def data(tiny_base):
    return windows_from_texts(CORPUS * 2, tiny_base, 8, "tiny corpus").split(0.2, seed=0)


def _config(tiny_base, **kw):
    return DenoiserConfig(dim=tiny_base.space.dim, max_length=8, hidden=16, layers=1, heads=2, **kw)


def _optim(**kw):
    return OptimConfig(
        **{"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup": 2, "save_every": 3, **kw}
    )


def test_warped_is_the_grid_piecewise_linear():
    grid = torch.tensor([0.0, 0.5, 0.9, 1.0], dtype=torch.float64)  # 3 equal steps in u
    u = torch.tensor([0.0, 1 / 6, 1 / 3, 0.5, 2 / 3, 5 / 6, 1.0])
    want = torch.tensor([0.0, 0.25, 0.5, 0.7, 0.9, 0.95, 1.0])
    torch.testing.assert_close(warped(grid, u), want)
    assert warped(grid, u).dtype == torch.float32
    uniform = OnlineTimeWarp()  # no initial grid: uniform time
    torch.testing.assert_close(uniform.draw(u), u)


def test_online_warp_learns_where_the_loss_rises():
    warp = OnlineTimeWarp(bins=16, momentum=0.5, refresh_every=5)
    gen = torch.Generator().manual_seed(0)

    def loss_at(t):  # the loss rises between t = 0.8 and t = 1
        return 5 * torch.sigmoid((t - 0.9) * 40)

    first = warp.grid.clone()
    for _ in range(40):
        t = warp.draw(torch.rand(64, generator=gen))
        warp.observe(t, loss_at(t))
    assert bool((warp.seen > 0).all()) and warp.batches == 40
    grid = warp.grid.tolist()
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert all(b > a for a, b in itertools.pairwise(grid))
    assert not torch.equal(first, warp.grid)
    # most of the grid, i.e. most training times, falls where the loss changes
    assert sum(0.75 <= g <= 1.0 for g in grid) / len(grid) > 0.6
    times = warp.draw(torch.rand(4000, generator=gen))
    assert float((times > 0.75).float().mean()) > 0.6
    # the grid is time_warp of the binned curve
    assert grid == pytest.approx(time_warp(*warp.curve()))
    # the state round-trips
    other = OnlineTimeWarp(bins=16, momentum=0.5, refresh_every=5)
    other.load_state_dict(warp.state_dict())
    u = torch.rand(10, generator=gen)
    assert torch.equal(other.draw(u), warp.draw(u))
    assert torch.equal(other.loss, warp.loss) and other.batches == warp.batches


def test_online_warp_waits_for_every_bin():
    warp = OnlineTimeWarp([0.0, 0.5, 1.0], bins=4, refresh_every=1)
    warp.observe(torch.tensor([0.1, 0.3]), torch.tensor([1.0, 2.0]))  # bins 2, 3 empty
    assert warp.grid.tolist() == [0.0, 0.5, 1.0]
    assert warp.loss[:2].tolist() == [1.0, 2.0] and warp.seen.tolist() == [1, 1, 0, 0]


def test_window_losses_add_up_to_the_batch_loss(tiny_base, data):
    train, _ = data
    vocab = torch.unique(train.ids)
    den = train_den.Denoiser(
        _config(tiny_base, prediction="tokens", vocab_size=len(vocab), clean_prompt=True),
        vocab,
    ).bind_embeddings(tiny_base.space)
    ids = train.ids[:3]
    z0, t = tiny_base.space.embed(ids), torch.tensor([0.2, 0.5, 0.9])
    eps = torch.randn(z0.shape)
    mask = torch.arange(8)[None, :] < torch.tensor([[0], [2], [3]])
    cond = train_den.Conditioning(mask, False)
    total, count = train_den.window_losses(den, ids, z0, t, eps, cond)
    assert count.tolist() == [8.0, 6.0, 5.0]  # clean positions are not counted
    loss = train_den.denoiser_loss(den, ids, z0, t, eps, cond)
    torch.testing.assert_close(total.sum() / count.sum(), loss)
    logp = torch.log_softmax(
        den.features(train_den.model_input(den, z0, t, eps, cond)[0], t, clean_mask=mask), -1
    )
    nll = -logp.gather(-1, torch.searchsorted(vocab, ids)[..., None])[..., 0]
    torch.testing.assert_close(total, (nll * ~mask).sum(dim=1))


def test_warp_training_moves_the_times_and_resumes_exactly(tmp_path, tiny_base, data, monkeypatch):
    train, hold = data
    drawn: list[torch.Tensor] = []
    real_loss = train_den.window_losses

    def record(den, ids, z0, t, eps, cond=None):
        if den.training:
            drawn.append(t.clone())
        return real_loss(den, ids, z0, t, eps, cond)

    monkeypatch.setattr(train_den, "window_losses", record)
    kw = dict(holdout=hold, progress=False, train_times="warp")
    cfg = _config(tiny_base, prediction="tokens")
    straight = train_den.train_denoiser(tiny_base, train, tmp_path / "a", cfg, _optim(), **kw)
    uniform_t = [
        common.batch_draws(common.step_generator(0, s), len(train), 4)[1] for s in range(6)
    ]
    assert len(drawn) == 6  # the grid stays uniform until its first refresh (50 batches)
    torch.testing.assert_close(torch.stack(drawn), torch.stack(uniform_t))

    # a warp that refreshes every step: the resumed run must restore its state
    monkeypatch.setattr(train_den, "OnlineTimeWarp", _fast_warp)
    drawn.clear()
    straight = train_den.train_denoiser(tiny_base, train, tmp_path / "c", cfg, _optim(), **kw)
    assert (torch.stack(drawn) - torch.stack(uniform_t)).abs().max() > 0.01
    want = [t.clone() for t in drawn]
    run_interrupted(
        monkeypatch,
        lambda: train_den.train_denoiser(tiny_base, train, tmp_path / "b", cfg, _optim(), **kw),
    )
    drawn.clear()
    resumed = train_den.train_denoiser(
        tiny_base, train, tmp_path / "b", cfg, _optim(), resume=True, **kw
    )
    assert all(torch.equal(a, b) for a, b in zip(drawn, want[3:], strict=True))
    assert_same_weights(straight.denoiser, resumed.denoiser)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    # a uniform-time state does not resume as a warp run
    with pytest.raises(CheckpointError, match=r"other settings .*train_times"):
        train_den.train_denoiser(
            tiny_base,
            train,
            tmp_path / "b",
            cfg,
            _optim(),
            resume=True,
            holdout=hold,
            progress=False,
        )


def _fast_warp(initial=None):
    return OnlineTimeWarp(initial, bins=2, momentum=0.5, refresh_every=1)


def test_init_fine_tunes_a_checkpoint(tmp_path, tiny_base, data):
    train, hold = data
    cfg = _config(tiny_base, prediction="tokens", self_condition=True)
    train_den.train_denoiser(
        tiny_base,
        train,
        tmp_path / "first",
        cfg,
        _optim(),
        holdout=hold,
        progress=False,
        warp=True,
    )
    init = load_model(tmp_path / "first", DENOISER_STEM, tiny_base.space)
    assert init.config.time_grid
    # zero learning rate: the fine-tuned weights are the init's (its EMA copy too)
    run = train_den.train_denoiser(
        tiny_base,
        hold,
        tmp_path / "tuned",
        cfg,
        _optim(lr=1e-12, ema=0.0),
        progress=False,
        init=init,
        train_times="warp",
    )
    for (k, a), b in zip(
        init.state_dict().items(), run.denoiser.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=k)
    # the token subset is the init's, not the new data's (here a subset of it)
    assert torch.equal(run.denoiser.vocab_ids, init.vocab_ids)
    assert run.denoiser.config.vocab_size == init.config.vocab_size
    assert math.isfinite(run.history[-1]["loss"])
    wider = DenoiserConfig(
        dim=tiny_base.space.dim,
        max_length=8,
        hidden=32,
        layers=1,
        heads=2,
        prediction="tokens",
        self_condition=True,
    )
    with pytest.raises(ConfigError, match=r"--init denoiser differs .*hidden 16 \(asked: 32\)"):
        train_den.train_denoiser(
            tiny_base, train, tmp_path / "bad", wider, _optim(), progress=False, init=init
        )
    with pytest.raises(ConfigError, match="unknown train_times 'cosine'"):
        train_den.train_denoiser(
            tiny_base,
            train,
            tmp_path / "bad",
            cfg,
            _optim(),
            progress=False,
            train_times="cosine",
        )
