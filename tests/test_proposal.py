"""The amortised proposal (fastdia.models.proposal, fastdia.train.proposal): its heads and
their fold against the module, training toward the critics' gradients and its exact
resume, the sampler under it, checkpoints, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from interrupt import assert_same_weights, run_interrupted
from tiny import CORPUS

from fastdia.cli import main
from fastdia.data import windows_from_texts
from fastdia.errors import CheckpointError, ConfigError
from fastdia.models.checkpoint import (
    PROPOSAL_STEM,
    load_checkpoint,
    save_checkpoint,
    save_model,
)
from fastdia.models.critic import CriticConfig, build_critic
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.models.proposal import AmortisedProposal, ProposalConfig, proposal_grad
from fastdia.pipeline import build_sampler
from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic
from fastdia.train.common import OptimConfig
from fastdia.train.proposal import check_imitable, gradient_targets, train_proposal

PROMPT = "The movie"


def _proposal(dim: int, rewards=("sentiment", "nontoxic"), hidden: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return AmortisedProposal(ProposalConfig(dim=dim, rewards=list(rewards), hidden=hidden)).eval()


def _critics(dim: int, hidden: int = 8) -> dict[str, torch.nn.Module]:
    out = {}
    for seed, name in enumerate(("sentiment", "nontoxic")):
        torch.manual_seed(10 + seed)
        out[name] = build_critic(CriticConfig(dim=dim, hidden=hidden, reward=name)).eval()
    return out


# ---- the module ------------------------------------------------------------------------------
def test_heads_mix_by_the_reward_weights_and_the_fold_is_the_module(tiny_base):
    """forward = the heads mixed by the weights, / L; the fold for a mixture and a table of
    times gives the same gradient per row (awkward shapes: 3 rows of 5 positions)."""
    dim = tiny_base.space.dim
    proposal = _proposal(dim)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, dim, generator=g)
    t = torch.tensor([0.9, 0.4, 0.05])
    weights = proposal.reward_weights([("nontoxic", 0.5), ("sentiment", 2.0)])
    assert weights.tolist() == [2.0, 0.5]
    heads = proposal.heads(z, t)
    assert heads.shape == (3, 5, 2, dim) and heads.dtype == torch.float32
    with torch.no_grad():
        got = proposal(z, t, weights)
    torch.testing.assert_close(got, (2.0 * heads[:, :, 0] + 0.5 * heads[:, :, 1]) / 5)
    fold = proposal.fold(weights, t)
    for r in range(3):
        row = proposal_grad(z[r], fold.row(r), 5)  # one sequence at row r's time
        with torch.no_grad():
            want = proposal(z[r : r + 1], t[r], weights)[0]
        torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"no head for keyword:x .*train-proposal"):
        proposal.reward_weights([("keyword:x", 1.0)])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"rewards": []}, "one or more distinct rewards"),
        ({"rewards": ["sentiment", "sentiment"]}, "one or more distinct rewards"),
        ({"rewards": ["sentiment"], "hidden": 0}, "sizes must be positive"),
    ],
)
def test_bad_proposal_configs(kw, message):
    with pytest.raises(ConfigError, match=message):
        ProposalConfig(dim=4, **kw)


# ---- training --------------------------------------------------------------------------------
@pytest.fixture
def data(tiny_base):
    return windows_from_texts(CORPUS * 2, tiny_base, 8, "tiny corpus").split(0.2, seed=0)


def _optim(**kw):
    base = {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup": 2, "save_every": 3, "ema": 0.9}
    return OptimConfig(**{**base, **kw})


def test_training_learns_the_critics_gradients(tmp_path, tiny_base, data):
    """From a random start (relative error about 1 or more, cosine about 0) to a close
    imitation of two critics' per-token gradients on held-out windows at every level."""
    train, hold = data
    critics = _critics(tiny_base.space.dim)
    config = ProposalConfig(dim=tiny_base.space.dim, rewards=["sentiment", "nontoxic"], hidden=64)
    untrained = train_proposal(
        tiny_base, train, hold, critics, tmp_path / "a", config, _optim(steps=1), progress=False
    )
    assert untrained.metrics["rel_err"] > 0.9 and abs(untrained.metrics["cos"]) < 0.3
    config = ProposalConfig(dim=tiny_base.space.dim, rewards=["sentiment", "nontoxic"], hidden=64)
    run = train_proposal(
        tiny_base,
        train,
        hold,
        critics,
        tmp_path / "b",
        config,
        _optim(steps=400, batch_size=16, lr=3e-3, warmup=20, save_every=400),
        progress=False,
    )
    m = run.metrics
    assert m["rel_err"] < 0.25 and m["cos"] > 0.85, m
    for name in ("sentiment", "nontoxic"):
        for level in (0.0, 0.75):
            assert m[f"rel_err@{name}@{level}"] < 0.4, (name, level, m)
    # what was saved is what was measured, and loads with the checkpoint
    save_checkpoint(
        tmp_path / "b",
        Denoiser(DenoiserConfig(dim=tiny_base.space.dim, max_length=8, hidden=8, layers=1)),
        list(critics.values()),
        space=tiny_base.space,
        base_model=tiny_base.name,
    )
    loaded = load_checkpoint(tmp_path / "b", tiny_base.space).proposal
    assert isinstance(loaded, AmortisedProposal)
    assert_same_weights(loaded, run.proposal)
    assert loaded.config.metrics["rel_err"] == pytest.approx(m["rel_err"])


def test_gradient_targets_are_the_critics_per_token_gradients(tiny_base):
    critics = _critics(tiny_base.space.dim)
    z = torch.randn(2, 5, tiny_base.space.dim, requires_grad=True)
    t = torch.tensor([0.3, 0.8])
    got = gradient_targets(list(critics.values()), z.detach(), t)
    for j, critic in enumerate(critics.values()):
        (grad,) = torch.autograd.grad(critic(z, t).sum(), z)
        torch.testing.assert_close(got[:, :, j], grad * 5)


def test_exact_resume(tmp_path, tiny_base, data, monkeypatch):
    train, hold = data
    critics = _critics(tiny_base.space.dim)

    def run(folder, resume=False):
        config = ProposalConfig(dim=tiny_base.space.dim, rewards=["sentiment", "nontoxic"])
        return train_proposal(
            tiny_base, train, hold, critics, folder, config, _optim(), resume=resume, progress=False
        )

    straight = run(tmp_path / "a")
    run_interrupted(monkeypatch, lambda: run(tmp_path / "b"))
    resumed = run(tmp_path / "b", resume=True)
    assert_same_weights(straight.proposal, resumed.proposal)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


def test_only_token_local_critics_are_imitated(tiny_base):
    critics = _critics(tiny_base.space.dim)
    with pytest.raises(
        ConfigError, match=r"no critic for toxicity .*train-critic --reward toxicity"
    ):
        check_imitable(critics, ["sentiment", "toxicity"])
    cfg = CriticConfig(dim=tiny_base.space.dim, kind="context", hidden=8, heads=2, layers=1)
    critics["context"] = build_critic(cfg)
    with pytest.raises(ConfigError, match="critic of context is a context critic"):
        check_imitable(critics, ["context"])


# ---- the sampler -----------------------------------------------------------------------------
def _sampler(tiny_base, tiny_models, proposal, guidance=4.0, **kw):
    denoiser, critic = tiny_models
    cfg = SamplerConfig(
        steps=4,
        guidance=guidance,
        decode="nearest",
        on_eos="mask",
        block_size=4,
        guidance_estimator="proposal",
        **kw,
    )
    return Sampler(
        denoiser,
        tiny_base.space,
        [WeightedCritic("sentiment", critic, 2.0)],
        cfg,
        base_model=tiny_base,
        proposal=proposal,
        proposal_weights=proposal.reward_weights([("sentiment", 2.0)]),
    )


def test_the_step_reads_the_proposals_gradient_and_no_critic(tiny_base, tiny_models):
    """What the fused step receives at every row: the proposal's prediction at the state
    (the module's, times the run's reward weight), and no critic stack."""
    proposal = _proposal(tiny_base.space.dim)
    sampler = _sampler(tiny_base, tiny_models, proposal)
    plan = sampler.plan(2, 8, prompt_tokens=2)
    diffusion = plan.diffusion
    seen = []
    step = diffusion._guided_step

    def spy(*args, **kwargs):
        if kwargs.get("guidance") is diffusion.guidance:
            seen.append((args[0].clone(), kwargs.get("grad"), kwargs.get("critic")))
        return step(*args, **kwargs)

    diffusion._guided_step = spy
    plan.run(PROMPT, seed=3)
    rows = len(diffusion.table)
    guided = [s for s in seen if s[1] is not None]
    assert len(guided) == 2 * rows  # every row of both blocks
    weights = torch.tensor([2.0, 0.0])
    for r, (z, grad, critic) in enumerate(guided[:rows]):
        assert critic is None
        with torch.no_grad():
            want = proposal(z.view(2, -1, z.shape[-1]), diffusion.table.t[r], weights)
        torch.testing.assert_close(grad.view_as(want), want, rtol=1e-5, atol=1e-6)


def test_a_silent_proposal_is_the_unguided_sampler(tiny_base, tiny_models):
    """A proposal that predicts zero gradient leaves every sample as lambda = 0 draws it;
    a real one moves them."""
    silent = _proposal(tiny_base.space.dim)
    with torch.no_grad():
        silent.head.weight.zero_()
        silent.head.bias.zero_()
    out = _sampler(tiny_base, tiny_models, silent, guidance=50.0).sample(
        3, 8, prompt=PROMPT, seed=5
    )
    denoiser, critic = tiny_models
    cfg = SamplerConfig(steps=4, guidance=0.0, decode="nearest", on_eos="mask", block_size=4)
    plain = Sampler(denoiser, tiny_base.space, [WeightedCritic("sentiment", critic)], cfg)
    assert torch.equal(out.tokens, plain.sample(3, 8, prompt=PROMPT, seed=5).tokens)
    loud = _proposal(tiny_base.space.dim, seed=1)
    with torch.no_grad():
        loud.head.bias.normal_(0, 50.0)
    moved = _sampler(tiny_base, tiny_models, loud, guidance=50.0).sample(
        3, 8, prompt=PROMPT, seed=5
    )
    assert not torch.equal(moved.tokens, out.tokens)


def test_bad_proposal_settings(tiny_base, tiny_models):
    denoiser, _ = tiny_models
    with pytest.raises(ConfigError, match=r"MALA rows .*amortised proposal"):
        SamplerConfig(guidance_estimator="proposal", mh_steps=1)
    with pytest.raises(ConfigError, match="'proposal' guides the diffusion with no critic"):
        SamplerConfig(guidance_estimator="proposal", noise_kappa=0.5)
    with pytest.raises(ConfigError, match="needs proposal= and proposal_weights="):
        Sampler(denoiser, tiny_base.space, [], SamplerConfig(guidance_estimator="proposal"))
    other = _proposal(7)
    with pytest.raises(ConfigError, match="belongs to another base model"):
        _sampler(tiny_base, tiny_models, other)
    proposal = _proposal(tiny_base.space.dim)
    with pytest.raises(ConfigError, match="one weight per reward"):
        Sampler(
            denoiser,
            tiny_base.space,
            [],
            SamplerConfig(guidance_estimator="proposal"),
            proposal=proposal,
            proposal_weights=torch.ones(3),
        )


def test_checkpoints_with_and_without_a_proposal(tmp_path, tiny_base, tiny_models):
    """build_sampler takes the folder's proposal.*; a folder without one, a reward it has no
    head for, or a proposal of another base model are clear errors."""
    denoiser, critic = tiny_models
    space = tiny_base.space
    save_checkpoint(tmp_path, denoiser, [critic], space=space, base_model=tiny_base.name)
    config = SamplerConfig(guidance=2.0, guidance_estimator="proposal", decode="nearest")
    with pytest.raises(CheckpointError, match=r"no amortised proposal .*fastdia train-proposal"):
        build_sampler(tiny_base, config, rewards=[("sentiment", 1.0)], checkpoint=tmp_path)
    proposal = _proposal(space.dim, rewards=["sentiment"])
    save_model(proposal, tmp_path, PROPOSAL_STEM, space=space, base_model=tiny_base.name)
    built = build_sampler(tiny_base, config, rewards=[("sentiment", 1.5)], checkpoint=tmp_path)
    assert built.sampler.proposal_weights.tolist() == [1.5]
    assert_same_weights(built.sampler.proposal, proposal)
    with pytest.raises(ConfigError, match="no head for nontoxic"):
        build_sampler(tiny_base, config, rewards=[("nontoxic", 1.0)], checkpoint=tmp_path)
    meta = json.loads((tmp_path / f"{PROPOSAL_STEM}.json").read_text())
    meta["embedding"]["fingerprint"] = "v1-d1-0000"
    (tmp_path / f"{PROPOSAL_STEM}.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(tmp_path, space)


def test_the_command_line(tmp_path, capsys, monkeypatch, tiny_model_dir, tiny_base, tiny_models):
    """train-proposal into a checkpoint folder, then sample with it; bad input exits 2."""
    denoiser, critic = tiny_models
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, denoiser, [critic], space=tiny_base.space, base_model=tiny_base.name)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 2))
    common = ["--base-model", str(tiny_model_dir), "--length", "8", "--no-progress"]
    train = ["train-proposal", *common, "--data", f"text:{corpus}", "--out", str(ckpt)]
    train += ["--steps", "4", "--batch-size", "4", "--warmup", "1", "--hidden", "8"]
    assert main(train) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rewards"] == ["sentiment"] and "rel_err" in report["metrics"]
    sample = ["sample", "--base-model", str(tiny_model_dir), "--checkpoint", str(ckpt)]
    sample += ["--steps", "2", "--new-tokens", "4", "--block-size", "2", "--prompt", PROMPT]
    sample += ["--num-samples", "2", "--reward", "sentiment", "--guidance", "5", "--json"]
    sample += ["--decode", "nearest", "--guidance-estimator", "proposal"]
    assert main(sample) == 0
    assert "summary" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*sample, "--mh-steps", "1"]) == 2
    assert "MALA rows" in capsys.readouterr().err
    assert main([*sample, "--reward", "nontoxic"]) == 2  # the last --reward counts
    assert "no head for nontoxic" in capsys.readouterr().err
    assert main([*train, "--rewards", "nontoxic"]) == 2
    assert "no critic for nontoxic" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(train) == 2
    assert "runs on one process" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    random = ["sample", "--base-model", str(tiny_model_dir), "--random-init", "--steps", "2"]
    random += ["--new-tokens", "4", "--prompt", PROMPT, "--reward", "sentiment"]
    random += ["--guidance", "5", "--guidance-estimator", "proposal", "--decode", "nearest"]
    assert main(random) == 0


def test_the_step_time_benchmark_runs_on_the_demo(tmp_path, default_base):
    """``python -m benchmarks.proposal_step`` on the shipped demo (its proposal.*), at one
    repeat: every part timed, both whole runs, the result file written."""
    from benchmarks import proposal_step
    from fastdia.pipeline import DEMO_CHECKPOINT

    out = tmp_path / "step.json"
    argv = ["--checkpoint", str(DEMO_CHECKPOINT), "--batch", "1", "--new-tokens", "16"]
    proposal_step.main([*argv, "--repeats", "1", "--runs", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["window"] == 32 and result["table_rows"] > 1
    assert all(v > 0 for v in result["parts_s"].values())
    assert set(result["runs"]) == {"critic", "proposal"}
    assert all(r["s_per_100_tokens"] > 0 for r in result["runs"].values())
