"""Rewards on decoded text, and the ``--reward`` spec language that combines them.

>>> reward = build_rewards("sentiment:2,keyword:happy,joy")  # doctest: +SKIP
>>> reward(["I am happy", "I am sad"])  # doctest: +SKIP
{'sentiment': tensor([...]), 'keyword:happy,joy': tensor([0.5, 0.]), 'total': tensor([...])}

Every reward maps ``B`` strings to a float32 ``[B]`` CPU tensor (see :class:`Reward`).
Built-ins: ``sentiment``, ``nontoxic``, ``similarity:TEXT``, ``keyword:W1,W2,...``
(:mod:`fastdia.rewards.builtin`); grammar and registry in :mod:`fastdia.rewards.registry`.
Importing this package imports neither vaderSentiment, profanity_check nor transformers:
they load when a reward is first called.
"""

from fastdia.rewards.base import Reward
from fastdia.rewards.builtin import (
    KeywordReward,
    NontoxicReward,
    SentimentReward,
    SimilarityReward,
)
from fastdia.rewards.registry import (
    REWARDS,
    RegisteredReward,
    RewardFactory,
    RewardItem,
    WeightedReward,
    build_rewards,
    describe_rewards,
    format_reward_spec,
    parse_reward_spec,
    register_reward,
    unregister_reward,
)

__all__ = [
    "REWARDS",
    "KeywordReward",
    "NontoxicReward",
    "RegisteredReward",
    "Reward",
    "RewardFactory",
    "RewardItem",
    "SentimentReward",
    "SimilarityReward",
    "WeightedReward",
    "build_rewards",
    "describe_rewards",
    "format_reward_spec",
    "parse_reward_spec",
    "register_reward",
    "unregister_reward",
]
