"""``fastdia profile`` on the CPU: the reference ops on tiny shapes, the JSON it writes, the
byte and FLOP model behind its fractions."""

from __future__ import annotations

import json

import pytest

from fastdia import ops, profile
from fastdia.cli import main

pytestmark = pytest.mark.filterwarnings(  # numpy noise from the Triton interpreter
    "ignore:Conversion of an array with ndim > 0:DeprecationWarning"
)

TINY = [
    "profile",
    "--device",
    "cpu",
    "--quick",
    "--guided-step-tokens",
    "8,16",
    "--round-tokens",
    "4",
    "--dim",
    "24",
    "--vocab",
    "300",
    "--hidden",
    "8",
    "--seq-len",
    "4",
    "--repeats",
    "2",
]


def test_profile_cli_writes_json_and_a_table(tmp_path, capsys):
    out = tmp_path / "prof.json"
    assert main([*TINY, "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    env = payload["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["git_sha"] and env["date"]
    ceilings = payload["ceilings"]
    assert ceilings["bandwidth_gb_per_s"] > 0 and ceilings["matmul_tflop_per_s"] > 0
    assert ceilings["matmul_dtype"] == "float32"
    rows = payload["rows"]
    shapes = [(r["op"], r["tokens"]) for r in rows]
    assert shapes == [("guided_step", 8), ("guided_step", 16), ("round_to_vocab", 4)]
    for row in rows:
        assert row["variant"] == "reference"  # the interpreter is never profiled by default
        assert "error" not in row and row["ms"] > 0
        assert row["fraction_of_roofline"] > 0 and row["bound"] in ("memory", "compute")
        assert row["gb_per_s"] == pytest.approx(row["bytes"] / (row["ms"] * 1e6))
        assert row["fraction_of_bandwidth"] == pytest.approx(
            row["gb_per_s"] / ceilings["bandwidth_gb_per_s"]
        )
    assert rows[0]["seq_len"] == 4 and rows[0]["hidden"] == 8 and rows[2]["vocab"] == 300
    assert payload["config"]["quick"] is True
    table = capsys.readouterr().out
    assert "ceilings: copy" in table and "round_to_vocab reference" in table
    assert f"wrote {out}" in table


def test_profile_from_a_file_prints_autos_choice_and_records_it_when_asked(
    tmp_path, monkeypatch, capsys
):
    from fastdia.ops import measured

    store = tmp_path / "store.json"
    monkeypatch.setenv(measured.PROFILE_ENV, str(store))
    source = tmp_path / "prof.json"
    assert main([*TINY, "--out", str(source), "--record"]) == 2  # a CPU run is not stored
    assert "only GPU measurements" in capsys.readouterr().err and not store.exists()
    payload = json.loads(source.read_text())
    payload["environment"]["device"] = "Fake GPU"  # as if measured on one
    source.write_text(json.dumps(payload))
    assert main(["profile", "--from", str(source)]) == 0
    out = capsys.readouterr().out
    assert "round_to_vocab reference" in out  # the table
    assert "auto would take (not recorded; add --record): guided_step -> reference" in out
    assert not store.exists()
    assert main(["profile", "--from", str(source), "--record"]) == 0
    assert "recorded: round_to_vocab -> reference" in capsys.readouterr().out
    devices = json.loads(store.read_text())["devices"]
    assert devices["Fake GPU"]["guided_step"]["fastest"] == "reference"
    source.write_text("{}")
    assert main(["profile", "--from", str(source)]) == 2
    assert "not a `fastdia profile` JSON" in capsys.readouterr().err


def test_profile_runs_named_variants(tmp_path):
    """A variant named explicitly runs where it is available (Triton in the interpreter)."""
    pytest.importorskip("triton")
    out = tmp_path / "prof.json"
    args = [*TINY, "--variants", "reference,triton", "--ops", "round_to_vocab"]
    assert main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["reference", "triton"]
    assert all("error" not in r for r in rows)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ops", "softmax"], "unknown op 'softmax'"),
        (["--variants", "cudnn"], "unknown variant 'cudnn'"),
        (["--dim", "0"], "--dim must be a positive integer"),
    ],
)
def test_profile_rejects_bad_options(tmp_path, capsys, extra, message):
    assert main([*TINY, *extra, "--out", str(tmp_path / "x.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_bytes_and_flops_follow_the_design():
    step = profile.Case(ops.GUIDED_STEP, 1024, 576, hidden=128, seq_len=32)
    assert step.bytes_moved() == 12 * 1024 * 576 + 4 * (128 * 576 + 2 * 128)
    assert step.flops() == 4 * 1024 * 128 * 576
    rnd = profile.Case(ops.ROUND_TO_VOCAB, 64, 576, vocab=49152, dtype="bfloat16")
    assert rnd.bytes_moved() == 2 * (49152 * 576 + 64 * 576) + 4 * 49152 + 8 * 64
    assert rnd.flops() == 2 * 64 * 576 * 49152


def test_default_grid_and_variants():
    cases = profile.default_cases()
    assert [c.tokens for c in cases if c.op == ops.GUIDED_STEP] == [64, 1024, 8192]
    assert [c.tokens for c in cases if c.op == ops.ROUND_TO_VOCAB] == [64, 1024, 4096, 8192]
    assert all(c.dim == 576 for c in cases)
    assert {c.vocab for c in cases if c.op == ops.ROUND_TO_VOCAB} == {49152}
    assert {c.hidden for c in cases if c.op == ops.GUIDED_STEP} == {128}
    assert profile.default_variants(ops.GUIDED_STEP, "cpu") == ["reference"]
    assert profile.copies_past_l2(10**6, "cpu") == 1
