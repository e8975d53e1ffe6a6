"""The demo checkpoint shipped inside the package, and the command that uses it by default.

These check what the shipped models do when run, the sampler the defaults build against
the settings the model card describes (numbers written here, not read back from
``sampling.json``), and the model card's eval tables against the results files beside it.
The sampling runs write one block of 16 new tokens each (CI time).
"""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch

from fastdia.cli import main
from fastdia.models.checkpoint import load_checkpoint
from fastdia.pipeline import (
    DEMO_CHECKPOINT,
    build_sampler,
    resolve_checkpoint,
    sampler_config,
    sampling_settings,
)

DEMO_BUDGET_BYTES = 60 * 2**20
PROMPT = "The movie was"
# the acceptance command: no flags beyond these, no network
DEFAULT_COMMAND = (
    *("sample", "--prompt", PROMPT, "--reward", "sentiment"),
    *("--num-samples", "8", "--new-tokens", "16", "--json"),  # one block
)
# what MODEL_CARD.md ("How it samples") says the defaults are
CARD_LM = {
    "temperature": 0.8,
    "latent_weight": 0.05,
    "tilt": 0.075,
    "tilt_once": True,
    "tilt_horizon": 0,
}
CARD_WINDOW, CARD_BLOCK, CARD_STEPS, CARD_STOP = 32, 16, 50, 0.8
# reward spec -> (lambda, the critics that guide with their weights)
CARD_GUIDANCE = {
    "sentiment": (192.0, [("sentiment", 1.0)]),
    "nontoxic": (48.0, [("nontoxic", 1.0)]),  # sampling.json's per-reward default
    "sentiment:1,nontoxic:0.5": (192.0, [("sentiment", 1.0), ("nontoxic", 0.5)]),
}


def test_demo_ships_inside_the_package_within_budget():
    files = {p.name: p.stat().st_size for p in DEMO_CHECKPOINT.iterdir() if p.is_file()}
    for name in (
        "denoiser.json",
        "denoiser.safetensors",
        "critic-sentiment.json",
        "critic-sentiment.safetensors",
        "critic-nontoxic.json",
        "critic-nontoxic.safetensors",
        "sampling.json",
        "MODEL_CARD.md",
        "eval.json",
        "eval.png",
    ):
        assert name in files, f"{name} missing from {DEMO_CHECKPOINT}"
    assert sum(files.values()) <= DEMO_BUDGET_BYTES
    assert resolve_checkpoint(None) == DEMO_CHECKPOINT


# ---- the sampler the defaults build ---------------------------------------------------------
@pytest.fixture(scope="module")
def demo_models(default_base):
    return load_checkpoint(DEMO_CHECKPOINT, default_base.space)


def _demo_sampler(base, loaded, reward, **given):
    """The sampler ``fastdia sample --reward REWARD`` builds from the demo (the CLI's path:
    settings, config, rewards, assembly), with ``given`` settings over the checkpoint's."""
    from fastdia.rewards import build_rewards

    config = sampler_config(sampling_settings(DEMO_CHECKPOINT, reward, **given))
    rewards = build_rewards(reward)
    weighted = list(zip(rewards.names, rewards.weights, strict=True))
    return build_sampler(base, config, rewards=weighted, loaded=loaded).sampler


@pytest.mark.slow
@pytest.mark.parametrize("reward", list(CARD_GUIDANCE))
def test_demo_defaults_build_the_sampler_the_model_card_describes(
    default_base, demo_models, reward
):
    """50 ``dia`` steps down to t* = 0.8 placed by the denoiser's time warp, lambda 192
    (48 for nontoxic alone), blocks of 16 over the 32-token window, and the LM decode at
    T 0.8 whose score reads the latent with weight 0.05 and the critics' per-token values
    with weight tilt x lambda / W = 0.075 x lambda / 32, each token's spent once used."""
    from fastdia.decode import token_values
    from fastdia.schedules import alpha_bar

    guidance, critics = CARD_GUIDANCE[reward]
    sampler = _demo_sampler(default_base, demo_models, reward)
    plan = sampler.plan(2, 16, prompt_tokens=3)
    cfg = sampler.config
    assert (cfg.sampler, cfg.decode, cfg.on_eos, cfg.guidance) == ("dia", "lm", "stop", guidance)
    assert [(c.name, c.weight) for c in sampler.critics] == critics
    assert (sampler.window, sampler.block_size, plan.blocks) == (CARD_WINDOW, CARD_BLOCK, 1)
    # the diffusion: 50 rows from t = 1 down to t* = 0.8, spaced by the measured warp
    times = plan.diffusion.times
    assert plan.steps == CARD_STEPS and len(times) == CARD_STEPS + 1
    assert times[0] == pytest.approx(CARD_STOP) and times[-1] == 1.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) > 1.5 * min(gaps)  # not evenly spaced in t
    assert float(plan.diffusion.guidance) == guidance
    # the decode (fastdia/decode.py): score <h/T, E_v> + alpha <z, E_v> + bias_v, with
    # alpha = w sqrt(abar) c / (1 - abar) and bias_v = -w abar c^2 |E_v|^2 / (2 (1 - abar))
    # + beta u(v) at abar = abar(t*), beta = tilt lambda / W
    decode = plan.decode_plan
    assert vars(decode.decoder.config) == CARD_LM
    space = default_base.space
    abar = float(alpha_bar(sampler.denoiser.config.schedule, torch.tensor([CARD_STOP]))[0])
    w, c = CARD_LM["latent_weight"], space.scale
    assert decode.alpha == pytest.approx(w * math.sqrt(abar) * c / (1 - abar), rel=1e-4)
    beta = CARD_LM["tilt"] * guidance / CARD_WINDOW
    norms = space.weight.float().pow(2).sum(dim=1)
    want = -w * abar * c * c / (2 * (1 - abar)) * norms + beta * token_values(
        [(demo_models.critics[name], weight) for name, weight in critics], space.weight, c
    )
    allowed = decode.bias > -1e8  # banned ids (template and role tokens) aside
    assert int(allowed.sum()) > space.vocab_size - 100
    torch.testing.assert_close(decode.bias[allowed], want[allowed], rtol=1e-4, atol=1e-4)
    assert decode.row_bias is not None  # tilt_once: a per-row bias that loses spent tokens


# ---- the default command ------------------------------------------------------------------
def _cli(out_file, *argv):
    """Run ``fastdia sample`` writing its JSON lines to ``out_file``; the samples and the
    summary."""
    assert main([*argv, "--out", str(out_file)]) == 0
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    return lines[:-1], lines[-1]["summary"]


@pytest.fixture(scope="module")
def default_run(default_base, tmp_path_factory):
    """The default command (the shipped demo, its sampling.json)."""
    return _cli(tmp_path_factory.mktemp("default") / "out.jsonl", *DEFAULT_COMMAND)


@pytest.fixture(scope="module")
def unguided_run(default_base, tmp_path_factory):
    """The default command on a copy of the demo whose sampling.json differs in one
    value: ``"guidance": 0``."""
    folder = tmp_path_factory.mktemp("unguided-demo")
    for path in DEMO_CHECKPOINT.iterdir():
        if path.is_file() and path.name != "sampling.json":
            (folder / path.name).symlink_to(path)
    settings = json.loads((DEMO_CHECKPOINT / "sampling.json").read_text())
    (folder / "sampling.json").write_text(json.dumps({**settings, "guidance": 0}))
    out = folder.parent / "unguided.jsonl"
    return _cli(out, *DEFAULT_COMMAND, "--checkpoint", str(folder))


@pytest.mark.slow
def test_default_command_runs_the_demo_as_its_card_says(default_run):
    samples, summary = default_run
    assert summary["base_model"] == "smollm2-135m" and not summary["random_init"]
    assert summary["guidance"] == CARD_GUIDANCE["sentiment"][0] and summary["lm"] == CARD_LM
    assert (summary["sampler"], summary["decode"], summary["on_eos"]) == ("dia", "lm", "stop")
    assert (summary["steps"], summary["rows"], summary["stop_at"]) == (50, 50, CARD_STOP)
    assert (summary["block_size"], summary["window"], summary["blocks"]) == (16, 32, 1)
    assert [s["seed"] for s in samples] == list(range(8))


@pytest.mark.slow
def test_default_command_writes_text_of_the_asked_length(default_base, default_run):
    """Eight samples of 16 new tokens (fewer only for a row that ended at its end token),
    whose ids decode to the text printed, that read as text to the base model."""
    from fastdia.evaluate import continuation_nll

    samples, summary = default_run
    space = default_base.space
    assert len(samples) == 8 and summary["new_tokens"] == 16
    assert summary["new_tokens_delivered"] == sum(len(s["completion_ids"]) for s in samples)
    assert sum(not s["finished"] for s in samples) >= 6  # most run the whole block
    for s in samples:
        ids = s["completion_ids"]
        assert len(ids) == 16 or (s["finished"] and 0 < len(ids) < 16), s
        assert all(0 <= i < space.vocab_size for i in ids)
        assert space.decode(ids) == s["completion"] and s["text"] == PROMPT + s["completion"]
    # fluent: the base model's perplexity of the continuations is that of text, not salad
    prompt = space.encode(PROMPT)
    nll = torch.cat(
        [
            continuation_nll(default_base, prompt, torch.tensor([s["completion_ids"]]))[0]
            for s in samples
        ]
    )
    assert float(nll.mean().exp()) < 60


@pytest.mark.slow
def test_demo_guidance_moves_the_critic_and_the_reward(default_run, unguided_run):
    """Seed for seed, sampling.json's guidance makes the text the sentiment critic scores
    clearly higher than the same demo with ``"guidance": 0`` does, and the true reward
    (VADER) agrees on average."""
    guided, summary = default_run
    unguided, summary0 = unguided_run
    assert summary0["guidance"] == 0.0 and summary["guidance"] == CARD_GUIDANCE["sentiment"][0]
    assert [s["seed"] for s in guided] == [s["seed"] for s in unguided]
    assert [s["text"] for s in guided] != [s["text"] for s in unguided]
    lift = [
        g["critic"]["sentiment"] - u["critic"]["sentiment"]
        for g, u in zip(guided, unguided, strict=True)
    ]
    assert sum(d > 0 for d in lift) >= 7, lift
    assert sum(lift) / len(lift) > 0.5, lift

    def reward(rows):
        return sum(r["rewards"]["sentiment"] for r in rows) / len(rows)

    assert reward(guided) > reward(unguided) + 0.2


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["nontoxic", "sentiment:1,nontoxic:0.5"])
def test_demo_critics_guide_other_rewards(default_base, demo_models, reward):
    """The other critic, alone (its own guidance, 48) and mixed with sentiment: seed for
    seed, the default guidance raises the guiding critics' weighted score over guidance 0
    (5 steps, 4 samples, for time)."""
    scores = {}
    for guidance in (None, 0.0):
        sampler = _demo_sampler(default_base, demo_models, reward, guidance=guidance, steps=5)
        out = sampler.sample(4, 16, prompt="I think", seed=0)
        scores[guidance] = sum(c.weight * out.critic_values[c.name] for c in sampler.critics)
    lift = scores[None] - scores[0.0]
    assert int((lift > 0).sum()) >= 3, lift
    assert float(lift.mean()) > 0.5, lift


@pytest.mark.slow
def test_demo_models_load_and_behave(default_base, demo_models):
    ckpt = demo_models
    den = ckpt.denoiser
    cfg = den.config
    assert cfg.dim == default_base.space.dim and cfg.max_length == CARD_WINDOW
    assert cfg.arch == "adaln" and cfg.self_condition and cfg.clean_prompt and cfg.time_grid
    # MODEL_CARD.md: "10.3 M parameters"
    assert round(sum(p.numel() for p in den.parameters()) / 1e6, 1) == 10.3
    assert set(ckpt.critics) == {"sentiment", "nontoxic"}
    space = default_base.space
    # the sentiment critic ranks clearly positive above clearly negative text
    texts = ["I love this wonderful, happy day.", "I hate this awful, terrible day."]
    ids = [space.encode(t) for t in texts]
    n = min(map(len, ids))
    with torch.no_grad():
        h = ckpt.critics["sentiment"](space.embed(torch.tensor([i[:n] for i in ids])), 0.0)
    assert h[0] > h[1]
    # the denoiser recovers most tokens of real text at a low noise level, clean prompt given
    ids = torch.tensor([space.encode("The movie was great and the actors were wonderful.")])
    z0 = space.embed(ids)
    t = torch.full((1,), 0.3)
    from fastdia.train.denoiser import noised

    gen = torch.Generator().manual_seed(0)
    z_t = noised(z0, t, torch.randn(z0.shape, generator=gen), cfg.schedule)
    with torch.no_grad():
        x0 = den(z_t, t)
    from fastdia.ops import round_to_vocab

    acc = (round_to_vocab(x0, space.weight, space.rounding_bias("l2")) == ids).float().mean()
    assert acc > 0.7


# ---- the model card's numbers are the results files' ---------------------------------------
# the card's short row names -> the eval's
EVAL_ROWS = {
    "base model": "base model (T=0.8, top-p 1)",
    "base model (T=0.8)": "base model (T=0.8, top-p 1)",
    "best-of-4": "best-of-4 (T=0.8, top-p 1)",
    "best-of-4 (T=0.8)": "best-of-4 (T=0.8, top-p 1)",
    "best-of-16": "best-of-16 (T=0.8, top-p 1)",
    "base model (T=1, top-p 0.95)": "base model (T=1, top-p 0.95)",
    "best-of-4 (T=1, top-p 0.95)": "best-of-4 (T=1, top-p 0.95)",
    "tilt-only decode": "tilt-only decode (T=0.8, tilt 0.1)",
    "pure-noise latent (ablation)": "fastdia, pure-noise latent (ablation)",
    "**fastdia default**": "fastdia lambda=192 (default)",
}


def _table(text: str, header: str) -> list[list[str]]:
    """The rows (cells) of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _from_json(row: dict) -> dict[str, str]:
    """An eval.json row in the card's cells."""
    ci, judges = row["ci"], row["judges"]
    lo, hi = ci["positive_frac"]
    plo, phi = ci["perplexity"]
    return {
        "positive": f"{_pct(row['rewards']['sentiment']['positive_frac'])} "
        f"[{_pct(lo)}, {_pct(hi)}] / {_pct(judges['afinn']['positive_frac'])}",
        "perplexity": f"{row['perplexity']:.1f} [{plo:.1f}, {phi:.1f}] / "
        f"{judges['gemma3-270m']['perplexity']:.1f}",
        "distinct-2": f"{row['distinct_2']:.2f}",
        "degenerate": _pct(row["degenerate_frac"]),
        "hacking": _pct(judges["afinn"]["reward_hacking_frac"]),
        "s / 100 tok": f"{row['seconds_per_100_tokens']:.2f}",
    }


def _from_md(cells: dict[str, str]) -> dict[str, str]:
    """An eval-N.md row in the card's cells."""
    first = cells["perplexity (gemma3-270m)"].split(" [")[0]
    return {
        "positive": f"{cells['positive']} / {cells['positive (afinn)'].split(' [')[0]}",
        "perplexity": f"{cells['perplexity']} / {first}",
        "distinct-2": cells["distinct-2"].split(" [")[0],
        "degenerate": cells["degenerate"],
        "s / 100 tok": cells["s / 100 tok"],
    }


def test_model_card_eval_tables_are_the_results_files():
    """Every cell of the card's two eval tables is the committed result's: the 32-token
    rows from eval.json, the 64- and 128-token rows from eval-64.md and eval-128.md."""
    card = (DEMO_CHECKPOINT / "MODEL_CARD.md").read_text()
    results = json.loads((DEMO_CHECKPOINT / "eval.json").read_text())
    assert results["config"]["new_tokens"] == 32 and results["config"]["num_samples"] == 4
    by_name = {(s, r["name"]): _from_json(r) for s, rows in results["sets"].items() for r in rows}
    columns = ["positive", "perplexity", "distinct-2", "degenerate", "hacking", "s / 100 tok"]
    main_rows = _table(card, "| prompts | row | positive (VADER / AFINN)")
    assert len(main_rows) == 16
    for prompts, name, *cells in main_rows:
        want = by_name[(prompts, EVAL_ROWS[name])]
        assert dict(zip(columns, cells, strict=True)) == want, (prompts, name)
    by_tokens = {}
    for n in (64, 128):
        md = (DEMO_CHECKPOINT / f"eval-{n}.md").read_text()
        header = md.splitlines()[0].strip("|").split("|")
        for line in _table(md, "| prompts | row"):
            cells = dict(zip([h.strip() for h in header], line, strict=True))
            by_tokens[(cells["prompts"], str(n), cells["row"])] = _from_md(cells)
    del columns[4]  # no hacking column
    long_rows = _table(card, "| prompts | new tokens | row |")
    assert len(long_rows) == 24
    for prompts, tokens, name, *cells in long_rows:
        got = dict(zip(columns, cells, strict=True))
        if tokens == "32":
            want = by_name[(prompts, EVAL_ROWS[name])]
            assert got == {k: want[k] for k in columns}, (prompts, tokens, name)
        else:
            assert got == by_tokens[(prompts, tokens, EVAL_ROWS[name])], (prompts, tokens, name)
    # the card's opening sentence: the default's positive rates at 32 and 64 new tokens
    opening = re.sub(r"\s+", " ", card.split("## How it samples")[0])
    said = re.search(
        r"(\d+%) / (\d+%) positive from neutral / negative prompts at 32 new tokens, "
        r"(\d+%) / (\d+%) at 64",
        opening,
    )
    assert said, opening
    default = EVAL_ROWS["**fastdia default**"]
    want = [by_name[(s, default)]["positive"] for s in ("neutral", "negative")]
    want += [by_tokens[(s, "64", default)]["positive"] for s in ("neutral", "negative")]
    assert list(said.groups()) == [w.split(" ")[0] for w in want]
