"""The demo checkpoint shipped inside the package, and the command that uses it by default."""

from __future__ import annotations

import json

import pytest

from fastdia.cli import main
from fastdia.models.checkpoint import load_checkpoint
from fastdia.pipeline import DEMO_CHECKPOINT, resolve_checkpoint

DEMO_BUDGET_BYTES = 40 * 2**20
# the acceptance command: no flags beyond these, no network
DEFAULT_COMMAND = (
    *("sample", "--prompt", "The movie was", "--reward", "sentiment"),
    *("--num-samples", "8", "--json"),
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
        "MODEL_CARD.md",
        "eval.json",
        "eval.png",
    ):
        assert name in files, f"{name} missing from {DEMO_CHECKPOINT}"
    assert sum(files.values()) <= DEMO_BUDGET_BYTES
    assert resolve_checkpoint(None) == DEMO_CHECKPOINT
    card = (DEMO_CHECKPOINT / "MODEL_CARD.md").read_text()
    assert "fastdia eval" in card and "scripts/train-demo.sh" in card


@pytest.mark.slow
def test_demo_loads_on_the_default_base_model(default_base):
    ckpt = load_checkpoint(DEMO_CHECKPOINT, default_base.space)
    den = ckpt.denoiser
    assert den.config.dim == default_base.space.dim and den.config.max_length >= 32
    assert set(ckpt.critics) == {"sentiment", "nontoxic"}
    for name, critic in ckpt.critics.items():
        # the held-out fidelity recorded by training (the target is 0.7)
        assert critic.config.metrics["spearman"] >= 0.7, name
    eval_rows = json.loads((DEMO_CHECKPOINT / "eval.json").read_text())["rows"]
    assert {row["name"] for row in eval_rows} >= {"base model", "lambda=0"}


@pytest.mark.slow
def test_default_sample_command_uses_the_demo(capsys, default_base):
    code = main(list(DEFAULT_COMMAND))
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = [json.loads(line) for line in out.out.strip().splitlines()]
    samples, summary = lines[:-1], lines[-1]["summary"]
    assert len(samples) == 8 and summary["num_samples"] == 8
    assert not summary["random_init"] and summary["base_model"] == "smollm2-135m"
    defaults = json.loads((DEMO_CHECKPOINT / "sampling.json").read_text())
    assert summary["guidance"] == defaults["guidance"]
    for s in samples:
        assert s["text"].startswith("The movie was") and len(s["token_ids"]) == summary["length"]
        assert -1 <= s["rewards"]["sentiment"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["nontoxic", "sentiment:1,nontoxic:0.5"])
def test_demo_critics_guide_other_rewards(capsys, default_base, reward):
    code = main(
        ["sample", "--prompt", "I think", "--reward", reward, "--num-samples", "2", "--steps", "5"]
    )
    out = capsys.readouterr()
    assert code == 0, out.err


@pytest.mark.slow
def test_demo_guidance_moves_the_true_reward(capsys, default_base):
    """Strong guidance (the top of the model card's grid) makes samples clearly positive."""
    means = {}
    for lam in ("0", "256"):
        code = main([*DEFAULT_COMMAND, "--guidance", lam])
        out = capsys.readouterr()
        assert code == 0, out.err
        samples = [json.loads(line) for line in out.out.strip().splitlines()][:-1]
        means[lam] = sum(s["rewards"]["sentiment"] for s in samples) / len(samples)
    assert means["256"] > 0.9 and means["256"] > means["0"] + 0.3
