"""Denoiser, critics, and checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from fastdia.embedding import EmbeddingSpace
from fastdia.errors import CheckpointError, ConfigError
from fastdia.models.checkpoint import (
    critic_stem,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from fastdia.models.critic import CriticConfig, TokenLocalCritic, build_critic
from fastdia.models.denoiser import Denoiser, DenoiserConfig


def test_denoiser_shapes_and_time_dependence():
    torch.manual_seed(0)
    den = Denoiser(DenoiserConfig(dim=24, max_length=16, hidden=32, layers=2, heads=4)).eval()
    z = torch.randn(3, 11, 24)
    out = den(z, 0.5)
    assert out.shape == z.shape and out.dtype == torch.float32
    assert torch.allclose(den(z, torch.full((3,), 0.5)), out)
    assert not torch.allclose(den(z, 0.1), out)
    # bidirectional: the first token's output depends on the last token
    z2 = z.clone()
    z2[:, -1] += 1
    assert not torch.allclose(den(z2, 0.5)[:, 0], out[:, 0])
    with pytest.raises(ConfigError, match="at most 16 tokens"):
        den(torch.randn(1, 17, 24), 0.5)


def test_config_validation():
    with pytest.raises(ConfigError, match="known: eps, x0, tokens"):
        DenoiserConfig(dim=8, prediction="v")
    with pytest.raises(ConfigError, match="size of a 'tokens' head"):
        DenoiserConfig(dim=8, vocab_size=5)
    with pytest.raises(ConfigError, match="vocab_size > 0"):
        Denoiser(DenoiserConfig(dim=8, hidden=8, heads=2, prediction="tokens"))
    with pytest.raises(ConfigError, match="distinct token ids"):
        Denoiser(
            DenoiserConfig(dim=8, hidden=8, heads=2, prediction="tokens", vocab_size=3),
            torch.tensor([1, 1, 2]),
        )
    with pytest.raises(ConfigError, match="multiple of heads"):
        DenoiserConfig(dim=8, hidden=30, heads=4)
    with pytest.raises(ConfigError, match="known: token_local, context"):
        CriticConfig(dim=8, kind="mlp")


@pytest.mark.parametrize("time_conditioned", [True, False])
def test_token_local_critic_closed_form_gradient(time_conditioned):
    torch.manual_seed(0)
    critic = TokenLocalCritic(CriticConfig(dim=20, hidden=12, time_conditioned=time_conditioned))
    critic.double()
    z = torch.randn(3, 7, 20, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    h = critic(z, t)
    (auto,) = torch.autograd.grad(h.sum(), z)
    h2, grad = critic.value_and_grad(z.detach(), t)
    torch.testing.assert_close(h2, h.detach())
    torch.testing.assert_close(grad, auto)
    # token-local: a token's gradient does not depend on the other tokens
    z3 = z.detach().clone()
    z3[:, 1:] = torch.randn_like(z3[:, 1:])
    _, grad3 = critic.value_and_grad(z3, t)
    torch.testing.assert_close(grad3[:, 0], grad[:, 0])
    if time_conditioned:
        assert not torch.allclose(critic(z, 0.1), critic(z, 0.9))


def test_context_critic_gradient_is_autograd_and_contextual():
    torch.manual_seed(0)
    critic = build_critic(CriticConfig(dim=16, kind="context", hidden=16, layers=1, heads=2))
    z = torch.randn(2, 5, 16)
    h, grad = critic.value_and_grad(z, 0.3)
    assert h.shape == (2,) and grad.shape == z.shape
    eps = 1e-3
    z_plus = z.clone()
    z_plus[0, 2, 3] += eps
    numeric = (critic(z_plus, 0.3)[0] - critic(z, 0.3)[0]) / eps
    assert numeric.item() == pytest.approx(grad[0, 2, 3].item(), rel=0.05, abs=1e-4)
    z_other = z.clone()
    z_other[:, 4] += 1
    assert not torch.allclose(critic.value_and_grad(z_other, 0.3)[1][:, 0], grad[:, 0])


@pytest.fixture
def space():
    torch.manual_seed(0)
    return EmbeddingSpace(torch.randn(100, 16), tokenizer=None)


def _models(dim=16):
    torch.manual_seed(1)
    den = Denoiser(DenoiserConfig(dim=dim, max_length=8, hidden=16, layers=1, heads=2))
    c1 = build_critic(
        CriticConfig(dim=dim, hidden=8, reward="sentiment", metrics={"spearman": 0.8})
    )
    c2 = build_critic(
        CriticConfig(dim=dim, kind="context", hidden=8, heads=2, reward="keyword:a,b")
    )
    return den, [c1, c2]


def test_checkpoint_round_trip(tmp_path, space):
    den, critics = _models()
    save_checkpoint(tmp_path, den, critics, space=space, base_model="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            "denoiser.json",
            "denoiser.safetensors",
            "critic-sentiment.json",
            "critic-sentiment.safetensors",
            f"{critic_stem('keyword:a,b')}.json",
            f"{critic_stem('keyword:a,b')}.safetensors",
        ]
    )
    ckpt = load_checkpoint(tmp_path, space)
    z = torch.randn(2, 8, 16)
    torch.testing.assert_close(ckpt.denoiser(z, 0.4), den.eval()(z, 0.4))
    assert set(ckpt.critics) == {"sentiment", "keyword:a,b"}
    torch.testing.assert_close(ckpt.critics["sentiment"](z, 0.2), critics[0](z, 0.2))
    assert ckpt.critics["sentiment"].config.metrics == {"spearman": 0.8}
    meta = json.loads((tmp_path / "denoiser.json").read_text())
    assert meta["embedding"]["fingerprint"] == space.fingerprint
    assert not list(tmp_path.glob("*.tmp"))


def test_tokens_denoiser_round_trip_binds_embeddings(tmp_path, space):
    torch.manual_seed(2)
    vocab = torch.tensor([40, 3, 17, 99, 5])
    cfg = DenoiserConfig(
        dim=16, max_length=8, hidden=16, layers=1, heads=2, prediction="tokens", vocab_size=5
    )
    den = Denoiser(cfg, vocab).eval()
    z = torch.randn(2, 8, 16)
    with pytest.raises(ConfigError, match="bind_embeddings"):
        den(z, 0.4)
    den.bind_embeddings(space)
    assert torch.equal(den.vocab_ids, vocab.sort().values)
    save_checkpoint(tmp_path, den, [], space=space, base_model="tiny")
    loaded = load_checkpoint(tmp_path, space).denoiser
    torch.testing.assert_close(loaded(z, 0.4), den(z, 0.4))
    # the embeddings are not stored in the checkpoint: they come from the base model
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "denoiser.safetensors")) >= {"vocab_ids"}
    assert "token_embeddings" not in load_file(tmp_path / "denoiser.safetensors")


def test_checkpoint_of_another_base_model_fails(tmp_path, space):
    den, critics = _models()
    save_checkpoint(tmp_path, den, critics, space=space, base_model="tiny")
    other = EmbeddingSpace(space.weight + 0.01, tokenizer=None)
    with pytest.raises(CheckpointError, match="another base model's embeddings"):
        load_checkpoint(tmp_path, other)


def test_corrupt_and_missing_files_fail_clearly(tmp_path, space):
    den, critics = _models()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", space)
    save_checkpoint(tmp_path, den, critics, space=space, base_model="tiny")
    (tmp_path / "critic-sentiment.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path, space)
    (tmp_path / "critic-sentiment.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path, space)
    (tmp_path / "denoiser.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path, "denoiser", space)
    (tmp_path / "denoiser.json").unlink()
    with pytest.raises(CheckpointError, match=r"denoiser\.json is missing"):
        load_checkpoint(tmp_path, space)


def test_weights_that_do_not_match_the_config_fail(tmp_path, space):
    den, critics = _models()
    save_checkpoint(tmp_path, den, critics[:1], space=space, base_model="tiny")
    meta = json.loads((tmp_path / "denoiser.json").read_text())
    meta["config"]["hidden"] = 32
    (tmp_path / "denoiser.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_model(tmp_path, "denoiser", space)
