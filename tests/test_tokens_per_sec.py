"""``python -m benchmarks.tokens_per_sec`` on the CPU with the tiny base model: the JSON
lines, the skipped backends and their reasons, the plot, the reproducing commands."""

from __future__ import annotations

import json
import shlex

import pytest

tps = pytest.importorskip("benchmarks.tokens_per_sec")


def _run(tiny_model_dir, out, *extra):
    args = [
        "--base-model",
        str(tiny_model_dir),
        "--batch",
        "1,2",
        "--new-tokens",
        "8",
        "--steps",
        "3",
        "--best-of",
        "2",
        "--repeats",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        *(() if "--decode" in extra else ("--decode", "nearest")),
        *extra,
    ]
    assert tps.main(args) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_rows_plot_and_skips(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "tps.jsonl"
    rows = _run(tiny_model_dir, out, "--backends", "reference,triton,triton+graph,cuda+graph")
    kinds = [(r["config"]["method"], r["config"]["backend"], r["config"]["batch"]) for r in rows]
    assert kinds == [
        ("fastdia", "reference", 1),
        ("fastdia", "reference", 2),
        ("fastdia", "triton", 1),
        ("fastdia", "triton", 2),
        ("fastdia", "triton+graph", 1),
        ("fastdia", "triton+graph", 2),
        ("fastdia", "cuda+graph", 1),
        ("fastdia", "cuda+graph", 2),
        ("hf_generate", None, 1),
        ("best_of_n", None, 1),
        ("hf_generate", None, 2),
        ("best_of_n", None, 2),
    ]
    timed = [r for r in rows if "skipped" not in r]
    assert [r["config"]["backend"] for r in rows if "skipped" in r] == [
        "triton",
        "triton",
        "triton+graph",
        "triton+graph",
        "cuda+graph",
        "cuda+graph",
    ]
    assert all(r["skipped"] for r in rows if "skipped" in r)  # every skip says why
    for r in timed:
        assert "error" not in r, r.get("error")
        c = r["config"]
        assert r["tokens_per_s"] == pytest.approx(
            c["batch"] * c["new_tokens"] / r["seconds_median"]
        )
        assert r["peak_memory_bytes"] > 0 and r["device"] == "cpu" and r["git_sha"]
        assert r["versions"]["torch"] and r["date"]
        if c["method"] == "fastdia":
            assert r["ms_per_step"] == pytest.approx(1e3 * r["seconds_median"] / 3)
            assert r["tokens_shape"] == [c["batch"], 8]
        else:
            assert r["ms_per_step"] is None
    assert [r["config"]["best_of"] for r in timed if r["config"]["method"] == "best_of_n"] == [2, 2]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "skipped: CUDA graphs need a CUDA device" in printed and f"wrote {out}" in printed


def test_each_row_names_the_command_that_reproduces_it(tiny_model_dir, tmp_path):
    rows = _run(tiny_model_dir, tmp_path / "tps.jsonl", "--methods", "fastdia,best_of_n")
    parser = tps.build_parser()
    for row in rows:
        argv = shlex.split(row["command"])
        assert argv[:3] == ["python", "-m", "benchmarks.tokens_per_sec"]
        again = tps._resolve(parser.parse_args(argv[3:]))
        c = row["config"]
        assert again.methods == [c["method"]] and again.batch == [c["batch"]]
        assert again.new_tokens == [c["new_tokens"]] and again.base_model == c["base_model"]
        if c["method"] == "fastdia":
            assert again.backends == [c["backend"]] and again.steps == [c["steps"]]
        else:
            assert again.best_of == [c["best_of"]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backends", "onnx"], "unknown backend 'onnx'"),
        (["--methods", "beam"], "unknown method"),
        (["--decode", "beam"], "unknown decode 'beam'"),
    ],
)
def test_bad_options_fail_with_status_2(tmp_path, capsys, extra, message):
    assert tps.main([*extra, "--out", str(tmp_path / "x.jsonl")]) == 2
    assert message in capsys.readouterr().err


def test_lm_decode_rows_time_the_default_sampling_path(tiny_model_dir, tmp_path):
    """--decode lm: the sampler with the base model as prior (the demo's LM-decode weights),
    next to the diffusion loop alone; the command reproduces the decode."""
    rows = _run(
        tiny_model_dir,
        tmp_path / "tps.jsonl",
        *("--methods", "fastdia", "--backends", "reference", "--decode", "lm,nearest"),
    )
    assert [(r["config"]["decode"], r["config"]["batch"]) for r in rows] == [
        ("lm", 1),
        ("lm", 2),
        ("nearest", 1),
        ("nearest", 2),
    ]
    for r in rows:
        assert "error" not in r and r["tokens_shape"] == [r["config"]["batch"], 8]
        argv = shlex.split(r["command"])
        assert argv[argv.index("--decode") + 1] == r["config"]["decode"]
