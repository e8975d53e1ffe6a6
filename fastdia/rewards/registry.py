"""The reward registry and the ``--reward`` spec language.

Grammar of ``--reward NAME[:ARG][:WEIGHT],...``
================================================

* A spec is a list of *items* separated by commas. Each item is one registered reward
  (``NAME``) with its argument (``ARG``, only for rewards that take one) and its weight
  (``WEIGHT``, default ``1``). The combined reward is ``sum_i WEIGHT_i * reward_i(text)``.
* **Where items start.** The spec is split at every comma. A piece starts a new item when,
  whitespace stripped, it is a registered name followed by ``:`` or by nothing; any other
  piece continues the previous item's argument, comma included. So
  ``keyword:happy,joy,sentiment:2`` is ``keyword`` with the keywords ``happy,joy``
  (weight 1) plus ``sentiment`` with weight 2, and ``similarity:Hello, world`` is one
  item whose target is ``Hello, world``. Consequence: an argument cannot contain a comma
  followed by a registered name and then ``:``, a comma or its end
  (``keyword:happy,sentiment`` is two items); put such a keyword first
  (``keyword:sentiment,happy``). A piece that merely starts with a name, like
  ``sentiments`` or ``sentiment analysis``, continues the argument. Names are case-sensitive.
* **Rewards that take no argument** (``sentiment``, ``nontoxic``): ``NAME`` or
  ``NAME:WEIGHT``; anything after the colon must be a number.
* **Rewards that take an argument** (``similarity:TEXT``, ``keyword:W1,W2,...``): the
  argument is required. After the last colon, a part that Python's ``float()`` reads
  is the weight and the rest (after the first colon) the argument:
  ``similarity:a great film:0.5`` has target ``a great film`` and weight 0.5,
  ``similarity:note: it works`` has target ``note: it works``. A bare number is a weight,
  so ``similarity:0.5`` is an error (missing target); a target that is itself a number,
  or ends in ``:NUMBER``, needs an explicit weight: ``similarity:1984:1``,
  ``similarity:at 12:30:1``.
* **Whitespace** around names, arguments and weights is stripped (inside an argument it
  is kept).
* **Weights** are finite floats; negative weights are allowed and mean "minimise" (e.g.
  ``similarity:a sad story:-1``); zero weights are allowed (the reward is computed and
  reported but does not steer) as long as not every weight is zero. ``nan`` and ``inf``
  are errors.
* **Errors** (:class:`~fastdia.errors.ConfigError`, each naming the fix): empty spec or
  empty item, unknown name (the known rewards are listed with their help), missing
  argument, argument given to a reward that takes none, empty, non-numeric-where-required
  or non-finite weight, every weight zero, the same item listed twice.

The canonical form (what :func:`format_reward_spec` and :attr:`WeightedReward.spec` write)
is ``NAME[:ARG][:WEIGHT]`` joined by ``,`` with the weight left out when it is 1 and the
argument does not require it; it parses back to the same items.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastdia.errors import ConfigError, FastdiaError
from fastdia.rewards.base import Reward, as_text_list
from fastdia.rewards.builtin import BUILTIN_REWARDS

logger = logging.getLogger(__name__)

RewardFactory = Callable[[str | None], Reward]
"""Builds a reward from its argument (``None`` for rewards that take none)."""

RewardItem = tuple[str, str | None, float]
"""``(name, argument or None, weight)``: one item of a parsed spec."""

TOTAL_KEY = "total"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")


@dataclass(frozen=True)
class RegisteredReward:
    """One registry entry; calling it builds the reward.

    Attributes:
        name: the registered name (letters, digits, ``_``, ``-``; no ``:`` or ``,``).
        factory: ``factory(arg) -> Reward``; ``arg`` is ``None`` when ``takes_argument``
            is false, else the non-empty, stripped argument string.
        takes_argument: whether the spec must give ``NAME:ARG``.
        help: one line shown in error messages and listings.
        metavar: how the argument is shown in usage lines, e.g. ``"TEXT"``.
    """

    name: str
    factory: RewardFactory
    takes_argument: bool
    help: str
    metavar: str = "ARG"

    def __call__(self, arg: str | None = None) -> Reward:
        """Build the reward (see :attr:`factory`)."""
        return self.factory(arg)

    @property
    def usage(self) -> str:
        """``NAME[:WEIGHT]`` or ``NAME:ARG[:WEIGHT]``."""
        return (
            f"{self.name}:{self.metavar}[:WEIGHT]"
            if self.takes_argument
            else f"{self.name}[:WEIGHT]"
        )


REWARDS: dict[str, RegisteredReward] = {}
"""The registry: name -> :class:`RegisteredReward` (call it with the argument to build)."""


def register_reward(
    name: str,
    factory: RewardFactory,
    *,
    takes_argument: bool,
    help: str,
    metavar: str = "ARG",
    replace: bool = False,
) -> RegisteredReward:
    """Add a reward to :data:`REWARDS` so that specs can name it.

    Args:
        name: letters, digits, ``_`` and ``-``, starting with a letter or ``_``; not
            ``"total"``. The reward the factory builds should have ``name`` (for rewards
            without argument) or ``f"{name}:{canonical arg}"`` as its ``.name``, so that
            :attr:`WeightedReward.spec` round-trips.
        factory: ``factory(arg) -> Reward``.
        takes_argument: whether the spec must give an argument (``NAME:ARG``).
        help: a one-line description.
        metavar: how the argument is shown in usage lines (for ``takes_argument``).
        replace: allow replacing an existing entry of that name.

    Returns:
        The new entry.

    Raises:
        ConfigError: bad name, name taken (and not ``replace``), factory not callable.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == TOTAL_KEY:
        raise ConfigError(
            f"cannot register reward {name!r}: a name is letters, digits, '_' and '-', "
            f"starts with a letter or '_', and is not {TOTAL_KEY!r} (e.g. 'my_reward')"
        )
    if not callable(factory):
        raise ConfigError(f"cannot register reward {name!r}: the factory must be callable")
    if name in REWARDS and not replace:
        raise ConfigError(
            f"reward {name!r} is already registered; pick another name or pass replace=True"
        )
    entry = RegisteredReward(
        name, factory, bool(takes_argument), str(help).strip(), str(metavar) or "ARG"
    )
    REWARDS[name] = entry
    logger.debug("registered reward %r (takes_argument=%s)", name, entry.takes_argument)
    return entry


def unregister_reward(name: str) -> None:
    """Remove ``name`` from :data:`REWARDS`; raises :class:`ConfigError` if unknown."""
    if name not in REWARDS:
        raise ConfigError(f"reward {name!r} is not registered.\n{describe_rewards()}")
    del REWARDS[name]


def describe_rewards() -> str:
    """A listing of the registered rewards with their usage and help, for messages."""
    if not REWARDS:
        return "No rewards are registered."
    width = max(len(e.usage) for e in REWARDS.values())
    lines = [f"  {e.usage:<{width}}  {e.help}" for e in REWARDS.values()]
    return "Known rewards:\n" + "\n".join(lines)


# --------------------------------------------------------------------------- parsing


def _leading_name(piece: str) -> str | None:
    head = piece.split(":", 1)[0].strip()
    return head if head in REWARDS else None


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def _format_weight(weight: float) -> str:
    if weight.is_integer() and abs(weight) < 1e15:
        return str(int(weight))
    return repr(weight)


def _resolve_item(name: str, rest: str | None, spec: str) -> RewardItem:
    """Split the text after ``NAME:`` (``None`` when there is no colon) into arg, weight."""
    entry = REWARDS[name]
    example = f"'{name}:ARG'" if entry.takes_argument else f"'{name}:2'"
    arg: str | None
    weight: float | None
    if not entry.takes_argument:
        arg, weight = None, 1.0 if rest is None else _number(rest)
        if weight is None:
            assert rest is not None
            what = "an empty weight" if not rest.strip() else f"{rest.strip()!r}"
            raise ConfigError(
                f"reward {name!r} takes no argument, but {spec!r} gives it {what}; "
                f"after the colon only a weight may follow, e.g. {example}"
            )
    else:
        if rest is None:
            arg, weight = "", 1.0
        else:
            head, colon, last = rest.rpartition(":")
            weight = _number(last)
            if weight is not None:
                arg = head if colon else ""
            elif colon and not last.strip():
                raise ConfigError(
                    f"empty weight after the last ':' of {name + ':' + rest!r} in {spec!r}; "
                    "write a number after it or drop the colon"
                )
            else:
                arg, weight = rest, 1.0
        arg = arg.strip()
        if not arg:
            given = "" if rest is None else f" ({rest.strip()!r} was read as the weight)"
            raise ConfigError(
                f"reward {name!r} needs an argument{given}: write {entry.usage}, e.g. "
                f"{_EXAMPLES.get(name, example)}; an argument that is itself a number needs "
                f"an explicit weight, e.g. '{name}:1984:1'"
            )
    if not math.isfinite(weight):
        if entry.takes_argument:
            fix = (
                f"e.g. '{name}:{arg}:2'; if {(rest or '').strip()!r} is all argument, add an "
                f"explicit weight: '{name}:{(rest or '').strip()}:1'"
            )
        else:
            fix = f"e.g. {example}"
        raise ConfigError(
            f"weight of reward {name!r} in {spec!r} is {weight}; weights must be finite "
            f"numbers (negative ones minimise), {fix}"
        )
    return name, arg, float(weight)


_EXAMPLES = {"similarity": "'similarity:a great film'", "keyword": "'keyword:happy,joy'"}


def parse_reward_spec(spec: str) -> list[RewardItem]:
    """Parse a ``--reward`` spec (grammar in the module docstring).

    Args:
        spec: e.g. ``"sentiment:2,similarity:a great film:0.5,keyword:happy,joy"``.

    Returns:
        One ``(name, argument or None, weight)`` per item, in order. Arguments and names
        are stripped; arguments are passed verbatim otherwise (a factory may normalise
        them further, e.g. ``keyword`` lower-cases).

    Raises:
        ConfigError: see the module docstring.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            f"empty reward spec {spec!r}: give NAME[:ARG][:WEIGHT],..., e.g. "
            f"'sentiment' or 'sentiment:2,keyword:happy,joy'.\n{describe_rewards()}"
        )
    raw: list[tuple[str, str | None]] = []  # (name, text after 'NAME:' or None)
    for piece in spec.split(","):
        name = _leading_name(piece)
        if name is not None:
            _, colon, rest = piece.partition(":")
            raw.append((name, rest if colon else None))
            continue
        if raw and REWARDS[raw[-1][0]].takes_argument and raw[-1][1] is not None:
            raw[-1] = (raw[-1][0], f"{raw[-1][1]},{piece}")
            continue
        if not piece.strip():
            raise ConfigError(
                f"empty item in reward spec {spec!r} (a leading, trailing or doubled comma); "
                "separate items by single commas, e.g. 'sentiment,nontoxic'"
            )
        raise _unknown(piece.split(":", 1)[0].strip(), spec)
    items = [_resolve_item(name, rest, spec) for name, rest in raw]
    for name, arg, _ in items:
        same = [w for n, a, w in items if (n, a) == (name, arg)]
        if len(same) > 1:
            item = name if arg is None else f"{name}:{arg}"
            raise ConfigError(
                f"reward {item!r} is listed {len(same)} times in {spec!r}; list it once with "
                f"the sum of the weights: '{item}:{_format_weight(math.fsum(same))}'"
            )
    if all(w == 0.0 for _, _, w in items):
        raise ConfigError(
            f"every weight in reward spec {spec!r} is 0, so the reward would be constant; "
            "give at least one item a non-zero weight, e.g. 'sentiment:1'"
        )
    return items


def _unknown(name: str, spec: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(REWARDS), n=1)
    did_you_mean = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown reward {name!r} in spec {spec!r}.{did_you_mean} "
        f"Register new ones with fastdia.rewards.register_reward.\n{describe_rewards()}"
    )


def format_reward_spec(items: Sequence[RewardItem]) -> str:
    """The canonical spec string of ``items``; ``parse_reward_spec`` reads it back equal.

    Each item is ``NAME``, ``NAME:ARG``, ``NAME:WEIGHT`` or ``NAME:ARG:WEIGHT``, the weight
    written (shortest round-tripping form) unless it is 1 and the argument does not end in
    something that would read as a weight.

    Args:
        items: ``(name, argument or None, weight)`` with registered names.

    Raises:
        ConfigError: the items cannot be written as a spec that parses back to them (an
            unregistered name, an argument containing ``,NAME`` of a registered reward,
            surrounding whitespace, ...), or they are not a valid spec.
    """
    parts: list[str] = []
    for name, arg, weight in items:
        if name not in REWARDS:
            raise _unknown(name, repr(list(items)))
        text = name if arg is None else f"{name}:{arg}"
        weight = float(weight)
        plain_ok = False
        if weight == 1.0:
            try:
                plain_ok = _resolve_item(name, None if arg is None else arg, text) == (
                    name,
                    arg,
                    1.0,
                )
            except ConfigError:
                plain_ok = False
        parts.append(text if plain_ok else f"{text}:{_format_weight(weight)}")
    spec = ",".join(parts)
    back = parse_reward_spec(spec)
    wanted = [(n, a, float(w)) for n, a, w in items]
    if back != wanted:
        raise ConfigError(
            f"the reward items {wanted!r} cannot be written as a spec: {spec!r} reads back "
            f"as {back!r}; avoid surrounding whitespace in arguments and ',NAME' of a "
            "registered reward inside them"
        )
    return spec


# --------------------------------------------------------------------------- combining


class WeightedReward:
    """A weighted sum of rewards, reporting every component.

    Args:
        components: ``(reward, weight)`` pairs; reward names must be distinct and not
            ``"total"``; weights finite, not all zero.

    Raises:
        ConfigError: no components, duplicate or reserved names, bad weights.
    """

    def __init__(self, components: Sequence[tuple[Reward, float]]) -> None:
        comps = [(r, float(w)) for r, w in components]
        if not comps:
            raise ConfigError(
                f"a WeightedReward needs at least one reward; e.g. build_rewards('sentiment')."
                f"\n{describe_rewards()}"
            )
        names = [r.name for r, _ in comps]
        for i, name in enumerate(names):
            if name == TOTAL_KEY:
                raise ConfigError(f"a reward may not be named {TOTAL_KEY!r}; rename it")
            if name in names[:i]:
                raise ConfigError(
                    f"reward {name!r} appears twice; list it once with the sum of the weights"
                )
        for name, (_, w) in zip(names, comps, strict=True):
            if not math.isfinite(w):
                raise ConfigError(f"weight of reward {name!r} is {w}; weights must be finite")
        if all(w == 0.0 for _, w in comps):
            raise ConfigError("every weight is 0; give at least one reward a non-zero weight")
        self.components: tuple[tuple[Reward, float], ...] = tuple(comps)

    @property
    def names(self) -> list[str]:
        """The component names (their spec strings), in order."""
        return [r.name for r, _ in self.components]

    @property
    def weights(self) -> list[float]:
        """The component weights, in order."""
        return [w for _, w in self.components]

    def items(self) -> list[RewardItem]:
        """``(registry name, argument or None, weight)`` of each component."""
        out: list[RewardItem] = []
        for reward, weight in self.components:
            name, colon, arg = reward.name.partition(":")
            out.append((name, arg if colon else None, weight))
        return out

    @property
    def spec(self) -> str:
        """The canonical spec; ``build_rewards(self.spec)`` rebuilds an equal reward.

        Raises:
            ConfigError: a component is not a registered reward (see
                :func:`format_reward_spec`).
        """
        return format_reward_spec(self.items())

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Score ``B`` texts with every component.

        Returns:
            ``{name: float32 [B] CPU tensor}`` for each component in order, then
            ``"total"``: ``sum_i weight_i * component_i`` (float32 ``[B]``).

        Raises:
            FastdiaError: a component returned something other than a ``[B]`` tensor.
        """
        batch = as_text_list(texts, who="weighted reward")
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(batch), dtype=torch.float32)
        for reward, weight in self.components:
            values = reward(batch)
            if not isinstance(values, torch.Tensor) or tuple(values.shape) != (len(batch),):
                shape = tuple(values.shape) if isinstance(values, torch.Tensor) else None
                raise FastdiaError(
                    f"reward {reward.name!r} returned {type(values).__name__} of shape "
                    f"{shape} for {len(batch)} texts; a reward must return a tensor of shape "
                    f"[{len(batch)}]"
                )
            values = values.detach().to(device="cpu", dtype=torch.float32)
            out[reward.name] = values
            if weight != 0.0:
                total += weight * values
        out[TOTAL_KEY] = total
        return out

    def __len__(self) -> int:
        return len(self.components)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {w:g}" for n, w in zip(self.names, self.weights, strict=True))
        return f"WeightedReward({{{inner}}})"


def build_rewards(spec: str) -> WeightedReward:
    """Parse ``spec`` and build every reward in it (see the module docstring).

    Heavy packages are not imported here (only checked to be installed); they load on the
    first call.

    Raises:
        ConfigError: bad spec or argument.
        AssetMissingError: a reward's package is not installed.
    """
    items = parse_reward_spec(spec)
    rewards = [(REWARDS[name](arg), weight) for name, arg, weight in items]
    built = WeightedReward(rewards)
    logger.debug("built rewards %s from spec %r", built.names, spec)
    return built


for _name, _factory, _takes, _help, _metavar in BUILTIN_REWARDS:
    register_reward(_name, _factory, takes_argument=_takes, help=_help, metavar=_metavar)
del _name, _factory, _takes, _help, _metavar
