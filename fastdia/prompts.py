"""Prompts as token ids: plain text or the tokenizer's chat template, checked; the tokens
that end a row or must never be written; prompt files.

A *prompt* is text, token ids, or None (no prompt: the base model starts from its start
token, which is not part of the output). With ``chat=True`` text is wrapped as one user
turn in the tokenizer's chat template with the assistant's turn opened
(``add_generation_prompt``), and the sample is the assistant's reply alone; token ids
are used as given (with ``chat``, already templated).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdia.errors import ConfigError

Prompt = str | Sequence[int] | None
"""Text, token ids, or None (no prompt)."""

ON_EOS = ("stop", "mask")
"""What the end-of-text / end-of-turn tokens do: ``stop`` ends the row there (the rest of
the row is padding, not counted), ``mask`` forbids them (every row writes all its
tokens)."""


def check_chat(tokenizer: Any) -> None:
    """Raise ConfigError unless ``tokenizer`` has a chat template (for ``--chat``)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"--chat needs a tokenizer with a chat template, and {name}'s has none; leave "
            "--chat out (plain continuation) or use an instruction-tuned base model"
        )


def encode_prompt(
    tokenizer: Any, vocab_size: int, prompt: Prompt, *, chat: bool = False
) -> list[int]:
    """One prompt as token ids (see the module docstring).

    Raises:
        ConfigError: empty text, ids outside ``[0, vocab_size)``, or ``chat`` with a
            tokenizer that has no chat template.
    """
    if chat:
        check_chat(tokenizer)
    if prompt is None:
        if not chat:
            return []
        prompt = ""
    if isinstance(prompt, str):
        if not chat and not prompt.strip():
            raise ConfigError("prompt is empty; pass some text, or no prompt at all")
        if chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in tokenizer.encode(prompt, add_special_tokens=False)]
    ids = [int(i) for i in prompt]  # used as given (with chat: already templated)
    if any(not 0 <= i < vocab_size for i in ids):
        raise ConfigError(f"prompt ids must be in [0, {vocab_size})")
    return ids


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids a decode treats specially.

    Attributes:
        stop: ids that end a row (end of text, end of turn); empty when they are masked.
        banned: ids never written: the tokenizer's other special tokens (template and role
            markers), and with ``on_eos="mask"`` the stop ids too.
    """

    stop: tuple[int, ...]
    banned: tuple[int, ...]


def special_tokens(
    tokenizer: Any, generation_config: Any = None, *, on_eos: str = "stop"
) -> SpecialTokens:
    """The stop and banned ids of a tokenizer (and the model's generation config) for
    ``on_eos`` (:data:`ON_EOS`)."""
    if on_eos not in ON_EOS:
        raise ConfigError(f"on_eos must be one of {', '.join(ON_EOS)}, got {on_eos!r}")
    ends: set[int] = set()
    for source in (tokenizer, generation_config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ends.add(eos)
        elif isinstance(eos, (list, tuple)):
            ends.update(int(e) for e in eos)
    for name in ("<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if isinstance(tid, int):
            ends.add(tid)
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    if on_eos == "stop":
        return SpecialTokens(tuple(sorted(ends)), tuple(sorted(special - ends)))
    return SpecialTokens((), tuple(sorted(special | ends)))


def cut_completions(
    prompts: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
    stop: Sequence[int],
    *,
    chat: bool,
) -> tuple[list[list[int]], list[bool], list[list[int]]]:
    """Each row's completion (its ``generated`` ids up to its first ``stop`` id), whether
    it ended, and what a reward reads (token ids): the prompt and the completion, or with
    ``chat`` the completion alone (what :attr:`SampleOutput.texts` holds)."""
    ends = set(stop)
    completion, finished = [], []
    for row in generated:
        row = list(row)
        end = next((i for i, t in enumerate(row) if t in ends), None)
        completion.append(row if end is None else row[:end])
        finished.append(end is not None)
    read = completion if chat else [[*p, *c] for p, c in zip(prompts, completion, strict=True)]
    return completion, finished, read


@dataclass
class PromptRecord:
    """One line of a prompts file: the text, and its own seed and id when it gives them."""

    prompt: str
    line: int
    id: str | None = None
    seed: int | None = None


def read_prompts_file(path: str | Path) -> list[PromptRecord]:
    """Prompts from a file: one text per line, or JSONL objects with ``prompt`` (and
    optionally ``id``, ``seed``). A file is JSONL when its first non-blank line starts with
    ``{``; blank lines are skipped.

    Raises:
        ConfigError: a file that is missing, unreadable or holds no prompt, or a JSONL line
            that is not an object with a non-empty string ``prompt`` (named by line number).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the prompts file {path}: {exc}") from exc
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise ConfigError(f"the prompts file {path} holds no prompt (it is empty)")
    if not numbered[0][1].lstrip().startswith("{"):
        return [PromptRecord(line, number) for number, line in numbered]
    records = []
    for number, line in numbered:
        where = f"{path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: a JSONL prompt must be an object with a 'prompt' field")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{where}: 'prompt' must be a non-empty string")
        seed = obj.get("seed")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31
        ):
            raise ConfigError(f"{where}: 'seed' must be an integer in [0, 2**31)")
        ident = obj.get("id")
        records.append(PromptRecord(prompt, number, None if ident is None else str(ident), seed))
    return records
