"""``round_to_vocab``: nearest token under ``argmax_v <E_v, z> + bias_v``; the reference."""

from __future__ import annotations

import torch

_ROWS_PER_CHUNK = 1024  # bounds the reference's [rows, V] score buffer


def round_to_vocab_reference(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    return_embeddings: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Round ``z`` to token ids in plain PyTorch (scores in float32).

    Args:
        z: ``[..., d]`` float32/float16/bfloat16.
        weight: ``[V, d]`` the embedding matrix ``E``, same dtypes.
        bias: ``[V]`` or None.
        return_embeddings: also return ``weight[ids]``.

    Returns:
        ``ids [...]`` int64 (ties go to the lowest id, as ``torch.argmax``), and with
        ``return_embeddings`` also ``weight[ids]`` ``[..., d]`` in ``weight``'s dtype.
    """
    lead = z.shape[:-1]
    flat = z.reshape(-1, z.shape[-1]).float()
    w = weight.float()
    b = None if bias is None else bias.float()
    chunks = []
    for start in range(0, max(1, flat.shape[0]), _ROWS_PER_CHUNK):
        scores = flat[start : start + _ROWS_PER_CHUNK] @ w.T
        if b is not None:
            scores += b
        chunks.append(scores.argmax(dim=-1))
    # no buffer allocated from a host shape: graph-safe (docs/design.md §2)
    ids = (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).view(lead)
    return (ids, weight[ids]) if return_embeddings else ids
