"""The checks of a run's sizes and seeds, shared by the sampler, its plans, the batch
jobs and the CLI: seeds, the denoiser window, the block size, the new-token count."""

from __future__ import annotations

from collections.abc import Sequence

from fastdia.errors import ConfigError


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is an int in ``[0, 2**31)``; else raise ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ConfigError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    return seed


def row_seed_list(seed: int | Sequence[int], rows: int) -> list[int]:
    """Per-row seeds: ``seed + b`` (mod ``2**31``) for one seed, or ``rows`` given seeds."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        check_seed(seed)
        return [(seed + b) % 2**31 for b in range(rows)]
    seeds = [check_seed(s) for s in seed]
    if len(seeds) != rows:
        raise ConfigError(f"got {len(seeds)} seeds for {rows} rows: give one seed or one per row")
    return seeds


def check_window(window: int | None, max_length: int) -> int:
    """The denoiser window ``W``: ``window``, or the denoiser's ``max_length``."""
    if window is None:
        return max_length
    if window > max_length:
        raise ConfigError(
            f"a window of {window} tokens exceeds the denoiser's maximum of {max_length}"
        )
    return window


def check_block_size(block_size: int | None, window: int) -> int:
    """The block size ``K`` for a denoiser window ``W``: ``block_size``, or ``W // 2``."""
    if block_size is None:
        return max(1, window // 2)
    if not 1 <= block_size <= window:
        raise ConfigError(
            f"block size {block_size} does not fit the denoiser's window of {window} tokens; "
            f"use --block-size in [1, {window}]"
        )
    return block_size


def check_new_tokens(new_tokens: int, context: int | None, prompt_tokens: int = 0) -> int:
    """``new_tokens`` if it is a positive int that fits the base model's ``context`` after
    ``prompt_tokens``; else a ConfigError naming the limit."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ConfigError(f"--new-tokens must be a positive integer, got {new_tokens!r}")
    if context is not None and prompt_tokens + new_tokens > context:
        raise ConfigError(
            f"--new-tokens {new_tokens} after a prompt of {prompt_tokens} tokens exceeds the "
            f"base model's context of {context} tokens; use --new-tokens <= "
            f"{max(context - prompt_tokens, 0)} or a shorter prompt"
        )
    return new_tokens
