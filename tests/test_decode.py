"""The LM decode (base model as prior) and the Gumbel-max sampling op."""

from __future__ import annotations

import math

import pytest
import torch

from fastdia import noise, ops
from fastdia.decode import (
    DECODE_STEP,
    DecodeConfig,
    LMDecoder,
    logit_transform,
    ties_embeddings,
    token_values,
)
from fastdia.errors import ConfigError
from fastdia.models.critic import CriticConfig, build_critic
from fastdia.ops import SAMPLE_VOCAB
from fastdia.ops.gumbel import gumbel_argmax, sample_vocab_reference
from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic
from fastdia.window import BlockState

# chi-square critical value for 4 degrees of freedom at p = 0.001
CHI2_DF4_P001 = 18.47


def test_gumbel_noise_is_philox_uniform_mapped():
    """Element k is -log(-log(u)) of the first Philox word of (seed, step, k)."""
    k0, k1 = 7, 3  # step, seed
    words = noise.philox_randint4x(k0, k1, torch.arange(50))[0]
    u = torch.where(words >= 2**31, 0xFFFFFFFF - words, words).float() * 4.6566127342e-10
    u = u.clamp(noise.GUMBEL_U_MIN, noise.GUMBEL_U_MAX)
    expected = -torch.log(-torch.log(u))
    torch.testing.assert_close(noise.gumbel(3, 7, 50), expected)
    torch.testing.assert_close(noise.gumbel(3, 7, 20, offset=30), expected[30:])


def test_sample_vocab_matches_softmax_distribution():
    """Gumbel-max over 5 tokens: counts over 20,000 rows fit softmax(scores) (chi-square)."""
    torch.manual_seed(0)
    weight = torch.randn(5, 3)
    query = torch.tensor([0.8, -0.3, 0.5])
    bias = torch.tensor([0.1, 0.0, -0.4, 0.3, 0.2])
    probs = torch.softmax(weight @ query + bias, dim=0)
    rows = 20_000
    ids = sample_vocab_reference(query.expand(rows, -1), weight, bias, seed=11, step=4)
    counts = torch.bincount(ids, minlength=5).double()
    expected = probs.double() * rows
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_DF4_P001, (counts, expected)
    # reproducible by seed, different for another seed or step
    again = sample_vocab_reference(query.expand(rows, -1), weight, bias, seed=11, step=4)
    assert torch.equal(ids, again)
    assert not torch.equal(
        ids, sample_vocab_reference(query.expand(rows, -1), weight, bias, seed=12, step=4)
    )
    assert not torch.equal(
        ids, sample_vocab_reference(query.expand(rows, -1), weight, bias, seed=11, step=5)
    )


def test_sample_vocab_equals_argmax_of_scores_plus_numbered_noise():
    torch.manual_seed(1)
    z, weight, bias = torch.randn(70, 6), torch.randn(33, 6), torch.randn(33)
    ids = ops.sample_vocab(z, weight, bias, seed=2, step=9)
    # row n draws under seed 2 + n, element v (across the reference's chunks of 64 rows)
    g = torch.stack([noise.gumbel(2 + n, 9, 33) for n in range(70)])
    assert torch.equal(ids, (z @ weight.T + bias + g).argmax(dim=1))
    assert torch.equal(gumbel_argmax(z @ weight.T + bias, seed=2, step=9), ids)
    # explicit per-row seeds: a row's draw depends on its own seed only
    seeds = torch.arange(70, dtype=torch.int64).flip(0) * 3
    ids2 = ops.sample_vocab(z, weight, bias, seed=seeds, step=9)
    tail = gumbel_argmax((z @ weight.T + bias)[64:], seed=seeds[64:], step=9)
    assert torch.equal(ids2[64:], tail)
    one = ops.sample_vocab(z[5:6], weight, bias, seed=seeds[5:6], step=9)
    assert one.item() == ids2[5].item()


def test_sample_vocab_bad_input():
    with pytest.raises(ConfigError, match="z \\[N, d\\]"):
        ops.sample_vocab(torch.zeros(3), torch.zeros(4, 3), seed=0, step=0)
    with pytest.raises(ConfigError, match="bias must be \\[V=4\\] or \\[N=2, V=4\\]"):
        ops.sample_vocab(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(3, 4), seed=0, step=0)
    with pytest.raises(ConfigError, match="seed must be one seed or one per row"):
        ops.sample_vocab(
            torch.zeros(2, 3), torch.zeros(4, 3), seed=torch.zeros(3, dtype=torch.int64), step=0
        )


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0},
        {"temperature": float("nan")},
        {"latent_weight": -1},
        {"tilt": float("inf")},
    ],
)
def test_decode_config_rejects_bad_weights(kw):
    with pytest.raises(ConfigError, match="must be a finite number"):
        DecodeConfig(**kw)


def test_decode_config_rejects_a_non_boolean_tilt_once():
    with pytest.raises(ConfigError, match="tilt_once must be true or false"):
        DecodeConfig(tilt_once=1)
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="tilt_horizon must be an integer >= 0"):
            DecodeConfig(tilt_horizon=bad)


def test_tilt_once_stops_a_strong_tilt_from_repeating(tiny_base, tiny_models):
    """With a tilt that dominates the LM, plain tilting repeats the best tokens; with
    tilt_once every continuation token is distinct until the well-scored ones run out."""
    denoiser, critic = tiny_models
    distinct = {}
    for once in (False, True):
        # beta = tilt x lambda / W = 500 per unit of the critic's token value
        lm = DecodeConfig(latent_weight=0.0, tilt=500.0 * 32, tilt_once=once)
        cfg = SamplerConfig(guidance=1.0, decode="lm", lm=lm, on_eos="mask")
        critics = [WeightedCritic("sentiment", critic)]
        s = Sampler(denoiser, tiny_base.space, critics, cfg, base_model=tiny_base)
        out = s.sample(4, 10, prompt="The movie", seed=0)
        distinct[once] = min(len(set(row)) for row in out.tokens.tolist())
    assert distinct[True] == 10 and distinct[False] < distinct[True], distinct


def _direct_decode(base, z, prompts, seeds, abar, cfg, tilt_values, banned, transform=None):
    """The decode written out, one row at a time on its own prompt (the start token for
    none): LM log-probs / T + w log N(z; sqrt(abar) c E_v, 1 - abar) + tilt u(v), banned
    tokens out, Gumbel-max under the row's seed; a full forward per position."""
    model, space = base.model, base.space
    length = z.shape[1]
    c, E = space.scale, space.weight.float()
    rows = []
    for b, prompt in enumerate(prompts):
        context = list(prompt) or [base.tokenizer.bos_token_id]
        new: list[int] = []
        for g in range(length):
            logits = model(torch.tensor([context + new])).logits[:, -1].float()
            if transform is not None:  # what the model's own forward would do to them
                logits = transform(logits)
            logp = torch.log_softmax(logits, dim=-1) / cfg.temperature
            diff = z[b, g][None, :] - math.sqrt(abar) * c * E
            log_gauss = -diff.pow(2).sum(-1) / (2 * (1 - abar))
            tilt = cfg.tilt * tilt_values.clone()
            if cfg.tilt_once:  # tokens already drawn in the continuation earn nothing
                tilt[new] = 0.0
            if cfg.tilt_horizon and g >= cfg.tilt_horizon:  # past the horizon: no tilt
                tilt.zero_()
            scores = logp + cfg.latent_weight * log_gauss + tilt
            scores[0, list(banned)] = -1e9
            tok = gumbel_argmax(scores, seed=seeds[b], step=DECODE_STEP + g)
            new.append(int(tok))
        rows.append(new)
    return torch.tensor(rows)


def _decode_plan(base, cfg, prompts, seeds, z, abar, critics, beta, banned=(), cap=8):
    """A decode over hand-filled block buffers: one block of the latent ``z [B, K, d]``
    after the ragged ``prompts`` (left-padded to ``cap``)."""
    batch, block, dim = z.shape
    state = BlockState.allocate(batch, cap, block, block, dim, torch.device("cpu"))
    plan = LMDecoder(base, cfg, {SAMPLE_VOCAB: "reference"}).plan(
        state, abar, critics, beta, banned
    )
    bos = base.tokenizer.bos_token_id
    for b, prompt in enumerate(prompts):
        prefix = list(prompt) or [bos]
        state.tokens[b, cap - len(prefix) : cap] = torch.tensor(prefix)
        state.pad[b] = cap - len(prefix)
        state.prompt_len[b] = len(prompt)
    state.seeds.copy_(torch.tensor(seeds))
    state.latent.copy_(z)
    return plan


def _run(plan):
    st = plan.state
    st.generated.zero_()
    plan.start()
    plan.decode_tokens(st.block)
    return st.tokens[:, st.prompt_cap :].clone()


@pytest.mark.parametrize(
    "cfg",
    [
        DecodeConfig(),
        DecodeConfig(0.7, 0.5, 2.0),
        DecodeConfig(1.0, 0.0, 1.0),
        DecodeConfig(1.0, 0.2, 40.0, tilt_once=True),  # a tilt strong enough to repeat
        DecodeConfig(0.9, 0.2, 40.0, tilt_once=True, tilt_horizon=3),
    ],
)
def test_fused_tied_decode_equals_direct_lm_plus_gaussian(tiny_base, cfg):
    """The one-query score <h/T + alpha z, E> + bias is the LM + Gaussian posterior, row by
    row on ragged, left-padded prompts."""
    assert ties_embeddings(tiny_base.model)
    torch.manual_seed(3)
    critic = build_critic(CriticConfig(dim=tiny_base.space.dim, hidden=8, reward="sentiment"))
    critics = [(critic, 0.7)]
    abar, length = 0.02, 6
    prompts = [tiny_base.space.encode("The movie"), [], tiny_base.space.encode("I love this")]
    seeds = [5, 9, 2]
    ids_true = torch.randint(tiny_base.space.vocab_size, (3, length))
    z = math.sqrt(abar) * tiny_base.space.embed(ids_true) + math.sqrt(1 - abar) * torch.randn(
        3, length, tiny_base.space.dim
    )
    banned = (0,)
    plan = _decode_plan(tiny_base, cfg, prompts, seeds, z, abar, critics, cfg.tilt, banned)
    assert plan.tied  # the fused draw over the embedding
    got = _run(plan)
    tilt = token_values(critics, tiny_base.space.weight, tiny_base.space.scale)
    with torch.no_grad():
        want = _direct_decode(tiny_base, z, prompts, seeds, abar, cfg, tilt, banned)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "setting",
    [
        {"final_logit_softcapping": 0.3},
        {"logit_scale": 3.0},
        {"logits_scaling": 0.25, "final_logit_softcapping": 1.0},
    ],
)
def test_logit_scaling_and_soft_capping_take_the_general_path(tiny_base, setting):
    """A tied model whose forward scales or soft-caps its logits (Gemma 2/3, Cohere,
    Granite) is not drawn with the fused tied path, which would drop that: the general
    path applies it, and the decode equals the direct one on the transformed logits."""
    config = tiny_base.model.config
    cfg = DecodeConfig(0.8, 0.3, 0.0)
    prompts, seeds = [tiny_base.space.encode("The movie"), []], [3, 4]
    z = torch.randn(2, 5, tiny_base.space.dim, generator=torch.Generator().manual_seed(0))
    plain = _run(_decode_plan(tiny_base, cfg, prompts, seeds, z, 0.05, [], 0.0, (0,)))
    try:
        for key, value in setting.items():
            setattr(config, key, value)
        transform = logit_transform(tiny_base.model)
        assert transform is not None and not ties_embeddings(tiny_base.model)
        plan = _decode_plan(tiny_base, cfg, prompts, seeds, z, 0.05, [], 0.0, (0,))
        assert not plan.tied
        got = _run(plan)
        with torch.no_grad():
            none = torch.zeros(tiny_base.space.vocab_size)
            want = _direct_decode(tiny_base, z, prompts, seeds, 0.05, cfg, none, (0,), transform)
    finally:
        for key in setting:
            delattr(config, key)
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)  # the transform changed the draws
    x = torch.tensor([-2.0, 0.0, 5.0])
    scale = setting.get("logit_scale", 1.0) / setting.get("logits_scaling", 1.0)
    cap = setting.get("final_logit_softcapping")
    expected = x * scale if not cap else cap * torch.tanh(x * scale / cap)
    torch.testing.assert_close(transform(x), expected)


def test_static_cache_decode_equals_the_dynamic_one(tiny_base, tiny_models):
    """The static-KV-cache step (prompts minus their last token prefilled, then one step
    per position) gives the tokens of the model's own dynamic cache, run after run."""
    _, critic = tiny_models
    cfg = DecodeConfig(temperature=0.9, latent_weight=0.5, tilt=1.0)
    prompts = [tiny_base.space.encode("The movie was great"), [], [7]]
    z = torch.zeros(3, 7, tiny_base.space.dim)
    static = _decode_plan(tiny_base, cfg, prompts, [1, 2, 3], z, 0.2, [(critic, 1.0)], 0.4)
    dynamic = _decode_plan(tiny_base, cfg, prompts, [1, 2, 3], z, 0.2, [(critic, 1.0)], 0.4)
    dynamic.cache = None
    assert static.static and not dynamic.static
    torch.manual_seed(0)
    for seeds in ([1, 2, 3], [4, 4, 4], [1, 2, 3]):
        for plan in (static, dynamic):
            plan.state.seeds.copy_(torch.tensor(seeds))
            plan.state.latent.copy_(
                torch.randn(
                    3, 7, tiny_base.space.dim, generator=torch.Generator().manual_seed(seeds[0])
                )
            )
        a, b = _run(static), _run(dynamic)
        assert torch.equal(a, b), seeds


def test_token_values_are_the_critic_on_single_tokens(tiny_base):
    torch.manual_seed(4)
    critic = build_critic(CriticConfig(dim=tiny_base.space.dim, hidden=8, reward="sentiment"))
    u = token_values([(critic, 2.0)], tiny_base.space.weight, tiny_base.space.scale)
    ids = torch.tensor([[5], [17]])
    with torch.no_grad():  # a one-token sequence's critic value is u(v) + b2
        h = critic(tiny_base.space.embed(ids), 0.0)
    torch.testing.assert_close(2.0 * (h - critic.b2), u[ids[:, 0]], rtol=1e-5, atol=1e-5)


def test_sampler_lm_decode_end_to_end(tiny_base, tiny_models):
    denoiser, critic = tiny_models
    cfg = SamplerConfig(steps=4, guidance=1.0, decode="lm", stop_at=0.9, lm=DecodeConfig(tilt=0.5))
    with pytest.raises(ConfigError, match="base_model="):
        Sampler(denoiser, tiny_base.space, [], cfg)
    s = Sampler(
        denoiser, tiny_base.space, [WeightedCritic("sentiment", critic)], cfg, base_model=tiny_base
    )
    plan = s.plan(2, 10)
    a = plan.run("The movie", seed=1)
    b = plan.run("The movie", seed=1)
    c = plan.run("The movie", seed=2)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert a.prompt_ids == [tiny_base.space.encode("The movie")] * 2
    assert a.steps == 4 and a.blocks == 1


def test_each_run_records_the_paths_it_took(tiny_base, tiny_models, monkeypatch, caplog):
    """What a run cannot take silently is a warning and a record in its output: no static
    KV cache (a dynamic one, no decode graph), context critics left out of the decode's
    tilt, a backend the decode's draw has no variant of."""
    import transformers

    from fastdia.sampler import decode_backend

    denoiser, critic = tiny_models
    context = build_critic(
        CriticConfig(
            dim=tiny_base.space.dim, kind="context", hidden=16, heads=2, layers=1, reward="nontoxic"
        )
    )
    critics = [WeightedCritic("sentiment", critic), WeightedCritic("nontoxic", context)]
    cfg = SamplerConfig(steps=2, guidance=1.0, decode="lm", stop_at=0.9, lm=DecodeConfig(tilt=0.5))
    s = Sampler(denoiser, tiny_base.space, critics, cfg, base_model=tiny_base)
    with caplog.at_level("WARNING"):
        out = s.sample(2, 4, prompt="The movie", seed=1)
    assert out.paths == {
        "backends": {
            "guided_step": "reference",
            "round_to_vocab": "reference",
            "sample_vocab": "reference",
        },
        "diffusion_graph": False,
        "decode_graph": False,
        "kv_cache": "static",
        "decode_head": "tied",
        "tilt_critics": ["sentiment"],
    }
    assert "nontoxic guide the diffusion but not the tilt" in caplog.text

    def no_static_cache(*args, **kwargs):
        raise TypeError("not for this model")

    monkeypatch.setattr(transformers, "StaticCache", no_static_cache)
    caplog.clear()
    s = Sampler(denoiser, tiny_base.space, critics, cfg, base_model=tiny_base)  # a new plan
    with caplog.at_level("WARNING"):
        out = s.sample(2, 4, prompt="The movie", seed=1)
    assert out.paths["kv_cache"] == "dynamic"
    assert "no static KV cache" in caplog.text and "not for this model" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert decode_backend("cuda", torch.device("cpu")) == "reference"
    assert "sample_vocab has no 'cuda' variant: the LM decode draws with 'reference'" in (
        caplog.text
    )


def test_lm_decode_needs_a_noisy_latent():
    with pytest.raises(ConfigError, match="stop level t\\* in"):
        SamplerConfig(steps=2, decode="lm", stop_at=0.0)
    SamplerConfig(steps=2, decode="lm", stop_at=0.0, lm=DecodeConfig(latent_weight=0.0))


@pytest.mark.parametrize("stop", [-0.1, 1.0, 1.5, float("nan")])
def test_stop_level_outside_range_is_refused(stop):
    with pytest.raises(ConfigError, match="stop level"):
        SamplerConfig(stop_at=stop)
