"""The ``fastdia sample`` command: output format, determinism, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastdia.cli import build_parser, main
from fastdia.cli_options import sampling_overrides
from fastdia.embedding import EmbeddingSpace
from fastdia.errors import CheckpointError
from fastdia.models.checkpoint import sampling_defaults, save_checkpoint
from fastdia.models.critic import CriticConfig, build_critic
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.settings import SAMPLING_KEYS


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _records(stdout):
    lines = [json.loads(line) for line in stdout.strip().splitlines()]
    return lines[:-1], lines[-1]["summary"]


@pytest.fixture
def tiny_args(tiny_model_dir):
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
    ]


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_base):
    torch.manual_seed(0)
    dim = tiny_base.space.dim
    den = Denoiser(DenoiserConfig(dim=dim, max_length=16, hidden=16, layers=1, heads=2))
    critics = [
        build_critic(CriticConfig(dim=dim, hidden=8, reward=r)) for r in ("sentiment", "nontoxic")
    ]
    save_checkpoint(tmp_path / "ckpt", den, critics, space=tiny_base.space, base_model="tiny")
    return tmp_path / "ckpt"


def test_json_output_and_determinism(capsys, tiny_args):
    argv = [
        *tiny_args,
        "--random-init",
        "--prompt",
        "The movie was",
        "--num-samples",
        "3",
        "--reward",
        "sentiment:1,nontoxic:0.5",
        "--json",
    ]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    samples, summary = _records(out)
    assert len(samples) == 3
    for s in samples:
        assert s["text"].startswith("The movie was")
        assert len(s["completion_ids"]) == 8 and s["new_tokens"] == 8 and not s["finished"]
        assert s["text"] == "The movie was" + s["completion"]
        assert set(s["rewards"]) == {"sentiment", "nontoxic", "total"}
        assert -1 <= s["rewards"]["sentiment"] <= 1 and 0 <= s["rewards"]["nontoxic"] <= 1
        assert set(s["critic"]) == {"sentiment", "nontoxic"}
    assert [s["seed"] for s in samples] == [0, 1, 2]  # sample i uses seed + i
    assert summary["backend"] == "reference" and summary["steps"] == 4
    assert summary["num_samples"] == 3 and summary["tokens_per_s"] > 0 and summary["seconds"] > 0
    code, again, _ = _run(capsys, *argv)
    assert [s["completion_ids"] for s in _records(again)[0]] == [
        s["completion_ids"] for s in samples
    ]
    code, other, _ = _run(capsys, *argv[:-1], "--seed", "1", "--json")
    assert [s["completion_ids"] for s in _records(other)[0]] != [
        s["completion_ids"] for s in samples
    ]


def test_checkpoint_is_used(capsys, tiny_args, tiny_checkpoint):
    code, out, _ = _run(
        capsys,
        *tiny_args,
        "--checkpoint",
        str(tiny_checkpoint),
        "--reward",
        "nontoxic",
        "--json",
        "--sampler",
        "ddpm",
    )
    assert code == 0
    samples, summary = _records(out)
    assert len(samples) == 4 and summary["sampler"] == "ddpm"
    assert summary["guidance"] == 1.0  # no sampling.json: the built-in default


def test_checkpoint_sampling_defaults(capsys, tiny_args, tiny_checkpoint):
    (tiny_checkpoint / "sampling.json").write_text('{"guidance": 3.5}')
    argv = [*tiny_args, "--checkpoint", str(tiny_checkpoint), "--json"]
    code, out, _ = _run(capsys, *argv)
    assert code == 0 and _records(out)[1]["guidance"] == 3.5
    code, out, _ = _run(capsys, *argv, "--guidance", "0")  # an explicit value wins
    assert code == 0 and _records(out)[1]["guidance"] == 0.0
    (tiny_checkpoint / "sampling.json").write_text('{"guidance": -2}')
    code, _, err = _run(capsys, *argv)
    assert code == 2 and 'sampling.json: "guidance" must be a finite number >= 0' in err
    (tiny_checkpoint / "sampling.json").write_text('{"guidance": 1, "stop_at": 0.5, "decode": "x"}')
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "unknown decode 'x'" in err
    (tiny_checkpoint / "sampling.json").write_text('{"tilt_once": 1}')
    code, _, err = _run(capsys, *argv)
    assert code == 2 and 'sampling.json: "tilt_once" must be true or false, got 1' in err
    (tiny_checkpoint / "sampling.json").write_text('{"tilt_once": true}')
    code, out, _ = _run(capsys, *argv)
    assert code == 0 and _records(out)[1]["lm"]["tilt_once"] is True
    code, out, _ = _run(capsys, *argv, "--no-tilt-once")
    assert code == 0 and _records(out)[1]["lm"]["tilt_once"] is False
    (tiny_checkpoint / "sampling.json").write_text('{"speed": 3}')
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "unknown keys speed" in err
    (tiny_checkpoint / "sampling.json").write_text("[1, 2]")
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "must hold a JSON object" in err


def test_guidance_0_still_decodes_from_the_diffusion_latent(capsys, tiny_args, tiny_checkpoint):
    """``--guidance 0`` turns the critic off, not the diffusion: the LM decode still reads
    the unguided latent. The tiny LM is random, so where the latent is read it decides
    the tokens: they are the diffusion's own tokens (``--decode nearest``, the same seeds),
    and the decode without the latent (``--latent-weight 0``) writes other ones."""
    argv = [*tiny_args, "--checkpoint", str(tiny_checkpoint), "--decode", "lm"]
    argv += ["--stop-at", "0.5", "--guidance", "0", "--num-samples", "4", "--json"]

    def tokens(*extra):
        code, out, err = _run(capsys, *argv, *extra)
        assert code == 0, err
        samples, summary = _records(out)
        assert summary["guidance"] == 0.0
        return torch.tensor([s["completion_ids"] for s in samples]), summary

    latent, summary = tokens()
    assert summary["decode"] == "lm" and summary["lm"]["latent_weight"] == 1.0
    assert summary["rows"] == 4  # the diffusion's 4 steps per block
    diffusion, summary = tokens("--decode", "nearest")
    assert summary["rows"] == 4
    no_latent, summary = tokens("--latent-weight", "0")
    assert summary["rows"] == 0  # nothing diffused
    assert latent.shape == diffusion.shape == no_latent.shape == (4, 8)
    assert (latent == diffusion).float().mean() >= 0.9
    assert (no_latent == diffusion).float().mean() <= 0.2
    assert (no_latent == latent).float().mean() <= 0.2


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"steps": 0}', '"steps" must be a positive integer, got 0'),
        ('{"steps": 2.5}', '"steps" must be a positive integer, got 2.5'),
        ('{"steps": true}', '"steps" must be a positive integer, got True'),
        ('{"decode": 3}', '"decode" must be a decode mode, got 3'),
        ('{"score_temperature": 0}', '"score_temperature" must be a finite number > 0, got 0'),
        ('{"tilt": -0.5}', '"tilt" must be a finite number >= 0, got -0.5'),
        ('{"latent_weight": NaN}', '"latent_weight" must be a finite number >= 0, got nan'),
        ('{"tilt_once": "yes"}', "\"tilt_once\" must be true or false, got 'yes'"),
    ],
)
def test_sampling_json_values_are_checked(tmp_path, text, message):
    (tmp_path / "sampling.json").write_text(text)
    with pytest.raises(CheckpointError, match="fix or delete it") as info:
        sampling_defaults(tmp_path)
    assert message in str(info.value)


def test_every_sampling_key_has_a_valid_default_and_a_command_line_option(tmp_path):
    defaults = {key: spec.default for key, spec in SAMPLING_KEYS.items()}
    (tmp_path / "sampling.json").write_text(json.dumps(defaults | {"why": "a note"}))
    assert sampling_defaults(tmp_path) == defaults | {"why": "a note"}
    parser = build_parser()
    for command in (["sample", "--prompt", "x"], ["eval"]):
        overrides = sampling_overrides(parser.parse_args(command))
        assert set(overrides) == set(SAMPLING_KEYS)
        assert all(value is None for value in overrides.values())  # None: not given


def test_human_readable_output(capsys, tiny_args):
    code, out, _ = _run(capsys, *tiny_args, "--random-init", "--num-samples", "2")
    assert code == 0 and out.count("sentiment=") == 2 and "tokens/s" in out


CHEAP_ERRORS = [
    (["--prompt", "   "], "--prompt is empty"),
    (["--sampler", "euler"], "unknown sampler 'euler'; known: ddpm, ddim, dia"),
    (["--reward", "happiness"], "unknown reward"),
    (["--backend", "magic"], "unknown backend 'magic'"),
    (["--seed", "-3"], "seed must be an integer in [0, 2**31)"),
    (["--rounding", "cosine"], "known: l2, inner"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "cannot read the prompts file"),
    (["--prompt", "a", "--prompts-file", "x.txt"], "give --prompt or --prompts-file, not both"),
    (["--length", "9", "--new-tokens", "4"], "not both"),
]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no prompt (it is empty)"),
        ("\n  \n", "holds no prompt (it is empty)"),
        ('{"prompt": "The movie"}\n{"prompt": "x"\n', "line 2: not valid JSON"),
        ('{"prompt": "The movie"}\n\n["x"]\n', "line 3: a JSONL prompt must be an object"),
        ('{"prompt": ""}\n', "line 1: 'prompt' must be a non-empty string"),
        ('{"prompt": "a", "seed": -1}\n', "line 1: 'seed' must be an integer"),
    ],
)
def test_bad_prompts_file_fails_before_loading_naming_the_line(
    capsys, monkeypatch, tmp_path, tiny_args, content, message
):
    import fastdia.base_model

    def heavy(*a, **k):
        raise AssertionError("loaded the base model before validating the prompts file")

    monkeypatch.setattr(fastdia.base_model, "load_base_model", heavy)
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    code, _, err = _run(capsys, *tiny_args, "--random-init", "--prompts-file", str(path))
    assert code == 2 and message in err and str(path) in err


def test_prompts_file_batches_prompts_and_writes_jsonl(capsys, tmp_path, tiny_args):
    """Several prompts (one with its own seed and id) share batches; every sample is the
    one a --prompt run with the same seed writes; JSONL to --out."""
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "The movie was", "id": "a"},
        {"prompt": "I love this film, it is a happy", "seed": 40},
        {"prompt": "Nothing"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out" / "samples.jsonl"
    argv = [*tiny_args, "--random-init", "--num-samples", "2", "--batch-size", "4"]
    code, _, _ = _run(capsys, *argv, "--prompts-file", str(path), "--out", str(out))
    assert code == 0
    records, summary = _records(out.read_text())
    assert len(records) == 6 and summary["num_prompts"] == 3 and summary["tokens_per_s"] > 0
    assert [(r["prompt_index"], r["sample"]) for r in records] == [
        (i, j) for i in range(3) for j in range(2)
    ]
    assert [r["seed"] for r in records] == [0, 1, 40, 41, 0, 1] and records[0]["id"] == "a"
    for r in (records[1], records[3]):
        code, single, _ = _run(
            capsys, *argv, "--prompt", r["prompt"], "--seed", str(r["seed"]), "--json"
        )
        assert _records(single)[0][0]["completion_ids"] == r["completion_ids"]
    # a text file: one prompt per line
    text = tmp_path / "prompts.txt"
    text.write_text("The movie was\n\nNothing\n")
    code, stdout, _ = _run(capsys, *argv, "--prompts-file", str(text))
    records_txt, _ = _records(stdout)
    assert [r["prompt"] for r in records_txt] == ["The movie was"] * 2 + ["Nothing"] * 2
    assert records_txt[0]["completion_ids"] == records[0]["completion_ids"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--chat"], "needs a tokenizer with a chat template"),
        (["--new-tokens", "500"], "exceeds the base model's context of 128 tokens"),
        (["--block-size", "80"], "does not fit the denoiser's window of 64 tokens"),
        (["--new-tokens", "8", "--prompt", " "], "--prompt is empty"),
    ],
)
def test_errors_that_need_the_tokenizer_or_models(capsys, tiny_args, extra, message):
    argv = [*tiny_args, "--random-init", "--decode", "lm", "--stop-at", "0.5", *extra]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and message in err and out == ""


@pytest.mark.parametrize(("extra", "message"), CHEAP_ERRORS)
def test_cheap_errors_fail_before_loading_anything(capsys, monkeypatch, tiny_args, extra, message):
    import fastdia.base_model

    def heavy(*a, **k):
        raise AssertionError("loaded the base model before validating the arguments")

    monkeypatch.setattr(fastdia.base_model, "load_base_model", heavy)
    code, _, err = _run(capsys, *tiny_args, "--random-init", *extra)
    assert code == 2
    assert message in err and err.startswith("fastdia sample: error:")
    assert err.count("error:") == 1  # one message (a list of known names may follow)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "must be a positive integer"),
        (["--guidance", "nan"], "finite number >= 0"),
        (["--guidance", "-1"], "negative weight"),
        (["--length", "0"], "must be a positive integer"),
        (["--new-tokens", "0"], "must be a positive integer"),
        (["--new-tokens", "-4"], "must be a positive integer"),
        (["--block-size", "0"], "must be a positive integer"),
        (["--on-eos", "ignore"], "invalid choice"),
    ],
)
def test_argument_type_errors(capsys, tiny_args, extra, message):
    with pytest.raises(SystemExit) as exc:
        main([*tiny_args, "--random-init", *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_deprecated_length_counts_the_prompt(capsys, tiny_model_dir):
    argv = ["sample", "--base-model", str(tiny_model_dir), "--steps", "2", "--random-init"]
    prompt = ["--prompt", "The movie was great and the actors were wonderful"]
    code, _, err = _run(capsys, *argv, "--length", "3", *prompt)
    assert code == 2 and "the length counts the prompt; use --new-tokens" in err
    code, out, err = _run(capsys, *argv, "--length", "20", *prompt, "--json", "--on-eos", "mask")
    assert code == 0 and "--length is deprecated" in err
    samples, summary = _records(out)
    n = summary["new_tokens"]
    assert 0 < n < 20 and all(len(s["completion_ids"]) == n for s in samples)
    code, _, err = _run(capsys, *argv, "--length", "20", "--new-tokens", "4")
    assert code == 2 and "not both" in err


def test_missing_checkpoint_says_how_to_get_one(capsys, tiny_args, tmp_path, monkeypatch):
    import fastdia.pipeline

    monkeypatch.setattr(fastdia.pipeline, "DEMO_CHECKPOINT", tmp_path / "no-demo")
    code, _, err = _run(capsys, *tiny_args)
    assert code == 2 and "--random-init" in err and "--checkpoint" in err
    code, _, err = _run(capsys, *tiny_args, "--checkpoint", str(tmp_path / "none"))
    assert code == 2 and "does not exist" in err


def test_checkpoint_errors(capsys, tiny_args, tiny_checkpoint):
    code, _, err = _run(
        capsys, *tiny_args, "--checkpoint", str(tiny_checkpoint), "--reward", "keyword:happy"
    )
    assert code == 2 and "no critic for keyword:happy" in err
    (tiny_checkpoint / "critic-nontoxic.safetensors").write_bytes(b"corrupt")
    code, _, err = _run(
        capsys, *tiny_args, "--checkpoint", str(tiny_checkpoint), "--reward", "nontoxic"
    )
    assert code == 2 and "corrupt" in err
    (tiny_checkpoint / "denoiser.safetensors").unlink()
    code, _, err = _run(capsys, *tiny_args, "--checkpoint", str(tiny_checkpoint))
    assert code == 2 and "no denoiser.safetensors" in err


def test_checkpoint_of_another_base_model(capsys, tiny_args, tmp_path, tiny_base):
    other = EmbeddingSpace(torch.randn(tiny_base.space.vocab_size, tiny_base.space.dim), None)
    den = Denoiser(DenoiserConfig(dim=other.dim, max_length=16, hidden=16, layers=1, heads=2))
    save_checkpoint(
        tmp_path,
        den,
        [build_critic(CriticConfig(dim=other.dim, reward="sentiment"))],
        space=other,
        base_model="other",
    )
    code, _, err = _run(capsys, *tiny_args, "--checkpoint", str(tmp_path))
    assert code == 2 and "another base model" in err


def test_base_model_path_that_does_not_exist(capsys, tmp_path):
    code, _, err = _run(capsys, "sample", "--random-init", "--base-model", str(tmp_path / "x"))
    assert code == 2 and "does not exist" in err


def test_console_entry_point_exit_code(tiny_model_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastdia.cli",
            "sample",
            "--random-init",
            "--base-model",
            str(tiny_model_dir),
            "--sampler",
            "nope",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "unknown sampler" in proc.stderr


@pytest.mark.slow
def test_default_base_model_random_init_is_deterministic(capsys, default_base):
    argv = [
        "sample",
        "--random-init",
        "--prompt",
        "The movie was",
        "--num-samples",
        "2",
        "--length",
        "16",
        "--steps",
        "10",
        "--seed",
        "0",
        "--json",
    ]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    samples, summary = _records(out)
    assert len(samples) == 2 and summary["base_model"] == "smollm2-135m"
    assert all(s["text"].startswith("The movie was") for s in samples)
    _, again, _ = _run(capsys, *argv)
    assert [s["completion_ids"] for s in _records(again)[0]] == [
        s["completion_ids"] for s in samples
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--decode", "beam"], "unknown decode 'beam'"),
        (["--decode", "lm"], "stop level t* in (0, 1)"),
        (["--decode", "lm", "--stop-at", "1.5"], "stop level t* must be a number in [0, 1)"),
        (["--decode", "lm", "--stop-at", "0.9", "--tilt", "-1"], "tilt must be a finite"),
        (["--decode", "lm", "--stop-at", "0.9", "--latent-weight", "nan"], "latent weight"),
        (["--decode", "lm", "--stop-at", "0.9", "--lm-temperature", "0"], "temperature must"),
        (["--score-temperature", "-2"], "score_temperature must"),
        (["--adaptive-noise", "-1"], "noise_kappa must be a finite number >= 0"),
        (["--critic-kind", "value", "--adaptive-noise", "0.5"], "with critic_kind='value'"),
    ],
)
def test_decode_bad_input_fails_before_loading(capsys, monkeypatch, flags, message):
    import fastdia.base_model

    def boom(*a, **k):
        raise AssertionError("the base model must not load for bad input")

    monkeypatch.setattr(fastdia.base_model, "load_base_model", boom)
    code, _, err = _run(capsys, "sample", "--random-init", *flags)
    assert code == 2 and message in err, err


def test_eval_out_that_cannot_be_written_fails_before_loading(capsys, monkeypatch, tmp_path):
    import fastdia.base_model

    def boom(*a, **k):
        raise AssertionError("the base model must not load for bad input")

    monkeypatch.setattr(fastdia.base_model, "load_base_model", boom)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code, _, err = _run(capsys, "eval", "--out", str(blocker / "eval.json"))
    assert code == 2 and "cannot create its folder" in err, err


def test_train_denoiser_bad_train_times_fails_before_loading(capsys, monkeypatch, tmp_path):
    import fastdia.base_model

    def boom(*a, **k):
        raise AssertionError("the base model must not load for bad input")

    monkeypatch.setattr(fastdia.base_model, "load_base_model", boom)
    argv = ["train-denoiser", "--data", "x", "--out", str(tmp_path), "--train-times", "late"]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "unknown --train-times 'late'; known: uniform, warp" in err, err
    for bad in ("1.5", "-0.1", "nan"):
        argv = ["train-denoiser", "--data", "x", "--out", str(tmp_path), "--noise-mask", bad]
        code, _, err = _run(capsys, *argv)
        assert code == 2 and "--noise-mask must lie in [0, 1]" in err, err


def test_adaptive_noise_and_critic_kind_reach_the_sampler_config():
    from fastdia.pipeline import sampler_config, sampling_settings

    def config(*flags):
        args = build_parser().parse_args(["sample", "--random-init", *flags])
        return sampler_config(sampling_settings(None, **sampling_overrides(args)))

    assert config("--adaptive-noise", "0.5").noise_kappa == 0.5
    assert config().noise_kappa == 0.0 and config().critic_kind == "token_local"
    assert config("--critic-kind", "value").critic_kind == "value"


def test_critic_kind_value_needs_value_critics(capsys, tiny_args, tiny_checkpoint):
    code, out, err = _run(
        capsys, *tiny_args, "--checkpoint", str(tiny_checkpoint), "--critic-kind", "value"
    )
    assert code == 2 and out == ""
    assert "has no value critic for sentiment" in err and "--kind value" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layers", "0"], "layers must be >= 1 (0 only for a value critic)"),
        (["--kind", "value", "--prefix-states", "0"], "a value critic reads base-model states"),
        (["--kind", "sideways"], "unknown critic kind 'sideways'"),
    ],
)
def test_train_critic_bad_settings_fail_before_loading(capsys, monkeypatch, flags, message):
    import fastdia.base_model

    def boom(*a, **k):
        raise AssertionError("the base model must not load for bad input")

    monkeypatch.setattr(fastdia.base_model, "load_base_model", boom)
    argv = ["train-critic", "--data", "nowhere", "--out", "nowhere", "--reward", "sentiment"]
    code, _, err = _run(capsys, *argv, *flags)
    assert code == 2 and message in err, err


def test_per_reward_defaults_apply_when_that_reward_guides_alone(
    capsys, tiny_args, tiny_checkpoint, tmp_path
):
    (tiny_checkpoint / "sampling.json").write_text(
        '{"guidance": 3.5, "tilt": 0.1, "per_reward": {"nontoxic": {"guidance": 7, "why": "x"}}}'
    )
    assert sampling_defaults(tiny_checkpoint)["guidance"] == 3.5
    assert sampling_defaults(tiny_checkpoint, "sentiment")["guidance"] == 3.5
    chosen = sampling_defaults(tiny_checkpoint, "nontoxic:2")
    assert chosen["guidance"] == 7 and chosen["tilt"] == 0.1  # the rest stays top-level
    assert sampling_defaults(tiny_checkpoint, "nontoxic,sentiment")["guidance"] == 3.5
    argv = [*tiny_args, "--checkpoint", str(tiny_checkpoint), "--json"]
    code, out, _ = _run(capsys, *argv, "--reward", "nontoxic")
    assert code == 0 and _records(out)[1]["guidance"] == 7.0
    code, out, _ = _run(capsys, *argv, "--reward", "nontoxic", "--guidance", "2")
    assert code == 0 and _records(out)[1]["guidance"] == 2.0  # the command line still wins
    for text, message in [
        ('{"per_reward": {"nontoxic": {"guidance": -1}}}', '"per_reward.nontoxic.guidance"'),
        ('{"per_reward": {"nontoxic": {"speed": 1}}}', "unknown keys per_reward.nontoxic.speed"),
        ('{"per_reward": {"nontoxic": {"block_size": 8}}}', "which every reward shares"),
        ('{"per_reward": [1]}', "must map reward names to objects"),
    ]:
        (tmp_path / "sampling.json").write_text(text)
        with pytest.raises(CheckpointError) as info:
            sampling_defaults(tmp_path)
        assert message in str(info.value)
