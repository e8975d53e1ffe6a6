"""``fastdia bench sentiment``: the shipped DExperts prompts, the four steering tasks, the
continuation-only scoring and the merged tables with the published rows apart."""

from __future__ import annotations

import json

import pytest
import torch
from test_evaluate import tiny_pipeline  # noqa: F401  (the fixture)

from fastdia import bench_sentiment as bs
from fastdia.cli import main
from fastdia.errors import ConfigError
from fastdia.evaluate import Batch, scored_texts


def test_shipped_sets_and_their_checks(tmp_path):
    sizes = {name: len(bs.load_prompts(name, 995)) for name in bs.SETS}
    assert sizes == {"neutral": 995, "negative": 995, "positive": 995}
    assert bs.load_prompts("neutral", 2) == bs.load_prompts("neutral", 1000)[:2]
    with pytest.raises(ConfigError, match="between 1 and 995"):
        bs.load_prompts("positive", 996)
    with pytest.raises(ConfigError, match="unknown benchmark set 'happy'"):
        bs.load_prompts("happy", 1)
    (tmp_path / "neutral.jsonl").write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    with pytest.raises(ConfigError, match="line 2 is not a JSON object"):
        bs.load_prompts("neutral", 1, folder=tmp_path)
    with pytest.raises(ConfigError, match="is missing"):
        bs.load_prompts("negative", 1, folder=tmp_path)


def test_directions_are_checked_before_any_work():
    assert bs.parse_directions("negative") == ["negative"]
    assert bs.parse_directions("negative, positive") == ["negative", "positive"]
    for bad in ("", "up", "positive,positive"):
        with pytest.raises(ConfigError, match="--directions"):
            bs.parse_directions(bad)
    assert main(["bench", "sentiment", "--directions", "sideways"]) == 2


def test_scoring_reads_the_continuation_alone(tiny_base):
    space = tiny_base.space
    prompt = space.encode("The movie was")
    ids = torch.tensor([prompt + space.encode(" great fun")])
    batch = [Batch(ids, prompt, "The movie was")]
    assert scored_texts(tiny_base, batch, "text") == ["The movie was great fun"]
    assert scored_texts(tiny_base, batch, "continuation") == [" great fun"]
    with pytest.raises(ConfigError, match="score must be one of"):
        scored_texts(tiny_base, batch, "prompt")


def test_bench_runs_every_task_and_prints_the_published_rows_apart(
    tmp_path,
    tiny_model_dir,
    tiny_pipeline,  # noqa: F811
):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "sentiment",
            "--checkpoint",
            str(tiny_pipeline),
            "--base-model",
            str(tiny_model_dir),
            "--num-prompts",
            "2",
            "--samples-per-prompt",
            "2",
            "--new-tokens",
            "4",
            "--steps",
            "2",
            "--baselines",
            "base@decode",
            "--judges",
            "afinn",
            "--draws",
            "20",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == [
        "neutral->positive",
        "negative->positive",
        "neutral->negative",
        "positive->negative",
    ]
    for task, rows in result["tasks"].items():
        assert [r["kind"] for r in rows] == ["baseline", "fastdia"], task
        for row in rows:
            assert row["num_samples"] == 4 and "distinct_3" in row
    pos = json.loads(bs.task_outputs(out, "positive").read_text())
    neg = json.loads(bs.task_outputs(out, "negative").read_text())
    assert pos["config"]["guide"] == "sentiment" and neg["config"]["guide"] == "sentiment:-1"
    assert pos["config"]["score"] == "continuation" and pos["config"]["new_tokens"] == 4
    table = out.with_suffix(".md").read_text()
    assert "## Published rows" in table and "| DExperts | 94.46 | 36.42 |" in table
    ours = table.split("## Published rows")[0]
    assert "| DExperts |" not in ours and "| neutral->positive | fastdia" in ours
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["config"]["directions"] == ["positive", "negative"]


def test_bench_runs_one_direction_alone(tmp_path, tiny_model_dir, tiny_pipeline):  # noqa: F811
    out = tmp_path / "bench.json"
    args = ["bench", "sentiment", "--checkpoint", str(tiny_pipeline)]
    args += ["--base-model", str(tiny_model_dir), "--num-prompts", "1"]
    args += ["--samples-per-prompt", "1", "--new-tokens", "2", "--steps", "2"]
    args += ["--baselines", "none", "--judges", "none", "--draws", "10"]
    assert main([*args, "--directions", "negative", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == ["neutral->negative", "positive->negative"]
    assert not bs.task_outputs(out, "positive").exists()
    assert "| positive->negative | fastdia" in out.with_suffix(".md").read_text()
