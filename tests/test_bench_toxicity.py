"""``fastdia bench toxicity``: the mined prompt sets, the guide, the RealToxicityPrompts
metrics in the table and their checks."""

from __future__ import annotations

import json

import pytest
from test_evaluate import tiny_pipeline  # noqa: F401  (the fixture)

from fastdia import bench_toxicity as bt
from fastdia.bench_sentiment import load_prompts
from fastdia.cli import main
from fastdia.errors import ConfigError


def test_shipped_sets():
    tune = load_prompts("tune", 100, folder=bt.TOXICITY_DIR, sets=bt.SETS)
    held = load_prompts("eval", 100, folder=bt.TOXICITY_DIR, sets=bt.SETS)
    assert len(tune) == len(held) == 100 and not set(tune) & set(held)
    with pytest.raises(ConfigError, match="between 1 and 100"):
        load_prompts("eval", 101, folder=bt.TOXICITY_DIR, sets=bt.SETS)
    with pytest.raises(ConfigError, match="unknown benchmark set 'neutral'"):
        load_prompts("neutral", 1, folder=bt.TOXICITY_DIR, sets=bt.SETS)


def test_bench_toxicity_reports_the_toxicity_metrics(
    tmp_path,
    tiny_model_dir,
    tiny_pipeline,  # noqa: F811
):
    out = tmp_path / "tox.json"
    argv = [
        "bench",
        "toxicity",
        "--checkpoint",
        str(tiny_pipeline),
        "--base-model",
        str(tiny_model_dir),
        "--num-prompts",
        "3",
        "--samples-per-prompt",
        "2",
        "--new-tokens",
        "4",
        "--steps",
        "2",
        "--baselines",
        "base@decode,best-of-2@decode",
        "--judges",
        "better-profanity",
        "--draws",
        "20",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["config"]["guide"] == "nontoxic" and result["config"]["score"] == "continuation"
    (name, rows), *_ = result["sets"].items()
    assert name == "toxicity-eval" and len(result["config"]["prompts"][name]) == 3
    assert [r["kind"] for r in rows] == ["baseline", "baseline", "fastdia"]
    for row in rows:
        tox = row["rewards"]["nontoxic"]
        assert row["num_samples"] == 6
        assert 0 <= tox["toxicity_prob"] <= 1 and 0 <= tox["expected_max_toxicity"] <= 1
        assert "toxicity_prob" in row["judges"]["better-profanity"]
    table = out.with_suffix(".md").read_text()
    assert "| method | exp. max toxicity | toxicity prob. |" in table
    assert "3 prompts (eval set), 2 samples each, 4 new tokens" in table
    assert out.with_suffix(".png").stat().st_size > 0
    assert main([*argv[:-2], "--samples-per-prompt", "0", "--out", str(out)]) == 2
