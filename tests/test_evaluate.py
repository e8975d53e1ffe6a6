"""Evaluation metrics against hand-computed values, and the eval/train commands end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import CORPUS

from fastdia.cli import main
from fastdia.cli_eval import parse_variant
from fastdia.errors import ConfigError
from fastdia.evaluate import perplexity, token_nll


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
    out = tmp_path / "new" / "eval.json"  # a folder that does not exist yet is made
    code = main(
        [
            "eval",
            "--checkpoint",
            str(tiny_pipeline),
            "--base-model",
            str(tiny_model_dir),
            "--lambdas",
            "0,2",
            "--prompt-sets",
            str(prompts),
            "--num-samples",
            "3",
            "--new-tokens",
            "6",
            "--steps",
            "3",
            "--decode",
            "lm",
            "--stop-at",
            "0.9",
            "--tilt",
            "0.5",
            "--lm-temperature",
            "0.7",
            "--baselines",
            "base,base-T0.8,best-of-2@decode,tilt-only,noise-latent,critic",
            "--tilt-only-tilt",
            "0.5,1",
            "--judges",
            f"lm:{tiny_model_dir},afinn,better-profanity",
            "--draws",
            "50",
            "--variant",
            "lm:decode=lm,stop_at=0.9,tilt=0.5,tilt_once=true",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["sets"]["prompts"]
    names = [r["name"] for r in rows]
    assert names == [
        "base model (T=1, top-p 0.95)",
        "base model (T=0.8, top-p 0.95)",
        "best-of-2 (T=0.7, top-p 1)",  # @decode: the decode's temperature, top-p 1
        "tilt-only decode (T=0.7, tilt 0.5)",
        "tilt-only decode (T=0.7, tilt 1)",
        "fastdia, pure-noise latent (ablation)",
        "critic-weighted decoding (T=1, beta 0.5)",
        "fastdia lambda=0",
        "fastdia lambda=2",
        "fastdia lm",
    ]
    assert [r["kind"] for r in rows] == ["baseline"] * 5 + ["ablation", "baseline"] + [
        "fastdia"
    ] * 3
    # the trade-off plot's lines: rows of one family differ in one strength
    families = [(r["family"], r["strength"]) for r in rows]
    assert families[3:5] == [("tilt-only decode", 0.5), ("tilt-only decode", 1.0)]
    assert families[7:9] == [("fastdia", 0.0), ("fastdia", 2.0)]
    assert families[2] == ("best-of-N (T=0.7, top-p 1)", 2.0)
    assert rows[4]["settings"]["tilt"] == 1.0
    assert rows[2]["settings"] == {
        "temperature": 0.7,
        "top_p": 1.0,
        "n": 2,
        "new_tokens": 6,
        "num_samples": 3,
    }
    assert rows[3]["settings"]["latent_weight"] == 0.0
    assert rows[5]["settings"]["noise_latent"] is True
    for row in rows:
        assert row["num_samples"] == 6
        lo, hi = row["ci"]["perplexity"]
        assert lo <= row["perplexity"] <= hi and row["ci_draws"] == 50
        if row["kind"] == "fastdia":
            assert isinstance(row["dominated_by"], list)
        judged = row["judges"]
        assert set(judged) == {f"lm:{tiny_model_dir}", "afinn", "better-profanity"}
        assert 0 <= judged["better-profanity"]["reward_hacking_frac"] <= 1
        tox = row["rewards"]["nontoxic"]
        assert 0 <= tox["toxicity_prob"] <= 1 and 0 <= tox["expected_max_toxicity"] <= 1
        assert "expected_max_toxicity" in row["ci"] and "judge_toxicity_prob" in row["ci"]
        assert judged[f"lm:{tiny_model_dir}"]["perplexity"] > 1
        assert 0 <= judged["afinn"]["positive_frac"] <= 1
        assert 0 <= judged["afinn"]["reward_hacking_frac"] <= 1
        assert "judge_perplexity" in row["ci"] and "judge_positive_frac" in row["ci"]
        assert set(row["rewards"]) == {"sentiment", "nontoxic", "total"}
        assert row["perplexity"] > 1 and 0 < row["distinct_1"] <= 1
        assert 0 <= row["rewards"]["sentiment"]["positive_frac"] <= 1
        assert 0 <= row["degenerate_frac"] <= 1 and row["prompt_gap"] is not None
    assert rows[-1]["settings"]["decode"] == "lm" and rows[-1]["settings"]["stop_at"] == 0.9
    assert rows[-1]["settings"]["tilt_once"] is True
    assert rows[1]["settings"]["temperature"] == 0.8
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fastdia lambda=2" in capsys.readouterr().out
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[2].startswith("| prompts | base model (T=1, top-p 0.95) |")
    assert "Dominance" in out.with_suffix(".md").read_text()
    # the trained checkpoint also drives `fastdia sample`
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tiny_pipeline),
                "--base-model",
                str(tiny_model_dir),
                "--new-tokens",
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


def test_degenerate_rule_by_hand():
    from fastdia.evaluate import is_degenerate

    assert not is_degenerate([1, 2, 3, 4, 5, 6, 7, 8])
    # bigrams (1,2),(2,1) repeat: 2 distinct of 7 < 60%
    assert is_degenerate([1, 2, 1, 2, 1, 2, 1, 2])
    # 3 of 8 tokens are 9: 37.5% > 25%, though its bigrams are all distinct
    assert is_degenerate([9, 1, 9, 2, 9, 3, 4, 5])
    # 2 of 8 is exactly 25%: not more than a quarter
    assert not is_degenerate([9, 1, 9, 2, 3, 4, 5, 6])
    assert not is_degenerate([])


def test_prompt_gap_and_nll_by_hand(tiny_base):
    from fastdia.evaluate import Batch, continuation_nll, summarise

    space = tiny_base.space
    p1, p2 = space.encode("The movie was"), space.encode("I love this")
    c1 = torch.tensor([space.encode(" great and the actors")[:4]] * 2)
    c2 = torch.tensor([space.encode(" film, it is a")[:4]] * 2)
    with torch.no_grad():

        def nll(prompt, cont):
            ids = torch.tensor([prompt + cont])
            logp = torch.log_softmax(tiny_base.model(ids).logits[0].float(), dim=-1)
            return [-logp[len(prompt) + j - 1, tok].item() for j, tok in enumerate(cont)]

    got = continuation_nll(tiny_base, p1, c1)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got[0], torch.tensor(nll(p1, c1[0].tolist())), rtol=1e-4, atol=1e-4)
    batches = [
        Batch(torch.cat([torch.tensor([p1] * 2), c1], 1), p1),
        Batch(torch.cat([torch.tensor([p2] * 2), c2], 1), p2),
    ]

    def reward(texts):
        return {"sentiment": torch.linspace(-0.5, 0.5, len(texts))}

    row, samples = summarise(tiny_base, reward, batches, seconds=0.8)
    own = nll(p1, c1[0].tolist()) * 2 + nll(p2, c2[0].tolist()) * 2
    other = nll(p2, c1[0].tolist()) * 2 + nll(p1, c2[0].tolist()) * 2
    assert row["prompt_gap"] == pytest.approx(
        (sum(other) - sum(own)) / len(own), rel=1e-4, abs=1e-4
    )
    assert row["perplexity"] == pytest.approx(math.exp(sum(own) / len(own)), rel=1e-4)
    assert row["seconds_per_100_tokens"] == pytest.approx(100 * 0.8 / 16)
    assert row["rewards"]["sentiment"]["positive_frac"] == 0.5  # 0.1667, 0.5 of 4
    assert row["degenerate_frac"] == 0.0 and row["num_samples"] == 4
    # the per-sample values behind the intervals
    assert samples.prompt.tolist() == [0, 0, 1, 1] and samples.tokens.tolist() == [4] * 4
    assert samples.positive.tolist() == [0.0, 0.0, 1.0, 1.0]  # -0.5, -0.17 | 0.17, 0.5
    torch.testing.assert_close(
        samples.nll,
        torch.tensor(
            [sum(nll(p1, c1[0].tolist()))] * 2 + [sum(nll(p2, c2[0].tolist()))] * 2,
            dtype=torch.float64,
        ),
        rtol=1e-4,
        atol=1e-4,
    )


def test_best_of_n_keeps_the_best_by_the_score(tiny_base):
    from fastdia.evaluate import best_of_n_method

    seen = []

    def score(texts):
        values = torch.tensor([float(len(t)) for t in texts])
        seen.append(values)
        return values

    prompts = ["The movie", "A long and winding road led to"]
    out, seconds = best_of_n_method(tiny_base, 3, 8, 4, score)(prompts, [0, 1000])
    assert len(seen) == 1 and seen[0].numel() == 2 * 3 * 4  # one batch: 2 prompts x 12
    assert seconds > 0
    for i, (prompt, ids) in enumerate(zip(prompts, out, strict=True)):
        p = tiny_base.space.encode(prompt)
        assert ids.shape == (3, len(p) + 8)  # the prompt, then 8 new tokens
        assert ids[:, : len(p)].tolist() == [p] * 3  # no padding left in
        values = seen[0].view(2, 3, 4)[i]  # 3 outputs, each the best of its own 4 draws
        got = torch.tensor([float(len(t)) for t in tiny_base.space.decode_batch(ids)])
        assert torch.equal(got, values.max(dim=1).values)


def test_padded_prompts_sample_as_alone(default_base):
    """A short prompt padded on the left beside a long one continues as it does alone: at
    a temperature near 0 both draw the argmax, so any leak of the padding into attention
    or positions would change the tokens."""
    from fastdia.data import sample_prompts

    short = default_base.space.encode("The movie")
    long = default_base.space.encode("A long and winding road led to the old house on the hill")
    assert len(long) > len(short) + 3
    cold = {"temperature": 1e-6, "top_p": 1.0}
    together = sample_prompts(default_base, [short, long], 2, 6, **cold)
    alone = [sample_prompts(default_base, [p], 2, 6, **cold)[0] for p in (short, long)]
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a, b)


def test_baseline_specs():
    from fastdia.cli_eval import BaselineSpec, parse_baseline

    assert parse_baseline("base") == BaselineSpec("base", None, 1.0, 0.95)
    assert parse_baseline("base-T0.8") == BaselineSpec("base", None, 0.8, 0.95)
    assert parse_baseline("base-T0.7-P0.9") == BaselineSpec("base", None, 0.7, 0.9)
    assert parse_baseline("best-of-4") == BaselineSpec("best", 4, 1.0, 0.95)
    assert parse_baseline("best-of-16-T0.8-P1") == BaselineSpec("best", 16, 0.8, 1.0)
    decode = parse_baseline("best-of-16@decode")
    assert decode == BaselineSpec("best", 16, None, 0.95) and decode.at(0.8) == (0.8, 1.0)
    assert parse_baseline("critic") == BaselineSpec("critic", None, 1.0, 0.95)
    assert parse_baseline("tilt-only").at(0.7) == (0.7, 1.0)
    assert parse_baseline("noise-latent").kind == "noise-latent"
    bad = ("base-T", "base-Tx", "base-T0", "base-T-1", "base-Tnan", "best-of-0", "best-of-x")
    for spec in (*bad, "base-T1-P1.5", "base-T1-P0", "critic-T0.8", "best", "magic", "x@decode"):
        assert parse_baseline(spec) is None, spec


def test_parse_variant_reads_each_kind_of_setting():
    name, changes = parse_variant(
        "v:decode=lm, steps=20,stop-at=0.5,tilt_once=off,self_condition=false,guidance=3"
    )
    assert name == "v"
    assert changes == {
        "decode": "lm",
        "steps": 20,
        "stop_at": 0.5,
        "tilt_once": False,
        "self_condition": False,
        "guidance": 3.0,
    }
    assert type(changes["steps"]) is int
    for bad, message in [
        ("v:speed=3", "unknown setting 'speed'"),
        ("v:tilt_once=2", "tilt_once needs true or false"),
        ("v:tilt=high", "tilt needs a number"),
        ("v", "must look like NAME:KEY=VALUE"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_variant(bad)


def test_baseline_rows_run_with_the_settings_they_report(
    tmp_path, tiny_model_dir, tiny_base, monkeypatch
):
    """The base model's rows call the sampler with the temperature, top-p, N and length
    their settings report (best-of-N draws N per output sample)."""
    import fastdia.evaluate as ev
    from fastdia.models.checkpoint import save_checkpoint
    from fastdia.models.critic import CriticConfig, build_critic
    from fastdia.models.denoiser import Denoiser, DenoiserConfig

    dim = tiny_base.space.dim
    den = Denoiser(DenoiserConfig(dim=dim, max_length=16, hidden=16, layers=1, heads=2))
    critics = [build_critic(CriticConfig(dim=dim, hidden=8, reward=r)) for r in ("sentiment",)]
    save_checkpoint(tmp_path / "ckpt", den, critics, space=tiny_base.space, base_model="tiny")

    calls = []
    real = ev.sample_prompts

    def record(base, prompts, n, new_tokens, **kw):
        calls.append({"n": n, "new": new_tokens, **kw})
        return real(base, prompts, n, new_tokens, **kw)

    monkeypatch.setattr(ev, "sample_prompts", record)
    prompts = tmp_path / "p.txt"
    prompts.write_text("The movie\n")
    out = tmp_path / "e.json"
    code = main(
        [
            "eval",
            "--base-model",
            str(tiny_model_dir),
            "--prompt-sets",
            str(prompts),
            "--num-samples",
            "2",
            "--new-tokens",
            "5",
            "--steps",
            "2",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--rewards",
            "sentiment",
            "--lm-temperature",
            "0.6",
            "--baselines",
            "base@decode,best-of-3-T0.5-P0.8,base",
            "--judges",
            "none",
            "--draws",
            "20",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())["sets"]["p"][:3]
    assert len(calls) == 3
    for row, call in zip(rows, calls, strict=True):
        s = row["settings"]
        assert call["temperature"] == s["temperature"] and call["top_p"] == s["top_p"]
        assert call["n"] == 2 * (s["n"] or 1) and call["new"] == s["new_tokens"] == 5
    assert [(r["settings"]["temperature"], r["settings"]["top_p"]) for r in rows] == [
        (0.6, 1.0),
        (0.5, 0.8),
        (1.0, 0.95),
    ]


def test_fastdia_rows_write_the_same_texts_in_any_group(default_base):
    """fastdia's eval rows seed every sample by its prompt and index, so a prompt's samples
    are the same whether it runs alone or batched with a longer prompt."""
    from fastdia.evaluate import sampler_method
    from fastdia.pipeline import (
        build_sampler,
        resolve_checkpoint,
        sampler_config,
        sampling_settings,
    )

    checkpoint = resolve_checkpoint(None)
    settings = sampling_settings(checkpoint, steps=4) | {"on_eos": "mask"}
    sampler = build_sampler(
        default_base, sampler_config(settings), rewards=[("sentiment", 1.0)], checkpoint=checkpoint
    ).sampler
    method = sampler_method(sampler, 2, 6)
    prompts = ["The movie was", "My neighbour told me yesterday that the old bakery"]
    together, _ = method(prompts, [0, 1000])
    for prompt, seed, ids in zip(prompts, [0, 1000], together, strict=True):
        alone, _ = method([prompt], [seed])
        assert torch.equal(ids, alone[0])
        assert ids[:, : len(default_base.space.encode(prompt))].tolist()[0] == (
            default_base.space.encode(prompt)
        )


def test_a_nontoxic_row_reports_the_toxicity_metrics_and_hacking(tiny_base):
    """EMT and toxicity probability per prompt, and the toxicity judge's flags and reward
    hacking (non-toxic by the reward, flagged by the judge), by hand."""
    from fastdia.evaluate import Batch, summarise

    space = tiny_base.space
    p1, p2 = space.encode("The movie was"), space.encode("I love this")
    cont = torch.tensor([space.encode(" great and the actors")[:4]] * 2)
    batches = [
        Batch(torch.cat([torch.tensor([p1] * 2), cont], 1), p1),
        Batch(torch.cat([torch.tensor([p2] * 2), cont], 1), p2),
    ]

    def reward(texts):
        return {"nontoxic": torch.tensor([0.9, 0.3, 0.8, 0.6])}  # toxicity .1 .7 | .2 .4

    class Flags:
        kind, name = "toxicity", "flags"

        def toxic(self, texts):
            return [False, True, True, False]

    row, samples = summarise(tiny_base, reward, batches, seconds=1.0, judges=[Flags()])
    tox = row["rewards"]["nontoxic"]
    assert tox["expected_max_toxicity"] == pytest.approx((0.7 + 0.4) / 2)
    assert tox["toxicity_prob"] == pytest.approx(0.5)
    judged = row["judges"]["flags"]
    assert judged["toxic_frac"] == 0.5 and judged["toxicity_prob"] == 1.0
    assert judged["reward_hacking_frac"] == 0.25  # sample 3: toxicity 0.2, flagged
    assert samples.judge_toxic.tolist() == [0.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(
        samples.toxicity, torch.tensor([0.1, 0.7, 0.2, 0.4], dtype=torch.float64)
    )


def test_sentiment_reward_hacking_by_hand(tiny_base):
    """Hacking: samples the reward calls positive that the sentiment judge does not."""
    from fastdia.evaluate import Batch, summarise

    space = tiny_base.space
    p1 = space.encode("The movie was")
    cont = torch.tensor([space.encode(" great and the actors")[:4]] * 4)
    batches = [Batch(torch.cat([torch.tensor([p1] * 4), cont], 1), p1)]

    def reward(texts):
        return {"sentiment": torch.tensor([0.5, 0.5, -0.5, 0.5])}

    class Lexicon:
        kind, name = "sentiment", "lexicon"

        def positive(self, texts):
            return [True, False, False, False]

    row, samples = summarise(tiny_base, reward, batches, seconds=1.0, judges=[Lexicon()])
    judged = row["judges"]["lexicon"]
    assert judged["positive_frac"] == 0.25
    assert judged["reward_hacking_frac"] == 0.5  # samples 2 and 4
    assert samples.judge_positive.tolist() == [1.0, 0.0, 0.0, 0.0]
