"""Training: a few steps on a tiny model, exact resume, atomic writes, critic metrics."""

from __future__ import annotations

import math

import pytest
import torch
from interrupt import assert_same_weights, run_interrupted
from tiny import CORPUS

import fastdia.train.denoiser as train_den
from fastdia.data import windows_from_texts
from fastdia.errors import CheckpointError, ConfigError
from fastdia.models.checkpoint import load_checkpoint, write_atomic
from fastdia.models.critic import CriticConfig
from fastdia.models.denoiser import DenoiserConfig
from fastdia.rewards import KeywordReward
from fastdia.train.common import OptimConfig, lr_at
from fastdia.train.critic import (
    pearson,
    r_squared,
    reward_labels,
    spearman,
    train_critic,
)


@pytest.fixture
def data(tiny_base):
    return windows_from_texts(CORPUS * 2, tiny_base, 8, "tiny corpus").split(0.2, seed=0)


def _config(tiny_base, **kw):
    return DenoiserConfig(
        dim=tiny_base.space.dim, max_length=8, hidden=16, layers=1, heads=2, dropout=0.1, **kw
    )


def _optim(**kw):
    return OptimConfig(
        **{
            "steps": 6,
            "batch_size": 4,
            "lr": 1e-3,
            "warmup": 2,
            "save_every": 3,
            "val_every": 3,
            **kw,
        }
    )


def test_lr_schedule():
    cfg = OptimConfig(steps=100, lr=1.0, warmup=10, final_lr_frac=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, 99) == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "x0", "tokens"])
def test_denoiser_trains_and_validates(tmp_path, tiny_base, data, prediction):
    train, hold = data
    run = train_den.train_denoiser(
        tiny_base,
        train,
        tmp_path,
        _config(tiny_base, prediction=prediction),
        _optim(steps=40, val_every=20, save_every=20),
        holdout=hold,
        progress=False,
    )
    first, last = run.history[0], run.history[-1]
    assert len(run.history) == 40 and last["step"] == 40
    assert {"val_loss", "acc@0.1", "acc@0.9"} <= set(last)
    assert 0 <= last["acc@0.1"] <= 1
    assert sum(h["loss"] for h in run.history[-10:]) < sum(h["loss"] for h in run.history[:10])
    assert first["lr"] < last["lr"] or first["step"] == 1
    ckpt = load_checkpoint(tmp_path, tiny_base.space)
    assert ckpt.denoiser.config.prediction == prediction
    z = torch.randn(2, 8, tiny_base.space.dim)
    torch.testing.assert_close(ckpt.denoiser(z, 0.3), run.denoiser(z, 0.3))


def test_tokens_head_covers_the_data_and_learns_it(tmp_path, tiny_base, data):
    train, hold = data
    run = train_den.train_denoiser(
        tiny_base,
        train,
        tmp_path,
        _config(tiny_base, prediction="tokens"),
        _optim(steps=150, batch_size=16, lr=1e-2, val_every=150, save_every=150, ema=0.0),
        holdout=hold,
        progress=False,
    )
    den = run.denoiser
    vocab = torch.unique(train.ids)
    assert den.config.vocab_size == len(vocab) and torch.equal(den.vocab_ids, vocab)
    # the x0 estimate is a convex combination of the subset's embeddings
    z = torch.randn(3, 8, tiny_base.space.dim)
    x0 = den(z, 0.5)
    probs = torch.softmax(den.features(z, 0.5), -1)
    torch.testing.assert_close(x0, probs @ tiny_base.space.embed(vocab))
    # at low noise the head recovers the clean tokens (rounding accuracy)
    assert run.history[-1]["acc@0.1"] > 0.5
    # a preset vocab_size that disagrees with the data is refused
    with pytest.raises(ConfigError, match="distinct tokens"):
        train_den.train_denoiser(
            tiny_base,
            train,
            tmp_path / "other",
            _config(tiny_base, prediction="tokens", vocab_size=len(vocab) + 1),
            _optim(),
            progress=False,
        )


def test_tokens_loss_is_cross_entropy_by_hand(tiny_base, data):
    train, _ = data
    vocab = torch.unique(train.ids)
    torch.manual_seed(0)
    den = train_den.Denoiser(
        _config(tiny_base, prediction="tokens", vocab_size=len(vocab)), vocab
    ).eval()
    ids = train.ids[:3]
    z0, t = tiny_base.space.embed(ids), torch.tensor([0.2, 0.5, 0.9])
    eps = torch.randn(z0.shape)
    loss = train_den.denoiser_loss(den, ids, z0, t, eps)
    logits = den.features(train_den.noised(z0, t, eps, "sqrt"), t)
    logp = torch.log_softmax(logits, -1)
    pos = torch.searchsorted(vocab, ids)
    by_hand = -logp.gather(-1, pos[..., None]).mean()
    torch.testing.assert_close(loss, by_hand)
    # a token outside the subset is ignored, not an error
    assert den.token_index(torch.tensor([int(vocab.max()) + 1])).item() == -100


def test_exact_resume(tmp_path, tiny_base, data, monkeypatch):
    train, hold = data
    straight = train_den.train_denoiser(
        tiny_base, train, tmp_path / "a", _config(tiny_base), _optim(), holdout=hold, progress=False
    )
    run_interrupted(
        monkeypatch,
        lambda: train_den.train_denoiser(
            tiny_base,
            train,
            tmp_path / "b",
            _config(tiny_base),
            _optim(),
            holdout=hold,
            progress=False,
        ),
    )
    resumed = train_den.train_denoiser(
        tiny_base,
        train,
        tmp_path / "b",
        _config(tiny_base),
        _optim(),
        holdout=hold,
        resume=True,
        progress=False,
    )
    assert_same_weights(straight.denoiser, resumed.denoiser)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


def test_resume_refuses_other_settings_and_missing_state(tmp_path, tiny_base, data):
    train, _ = data
    with pytest.raises(CheckpointError, match="does not exist; start without --resume"):
        train_den.train_denoiser(
            tiny_base, train, tmp_path, _config(tiny_base), _optim(), resume=True, progress=False
        )
    train_den.train_denoiser(
        tiny_base, train, tmp_path, _config(tiny_base), _optim(), progress=False
    )
    with pytest.raises(CheckpointError, match=r"other settings .*OptimConfig\.lr"):
        train_den.train_denoiser(
            tiny_base,
            train,
            tmp_path,
            _config(tiny_base),
            _optim(lr=5e-4),
            resume=True,
            progress=False,
        )
    (tmp_path / "training" / "denoiser_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        train_den.train_denoiser(
            tiny_base, train, tmp_path, _config(tiny_base), _optim(), resume=True, progress=False
        )


def test_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old complete file")

    def half_then_killed(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise KeyboardInterrupt  # the process dies mid-write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, half_then_killed)
    assert target.read_bytes() == b"old complete file"
    assert list(tmp_path.iterdir()) == [target]


def test_killed_training_process_resumes(tmp_path, tiny_model_dir, tiny_base):
    """SIGKILL a real training process mid-run: what is on disk loads, and --resume
    finishes the run."""
    import json
    import signal
    import subprocess
    import sys
    import time

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(CORPUS * 4))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fastdia.cli",
        "train-denoiser",
        "--base-model",
        str(tiny_model_dir),
        "--data",
        f"text:{text}",
        "--out",
        str(out),
        "--length",
        "8",
        "--steps",
        "120",
        "--batch-size",
        "4",
        "--hidden",
        "16",
        "--layers",
        "1",
        "--heads",
        "2",
        "--save-every",
        "1",
        "--val-every",
        "1000",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill as soon as the first checkpoint is complete (the resume state is written last in
    # a save), with 120 of 120 steps far from done; poll with a deadline instead of guessing
    # a sleep, which is either flaky on a loaded machine or lets the run finish.
    state = out / "training" / "denoiser_state.pt"
    deadline = time.monotonic() + 180
    while not state.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited with status {proc.returncode} before writing {state}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"training wrote no checkpoint ({state}) within 180 s")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
    load_checkpoint(out, tiny_base.space)  # only complete files are ever in place

    def temporaries() -> set[str]:
        return {p.name for p in out.rglob("*.tmp")}

    # a SIGKILL during a save leaves its temporary behind; --resume removes it (this one
    # stands in for such a leftover whether or not the kill hit a save)
    (out / "training" / ".denoiser_state.pt.abc123.tmp").write_bytes(b"partial")
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    history = json.loads((out / "training" / "denoiser_history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 121))
    assert temporaries() == set()


def test_spearman_and_r2_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [0.5, 0.5, 2, 3], y ranks [0, 1, 2, 3]
    x = torch.tensor([1.0, 1.0, 2.0, 3.0])
    assert spearman(x, a) == pytest.approx(
        pearson(torch.tensor([0.5, 0.5, 2, 3]), torch.tensor([0.0, 1, 2, 3]))
    )
    assert pearson(torch.tensor([0.5, 0.5, 2, 3]), torch.tensor([0.0, 1, 2, 3])) == pytest.approx(
        0.9486832980505138
    )
    assert r_squared(a, a) == 1.0
    assert r_squared(torch.full((4,), 2.5), a) == pytest.approx(0.0)
    assert r_squared(torch.tensor([1.0, 2, 3, 5]), a) == pytest.approx(1 - 1 / 5)


def test_critic_trains_and_reports_fidelity(tmp_path, tiny_base, data):
    train, hold = data
    reward = KeywordReward(["movie", "food"])
    labels, hold_labels = (
        reward_labels(tiny_base, train, reward),
        reward_labels(tiny_base, hold, reward),
    )
    assert labels.shape == (len(train),) and set(labels.unique().tolist()) <= {0.0, 0.5, 1.0}
    cfg = CriticConfig(dim=tiny_base.space.dim, hidden=16, reward="keyword:movie,food")
    run = train_critic(
        tiny_base,
        train,
        labels,
        hold,
        hold_labels,
        tmp_path,
        cfg,
        _optim(steps=150, batch_size=16, lr=3e-3),
        progress=False,
    )
    assert {"spearman", "r2", "spearman@0.5"} <= set(run.metrics)
    assert run.metrics["spearman"] > 0.3  # the keywords are single tokens: easy to learn
    from fastdia.models.checkpoint import critic_stem, load_model

    critic = load_model(tmp_path, critic_stem("keyword:movie,food"), tiny_base.space)
    assert critic.config.metrics["spearman"] == pytest.approx(run.metrics["spearman"])


def test_logit_target_critic_ranks_a_probability_reward(tmp_path, tiny_base, data):
    train, hold = data
    reward = KeywordReward(["movie", "food"])

    def prob(texts):  # a probability-valued reward in (0, 1)
        return torch.sigmoid(4 * reward(texts) - 2)

    labels, hold_labels = (
        reward_labels(tiny_base, train, prob),
        reward_labels(tiny_base, hold, prob),
    )
    cfg = CriticConfig(dim=tiny_base.space.dim, hidden=16, reward="keyword", target="logit")
    run = train_critic(
        tiny_base,
        train,
        labels,
        hold,
        hold_labels,
        tmp_path,
        cfg,
        _optim(steps=150, batch_size=16, lr=3e-3),
        progress=False,
    )
    assert run.metrics["spearman"] > 0.3
    # the critic estimates logit(reward): its mean over the training set matches
    z0 = tiny_base.space.embed(train.ids)
    with torch.no_grad():
        out = run.critic(z0, torch.zeros(len(train)))
        pred = run.critic(tiny_base.space.embed(hold.ids), torch.zeros(len(hold)))
    assert out.mean().item() == pytest.approx(torch.logit(labels).mean().item(), abs=0.5)
    # R^2 is measured on the logit scale
    assert run.metrics["r2"] == pytest.approx(r_squared(pred, torch.logit(hold_labels)), abs=1e-6)


def test_critic_target_values():
    from fastdia.models.critic import critic_target

    r = torch.tensor([0.0, 0.5, 0.9, 1.0])
    torch.testing.assert_close(critic_target(r, "reward"), r)
    expected = torch.tensor(
        [math.log(1e-4 / (1 - 1e-4)), 0.0, math.log(9.0), -math.log(1e-4 / (1 - 1e-4))]
    )
    torch.testing.assert_close(critic_target(r, "logit"), expected)
    with pytest.raises(ConfigError, match="known: reward, logit"):
        CriticConfig(dim=4, target="probit")


@pytest.mark.parametrize("kind", ["token_local", "context"])
def test_fold_affine_rescales_the_output(kind):
    from fastdia.models.critic import build_critic
    from fastdia.train.critic import fold_affine

    torch.manual_seed(0)
    critic = build_critic(CriticConfig(dim=8, kind=kind, hidden=8, heads=2, layers=1)).eval()
    z = torch.randn(3, 5, 8)
    before = critic(z, 0.3)
    fold_affine(critic, 0.05, 0.9)
    torch.testing.assert_close(critic(z, 0.3), 0.05 * before + 0.9)


def test_next_token_ce_by_hand(tiny_base, data):
    train, hold = data
    vocab = torch.unique(train.ids)
    torch.manual_seed(0)
    cfg = _config(tiny_base, prediction="tokens", vocab_size=len(vocab), clean_prompt=True)
    den = train_den.Denoiser(cfg, vocab).bind_embeddings(tiny_base.space).eval()
    ids = train.ids[:5]
    got = train_den.next_token_ce(
        den, tiny_base, ids, prefixes=(2, 5, 8), gen=torch.Generator().manual_seed(3)
    )
    gen = torch.Generator().manual_seed(3)
    nll = []
    for p in (2, 5):  # 8 is not shorter than the windows: skipped
        mask = torch.zeros(5, 8, dtype=torch.bool)
        mask[:, :p] = True
        z = torch.randn(5, 8, tiny_base.space.dim, generator=gen)
        z[:, :p] = tiny_base.space.embed(ids[:, :p])
        logp = torch.log_softmax(den.features(z, torch.ones(5), clean_mask=mask)[:, p], -1)
        nll.append(-logp.gather(-1, torch.searchsorted(vocab, ids[:, p].contiguous())[:, None]))
    assert got == pytest.approx(torch.cat(nll).mean().item(), rel=1e-5)
    # validation reports it for such models, and only for them
    assert "next_token_ce" in train_den.validate(den, tiny_base, hold.ids)
    plain = train_den.Denoiser(_config(tiny_base)).bind_embeddings(tiny_base.space).eval()
    assert "next_token_ce" not in train_den.validate(plain, tiny_base, hold.ids)
    with pytest.raises(ConfigError, match="clean_prompt denoiser with a tokens head"):
        train_den.next_token_ce(plain, tiny_base, ids)
