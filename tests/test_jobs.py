"""``fastdia generate``: request lines, batching, exact resume after a crash, bad lines;
and the :class:`fastdia.generate.Generator` API it runs on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastdia.cli import main
from fastdia.errors import ConfigError, FastdiaError
from fastdia.generate import Generator, GroupKey
from fastdia.jobs import (
    JobDefaults,
    cut_batches,
    default_seed,
    merge_parts,
    parse_request,
    part_path,
    read_done,
    read_requests,
    run_job,
)

DEFAULTS = JobDefaults("sentiment", None, 8, False, 0)
# the LM decode (so the base model's context limits new tokens), few steps
SETTINGS = {"steps": 3, "on_eos": "mask", "decode": "lm", "stop_at": 0.5}
PROMPTS = ["The movie was", "My day", "I think that the", "Food", "We went to", "Honestly"]


def _write(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def _sorted_lines(path):
    return sorted(path.read_text().splitlines(), key=lambda line: json.loads(line)["id"])


@pytest.fixture(scope="module")
def tiny_generator(tiny_model_dir):
    return Generator(base_model=str(tiny_model_dir), random_init=True, settings=SETTINGS)


def _requests(n=10):
    objs = [{"id": f"r{i:02d}", "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n)]
    objs[3]["new_tokens"] = 4  # a second group
    objs[7]["seed"] = 123
    return objs


# ---- request lines ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": 1, "prompt": "x"', "not valid JSON"),
        ('["x"]', "must be a JSON object"),
        ('{"prompt": "x"}', "'id' must be"),
        ('{"id": true, "prompt": "x"}', "'id' must be"),
        ('{"id": "", "prompt": "x"}', "'id' must be"),
        ('{"id": 1, "prompt": " "}', "'prompt' must be a non-empty string"),
        ('{"id": 1, "prompt": "x", "reward": 3}', "'reward' must be a reward spec"),
        ('{"id": 1, "prompt": "x", "reward": "happiness"}', "'reward': unknown reward"),
        ('{"id": 1, "prompt": "x", "guidance": -1}', "'guidance' must be a finite number"),
        ('{"id": 1, "prompt": "x", "guidance": "big"}', "'guidance' must be a number"),
        ('{"id": 1, "prompt": "x", "new_tokens": 0}', "'new_tokens' must be a positive"),
        ('{"id": 1, "prompt": "x", "new_tokens": 2.5}', "'new_tokens' must be a positive"),
        ('{"id": 1, "prompt": "x", "seed": -2}', "'seed' must be an integer"),
        ('{"id": 1, "prompt": "x", "chat": "yes"}', "'chat' must be true or false"),
        ('{"id": 1, "prompt": "x", "temperature": 1}', "unknown field(s) 'temperature'"),
    ],
)
def test_bad_request_lines_name_the_field(line, message):
    with pytest.raises(ConfigError, match=None) as exc:
        parse_request(line, 1, DEFAULTS)
    assert message in str(exc.value)


def test_requests_fill_in_the_job_defaults_and_seed_by_id():
    req = parse_request('{"id": 7, "prompt": "x"}', 3, DEFAULTS)
    assert (req.id, req.line, req.key) == ("7", 3, GroupKey("sentiment", None, 8, False))
    assert req.seed == default_seed(0, "7") != default_seed(1, "7")
    given = parse_request(
        '{"id": "a", "prompt": "x", "reward": "nontoxic", "guidance": 2, "new_tokens": 4, '
        '"seed": 5, "chat": true}',
        1,
        DEFAULTS,
    )
    assert given.key == GroupKey("nontoxic", 2.0, 4, True) and given.seed == 5


def test_read_requests_keeps_line_numbers_and_refuses_repeated_ids(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n\n{"id": 1, "prompt": "b"}\nnope\n')
    good, bad = read_requests(path, DEFAULTS)
    assert [r.line for r in good] == [1]
    assert [(b.line, b.text) for b in bad] == [(3, '{"id": 1, "prompt": "b"}'), (4, "nope")]
    assert "repeats line 1" in bad[0].error
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="holds no request"):
        read_requests(tmp_path / "empty.jsonl", DEFAULTS)
    with pytest.raises(ConfigError, match="cannot read the input file"):
        read_requests(tmp_path / "missing.jsonl", DEFAULTS)


def test_batches_group_compatible_requests_in_input_order():
    reqs = [parse_request(json.dumps(o), i, DEFAULTS) for i, o in enumerate(_requests(10))]
    batches = cut_batches(reqs, 4)
    assert [[r.id for r in b] for b in batches] == [
        ["r00", "r01", "r02", "r04"],
        ["r05", "r06", "r07", "r08"],
        ["r09"],
        ["r03"],
    ]


# ---- the output file ----------------------------------------------------------------------
def test_read_done_cuts_a_torn_last_line_and_refuses_foreign_files(tmp_path):
    out = tmp_path / "out.jsonl"
    assert read_done(out) == set()
    whole = '{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n'
    out.write_text(whole + '{"id": "c", "te')
    assert read_done(out) == {"a", "b"} and out.read_text() == whole
    out.write_text(whole + "garbage\n")  # complete but unreadable: the last write, redone
    assert read_done(out) == {"a", "b"} and out.read_text() == whole
    out.write_text("garbage\n" + whole)
    with pytest.raises(FastdiaError, match="line 1, is not a fastdia record"):
        read_done(out)
    assert out.read_text() == "garbage\n" + whole  # nothing changed


def test_resume_after_a_crash_and_a_torn_write_gives_the_same_lines(tmp_path, tiny_generator):
    reqs = [parse_request(json.dumps(o), i, DEFAULTS) for i, o in enumerate(_requests(10))]
    full = tmp_path / "full.jsonl"
    report = run_job(tiny_generator, reqs, full, batch_size=4)
    assert report.written == 10 and report.new_tokens == 9 * 8 + 4
    lines = [json.loads(line) for line in full.read_text().splitlines()]
    assert {r["id"] for r in lines} == {f"r{i:02d}" for i in range(10)}
    assert lines[0]["guidance"] == tiny_generator.guidance(None)
    assert next(r for r in lines if r["id"] == "r07")["seed"] == 123

    part = tmp_path / "part.jsonl"
    real = tiny_generator.run_batch
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    tiny_generator.run_batch = crash_on_third
    try:
        with pytest.raises(KeyboardInterrupt):
            run_job(tiny_generator, reqs, part, batch_size=4)
    finally:
        del tiny_generator.run_batch
    assert len(part.read_text().splitlines()) == 8
    # a crash in the middle of the next write: half of one line of the second batch lost
    kept = part.read_text().splitlines(keepends=True)
    part.write_text("".join(kept[:6]) + kept[6][:20])
    report = run_job(tiny_generator, reqs, part, batch_size=4)
    assert report.already_done == 6 and report.written == 4
    assert _sorted_lines(part) == _sorted_lines(full)
    assert run_job(tiny_generator, reqs, part, batch_size=4).written == 0  # all done


def test_a_sharded_run_cut_short_resumes_on_one_process(tmp_path, tiny_generator):
    """Ranks' part files left by a sharded job that died (one with a torn last line) are
    moved into the output in batch order, and the job finishes as one process: the
    output is the uninterrupted one's, byte for byte."""
    reqs = [parse_request(json.dumps(o), i, DEFAULTS) for i, o in enumerate(_requests(10))]
    full = tmp_path / "full.jsonl"
    run_job(tiny_generator, reqs, full, batch_size=4)
    by_id = {json.loads(line)["id"]: line for line in full.read_text().splitlines(True)}
    batches = [[r.id for r in b] for b in cut_batches(reqs, 4)]
    out = tmp_path / "out.jsonl"
    # rank 1 of 2 finished its first batch (batch 1) and tore its next; rank 0 wrote batch 0
    part_path(out, 1).write_text("".join(by_id[i] for i in batches[1]) + by_id[batches[3][0]][:9])
    part_path(out, 0).write_text("".join(by_id[i] for i in batches[0]))
    report = run_job(tiny_generator, reqs, out, batch_size=4)
    assert report.already_done == len(batches[0]) + len(batches[1])
    assert out.read_bytes() == full.read_bytes()
    assert not list(tmp_path.glob("out.jsonl.part-*"))
    # moving parts twice (a crash between the output's write and the parts' removal) adds
    # no id twice
    part_path(out, 0).write_text(by_id[batches[0][0]])
    assert merge_parts(out, {}) == 0 and out.read_bytes() == full.read_bytes()


def test_output_of_another_job_is_refused(tmp_path, tiny_generator):
    reqs = [parse_request(json.dumps(o), i, DEFAULTS) for i, o in enumerate(_requests(8))]
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "zz"}\n')
    with pytest.raises(FastdiaError, match="holds id 'zz' that the input does not"):
        run_job(tiny_generator, reqs, out, batch_size=4)


# ---- the command line -------------------------------------------------------------------
def _argv(tiny_model_dir, inp, out, *extra):
    return [
        "generate",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--base-model",
        str(tiny_model_dir),
        "--random-init",
        "--steps",
        "3",
        "--new-tokens",
        "6",
        "--on-eos",
        "mask",
        "--batch-size",
        "4",
        *extra,
    ]


def test_bad_lines_fail_the_job_before_loading(capsys, monkeypatch, tmp_path, tiny_model_dir):
    import fastdia.base_model

    def heavy(*a, **k):
        raise AssertionError("loaded the base model before validating the input")

    monkeypatch.setattr(fastdia.base_model, "load_base_model", heavy)
    inp = _write(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": ""}])
    code = main(_argv(tiny_model_dir, inp, tmp_path / "out.jsonl"))
    err = capsys.readouterr().err
    assert code == 2 and "line 2: 'prompt' must be a non-empty string" in err
    assert "--skip-bad" in err and not (tmp_path / "out.jsonl").exists()


def test_skip_bad_writes_every_bad_line_to_the_errors_file(capsys, tmp_path, tiny_model_dir):
    objs = [
        {"id": "ok", "prompt": "The movie was"},
        {"id": "empty", "prompt": ""},
        {"id": "long", "prompt": "The movie was", "new_tokens": 1000},  # needs the context
        {"id": "ok2", "prompt": "My day", "new_tokens": 4},
    ]
    inp = _write(tmp_path / "in.jsonl", objs)
    out = tmp_path / "out.jsonl"
    lm = ("--decode", "lm", "--stop-at", "0.5")  # the LM decode: the base model's context
    code = main(_argv(tiny_model_dir, inp, out, "--skip-bad", *lm))
    assert code == 0
    written = {json.loads(line)["id"] for line in out.read_text().splitlines()}
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors").read_text().splitlines()]
    assert written == {"ok", "ok2"}
    assert [e["line"] for e in errors] == [2, 3]
    assert (
        "context of 128 tokens" in errors[1]["error"] and json.loads(errors[1]["text"]) == objs[2]
    )
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["summary"]
    assert summary["written"] == 2 and summary["bad_lines"] == 2
    late = _write(tmp_path / "late.jsonl", [objs[0], objs[2]])  # only the tokenizer sees it
    code = main(_argv(tiny_model_dir, late, tmp_path / "late-out.jsonl", *lm))
    assert code == 2 and "line 2: a prompt of" in capsys.readouterr().err


def test_sigkill_and_resume_give_the_uninterrupted_output(tmp_path, tiny_model_dir):
    """A real process killed with SIGKILL after its first batches, then resumed."""
    inp = _write(tmp_path / "in.jsonl", _requests(24))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "fastdia.cli"]
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    subprocess.run(
        [*cmd, *_argv(tiny_model_dir, inp, full)], check=True, env=env, capture_output=True
    )
    proc = subprocess.Popen(
        [*cmd, *_argv(tiny_model_dir, inp, part)], env=env, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if part.exists() and part.read_text().count("\n") >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    assert 4 <= part.read_text().count("\n") < 24
    subprocess.run(
        [*cmd, *_argv(tiny_model_dir, inp, part)], check=True, env=env, capture_output=True
    )
    assert _sorted_lines(part) == _sorted_lines(full)


# ---- the Python API ---------------------------------------------------------------------
def test_generate_matches_the_sampler_and_a_loaded_model(tiny_model_dir, tiny_generator):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastdia.sampler import sample_rows

    result = tiny_generator.generate(
        ["The movie was", "My day"], new_tokens=6, num_samples=2, seed=[3, 10], batch_size=3
    )
    gens = result.generations
    assert [g.seed for g in gens] == [3, 4, 10, 11] and result.new_tokens == 24
    assert result.tokens_per_s > 0 and set(gens[0].rewards) == {"sentiment", "total"}
    sampler = tiny_generator.assembly("sentiment", None).sampler
    ref = sample_rows(sampler, ["The movie was"] * 2 + ["My day"] * 2, [3, 4, 10, 11], 6)
    assert [g.completion_ids for g in gens] == ref.completion_ids
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    held = Generator(model=model, tokenizer=tokenizer, random_init=True, settings=SETTINGS)
    again = held.generate(["The movie was", "My day"], new_tokens=6, num_samples=2, seed=[3, 10])
    assert [g.text for g in again.generations] == [g.text for g in gens]


def test_generator_bad_input(tiny_model_dir, tiny_generator, tiny_checkpoint_other):
    with pytest.raises(ConfigError, match="unknown sampling setting"):
        Generator(base_model=str(tiny_model_dir), random_init=True, settings={"stepz": 3})
    with pytest.raises(ConfigError, match="pass both model= and tokenizer="):
        Generator(model=object())
    with pytest.raises(ConfigError, match="prompt 1: prompt is empty"):
        tiny_generator.generate(["ok", " "])
    with pytest.raises(ConfigError, match="num_samples must be a positive integer"):
        tiny_generator.generate("ok", num_samples=0)
    with pytest.raises(ConfigError, match="context of 128 tokens"):
        tiny_generator.generate("ok", new_tokens=500)
    with pytest.raises(FastdiaError, match="another base model"):
        Generator(base_model=str(tiny_model_dir), checkpoint=tiny_checkpoint_other).generate("ok")


@pytest.fixture
def tiny_checkpoint_other(tmp_path):
    """A checkpoint trained on another base model's embeddings (width 48, other values)."""
    import torch

    from fastdia.embedding import EmbeddingSpace
    from fastdia.models.checkpoint import save_checkpoint
    from fastdia.models.critic import CriticConfig, build_critic
    from fastdia.models.denoiser import Denoiser, DenoiserConfig

    torch.manual_seed(1)
    space = EmbeddingSpace(torch.randn(320, 48), None)
    den = Denoiser(DenoiserConfig(dim=48, max_length=16, hidden=16, layers=1, heads=2))
    critic = build_critic(CriticConfig(dim=48, hidden=8, reward="sentiment"))
    save_checkpoint(tmp_path / "other", den, [critic], space=space, base_model="other")
    return tmp_path / "other"
