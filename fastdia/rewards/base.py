"""The interface every reward implements, and the input check they share.

A reward scores decoded text: it maps a batch of ``B`` strings to a float32 tensor of
shape ``[B]`` on the CPU, one score per text, higher meaning "more of what we want".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from fastdia.errors import ConfigError


@runtime_checkable
class Reward(Protocol):
    """A batched scorer of decoded text.

    Attributes:
        name: The canonical spec string of this reward, the one :func:`parse_reward_spec`
            reads back, e.g. ``"sentiment"``, ``"similarity:a great film"`` or
            ``"keyword:happy,joy"``. It is also the reward's key in the dictionary a
            :class:`~fastdia.rewards.registry.WeightedReward` returns.
    """

    name: str

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Score a batch of texts.

        Args:
            texts: ``B`` decoded strings (``B`` may be 0).

        Returns:
            float32 tensor of shape ``[B]`` on the CPU; entry ``i`` scores ``texts[i]``.
        """
        ...


def as_text_list(texts: Sequence[str], *, who: str) -> list[str]:
    """Check that ``texts`` is a sequence of strings and return it as a list.

    A bare ``str`` is a ``Sequence[str]`` too (of its characters); it is rejected, because
    scoring one text per character is never what the caller meant.

    Args:
        texts: the batch to score.
        who: the reward's name, for the error message.

    Returns:
        ``list(texts)``.

    Raises:
        ConfigError: ``texts`` is a ``str`` or holds something that is not a ``str``.
    """
    if isinstance(texts, str):
        raise ConfigError(
            f"reward {who!r} scores a batch of texts but got a single str; "
            f"pass a list, e.g. [{texts[:20]!r}]"
        )
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ConfigError(
                f"reward {who!r} got a {type(t).__name__} at position {i}; pass decoded "
                "strings (decode token ids with the tokenizer first)"
            )
    return out
