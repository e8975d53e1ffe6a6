"""Evaluation metrics against hand-computed values, and the eval/train commands end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import CORPUS

from fastdia.cli import main
from fastdia.evaluate import distinct_n, perplexity, token_nll


def test_distinct_n_by_hand():
    seqs = [[1, 2, 3, 1, 2], [1, 2, 4]]
    # unigrams: 1,2,3,1,2,1,2,4 -> 4 distinct of 8
    assert distinct_n(seqs, 1) == pytest.approx(4 / 8)
    # bigrams: (1,2),(2,3),(3,1),(1,2),(1,2),(2,4) -> 4 distinct of 6
    assert distinct_n(seqs, 2) == pytest.approx(4 / 6)
    assert distinct_n([[5]], 2) == 0.0


def test_perplexity_by_hand(tiny_base):
    ids = torch.tensor(
        [tiny_base.space.encode(CORPUS[0])[:9], tiny_base.space.encode(CORPUS[1])[:9]]
    )
    with torch.no_grad():
        logits = tiny_base.model(ids).logits.float()
    nll = []
    for b in range(2):
        for pos in range(3, 9):  # prompt of 3 tokens: score tokens 3..8
            logp = torch.log_softmax(logits[b, pos - 1], dim=-1)
            nll.append(-logp[ids[b, pos]].item())
    total, count = token_nll(tiny_base, ids, 3)
    assert count == 12 and total == pytest.approx(sum(nll), rel=1e-5)
    assert perplexity(tiny_base, ids, 3) == pytest.approx(math.exp(sum(nll) / 12), rel=1e-5)
    assert token_nll(tiny_base, ids, 0)[1] == 16  # the first token has no context


@pytest.fixture
def tiny_pipeline(tmp_path, tiny_model_dir, capsys):
    """make-data, train-denoiser and train-critic through the CLI on the tiny model."""
    common = ["--base-model", str(tiny_model_dir), "--length", "8", "--no-progress"]
    data = tmp_path / "data"
    (tmp_path / "p.txt").write_text("The movie\nI love\n")
    assert (
        main(
            [
                "make-data",
                *common,
                "--out",
                str(data),
                "--num-sequences",
                "32",
                "--batch-size",
                "16",
                "--prompts",
                str(tmp_path / "p.txt"),
            ]
        )
        == 0
    )
    ckpt = tmp_path / "ckpt"
    train = [
        *common,
        "--data",
        str(data),
        "--out",
        str(ckpt),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--save-every",
        "2",
        "--val-every",
        "2",
        "--warmup",
        "1",
    ]
    assert main(["train-denoiser", *train, "--hidden", "16", "--layers", "1", "--heads", "2"]) == 0
    for reward in ("sentiment", "nontoxic"):
        assert main(["train-critic", *train, "--reward", reward, "--hidden", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["reward"] == "nontoxic"
    assert "spearman" in json.loads(out[-1])["metrics"]
    return ckpt


def test_eval_command_writes_json_and_plot(tmp_path, tiny_model_dir, tiny_pipeline, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie\nI love\n")
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--checkpoint",
            str(tiny_pipeline),
            "--base-model",
            str(tiny_model_dir),
            "--lambdas",
            "0,2",
            "--prompts",
            str(prompts),
            "--num-samples",
            "3",
            "--length",
            "8",
            "--steps",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["base model", "lambda=0", "lambda=2"]
    for row in result["rows"]:
        assert row["num_samples"] == 6
        assert set(row["rewards"]) == {"sentiment", "nontoxic", "total"}
        assert row["perplexity"] > 1 and 0 < row["distinct_1"] <= 1
        assert 0 <= row["rewards"]["sentiment"]["positive_frac"] <= 1
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lambda=2" in capsys.readouterr().out
    # the trained checkpoint also drives `fastdia sample`
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tiny_pipeline),
                "--base-model",
                str(tiny_model_dir),
                "--length",
                "8",
                "--steps",
                "2",
                "--reward",
                "sentiment,nontoxic",
                "--json",
            ]
        )
        == 0
    )


def test_train_bad_input(tmp_path, tiny_model_dir, capsys, monkeypatch):
    common = [
        "--base-model",
        str(tiny_model_dir),
        "--length",
        "8",
        "--no-progress",
        "--out",
        str(tmp_path / "o"),
    ]
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert main(["train-denoiser", *common, "--data", f"text:{short}"]) == 2
    assert "only 0 windows" in capsys.readouterr().err
    text = tmp_path / "ok.txt"
    text.write_text("\n".join(CORPUS))
    assert (
        main(["train-critic", *common, "--data", f"text:{text}", "--reward", "sentiment,nontoxic"])
        == 2
    )
    assert "one critic per reward" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "profanity_check" else real(name, *a),
    )
    assert main(["train-critic", *common, "--data", f"text:{text}", "--reward", "nontoxic"]) == 2
    assert "pip install alt-profanity-check" in capsys.readouterr().err
    assert main(["eval", "--lambdas", "1,-2"]) == 2
    assert "--lambdas must be finite numbers >= 0" in capsys.readouterr().err
