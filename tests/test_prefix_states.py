"""A denoiser that reads the base model: its states input, training on windows cut from
longer sequences with their stored states, and the block loop that feeds it the states
the LM decode (or, for the nearest decode, a read of each block) writes."""

from __future__ import annotations

import pytest
import torch
from interrupt import assert_same_weights, run_interrupted

import fastdia.train.denoiser as train_den
from fastdia.data import base_states, generate_dataset, load_dataset
from fastdia.decode import DecodeConfig
from fastdia.errors import ConfigError
from fastdia.models.checkpoint import DENOISER_STEM, load_model, save_model
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.sampler import Sampler, SamplerConfig
from fastdia.train.common import OptimConfig
from fastdia.train.windows import WindowStates, crop_windows

M = 4  # prefix states in these tests


def _config(dim: int, **kw) -> DenoiserConfig:
    base = {
        "dim": dim,
        "max_length": 12,
        "hidden": 16,
        "layers": 2,
        "heads": 2,
        "arch": "adaln",
        "prefix_states": M,
        "state_dim": dim,
    }
    return DenoiserConfig(**{**base, **kw})


def _denoiser(dim: int, *, live: bool = True, **kw) -> Denoiser:
    """A states denoiser; ``live``: random (not zero) state projection and layer
    modulation, so that every input reaches the output."""
    torch.manual_seed(0)
    den = Denoiser(_config(dim, **kw))
    if live:
        with torch.no_grad():
            torch.nn.init.normal_(den.state_proj.weight, std=0.5)
            torch.nn.init.normal_(den.state_pos, std=0.5)
            for block in den.blocks:
                torch.nn.init.normal_(block.mod.weight, std=0.2)
            torch.nn.init.normal_(den.final_mod.weight, std=0.2)
    return den.eval()


# ---- the model --------------------------------------------------------------------------
def test_states_reach_the_output_and_masked_states_do_not():
    den = _denoiser(8)
    z, s = torch.randn(3, 12, 8), torch.randn(3, M, 8)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    out = den(z, 0.5, states=s, states_mask=mask)
    assert out.shape == (3, 12, 8) and out.dtype == torch.float32
    other = s.clone()
    other[:, :2] = torch.randn(3, 2, 8)  # new states where rows 1 and 2 have none
    moved = (den(z, 0.5, states=other, states_mask=mask) - out).abs().amax(dim=(1, 2))
    assert moved[0] > 1e-3 and moved[1] == 0 and moved[2] == 0
    # every state position counts for a row that has them all
    for i in range(M):
        one = s.clone()
        one[0, i] = torch.randn(8)
        assert not torch.allclose(den(z, 0.5, states=one, states_mask=mask)[0], out[0])


def test_states_get_gradients_and_per_position_times_work():
    den = _denoiser(8).train()
    z, s = torch.randn(2, 12, 8), torch.randn(2, M, 8)
    den(z, torch.rand(2, 12), states=s).pow(2).sum().backward()
    assert den.state_proj.weight.grad.abs().sum() > 0 and den.state_pos.grad.abs().sum() > 0


def test_states_are_required_with_their_shape():
    den = _denoiser(8)
    z = torch.randn(2, 12, 8)
    with pytest.raises(ConfigError, match=r"pass states \[2, 4, 8\], got None"):
        den(z, 0.5)
    with pytest.raises(ConfigError, match=r"got \(2, 3, 8\)"):
        den(z, 0.5, states=torch.randn(2, 3, 8))


def test_config_checks():
    with pytest.raises(ConfigError, match="go together"):
        DenoiserConfig(dim=8, arch="adaln", prefix_states=4)
    with pytest.raises(ConfigError, match="needs arch='adaln'"):
        DenoiserConfig(dim=8, prefix_states=4, state_dim=8)
    assert not DenoiserConfig(dim=8).reads_states


# ---- training windows -----------------------------------------------------------------
def test_window_states_before_hand_computed():
    seq = torch.arange(2 * 6 * 1, dtype=torch.float16).view(2, 6, 1)  # state = position
    ws = WindowStates(seq, torch.tensor([1, 3]))
    states, mask = ws.before(torch.tensor([0, 2]), 3, "cpu")
    # row 0 ends at 1 + 0 = 1: positions -2, -1, 0; row 1 ends at 3 + 2 = 5: 2, 3, 4
    assert mask.tolist() == [[False, False, True], [True, True, True]]
    assert states[..., 0].tolist() == [[0.0, 0.0, 0.0], [8.0, 9.0, 10.0]]
    assert states.dtype == torch.float32


def test_crop_windows():
    ids = torch.arange(40).view(2, 20)
    win, off = crop_windows(torch.Generator().manual_seed(0), ids, 5)
    assert torch.equal(win, torch.stack([ids[b, o : o + 5] for b, o in enumerate(off.tolist())]))
    fixed, off = crop_windows(None, ids, 5, fixed=True)
    assert off.tolist() == [15, 15] and torch.equal(fixed, ids[:, 15:])
    with pytest.raises(ConfigError, match="cannot give windows of 30"):
        crop_windows(None, ids, 30)


@pytest.fixture(scope="module")
def state_data(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("states-data")
    generate_dataset(
        tiny_base,
        folder,
        num_sequences=24,
        length=20,
        prompts=["The movie", "I love"],
        shard_size=12,
        batch_size=12,
        states=True,
        progress=False,
    )
    return folder


def test_stored_states_are_the_base_models(tiny_base, state_data):
    data = load_dataset(str(state_data), tiny_base, 12, states=True)
    assert data.length == 20 and data.states.shape == (24, 20, tiny_base.hidden_size)
    torch.testing.assert_close(
        data.states[:2].float(), base_states(tiny_base, data.ids[:2]).float(), atol=0, rtol=0
    )
    train, hold = data.split(0.25)
    assert train.states.shape[0] == len(train) and hold.states.shape[0] == len(hold)
    assert torch.equal(load_dataset(str(state_data), tiny_base, 12).ids, data.ids[:, :12])
    with pytest.raises(ConfigError, match="make-data --states"):
        load_dataset("text:/nonexistent", tiny_base, 12, states=True)


def _optim(**kw) -> OptimConfig:
    return OptimConfig(
        **{"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup": 2, "save_every": 3, "val_every": 3}
        | kw
    )


def _train_config(tiny_base, **kw) -> DenoiserConfig:
    dim = tiny_base.space.dim
    return _config(dim, clean_prompt=True, self_condition=True, prediction="tokens", **kw)


def test_training_with_states_resumes_exactly(tmp_path, tiny_base, state_data, monkeypatch):
    train, hold = load_dataset(str(state_data), tiny_base, 12, states=True).split(0.25)
    cfg = _train_config(tiny_base)

    def run(out, **kw):
        return train_den.train_denoiser(
            tiny_base, train, out, cfg, _optim(), holdout=hold, progress=False, **kw
        )

    straight = run(tmp_path / "a")
    assert "next_token_ce" in straight.history[-1]
    assert straight.denoiser.state_proj.weight.abs().sum() > 0  # the states were trained
    run_interrupted(monkeypatch, lambda: run(tmp_path / "b"))
    resumed = run(tmp_path / "b", resume=True)
    assert_same_weights(straight.denoiser, resumed.denoiser)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


def test_training_reads_the_states_of_its_windows(tmp_path, tiny_base, state_data, monkeypatch):
    """The states a training batch feeds are those before each window's first noisy
    position, as the block loop gives them."""
    train, _ = load_dataset(str(state_data), tiny_base, 12, states=True).split(0.25)
    seen = []
    real = train_den.window_losses

    def spy(den, ids, z0, t, eps, cond=None):
        seen.append((ids, cond))
        return real(den, ids, z0, t, eps, cond)

    monkeypatch.setattr(train_den, "window_losses", spy)
    train_den.train_denoiser(
        tiny_base, train, tmp_path, _train_config(tiny_base), _optim(steps=2), progress=False
    )
    for ids, cond in seen:
        prefix = cond.clean_mask.sum(dim=1)
        for b in range(ids.shape[0]):
            # find the window in its sequence, then the states before its noisy start
            row = next(
                (r, o)
                for r in range(len(train))
                for o in range(train.length - 11)
                if torch.equal(train.ids[r, o : o + 12], ids[b])
            )
            end = row[1] + int(prefix[b])
            want = train.states[row[0], max(0, end - M) : end].float()
            got = cond.states[b][cond.states_mask[b]]
            torch.testing.assert_close(got, want)
            assert int(cond.states_mask[b].sum()) == min(M, end)


def test_training_refuses_data_without_states(tmp_path, tiny_base, state_data):
    plain, _ = load_dataset(str(state_data), tiny_base, 12).split(0.25)
    with pytest.raises(ConfigError, match="loaded without them"):
        train_den.train_denoiser(
            tiny_base, plain, tmp_path, _train_config(tiny_base), _optim(), progress=False
        )


def test_init_from_an_unconditioned_denoiser(tmp_path, tiny_base, state_data):
    train, _ = load_dataset(str(state_data), tiny_base, 12, states=True).split(0.25)
    plain_cfg = _train_config(tiny_base, prefix_states=0, state_dim=0)
    plain = train_den.train_denoiser(
        tiny_base,
        load_dataset(str(state_data), tiny_base, 12),
        tmp_path / "plain",
        plain_cfg,
        _optim(steps=2),
        progress=False,
    ).denoiser
    tuned = train_den.train_denoiser(
        tiny_base,
        train,
        tmp_path / "tuned",
        _train_config(tiny_base),
        _optim(steps=2),
        init=plain,
        progress=False,
    ).denoiser
    assert tuned.config.reads_states and torch.equal(tuned.vocab_ids, plain.vocab_ids)
    with pytest.raises(ConfigError, match="prefix_states 4 \\(asked: 2\\)"):
        train_den.train_denoiser(
            tiny_base,
            train,
            tmp_path / "again",
            _train_config(tiny_base, prefix_states=2),
            _optim(steps=2),
            init=tuned,
            progress=False,
        )


# ---- sampling -------------------------------------------------------------------------
ROWS = ["The movie was", "I"]


def _sampler(tiny_base, den, decode: str, **kw) -> Sampler:
    lm = DecodeConfig(latent_weight=0.5, temperature=0.8)
    cfg = SamplerConfig(steps=3, decode=decode, stop_at=0.5, lm=lm, block_size=4, **kw)
    return Sampler(den, tiny_base.space, config=cfg, base_model=tiny_base)


@pytest.mark.parametrize("decode", ["lm", "nearest"])
def test_block_loop_feeds_the_states_of_the_text_so_far(tiny_base, decode):
    den = _denoiser(tiny_base.space.dim)
    s = _sampler(tiny_base, den, decode)
    plan = s.plan(2, 12, prompt_tokens=4)
    fed = []
    real = den.features

    def spy(z, t, **kw):
        fed.append((kw["states"].clone(), kw["states_mask"].clone(), int(plan.state.generated)))
        return real(z, t, **kw)

    den.features = spy
    out = plan.run(ROWS, seed=[1, 2])
    del den.features
    st, cap = plan.state, plan.prompt_cap
    assert {g for _, _, g in fed} == {0, 4, 8}  # three blocks
    for b, prompt in enumerate(ROWS):
        ids = s.encode(prompt) + out.tokens[b].tolist()
        want = base_states(tiny_base, torch.tensor([ids]))[0].float()  # unpadded, alone
        pad = int(st.pad[b])
        for states, mask, g in fed:
            n = len(s.encode(prompt)) + g  # tokens before the block
            k = min(M, n)
            assert int(mask[b].sum()) == k
            torch.testing.assert_close(states[b, M - k :], want[n - k : n], atol=2e-4, rtol=1e-3)
        # the block loop's record of every token read
        read = cap + (12 if decode == "lm" else 8)  # the nearest decode's last block unread
        torch.testing.assert_close(st.hist[b, pad:read], want[: read - pad], atol=2e-4, rtol=1e-3)


def test_states_change_the_latent(tiny_base):
    def latent(den):
        plan = _sampler(tiny_base, den, "nearest").plan(2, 8, prompt_tokens=4)
        plan.run(ROWS, seed=[1, 2])
        return plan.state.latent.clone()

    den = _denoiser(tiny_base.space.dim)
    first = latent(den)
    with torch.no_grad():
        den.state_proj.weight.mul_(-3.0)
    assert not torch.allclose(first, latent(den), atol=1e-3)


def test_sampler_refuses_a_base_model_of_another_width(tiny_base):
    den = _denoiser(tiny_base.space.dim, state_dim=tiny_base.hidden_size + 1)
    with pytest.raises(ConfigError, match="reads base-model states of width 49"):
        _sampler(tiny_base, den, "nearest")
    cfg = SamplerConfig(steps=3, block_size=4)
    with pytest.raises(
        ConfigError, match="a critic reads the base model's states: pass base_model="
    ):
        Sampler(_denoiser(tiny_base.space.dim), tiny_base.space, config=cfg)


def test_states_denoiser_checkpoint_round_trip(tmp_path, tiny_base):
    den = _denoiser(tiny_base.space.dim)
    save_model(den, tmp_path, DENOISER_STEM, space=tiny_base.space, base_model=tiny_base.name)
    back = load_model(tmp_path, DENOISER_STEM, tiny_base.space)
    assert back.config == den.config
    assert_same_weights(den, back)


# ---- the value critic -------------------------------------------------------------------
def _value_critic(dim: int, *, reward: str = "sentiment", layers: int = 2):
    from fastdia.models.critic import CriticConfig, build_critic

    torch.manual_seed(0)
    cfg = CriticConfig(
        dim=dim,
        kind="value",
        hidden=16,
        heads=2,
        reward=reward,
        max_length=4,
        prefix_states=M,
        state_dim=dim,
        layers=layers,
    )
    return build_critic(cfg).eval()


@pytest.mark.parametrize("layers", [2, 0])
def test_value_critic_reads_block_and_states(layers):
    critic = _value_critic(8, layers=layers)
    z, s = torch.randn(3, 4, 8), torch.randn(3, M, 8)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    h, grad = critic.value_and_grad(z, 0.3, states=s, states_mask=mask)
    assert h.shape == (3,) and grad.shape == z.shape and grad.abs().sum() > 0
    # the gradient is the derivative of the value (finite difference)
    dz = torch.zeros_like(z)
    dz[0, 1, 2] = 1e-3
    up = critic(z + dz, 0.3, states=s, states_mask=mask)[0]
    down = critic(z - dz, 0.3, states=s, states_mask=mask)[0]
    torch.testing.assert_close((up - down) / 2e-3, grad[0, 1, 2], atol=2e-3, rtol=2e-2)
    other = s.clone()
    other[:, :2] = torch.randn(3, 2, 8)
    moved = (critic(z, 0.3, states=other, states_mask=mask) - h).abs()
    assert moved[0] > 1e-4 and moved[1] == 0 and moved[2] == 0
    with pytest.raises(ConfigError, match=r"pass states \[3, 4, 8\], got None"):
        critic(z, 0.3)


def test_value_critic_config_checks():
    from fastdia.models.critic import CriticConfig

    with pytest.raises(ConfigError, match="a value critic reads base-model states"):
        CriticConfig(dim=8, kind="value", heads=2, hidden=16)
    with pytest.raises(ConfigError, match="a value critic reads base-model states"):
        CriticConfig(dim=8, prefix_states=4, state_dim=8)


def test_value_critic_trains_on_whole_sample_rewards(tmp_path, tiny_base, state_data, monkeypatch):
    from fastdia.models.critic import CriticConfig
    from fastdia.rewards import KeywordReward
    from fastdia.train.critic import reward_labels, train_critic

    data = load_dataset(str(state_data), tiny_base, 4, states=True)
    train, hold = data.split(0.25)
    reward = KeywordReward(["movie", "love"])
    labels, hold_labels = (
        reward_labels(tiny_base, train, reward),
        reward_labels(tiny_base, hold, reward),
    )
    # the label is the whole sequence's reward, not the block's
    whole = reward(tiny_base.space.decode_batch(train.ids[:3])).float()
    torch.testing.assert_close(labels[:3], whole)
    dim = tiny_base.space.dim
    cfg = CriticConfig(
        dim=dim,
        kind="value",
        hidden=16,
        heads=2,
        reward="kw",
        max_length=4,
        prefix_states=M,
        state_dim=dim,
    )
    optim = _optim(steps=6, batch_size=8)

    def run(out, **kw):
        return train_critic(
            tiny_base, train, labels, hold, hold_labels, out, cfg, optim, progress=False, **kw
        )

    straight = run(tmp_path / "a")
    assert (tmp_path / "a" / "value-kw.json").is_file()
    assert {"spearman", "spearman@8@0.0", "spearman@8@0.75"} <= set(straight.metrics)
    assert "spearman@32@0.0" not in straight.metrics  # a block at 32 does not fit 20 tokens
    run_interrupted(monkeypatch, lambda: run(tmp_path / "b"))
    resumed = run(tmp_path / "b", resume=True)
    assert_same_weights(straight.critic, resumed.critic)
    plain, plain_hold = load_dataset(str(state_data), tiny_base, 4).split(0.25)
    with pytest.raises(ConfigError, match="loaded without them"):
        train_critic(
            tiny_base,
            plain,
            labels,
            plain_hold,
            hold_labels,
            tmp_path / "c",
            cfg,
            optim,
            progress=False,
        )


def test_value_critic_guides_the_block_only(tiny_base):
    """A value critic's gradient reaches the block's positions of the window and nothing
    else, and it moves the latent; an unconditioned denoiser gets states for it."""
    from fastdia.sampler import WeightedCritic

    dim = tiny_base.space.dim
    plain = Denoiser(DenoiserConfig(dim=dim, max_length=12, hidden=16, layers=1, heads=2)).eval()
    critic = _value_critic(dim)

    def plan(guidance):
        cfg = SamplerConfig(steps=3, block_size=4, guidance=guidance)
        crit = [WeightedCritic("sentiment", critic)]
        s = Sampler(plain, tiny_base.space, crit, cfg, base_model=tiny_base)
        return s.plan(2, 8, prompt_tokens=4)

    p = plan(50.0)
    p.set_inputs([[5, 6, 7], [9]], [1, 2])
    p.decode_plan.start()
    p.diffusion._layout()
    z = torch.randn(2, 12, dim)
    grad = p.diffusion._context_grad(z, 0).view(2, 12, dim)
    touched = grad.abs().sum(dim=2) > 0
    want = torch.zeros(2, 12, dtype=torch.bool)
    for b in range(2):
        start = int(p.diffusion.block_pos[b, 0])
        want[b, start : start + 4] = True
    assert torch.equal(touched, want)
    guided = plan(50.0).run([[5, 6, 7], [9]], seed=[1, 2])
    free = plan(0.0).run([[5, 6, 7], [9]], seed=[1, 2])
    assert guided.tokens.shape == free.tokens.shape


# ---- the base model's next-token logits (lm_prior) -------------------------------------
def _lm_prior_denoiser(tiny_base) -> Denoiser:
    space = tiny_base.space
    cfg = _config(
        space.dim,
        prediction="tokens",
        vocab_size=space.vocab_size,
        clean_prompt=True,
        lm_prior=True,
    )
    torch.manual_seed(0)
    return Denoiser(cfg, torch.arange(space.vocab_size)).bind_embeddings(space).eval()


def test_lm_prior_adds_the_base_models_logits_at_the_first_noisy_position(tiny_base):
    den = _lm_prior_denoiser(tiny_base)
    space = tiny_base.space
    ids = torch.tensor([space.encode("The movie was great and")])
    states = base_states(tiny_base, ids).float()[:, -M:]
    z = torch.randn(2, 12, space.dim)
    mask = torch.arange(12)[None, :] < torch.tensor([[3], [5]])
    s = states.expand(2, -1, -1)
    with torch.no_grad():
        den.lm_gain.fill_(0.0)
        plain = den.features(z, 0.5, clean_mask=mask, states=s)
        den.lm_gain.fill_(0.7)
        with_lm = den.features(z, 0.5, clean_mask=mask, states=s)
    lm_logits = tiny_base.model(ids).logits[0, -1].float()  # the model's own next-token logits
    added = with_lm - plain
    for b, first in enumerate((3, 5)):
        torch.testing.assert_close(added[b, first], 0.7 * lm_logits, atol=1e-4, rtol=1e-4)
        others = torch.cat([added[b, :first], added[b, first + 1 :]])
        assert others.abs().max() == 0
    # no last state, no LM logits
    gone = torch.tensor([[True] * (M - 1) + [False]] * 2)
    with torch.no_grad():
        masked = den.features(z, 0.5, clean_mask=mask, states=s, states_mask=gone)
        den.lm_gain.fill_(0.0)
        masked_plain = den.features(z, 0.5, clean_mask=mask, states=s, states_mask=gone)
    torch.testing.assert_close(masked, masked_plain)


def test_lm_prior_checks(tiny_base):
    with pytest.raises(ConfigError, match="lm_prior adds the base model's next-token logits"):
        _config(8, lm_prior=True)
    den = _lm_prior_denoiser(tiny_base)
    unbound = Denoiser(den.config, den.vocab_ids)
    with pytest.raises(ConfigError, match="needs its embeddings"):
        unbound.features(torch.randn(1, 12, den.config.dim), 0.5, states=torch.randn(1, M, 48))
    wide = _config(
        tiny_base.space.dim,
        prediction="tokens",
        vocab_size=tiny_base.space.vocab_size,
        lm_prior=True,
        state_dim=tiny_base.space.dim + 1,
    )
    with pytest.raises(ConfigError, match="ties its input and output embeddings"):
        Denoiser(wide, torch.arange(tiny_base.space.vocab_size)).bind_embeddings(tiny_base.space)
    cfg = SamplerConfig(steps=3, block_size=4, clean_prompt=False)
    with pytest.raises(ConfigError, match="without the clean prompt"):
        Sampler(den, tiny_base.space, config=cfg, base_model=tiny_base).plan(1, 4)


def test_token_local_value_critic_folds_its_scale():
    from fastdia.train.critic import fold_affine

    critic = _value_critic(8, layers=0)
    z, s = torch.randn(3, 4, 8), torch.randn(3, M, 8)
    before = critic(z, 0.2, states=s)
    with torch.no_grad():
        fold_affine(critic, 2.5, -0.5)
    torch.testing.assert_close(critic(z, 0.2, states=s), 2.5 * before - 0.5)
