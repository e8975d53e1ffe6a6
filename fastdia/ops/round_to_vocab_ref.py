"""``round_to_vocab``: nearest token under ``argmax_v <E_v, z> + bias_v``; the reference, and
:func:`rounding_mismatches`, the check of a variant's ids against it up to float rounding."""

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


def rounding_mismatches(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    ref_ids: torch.Tensor,
    *,
    rel_tol: float | None = None,
) -> tuple[int, int]:
    """Compare ids against reference ids up to float rounding (the docs/design.md §3 argmax check).

    A row may differ from the reference only where the two picks' scores are a near tie:
    recomputed exactly (float64, from the same operand values), the score of the id the
    variant chose must be at least the reference pick's score minus
    ``rel_tol * (|z| . |E_v| + |bias_v|)`` for the larger of the two. The default
    ``rel_tol = 8 sqrt(d) eps_fp32`` bounds the float32 accumulation error of both sides
    (fp16/bf16 products are exact in float32, so the operand dtype adds nothing).

    Args:
        z: ``[..., d]`` the rounded inputs.
        weight: ``[V, d]`` the embedding matrix.
        bias: ``[V]``, ``[N, V]`` (one row per row of ``z``, e.g. a score bias plus
            ``sample_vocab``'s Gumbel noise) or None; any float dtype.
        ids: ``[...]`` int64, the variant's picks.
        ref_ids: ``[...]`` int64, the reference's picks.
        rel_tol: the relative tolerance (None: the default above).

    Returns:
        ``(differing rows, rows differing by more than the tolerance)``.
    """
    d = weight.shape[1]
    if rel_tol is None:
        rel_tol = 8.0 * d**0.5 * torch.finfo(torch.float32).eps
    flat_z = z.reshape(-1, d)
    got, want = ids.reshape(-1), ref_ids.reshape(-1)
    rows = (got != want).nonzero().flatten()
    if rows.numel() == 0:
        return 0, 0
    zr = flat_z[rows].double()
    wg, ww = weight[got[rows]].double(), weight[want[rows]].double()
    sg, sw = (zr * wg).sum(-1), (zr * ww).sum(-1)
    scale = torch.maximum((zr.abs() * wg.abs()).sum(-1), (zr.abs() * ww.abs()).sum(-1))
    if bias is not None:
        b = bias.double()
        if b.dim() == 1:
            bg, bw = b[got[rows]], b[want[rows]]
        else:
            b = b.reshape(-1, b.shape[-1])
            bg, bw = b[rows, got[rows]], b[rows, want[rows]]
        sg, sw = sg + bg, sw + bw
        scale = scale + torch.maximum(bg.abs(), bw.abs())
    bad = sg < sw - rel_tol * scale
    return int(rows.numel()), int(bad.sum())
