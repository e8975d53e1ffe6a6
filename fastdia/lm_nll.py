"""A causal LM's NLL of the last tokens of its rows, with logits computed only for them.

Scoring a continuation needs the LM's next-token distribution at the continuation's
positions alone; the output head over a large vocabulary (Gemma 3: 262k words) costs more
than the rest of a small model, so the logits are asked for only where they are used
(Hugging Face's ``logits_to_keep`` where the model takes it; else the full logits are
sliced, with the same result).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F


def _takes_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def tail_nll(
    model: Any, ids: torch.Tensor, keep: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """NLL of each of ``ids``'s last ``keep`` tokens given everything before it.

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...,
            position_ids=...)`` whose output has ``.logits [B, L', V]``.
        ids: ``[B, L]`` int64 on the model's device, ``1 <= keep < L``.
        keep: how many trailing positions to score.
        attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding on the *left*
            (rows are right-aligned so that their last tokens share positions); each row's
            position ids then count its real tokens only, so padding changes nothing.

    Returns:
        ``[B, keep]`` float32: ``-log p(ids[:, L-keep+j] | ids[:, :L-keep+j])``. Entries of
        a row whose tokens there are padding are meaningless; the caller drops them.
    """
    if not 1 <= keep < ids.shape[1]:
        raise ValueError(f"keep must be in [1, {ids.shape[1] - 1}], got {keep}")
    kwargs: dict[str, Any] = {"input_ids": ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if _takes_logits_to_keep(model):
        logits = model(**kwargs, logits_to_keep=keep + 1).logits[:, :-1]
    else:
        logits = model(**kwargs).logits[:, -keep - 1 : -1]
    targets = ids[:, -keep:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return nll
