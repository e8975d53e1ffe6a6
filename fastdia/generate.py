"""The stable Python entry point for pipelines: load once, generate many.

>>> from fastdia.generate import Generator  # doctest: +SKIP
>>> gen = Generator()                        # the embedded base model, the shipped demo
>>> result = gen.generate(["The movie was", "My day"], new_tokens=64, num_samples=2)
>>> [g.text for g in result.generations]     # prompt-major: prompt 0's samples first

A :class:`Generator` holds the base model (loaded once, or a ``transformers`` model and
tokenizer you already hold), the checkpoint, and one sampler per ``(reward, guidance)``
with its captured plans; ``fastdia generate`` (batch jobs) and ``fastdia serve`` (HTTP) run
on it. Rows are independent: a row's text depends on its prompt, seed and settings only,
never on what else shares its batch.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastdia.errors import ConfigError
from fastdia.prompts import Prompt, encode_prompt
from fastdia.settings import check_guidance

log = logging.getLogger(__name__)

DEFAULT_REWARD = "sentiment"
DEFAULT_NEW_TOKENS = 32


def canonical_reward(spec: str) -> str:
    """The canonical form of a ``--reward`` spec (``sentiment:1`` -> ``sentiment``);
    ConfigError names a bad one. Pure: builds no reward."""
    from fastdia.rewards.registry import format_reward_spec, parse_reward_spec

    return format_reward_spec(parse_reward_spec(spec))


@dataclass(frozen=True)
class GroupKey:
    """What rows must share to share a batch: the reward spec (canonical), the guidance
    (None: the checkpoint's), the number of new tokens and the chat template."""

    reward: str
    guidance: float | None
    new_tokens: int
    chat: bool


@dataclass
class Generation:
    """One sample: its prompt and text, and what the reward and the critics say of it.

    ``prompt`` is as given (text, token ids or None); ``text`` is what the reward reads (the
    prompt and the completion; with ``chat`` the assistant's reply only); ``completion`` is
    the generated text alone, ``new_tokens`` its token count (fewer than asked when the row
    ``finished`` at an end token).
    """

    prompt: Prompt
    text: str
    completion: str
    completion_ids: list[int]
    new_tokens: int
    finished: bool
    seed: int
    rewards: dict[str, float]
    critic: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatchResult:
    """The rows of one batch, with the batch's sampling and scoring seconds."""

    generations: list[Generation]
    sampling_seconds: float
    scoring_seconds: float


@dataclass
class GenerateResult:
    """What :meth:`Generator.generate` returns.

    Attributes:
        generations: one per (prompt, sample), prompt-major.
        seconds: wall time of the call (sampling and scoring).
        sampling_seconds: time in the sampler alone.
        new_tokens: generated tokens delivered (a finished row counts its tokens only).
    """

    generations: list[Generation] = field(default_factory=list)
    seconds: float = 0.0
    sampling_seconds: float = 0.0
    new_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class Generator:
    """Base model, checkpoint and samplers, loaded once; see the module docstring.

    Args:
        model: an already-loaded ``transformers`` causal LM (with ``tokenizer``); default:
            load ``base_model``.
        tokenizer: ``model``'s tokenizer.
        base_model: what to load when no ``model`` is given (the embedded default, a model
            folder or a cached Hugging Face id).
        checkpoint: a checkpoint folder (default: the shipped demo); it must have been
            trained on this base model's embeddings (fingerprint check, here).
        random_init: untrained denoiser and critics instead of a checkpoint.
        reward: the default reward spec (its sampler is built here, so that a checkpoint
            without its critic fails at once).
        device: ``"cpu"`` or ``"cuda"`` (default: cuda if available).
        backend: the op variant (default: ``$FASTDIA_BACKEND``, else auto).
        settings: sampling settings over the checkpoint's ``sampling.json`` (keys of
            :data:`fastdia.settings.SAMPLING_KEYS`, e.g. ``{"steps": 20}``).
        max_samplers: how many ``(reward, guidance)`` samplers stay built (least recently
            used ones are dropped), so that a server's memory stays bounded.

    Raises:
        ConfigError: an unknown setting or a value out of range, ``model`` without
            ``tokenizer``; CheckpointError / AssetMissingError: as :func:`build_sampler`.
    """

    def __init__(
        self,
        *,
        model: Any = None,
        tokenizer: Any = None,
        base_model: str | None = None,
        checkpoint: str | Path | None = None,
        random_init: bool = False,
        reward: str = DEFAULT_REWARD,
        device: str | None = None,
        backend: str | None = None,
        settings: dict[str, Any] | None = None,
        max_samplers: int = 8,
    ) -> None:
        from fastdia import ops
        from fastdia.base_model import DEFAULT_BASE_MODEL, load_base_model, wrap_base_model
        from fastdia.device import default_device
        from fastdia.models.checkpoint import load_checkpoint
        from fastdia.ops import registry
        from fastdia.pipeline import resolve_checkpoint, sampler_config
        from fastdia.settings import SAMPLING_KEYS

        if (model is None) != (tokenizer is None):
            raise ConfigError("pass both model= and tokenizer= (a loaded pair), or neither")
        if model is not None and base_model is not None:
            raise ConfigError("pass model= and tokenizer=, or base_model=, not both")
        unknown = sorted(set(settings or {}) - set(SAMPLING_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown sampling setting(s) {', '.join(unknown)}; known: "
                f"{', '.join(SAMPLING_KEYS)}"
            )
        if max_samplers < 1:
            raise ConfigError(f"max_samplers must be >= 1, got {max_samplers}")
        self.random_init = random_init
        self.checkpoint = None if random_init else resolve_checkpoint(checkpoint)
        self.default_reward = canonical_reward(reward)
        self._given = dict(settings or {})
        self._settings: dict[str, dict[str, Any]] = {}
        self.settings = self.settings_for(self.default_reward)
        self.backend = backend
        sampler_config(self.settings, backend=backend)  # range checks, before loading
        if model is not None and device is None:  # where the given model already is
            device = str(getattr(model, "device", "cpu"))
        self.device = default_device(device)
        # pad short batches to the batch size on a GPU (one captured plan serves them);
        # on a CPU a padding row costs as much as a real one
        self.pads: bool = str(self.device).startswith("cuda")
        for op in ops.SAMPLER_OPS:
            registry.resolve_backend(backend, op, self.device)
        if model is not None:
            self.base = wrap_base_model(model, tokenizer)
        else:
            self.base = load_base_model(base_model or DEFAULT_BASE_MODEL, device=self.device)
        self.loaded = (
            None
            if self.checkpoint is None
            else load_checkpoint(self.checkpoint, self.base.space, device=self.device)
        )
        self.max_samplers = max_samplers
        self._assemblies: OrderedDict[tuple[str, float | None], Any] = OrderedDict()
        self._rewards: dict[str, Any] = {}
        sampler = self.assembly(self.default_reward, None).sampler
        self.block_size: int = sampler.block_size
        self.context: int | None = sampler.context_length()

    def settings_for(self, reward: str) -> dict[str, Any]:
        """The sampling settings of rows guided by the canonical ``reward`` spec: the given
        settings over the checkpoint's (its per-reward defaults, where it has them)."""
        from fastdia.pipeline import sampling_settings

        if reward not in self._settings:
            self._settings[reward] = sampling_settings(self.checkpoint, reward, **self._given)
        return self._settings[reward]

    # ---- validation (cheap, no sampling; safe beside a running batch) ------------------
    def guidance(self, guidance: float | None, reward: str | None = None) -> float:
        """The guidance a row runs with: ``guidance``, else the settings' for ``reward``
        (default: the default reward)."""
        settings = self.settings_for(reward or self.default_reward)
        return float(settings["guidance"] if guidance is None else guidance)

    def check(
        self, prompt: Prompt, key: GroupKey, *, tokenizer: Any = None
    ) -> tuple[list[int], GroupKey]:
        """Check one row before it is queued: its reward (known, with a critic in the
        checkpoint), its new tokens (a positive int that fits the context after the prompt,
        in whole blocks). Builds nothing and runs no model.

        Args:
            prompt: text, token ids (used as given) or None.
            key: the row's settings.
            tokenizer: the tokenizer to encode with (default: the base model's); a server
                gives its request thread a copy of its own.

        Returns:
            The prompt's token ids and ``key`` made canonical (the reward spec's canonical
            form; a guidance equal to the settings' as None), so that equal settings share
            batches and samplers.

        Raises:
            ConfigError / CheckpointError: naming the problem.
        """
        from fastdia.pipeline import check_critics
        from fastdia.run_checks import check_new_tokens

        spec = canonical_reward(key.reward)
        if self.loaded is not None:
            kind = self.settings["critic_kind"]
            critics = self.loaded.critics_of(kind)
            check_critics(self.checkpoint, critics, self.rewards(spec).names, kind)
        check_new_tokens(key.new_tokens, None)
        if key.guidance is not None:
            check_guidance(key.guidance)
        space = self.base.space
        ids = encode_prompt(tokenizer or space.tokenizer, space.vocab_size, prompt, chat=key.chat)
        padded = -(-key.new_tokens // self.block_size) * self.block_size
        if self.context is not None and len(ids) + padded > self.context:
            raise ConfigError(
                f"a prompt of {len(ids)} tokens and {key.new_tokens} new tokens (in blocks of "
                f"{self.block_size}) exceed the base model's context of {self.context} tokens; "
                "shorten the prompt or ask for fewer new tokens"
            )
        same = key.guidance == self.settings_for(spec)["guidance"]
        guidance = None if same else key.guidance
        return ids, GroupKey(spec, guidance, key.new_tokens, key.chat)

    def rewards(self, spec: str) -> Any:
        """The :class:`~fastdia.rewards.WeightedReward` of ``spec`` (cached)."""
        from fastdia.rewards import build_rewards

        if spec not in self._rewards:
            self._rewards[spec] = build_rewards(spec)
        return self._rewards[spec]

    # ---- samplers --------------------------------------------------------------------
    def assembly(self, reward: str, guidance: float | None) -> Any:
        """The :class:`~fastdia.pipeline.Assembly` for ``(reward spec, guidance)``: built
        on first use over the one loaded checkpoint, its plans cached by shape; at most
        ``max_samplers`` stay built."""
        from fastdia.pipeline import build_sampler, sampler_config

        key = (canonical_reward(reward), guidance)
        if key in self._assemblies:
            self._assemblies.move_to_end(key)
            return self._assemblies[key]
        settings = dict(self.settings_for(key[0]))
        if guidance is not None:
            settings["guidance"] = guidance
        rewards = self.rewards(key[0])
        config = sampler_config(settings, backend=self.backend)
        if config.particles > 1:
            raise ConfigError(
                f"particles={config.particles}: SMC runs from `fastdia sample`, `fastdia eval` "
                "and the Sampler API, where each prompt's rows are its particles; the "
                "Generator (batch jobs, the server) writes one row per request: use particles 1"
            )
        assembly = build_sampler(
            self.base,
            config,
            rewards=list(zip(rewards.names, rewards.weights, strict=True)),
            checkpoint=self.checkpoint,
            random_init=self.random_init,
            device=self.device,
            loaded=self.loaded,
        )
        self._assemblies[key] = assembly
        while len(self._assemblies) > self.max_samplers:
            self._assemblies.popitem(last=False)
        return assembly

    # ---- sampling --------------------------------------------------------------------
    def run_batch(
        self,
        key: GroupKey,
        prompts: Sequence[Prompt],
        seeds: Sequence[int],
        *,
        pad_to: int | None = None,
    ) -> BatchResult:
        """Sample one batch: one row per ``(prompt, seed)``, all under ``key``'s settings,
        padded to ``pad_to`` rows (copies of the last row, dropped) so that a few plan sizes
        serve every batch. Then score every text with the reward.

        A row's text depends on its prompt, seed and ``key`` only (per-row noise).
        """
        from fastdia.run_checks import check_seed

        if not prompts or len(prompts) != len(seeds):
            raise ConfigError(f"need one seed per prompt, got {len(prompts)} and {len(seeds)}")
        rows = [self.check(p, key)[0] for p in prompts]
        seeds = [check_seed(s) for s in seeds]
        size = max(pad_to or 0, len(rows))
        real = len(rows)
        rows += [rows[-1]] * (size - real)
        seeds += [seeds[-1]] * (size - real)
        sampler = self.assembly(key.reward, key.guidance).sampler
        plan = sampler.plan(size, key.new_tokens, prompt_tokens=max(map(len, rows)))
        start = time.perf_counter()
        out = plan.run(rows, seed=seeds, new_tokens=key.new_tokens, chat=key.chat).subset(real)
        sampled = time.perf_counter()
        scores = self.rewards(key.reward)(out.texts)
        scored = time.perf_counter()
        generations = [
            Generation(
                prompt=prompts[j],
                text=out.texts[j],
                completion=out.completions[j],
                completion_ids=list(out.completion_ids[j]),
                new_tokens=len(out.completion_ids[j]),
                finished=bool(out.finished[j]),
                seed=int(out.seeds[j]),
                rewards={name: float(v[j]) for name, v in scores.items()},
                critic={name: float(v[j]) for name, v in out.critic_values.items()},
            )
            for j in range(real)
        ]
        return BatchResult(generations, sampled - start, scored - sampled)

    def generate(
        self,
        prompts: str | Sequence[str | None] | None,
        *,
        reward: str | None = None,
        guidance: float | None = None,
        new_tokens: int = DEFAULT_NEW_TOKENS,
        num_samples: int = 1,
        seed: int | Sequence[int] = 0,
        chat: bool = False,
        batch_size: int = 16,
    ) -> GenerateResult:
        """Generate ``num_samples`` samples of ``new_tokens`` after each prompt.

        Args:
            prompts: one prompt (text, or None for none) or a list of them.
            reward: a ``--reward`` spec (``"sentiment"``, ``"sentiment:1,nontoxic:0.5"``;
                default: the generator's).
            guidance: lambda (None: the checkpoint's ``sampling.json``).
            new_tokens: tokens to generate after each prompt.
            num_samples: samples per prompt; sample ``i`` of a prompt uses its seed ``+ i``.
            seed: one seed for every prompt, or one per prompt.
            chat: wrap each prompt in the tokenizer's chat template.
            batch_size: rows per batch (different prompts share batches).

        Returns:
            A :class:`GenerateResult` with one :class:`Generation` per (prompt, sample),
            prompt-major. Every prompt is checked before any sampling.
        """
        from fastdia.run_checks import check_seed

        many = isinstance(prompts, (list, tuple))
        texts = list(prompts) if many else [prompts]  # type: ignore[list-item]
        if not texts:
            raise ConfigError("prompts is an empty list; give at least one prompt")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(seed, int):
            seeds = [check_seed(seed)] * len(texts)
        else:
            seeds = [check_seed(s) for s in seed]
            if len(seeds) != len(texts):
                raise ConfigError(f"got {len(seeds)} seeds for {len(texts)} prompts")
        key = GroupKey(reward or self.default_reward, guidance, new_tokens, chat)
        for i, text in enumerate(texts):
            try:
                _, key = self.check(text, key)
            except ConfigError as exc:
                raise ConfigError(f"prompt {i}: {exc}") from None
        rows = [
            (text, (s + i) % 2**31)
            for text, s in zip(texts, seeds, strict=True)
            for i in range(num_samples)
        ]
        result = GenerateResult()
        start = time.perf_counter()
        size = min(batch_size, len(rows))
        for first in range(0, len(rows), size):
            part = rows[first : first + size]
            batch = self.run_batch(
                key, [p for p, _ in part], [s for _, s in part], pad_to=size if self.pads else None
            )
            result.generations += batch.generations
            result.sampling_seconds += batch.sampling_seconds
        result.seconds = time.perf_counter() - start
        result.new_tokens = sum(g.new_tokens for g in result.generations)
        return result
