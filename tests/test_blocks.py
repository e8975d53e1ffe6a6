"""The block loop: any length, ragged multi-prompt batches, per-row seeds, end tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastdia.decode import DecodeConfig
from fastdia.errors import ConfigError
from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic, sample_rows

GOLDEN = json.loads((Path(__file__).parent / "data" / "single_window_samples.json").read_text())
LM = {"decode": "lm", "stop_at": 0.5}
PROMPTS = ["The movie was", "I love this film, it is a happy and joyful", None, "The"]


def _lm_config(**kw) -> SamplerConfig:
    decode = DecodeConfig(temperature=0.9, latent_weight=0.3, tilt=1.0, tilt_once=True)
    return SamplerConfig(**{"steps": 4, "guidance": 2.0, "lm": decode, **LM, **kw})


def _sampler(tiny_base, tiny_models, config: SamplerConfig) -> Sampler:
    denoiser, critic = tiny_models
    critics = [WeightedCritic("sentiment", critic, 1.0)]
    return Sampler(denoiser, tiny_base.space, critics, config, base_model=tiny_base)


@pytest.mark.parametrize("decode", ["lm", "nearest"])
def test_one_block_of_the_window_reproduces_the_single_window_sampler(
    tiny_base, tiny_models, decode
):
    """K = W = L, no prompt: the same tokens as the single-window sampler wrote before the
    block loop existed (stored in tests/data)."""
    golden = GOLDEN["tiny"][decode]
    kw = {"steps": 6, "guidance": 2.0, "window": 16, "block_size": 16}
    if decode == "lm":
        d = golden["decode"]
        lm = DecodeConfig(d["temperature"], d["latent_weight"], d["tilt"], d["tilt_once"])
        config = SamplerConfig(decode="lm", stop_at=d["stop_at"], lm=lm, **kw)
    else:
        config = SamplerConfig(**kw)
    s = _sampler(tiny_base, tiny_models, config)
    for row in golden["rows"]:
        out = s.sample(1, 16, seed=row["seed"])
        assert out.tokens[0].tolist() == row["ids"]


def test_ragged_batch_gives_each_row_its_single_prompt_text(tiny_base, tiny_models):
    """Different prompts (lengths 0 to 12 tokens) in one batch, several blocks: each row
    writes what it writes alone with the same seed."""
    s = _sampler(tiny_base, tiny_models, _lm_config(block_size=6))
    seeds = [11, 5, 9, 2]
    batch = s.sample(4, 20, prompt=PROMPTS, seed=seeds)
    assert batch.blocks == 4 and batch.tokens.shape == (4, 20)
    for i, (prompt, seed) in enumerate(zip(PROMPTS, seeds, strict=True)):
        alone = s.sample(1, 20, prompt=prompt, seed=seed)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist(), i
        assert alone.texts[0] == batch.texts[i]
    assert batch.prompt_ids[2] == [] and batch.texts[0].startswith("The movie was")


def test_one_seed_means_seed_plus_row(tiny_base, tiny_models):
    s = _sampler(tiny_base, tiny_models, _lm_config(block_size=8))
    both = s.sample(2, 12, prompt="The movie was", seed=7)
    assert both.seeds == [7, 8]
    for row, seed in enumerate((7, 8)):
        alone = s.sample(1, 12, prompt="The movie was", seed=seed)
        assert torch.equal(alone.tokens[0], both.tokens[row])
    assert not torch.equal(both.tokens[0], both.tokens[1])


def test_window_holds_the_last_tokens_as_clean_context(tiny_base, tiny_models):
    """After several blocks the window's context is the row's last W - K tokens, written
    clean at the window's first positions; the block follows it."""
    config = SamplerConfig(steps=3, guidance=1.0, window=12, block_size=4)
    s = _sampler(tiny_base, tiny_models, config)
    prompt = tiny_base.space.encode("The movie was great and the actors")
    out = s.sample(2, 16, prompt=prompt, seed=1)
    diff = s.plan(2, 16, prompt_tokens=len(prompt)).diffusion
    # the last block (the 4th) saw the prompt and the first 12 tokens: the last 8 of them
    for row in range(2):
        text = prompt + out.tokens[row].tolist()
        ctx = text[len(prompt) + 12 - 8 : len(prompt) + 12]
        assert diff.ctx_ids[row, :8].tolist() == ctx
        assert diff.mask[row].tolist() == [True] * 8 + [False] * 4
        assert diff.block_pos[row].tolist() == [8, 9, 10, 11]
        torch.testing.assert_close(out.z[row, :8], tiny_base.space.embed(torch.tensor(ctx)))


def test_long_generation_beyond_the_window_and_short_last_block(tiny_base, tiny_models):
    s = _sampler(tiny_base, tiny_models, _lm_config(window=8, block_size=5))
    out = s.sample(3, 23, prompt="The food", seed=0)
    assert out.tokens.shape == (3, 23) and out.blocks == 5
    assert out.new_tokens == sum(len(c) for c in out.completion_ids) <= 3 * 23
    assert out.tokens_per_s == pytest.approx(out.new_tokens / out.seconds)
    # a plan for more tokens serves fewer: the same text as far as both go
    plan = s.plan(3, 40, prompt_tokens=4)
    longer = plan.run("The food", seed=0)
    assert torch.equal(longer.tokens[:, :23], out.tokens)


def test_stop_cuts_a_row_at_its_end_token_and_mask_never_draws_it(tiny_base, tiny_models):
    """on_eos="stop": a row ends at its first end token (not counted, padding after it);
    "mask": end and template tokens are never drawn, whatever the scores say."""
    eos = tiny_base.tokenizer.eos_token_id
    lm = DecodeConfig(latent_weight=0.0, tilt=1.0)  # the LM and the bias alone
    s = _sampler(tiny_base, tiny_models, _lm_config(block_size=4, on_eos="stop", lm=lm))
    assert s.special.stop == (eos,) and eos not in s.special.banned
    plan = s.plan(4, 12, prompt_tokens=3)
    plan.decode_plan.bias[eos] += 4.0  # make the end token likely
    out = plan.run("The movie", seed=3)
    assert any(out.finished) and not all(len(c) == 12 for c in out.completion_ids)
    for row in range(4):
        n = len(out.completion_ids[row])
        assert eos not in out.completion_ids[row]
        assert out.finished[row] == (n < 12) and (n == 12 or out.tokens[row, n].item() == eos)
    assert out.new_tokens == sum(len(c) for c in out.completion_ids)

    masked = _sampler(tiny_base, tiny_models, _lm_config(block_size=4, on_eos="mask", lm=lm))
    special = set(tiny_base.tokenizer.all_special_ids)
    assert set(masked.special.banned) == special and masked.special.stop == ()
    plan = masked.plan(4, 12, prompt_tokens=3)
    plan.decode_plan.bias[eos] += 40.0
    out = plan.run("The movie", seed=3)
    assert not any(out.finished) and not special & set(out.tokens.flatten().tolist())


def test_what_a_reward_reads_of_a_row():
    """cut_completions: a row ends at its first stop id; the reward reads the prompt and
    the completion, or with chat the completion alone."""
    from fastdia.prompts import cut_completions

    prompts, generated = [[1, 2], [3]], [[5, 9, 6, 7], [8, 8, 8, 8]]
    completion, finished, read = cut_completions(prompts, generated, (9,), chat=False)
    assert completion == [[5], [8, 8, 8, 8]] and finished == [True, False]
    assert read == [[1, 2, 5], [3, 8, 8, 8, 8]]
    assert cut_completions(prompts, generated, (), chat=True)[2] == generated


def test_nearest_decode_never_writes_a_banned_token(tiny_base, tiny_models):
    s = _sampler(tiny_base, tiny_models, SamplerConfig(steps=2, block_size=8, on_eos="mask"))
    diff = s.plan(2, 8).diffusion
    assert all(diff.bias[i].item() < -1e8 for i in s.special.banned)


def test_no_latent_weight_runs_no_diffusion(tiny_base, tiny_models):
    """The tilt-only decode: latent weight 0 means no diffusion at all."""
    lm = DecodeConfig(latent_weight=0.0, tilt=1.0)
    s = _sampler(tiny_base, tiny_models, SamplerConfig(guidance=2.0, decode="lm", lm=lm))
    plan = s.plan(2, 10)
    assert plan.diffusion is None and plan.steps == 0
    out = plan.run("The movie", seed=0, new_tokens=10)
    assert out.z is None and out.tokens.shape == (2, 10)


def test_sample_rows_batches_many_prompts_through_one_plan(tiny_base, tiny_models):
    s = _sampler(tiny_base, tiny_models, _lm_config(block_size=6))
    prompts = [*PROMPTS, "What an awful, sad and painful experience that was", "I"]
    seeds = list(range(100, 106))
    seen = []
    out = sample_rows(
        s, prompts, seeds, 9, batch_size=4, on_batch=lambda o: seen.append(len(o.texts))
    )
    assert seen == [4, 2] and out.seeds == seeds and len(out.texts) == 6
    alone = s.sample(1, 9, prompt=prompts[5], seed=105)
    assert alone.tokens[0].tolist() == out.tokens[5].tolist()
    assert len(s._plans) == 2  # one plan for both batches, one for the single run


def test_chat_template_needs_a_tokenizer_that_has_one(tiny_base, tiny_models):
    s = _sampler(tiny_base, tiny_models, _lm_config())
    with pytest.raises(ConfigError, match="chat template"):
        s.sample(1, 4, prompt="Hi", chat=True)


def test_bad_input(tiny_base, tiny_models):
    s = _sampler(tiny_base, tiny_models, _lm_config(block_size=8))
    with pytest.raises(ConfigError, match="--new-tokens must be a positive integer"):
        s.sample(1, 0)
    with pytest.raises(ConfigError, match="exceeds the base model's context of 128"):
        s.sample(1, 126, prompt="The movie was")
    with pytest.raises(ConfigError, match="got 3 prompts for 2 rows"):
        s.sample(2, 4, prompt=["a", "b", "c"])
    with pytest.raises(ConfigError, match="got 1 seeds for 2 rows"):
        s.sample(2, 4, prompt="The", seed=[1])
    with pytest.raises(ConfigError, match="prompt is empty"):
        s.sample(1, 4, prompt=" ")
    plan = s.plan(1, 8, prompt_tokens=2)
    with pytest.raises(ConfigError, match="holds prompts of up to 32"):
        plan.run("The movie was " * 10)
    with pytest.raises(ConfigError, match="generates up to 8 tokens"):
        plan.run("The", new_tokens=9)
    with pytest.raises(ConfigError, match="block size 40 does not fit the denoiser's window"):
        _sampler(tiny_base, tiny_models, _lm_config(block_size=40))
    with pytest.raises(ConfigError, match="exceeds the denoiser's maximum of 32"):
        _sampler(tiny_base, tiny_models, _lm_config(window=33))
    with pytest.raises(ConfigError, match="on_eos"):
        SamplerConfig(on_eos="ignore")
    with pytest.raises(ConfigError, match="block_size must be a positive integer"):
        SamplerConfig(block_size=0)


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["lm", "nearest"])
def test_demo_block_loop_reproduces_the_single_window_demo(default_base, decode):
    """The shipped demo, one block of its whole window, no prompt: the tokens the
    single-window sampler wrote (up to the first end token, where that sampler wrote on)."""
    import dataclasses

    from fastdia.pipeline import build_sampler, sampler_config, sampling_settings

    golden = GOLDEN["demo"][decode]
    settings = sampling_settings(None, **golden["settings"])  # the stored ones over defaults
    config = dataclasses.replace(sampler_config(settings), block_size=32)
    sampler = build_sampler(default_base, config, rewards=[("sentiment", 1.0)]).sampler
    stop = set(sampler.special.stop)
    for row in golden["rows"]:
        out = sampler.sample(1, 32, seed=row["seed"])
        ids = row["ids"]
        cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
        assert out.completion_ids[0] == ids[:cut]


@pytest.mark.slow
def test_demo_chat_writes_the_assistants_reply_only(default_base):
    """--chat with the instruct base model: the prompt is the chat template's user turn,
    the text is the reply, no template token or role line in it, stopped at end of turn."""
    from fastdia.pipeline import DEMO_CHECKPOINT, build_sampler, sampler_config, sampling_settings

    config = sampler_config(sampling_settings(DEMO_CHECKPOINT))
    sampler = build_sampler(default_base, config, rewards=[("sentiment", 1.0)]).sampler
    out = sampler.sample(4, 16, prompt="Tell me about your weekend.", seed=0, chat=True)
    template = default_base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about your weekend."}],
        add_generation_prompt=True,
        tokenize=True,
    )
    template = template["input_ids"] if hasattr(template, "keys") else template
    assert out.prompt_ids[0] == list(template)
    special = set(default_base.tokenizer.all_special_ids)
    for text, completion, ids in zip(out.texts, out.completions, out.completion_ids, strict=True):
        assert text == completion and "<|im_" not in text
        assert "\nassistant\n" not in text and "\nuser\n" not in text
        assert not special & set(ids)
