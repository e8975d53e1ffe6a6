"""The demo checkpoint shipped inside the package, and the command that uses it by default.

These check properties of the shipped models by running them, not numbers read back
from the files that ship beside them.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastdia.cli import main
from fastdia.models.checkpoint import load_checkpoint, sampling_defaults
from fastdia.pipeline import DEMO_CHECKPOINT, resolve_checkpoint, sampler_config, sampling_settings

DEMO_BUDGET_BYTES = 60 * 2**20
# the acceptance command: no flags beyond these, no network
DEFAULT_COMMAND = (
    *("sample", "--prompt", "The movie was", "--reward", "sentiment"),
    *("--num-samples", "8", "--new-tokens", "16", "--json"),  # one block
)


def test_demo_ships_inside_the_package_within_budget():
    files = {p.name: p.stat().st_size for p in DEMO_CHECKPOINT.iterdir() if p.is_file()}
    for name in (
        "denoiser.json",
        "denoiser.safetensors",
        "critic-sentiment.json",
        "critic-sentiment.safetensors",
        "critic-nontoxic.json",
        "critic-nontoxic.safetensors",
        "sampling.json",
        "MODEL_CARD.md",
        "eval.json",
        "eval.png",
    ):
        assert name in files, f"{name} missing from {DEMO_CHECKPOINT}"
    assert sum(files.values()) <= DEMO_BUDGET_BYTES
    assert resolve_checkpoint(None) == DEMO_CHECKPOINT
    card = (DEMO_CHECKPOINT / "MODEL_CARD.md").read_text()
    assert "fastdia eval" in card and "scripts/train-demo.sh" in card


def test_demo_sampling_defaults_build_a_valid_config():
    """sampling.json passes the checks and selects the LM decode with a noisy latent."""
    defaults = sampling_defaults(DEMO_CHECKPOINT)
    config = sampler_config(sampling_settings(DEMO_CHECKPOINT))
    assert config.decode == defaults["decode"] == "lm"
    assert 0 < config.stop_at < 1 and config.guidance > 0


@pytest.mark.slow
def test_demo_models_load_and_behave(default_base):
    ckpt = load_checkpoint(DEMO_CHECKPOINT, default_base.space)
    den = ckpt.denoiser
    cfg = den.config
    assert cfg.dim == default_base.space.dim and cfg.max_length >= 32
    assert cfg.arch == "adaln" and cfg.self_condition and cfg.clean_prompt and cfg.time_grid
    assert set(ckpt.critics) == {"sentiment", "nontoxic"}
    space = default_base.space
    # the sentiment critic ranks clearly positive above clearly negative text
    texts = ["I love this wonderful, happy day.", "I hate this awful, terrible day."]
    ids = [space.encode(t) for t in texts]
    n = min(map(len, ids))
    with torch.no_grad():
        h = ckpt.critics["sentiment"](space.embed(torch.tensor([i[:n] for i in ids])), 0.0)
    assert h[0] > h[1]
    # the denoiser recovers most tokens of real text at a low noise level, clean prompt given
    ids = torch.tensor([space.encode("The movie was great and the actors were wonderful.")])
    z0 = space.embed(ids)
    t = torch.full((1,), 0.3)
    from fastdia.train.denoiser import noised

    gen = torch.Generator().manual_seed(0)
    z_t = noised(z0, t, torch.randn(z0.shape, generator=gen), cfg.schedule)
    with torch.no_grad():
        x0 = den(z_t, t)
    from fastdia.ops import round_to_vocab

    acc = (round_to_vocab(x0, space.weight, space.rounding_bias("l2")) == ids).float().mean()
    assert acc > 0.7


def _samples(capsys, *extra):
    code = main([*DEFAULT_COMMAND, *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = [json.loads(line) for line in out.out.strip().splitlines()]
    return lines[:-1], lines[-1]["summary"]


@pytest.mark.slow
def test_default_sample_command_uses_the_demo_and_reads_as_text(capsys, default_base):
    from fastdia.evaluate import continuation_nll

    samples, summary = _samples(capsys)
    assert len(samples) == 8 and summary["num_samples"] == 8
    assert not summary["random_init"] and summary["base_model"] == "smollm2-135m"
    assert summary["decode"] == "lm" and summary["guidance"] > 0
    prompt = default_base.space.encode("The movie was")
    for s in samples:
        assert s["text"] == "The movie was" + s["completion"]
        assert 0 < len(s["completion_ids"]) <= summary["new_tokens"]
        assert s["finished"] == (len(s["completion_ids"]) < summary["new_tokens"])
    # fluent: the base model's perplexity of the continuations is that of text, not salad
    nll = torch.cat(
        [
            continuation_nll(default_base, prompt, torch.tensor([s["completion_ids"]]))[0]
            for s in samples
        ]
    )
    assert float(nll.mean().exp()) < 60


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["nontoxic", "sentiment:1,nontoxic:0.5"])
def test_demo_critics_guide_other_rewards(capsys, default_base, reward):
    code = main(
        [
            *("sample", "--prompt", "I think", "--reward", reward),
            *("--num-samples", "2", "--steps", "5", "--new-tokens", "16"),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err


@pytest.mark.slow
def test_demo_guidance_moves_the_true_reward(capsys, default_base):
    """The default guidance makes samples clearly more positive than no guidance."""
    means = {}
    for lam in ("0", None):
        samples, _ = _samples(capsys, *(("--guidance", lam) if lam else ()))
        means[lam] = sum(s["rewards"]["sentiment"] for s in samples) / len(samples)
    assert means[None] > means["0"] + 0.2
