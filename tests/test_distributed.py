"""Several processes (``torchrun``, gloo on the CPU): a sharded run writes what one process
writes, and a rank that is missing or dies fails the whole job within a timeout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_evaluate import tiny_pipeline  # noqa: F401  (the fixture)

from fastdia.distributed import SINGLE, World

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | extra


def _records(path: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return lines[:-1], lines[-1]["summary"]


def test_world_splits_by_index():
    w = World(rank=1, size=3)
    assert w.take(list(range(8))) == [1, 4, 7] and list(w.indices(8)) == [1, 4, 7]
    assert not w.is_main and w.distributed
    assert SINGLE.take([1, 2]) == [1, 2] and SINGLE.gather("x") == ["x"]


@pytest.fixture
def sample_args(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nA long road led to the house on the hill\nI think\n")
    return [
        "sample",
        "--base-model",
        str(tiny_model_dir),
        "--new-tokens",
        "8",
        "--steps",
        "4",
        "--on-eos",
        "mask",
        "--random-init",
        "--prompts-file",
        str(prompts),
        "--num-samples",
        "3",
        "--batch-size",
        "4",
    ]


def test_two_ranks_sample_what_one_process_samples(sample_args, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    cmd = [sys.executable, "-m", "fastdia", *sample_args]
    subprocess.run([*cmd, "--out", str(one)], check=True, env=_env(), timeout=300)
    launch = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(_port())]
    subprocess.run(
        [*launch, "-m", "fastdia", *sample_args, "--out", str(two)],
        check=True,
        env=_env(),
        timeout=300,
    )
    alone, summary_one = _records(one)
    shared, summary_two = _records(two)
    assert summary_one["world_size"] == 1 and summary_two["world_size"] == 2
    assert len(shared) == len(alone) == 9
    for a, b in zip(alone, shared, strict=True):
        # the same rows in the same order, the same texts; critic values up to the float
        # reduction order of another batch
        assert {k: v for k, v in a.items() if k != "critic"} == {
            k: v for k, v in b.items() if k != "critic"
        }
        for name, value in a["critic"].items():
            assert b["critic"][name] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert summary_two["new_tokens_delivered"] == summary_one["new_tokens_delivered"] == 72


def test_two_ranks_run_the_batch_job_one_process_runs(tiny_model_dir, tmp_path):
    """``generate`` under torchrun: each rank runs its batches into its part file, rank 0
    moves them into the output in batch order: the one process's file, byte for byte."""
    requests = tmp_path / "in.jsonl"
    prompts = ["The movie was", "My day", "I think that the", "Food", "We went to"]
    requests.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": prompts[i % 5]}) + "\n" for i in range(11))
    )
    args = ["generate", "--input", str(requests), "--base-model", str(tiny_model_dir)]
    args += ["--random-init", "--steps", "3", "--new-tokens", "6", "--on-eos", "mask"]
    args += ["--batch-size", "3"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    cmd = [sys.executable, "-m", "fastdia", *args]
    subprocess.run([*cmd, "--output", str(one)], check=True, env=_env(), timeout=300)
    launch = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(_port())]
    done = subprocess.run(
        [*launch, "-m", "fastdia", *args, "--output", str(two)],
        check=True,
        env=_env(),
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert one.read_bytes() == two.read_bytes() and one.read_text().count("\n") == 11
    assert not list(tmp_path.glob("two.jsonl.part-*"))
    summary = json.loads(done.stderr.strip().splitlines()[-1])["summary"]
    assert summary["world_size"] == 2 and summary["written"] == 11


def test_a_missing_rank_fails_within_the_timeout(sample_args, tmp_path):
    """Rank 0 of 2 started alone: the rendezvous times out with a message, exit 2."""
    env = _env(
        RANK="0",
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_port()),
        FASTDIA_DIST_TIMEOUT="3",
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "fastdia", *sample_args, "--out", str(tmp_path / "x.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "rank 0 of 2 could not join the process group at 127.0.0.1" in done.stderr
    assert time.monotonic() - start < 100


def test_a_killed_rank_fails_the_whole_job(sample_args, tmp_path):
    """A rank killed mid-run: torchrun stops the others and exits non-zero, no hang."""
    import psutil

    slow = [*sample_args, "--steps", "50", "--num-samples", "40"]
    launch = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(_port())]
    job = subprocess.Popen(
        [*launch, "-m", "fastdia", *slow, "--out", str(tmp_path / "x.jsonl")],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        ranks: list = []
        while time.monotonic() < deadline and len(ranks) < 2:
            ranks = psutil.Process(job.pid).children()
            time.sleep(0.2)
        assert len(ranks) == 2, "torchrun did not start two ranks"
        time.sleep(3)  # let them load and join
        os.kill(ranks[1].pid, signal.SIGKILL)
        _, err = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "Signals.SIGKILL" in err or "exitcode" in err
    assert not (tmp_path / "x.jsonl").read_text().strip()  # nothing half-written


def test_two_ranks_make_the_data_one_process_makes(tiny_model_dir, tmp_path):
    """``make-data`` under torchrun: the same shard files by content, resumable."""
    import hashlib

    args = [
        "make-data",
        "--base-model",
        str(tiny_model_dir),
        "--num-sequences",
        "80",
        "--length",
        "24",
        "--shard-size",
        "16",
        "--batch-size",
        "8",
        "--no-progress",
    ]

    def digest(folder: Path) -> dict[str, str]:
        return {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.glob("*"))
            if f.is_file()
        }

    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "fastdia", *args, "--out", str(one)],
        check=True,
        env=_env(),
        timeout=300,
    )
    launch = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(_port())]
    subprocess.run(
        [*launch, "-m", "fastdia", *args, "--out", str(two)], check=True, env=_env(), timeout=300
    )
    assert len(digest(one)) == 6  # five shards and meta.json
    assert digest(one) == digest(two)
    # a lost shard is rewritten by whichever rank owns it now (another world size)
    (two / "shard-00003.safetensors").unlink()
    launch[2] = "3"
    subprocess.run(
        [*launch, "-m", "fastdia", *args, "--out", str(two)], check=True, env=_env(), timeout=300
    )
    assert digest(one) == digest(two)


def test_two_ranks_evaluate_what_one_process_evaluates(
    tiny_model_dir,
    tiny_pipeline,  # noqa: F811
    tmp_path,
):
    """``eval`` under torchrun: each rank writes its groups of prompts and computes their
    perplexities, prompt gap and LM-judge scores, rank 0 scores the rewards and writes;
    every row's samples and metrics are those of one process."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("The movie\nI love\nA long road led to\nWe went\nShe said\n")
    args = [
        "eval",
        "--checkpoint",
        str(tiny_pipeline),
        "--base-model",
        str(tiny_model_dir),
        "--prompt-sets",
        str(prompts),
        "--num-samples",
        "2",
        "--new-tokens",
        "4",
        "--steps",
        "2",
        "--baselines",
        "base@decode,best-of-2@decode",
        "--prompts-per-batch",
        "2",
        "--rewards",
        "sentiment",
        "--judges",
        f"lm:{tiny_model_dir},afinn",  # an LM judge: each rank scores its own prompts
        "--draws",
        "20",
    ]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run(
        [sys.executable, "-m", "fastdia", *args, "--out", str(one)],
        check=True,
        env=_env(),
        timeout=300,
    )
    launch = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(_port())]
    subprocess.run(
        [*launch, "-m", "fastdia", *args, "--out", str(two)], check=True, env=_env(), timeout=300
    )
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["config"]["world_size"] == 1 and b["config"]["world_size"] == 2
    timing = ("seconds_per_100_tokens", "dominated_by", "dominates")
    for row_a, row_b in zip(a["sets"]["p"], b["sets"]["p"], strict=True):
        assert {k: v for k, v in row_a.items() if k not in timing} == {
            k: v for k, v in row_b.items() if k not in timing
        }


def _training_data(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """32 windows of 8 tokens from the tiny model (one process), and the options that read
    them."""
    data = tmp_path / "data"
    (tmp_path / "p.txt").write_text("The movie\nI love\n")
    common = ["--base-model", str(tiny_model_dir), "--length", "8", "--no-progress"]
    subprocess.run(
        [sys.executable, "-m", "fastdia", "make-data", *common, "--out", str(data),
         "--num-sequences", "32", "--batch-size", "16", "--prompts", str(tmp_path / "p.txt")],
        check=True, env=_env(), timeout=300,
    )  # fmt: skip
    return data, common


def _weights(folder: Path, stem: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / f"{stem}.safetensors"))


@pytest.mark.parametrize("what", ["denoiser", "critic"])
def test_two_ranks_train_what_one_process_trains(tiny_model_dir, tmp_path, what):
    """DDP (gloo) over 2 ranks: the weights after every step equal one process's on the
    same global batch, up to float sum order (atol 1e-5), and a 2-rank run resumes on 1."""
    import torch

    data, common = _training_data(tiny_model_dir, tmp_path)
    cmd = ["train-denoiser", "--hidden", "16", "--layers", "1", "--heads", "2"]
    stem = "denoiser"
    if what == "critic":
        cmd, stem = ["train-critic", "--reward", "sentiment", "--hidden", "8"], "critic-sentiment"
    train = [*cmd, *common, "--data", str(data), "--batch-size", "5", "--save-every", "2",
             "--val-every", "2", "--warmup", "1", "--self-condition"]  # fmt: skip
    if what == "critic":
        train.remove("--self-condition")
    one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    launch = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(_port())]
    for out, steps in ((one, "4"), (three, "60")):
        subprocess.run(
            [sys.executable, "-m", "fastdia", *train, "--steps", steps, "--out", str(out)],
            check=True, env=_env(), timeout=300,
        )  # fmt: skip
    subprocess.run(
        [*launch, "-m", "fastdia", *train, "--steps", "4", "--out", str(two)],
        check=True, env=_env(), timeout=300,
    )  # fmt: skip
    a, b = _weights(one, stem), _weights(two, stem)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
    history = json.loads((two / "training" / f"{stem}_history.json").read_text())
    ref = json.loads((one / "training" / f"{stem}_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for h, r in zip(history, ref, strict=True):
        assert h["loss"] == pytest.approx(r["loss"], rel=1e-4)
    # a 2-rank run killed mid-way resumes on one process to the one-process weights
    state = tmp_path / "killed" / "training" / f"{stem}_state.pt"
    job = subprocess.Popen(
        [*launch[:-1], str(_port()), "-m", "fastdia", *train, "--steps", "60",
         "--out", str(tmp_path / "killed")],
        env=_env(), start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not state.is_file() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)
    stopped = torch.load(state, weights_only=False)["step"]
    assert 0 < stopped < 60, "the run was not stopped mid-way"
    subprocess.run(
        [sys.executable, "-m", "fastdia", *train, "--steps", "60", "--out",
         str(tmp_path / "killed"), "--resume"],
        check=True, env=_env(), timeout=300,
    )  # fmt: skip
    a, b = _weights(three, stem), _weights(tmp_path / "killed", stem)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3, msg=name)


def test_shares_too_small_for_the_world(tiny_model_dir, tmp_path):
    """One row over two ranks samples it (rank 1 idles); a training batch smaller than the
    world is refused with one message per rank and a non-zero exit."""
    launch = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(_port())]
    out = tmp_path / "one.jsonl"
    subprocess.run(
        [*launch, "-m", "fastdia", "sample", "--base-model", str(tiny_model_dir),
         "--random-init", "--steps", "2", "--new-tokens", "4", "--on-eos", "mask",
         "--prompt", "The movie", "--num-samples", "1", "--out", str(out)],
        check=True, env=_env(), timeout=300,
    )  # fmt: skip
    records, summary = _records(out)
    assert len(records) == 1 and summary["new_tokens_delivered"] == 4
    data, common = _training_data(tiny_model_dir, tmp_path)
    launch[-1] = str(_port())
    done = subprocess.run(
        [*launch, "-m", "fastdia", "train-critic", "--reward", "sentiment", *common,
         "--data", str(data), "--out", str(tmp_path / "c"), "--batch-size", "1", "--steps", "2"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--batch-size 1 cannot be shared by 2 ranks" in done.stderr
