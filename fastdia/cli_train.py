"""``fastdia make-data``, ``fastdia train-denoiser``, ``fastdia train-critic`` and
``fastdia train-proposal``."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from fastdia.errors import ConfigError

log = logging.getLogger("fastdia")


def _common(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    from fastdia.base_model import DEFAULT_BASE_MODEL

    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--length", type=int, default=32, help="tokens per window")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    if data:
        p.add_argument(
            "--data",
            required=True,
            help="a folder from `fastdia make-data`, text:PATH or corpus:NAME",
        )
        p.add_argument("--out", required=True, help="checkpoint folder to write")
        p.add_argument("--holdout", type=float, default=0.05, help="fraction held out")


def _optim(p: argparse.ArgumentParser, *, steps: int, lr: float, batch: int) -> None:
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue exactly where the run stopped")


def add_parsers(sub: Any) -> None:
    """Register the data and training subcommands."""
    p = sub.add_parser("make-data", help="sample training windows from the base model")
    _common(p, data=False)
    p.add_argument("--out", required=True, help="dataset folder (resumable)")
    p.add_argument("--num-sequences", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--prompts", default=None, help="file of prompts, one per line")
    p.add_argument("--shard-size", type=int, default=256, help="sequences per shard file")
    p.add_argument(
        "--states",
        action="store_true",
        help="also store the base model's last-layer hidden states of every window "
        "(float16, d numbers per token: 1.2 KB per token for the default base model)",
    )
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("train-denoiser", help="train the diffusion denoiser")
    _common(p)
    _optim(p, steps=20000, lr=3e-4, batch=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--prediction",
        default="x0",
        help="eps, x0, or tokens (a distribution over the data's tokens, cross-entropy)",
    )
    p.add_argument("--schedule", default="sqrt", help="linear, cosine or sqrt")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument(
        "--arch", default="encoder", help="encoder (time at the input) or adaln (every layer)"
    )
    p.add_argument(
        "--self-condition", action="store_true", help="feed back the previous x0 estimate"
    )
    p.add_argument(
        "--clean-prompt", action="store_true", help="train with clean, masked prompt prefixes"
    )
    p.add_argument(
        "--time-warp",
        action="store_true",
        help="after training, measure the loss over t and store the step allocation",
    )
    p.add_argument(
        "--train-times",
        default="uniform",
        help="uniform (t ~ U(0, 1]) or warp (t drawn uniformly in the running loss curve, "
        "CDCD: training goes where tokens are decided)",
    )
    p.add_argument(
        "--noise-mask",
        type=float,
        default=0.0,
        metavar="FRAC",
        help="fraction of windows (0 to 1) trained with half of their positions at pure "
        "noise, to be predicted from context as in a masked LM; default 0",
    )
    p.add_argument(
        "--prefix-states",
        type=int,
        default=0,
        metavar="M",
        help="read the base model's last-layer states of the M tokens before the window's "
        "first noisy position (needs --arch adaln and data made with `make-data --states`; "
        "--length is then the window, cut from the data's longer sequences); default 0",
    )
    p.add_argument(
        "--lm-prior",
        action="store_true",
        help="with --prefix-states and --prediction tokens: add the base model's next-token "
        "logits (from the last state) to the first noisy position's (a tied base model)",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="FOLDER",
        help="start from the denoiser in this checkpoint folder (fine-tuning; same "
        "architecture options)",
    )
    p.set_defaults(func=cmd_train_denoiser)

    p = sub.add_parser("train-critic", help="train a critic that imitates a reward")
    _common(p)
    _optim(p, steps=3000, lr=1e-3, batch=128)
    p.add_argument("--reward", required=True, help="one reward, e.g. sentiment")
    p.add_argument(
        "--kind",
        default="token_local",
        help="token_local, context, or value (the expected reward of the whole sample "
        "given the base model's states before a block of --length tokens and the noisy "
        "block; needs data made with `make-data --states`)",
    )
    p.add_argument(
        "--prefix-states",
        type=int,
        default=8,
        metavar="M",
        help="a value critic reads the states of the M tokens before its block; default 8",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=2,
        help="context and value critics: transformer layers; a value critic with 0 takes the "
        "token-local form with a context-dependent bias (a smooth gradient); default 2",
    )
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument(
        "--target",
        default="reward",
        help="what the critic regresses: reward, or logit (for probability rewards: nontoxic)",
    )
    p.add_argument(
        "--schedule",
        default=None,
        help="noise schedule (default: the denoiser's in --out, else sqrt)",
    )
    p.set_defaults(func=cmd_train_critic)

    p = sub.add_parser(
        "train-proposal",
        help="train an amortised proposal that predicts the critics' guiding gradient "
        "(sampled with --guidance-estimator proposal)",
    )
    _common(p)
    _optim(p, steps=2000, lr=1e-3, batch=64)
    p.add_argument(
        "--rewards",
        default=None,
        help="comma-separated reward specs, one head each (default: every token-local "
        "critic in --out); their critics must be in --out",
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument(
        "--schedule",
        default=None,
        help="noise schedule (default: the denoiser's in --out, else sqrt)",
    )
    p.set_defaults(func=cmd_train_proposal)


def _setup(args: argparse.Namespace) -> tuple[Any, str]:
    """The base model on this process's device (under torchrun: this rank's, after joining
    the process group)."""
    from fastdia import distributed as dist
    from fastdia.base_model import load_base_model
    from fastdia.device import default_device

    device = default_device(args.device)
    if args.length < 2:
        raise ConfigError(f"--length must be >= 2, got {args.length}")
    w = dist.world(device)
    if w.distributed and args.command != "make-data" and args.batch_size < w.size:
        raise ConfigError(
            f"--batch-size {args.batch_size} cannot be shared by {w.size} ranks (each "
            "trains on its share of every global batch): use a batch of at least the "
            "world size, or fewer ranks"
        )
    device = dist.rank_device(device, w)
    return load_base_model(args.base_model, device=device), device


def _optim_config(args: argparse.Namespace) -> Any:
    from fastdia.train.common import OptimConfig

    return OptimConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
        ema=args.ema,
        seed=args.seed,
        save_every=args.save_every,
        val_every=args.val_every,
    )


def _data(args: argparse.Namespace, base: Any, *, states: bool = False) -> tuple[Any, Any]:
    from fastdia.data import load_dataset

    if not 0 < args.holdout < 0.5:
        raise ConfigError(f"--holdout must be in (0, 0.5), got {args.holdout}")
    data = load_dataset(args.data, base, args.length, states=states)
    return data.split(args.holdout, seed=args.seed)


def cmd_make_data(args: argparse.Namespace) -> int:
    from fastdia import distributed as dist
    from fastdia.data import DEFAULT_PROMPTS, generate_dataset

    prompts = DEFAULT_PROMPTS
    if args.prompts:
        prompts = tuple(p for p in Path(args.prompts).read_text().splitlines() if p.strip())
    base, _ = _setup(args)
    w = dist.world()  # under torchrun: rank r writes shards r, r + W, ...
    generate_dataset(
        base,
        args.out,
        num_sequences=args.num_sequences,
        length=args.length,
        prompts=prompts,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        states=args.states,
        progress=not args.no_progress and w.is_main,
        world=w,
    )
    dist.finish()
    if w.is_main:
        print(json.dumps({"out": args.out, "num_sequences": args.num_sequences}))
    return 0


def cmd_train_denoiser(args: argparse.Namespace) -> int:
    from fastdia import distributed as dist
    from fastdia.models.denoiser import DenoiserConfig
    from fastdia.schedules import check_choice
    from fastdia.train.denoiser import train_denoiser
    from fastdia.train.time_warp import TRAIN_TIMES

    check_choice(args.train_times, TRAIN_TIMES, "--train-times")
    if not 0.0 <= args.noise_mask <= 1.0:
        raise ConfigError(f"--noise-mask must lie in [0, 1] (a fraction), got {args.noise_mask}")
    optim = _optim_config(args)
    base, device = _setup(args)
    config = DenoiserConfig(
        dim=base.space.dim,
        max_length=args.length,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        prediction=args.prediction,
        schedule=args.schedule,
        dropout=args.dropout,
        arch=args.arch,
        self_condition=args.self_condition,
        clean_prompt=args.clean_prompt,
        prefix_states=args.prefix_states,
        state_dim=base.hidden_size if args.prefix_states else 0,
        lm_prior=args.lm_prior,
    )
    train, hold = _data(args, base, states=config.reads_states)
    init = None
    if args.init:
        from fastdia.models.checkpoint import DENOISER_STEM, load_model

        init = load_model(args.init, DENOISER_STEM, base.space)
    run = train_denoiser(
        base,
        train,
        args.out,
        config,
        optim,
        holdout=hold,
        resume=args.resume,
        device=device,
        progress=not args.no_progress,
        warp=args.time_warp,
        train_times=args.train_times,
        init=init,
        noise_mask=args.noise_mask,
        world=dist.world(),
    )
    last = run.history[-1] if run.history else {}
    if dist.world().is_main:
        print(json.dumps({"out": args.out, "seconds": run.seconds, "final": last}))
    dist.finish()
    return 0


def cmd_train_critic(args: argparse.Namespace) -> int:
    from fastdia import distributed as dist
    from fastdia.models.critic import CriticConfig
    from fastdia.rewards import build_rewards
    from fastdia.train.critic import reward_labels, train_critic

    rewards = build_rewards(args.reward)
    if len(rewards.names) != 1:
        raise ConfigError(
            f"train one critic per reward; --reward {args.reward!r} names "
            f"{len(rewards.names)}: {', '.join(rewards.names)}"
        )
    name = rewards.names[0]
    optim = _optim_config(args)
    schedule = args.schedule or _denoiser_schedule(Path(args.out)) or "sqrt"
    value = args.kind == "value"
    CriticConfig(  # the settings checked before anything loads
        dim=1,
        kind=args.kind,
        hidden=args.hidden,
        reward=name,
        target=args.target,
        layers=args.layers,
        prefix_states=args.prefix_states if value else 0,
        state_dim=1 if value else 0,
    )
    base, device = _setup(args)
    train, hold = _data(args, base, states=value)
    reward = rewards.components[0][0]
    labels, hold_labels = reward_labels(base, train, reward), reward_labels(base, hold, reward)
    config = CriticConfig(
        dim=base.space.dim,
        kind=args.kind,
        hidden=args.hidden,
        reward=name,
        target=args.target,
        max_length=args.length if value else max(64, args.length),
        prefix_states=args.prefix_states if value else 0,
        layers=args.layers,
        state_dim=base.hidden_size if value else 0,
    )
    run = train_critic(
        base,
        train,
        labels,
        hold,
        hold_labels,
        args.out,
        config,
        optim,
        schedule=schedule,
        resume=args.resume,
        device=device,
        progress=not args.no_progress,
        world=dist.world(),
    )
    if dist.world().is_main:
        print(
            json.dumps(
                {"out": args.out, "reward": name, "seconds": run.seconds, "metrics": run.metrics}
            )
        )
    dist.finish()
    return 0


def cmd_train_proposal(args: argparse.Namespace) -> int:
    from fastdia.models.checkpoint import load_checkpoint
    from fastdia.models.proposal import ProposalConfig
    from fastdia.rewards import build_rewards
    from fastdia.train.proposal import check_imitable, train_proposal

    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        raise ConfigError(
            "train-proposal runs on one process (the demo's takes 5 minutes on one CPU "
            "thread): start it without torchrun"
        )
    rewards = None
    if args.rewards is not None:
        rewards = list(build_rewards(args.rewards).names)
        ProposalConfig(dim=1, rewards=rewards, hidden=args.hidden)  # checked before loading
    optim = _optim_config(args)
    schedule = args.schedule or _denoiser_schedule(Path(args.out)) or "sqrt"
    base, device = _setup(args)
    critics = load_checkpoint(args.out, base.space, device=device).critics
    if rewards is None:
        rewards = sorted(n for n, c in critics.items() if c.config.kind == "token_local")
        if not rewards:
            raise ConfigError(
                f"{args.out} has no token-local critic to imitate: train one first with "
                "`fastdia train-critic`"
            )
    check_imitable(critics, rewards)
    train, hold = _data(args, base)
    config = ProposalConfig(dim=base.space.dim, rewards=rewards, hidden=args.hidden)
    run = train_proposal(
        base,
        train,
        hold,
        critics,
        args.out,
        config,
        optim,
        schedule=schedule,
        resume=args.resume,
        device=device,
        progress=not args.no_progress,
    )
    print(
        json.dumps(
            {"out": args.out, "rewards": rewards, "seconds": run.seconds, "metrics": run.metrics}
        )
    )
    return 0


def _denoiser_schedule(folder: Path) -> str | None:
    meta = folder / "denoiser.json"
    if meta.is_file():
        return json.loads(meta.read_text())["config"]["schedule"]
    return None
