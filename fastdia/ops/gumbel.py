"""``sample_vocab``: a Gumbel-max draw over the vocabulary, and its PyTorch reference.

For each row ``n`` of ``z [N, d]``::

    id[n] = argmax_v  <E_v, z[n]> + bias_v + g(seed_n, step, v)

with ``g`` fastdia's Philox Gumbel noise (:func:`fastdia.noise.gumbel_rows`: row ``n``
under its own seed, so a row's draw does not depend on the rest of the batch), i.e. a
sample from ``softmax(z E^T + bias)`` per row. It is :func:`round_to_vocab` with noise added to
every score, so a fused variant keeps the running (max, argmax) over vocabulary tiles
and never writes the ``[N, V]`` scores. The LM decode (:mod:`fastdia.decode`) draws
every token with it.
"""

from __future__ import annotations

import torch

from fastdia import noise
from fastdia.errors import ConfigError

_ROWS_PER_CHUNK = 64  # bounds the reference's [rows, V] score and noise buffers


def _check_counter(vocab: int) -> None:
    if vocab > noise.MAX_INDEX:
        raise ConfigError(f"sample_vocab numbers its noise by v < 2**31: V = {vocab} is too large")


def check_bias(bias: torch.Tensor | None, rows: int, vocab: int) -> None:
    """A score bias is None, ``[V]`` or ``[N, V]`` (one row per query)."""
    if bias is not None and tuple(bias.shape) not in ((vocab,), (rows, vocab)):
        raise ConfigError(
            f"sample_vocab's bias must be [V={vocab}] or [N={rows}, V={vocab}], got "
            f"{list(bias.shape)}"
        )


def gumbel_argmax(
    logits: torch.Tensor,
    *,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
) -> torch.Tensor:
    """``argmax_v logits[n, v] + g(seed_n, step, v)``: ``[N]`` int64.

    The same draw as :func:`sample_vocab_reference` from precomputed ``[N, V]`` scores
    (the LM decode's path for models whose output layer is not the embedding matrix).
    ``seed``: per-row seeds ``[N]`` int64 on ``logits``' device, or one seed ``s`` meaning
    ``s + n`` for row ``n`` (:func:`fastdia.noise.row_seeds`); ``step``: an int, or a
    1-element integer tensor on ``logits``' device (read there: nothing comes back to the
    host, so a captured decode step can advance it).
    """
    rows, vocab = logits.shape
    _check_counter(vocab)
    index = torch.arange(vocab, device=logits.device)  # constant
    g = noise.gumbel_rows(noise.row_seeds(seed, rows, logits.device), step, index)
    return (logits.float() + g).argmax(dim=-1)


def sample_vocab_reference(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
) -> torch.Tensor:
    """Gumbel-max sampling of one token per row in plain PyTorch (scores in float32).

    Args:
        z: ``[N, d]`` float32/float16/bfloat16 queries.
        weight: ``[V, d]`` the embedding matrix ``E``.
        bias: ``[V]``, ``[N, V]`` (one row per query) or None.
        seed, step: per-row seeds and the noise step, as in :func:`gumbel_argmax`.

    Returns:
        ``ids [N]`` int64, drawn from ``softmax(z E^T + bias)`` row by row.
    """
    if z.dim() != 2 or weight.dim() != 2 or z.shape[1] != weight.shape[1]:
        raise ConfigError(
            f"sample_vocab takes z [N, d] and weight [V, d], got {tuple(z.shape)} and "
            f"{tuple(weight.shape)}"
        )
    rows, vocab = z.shape[0], weight.shape[0]
    _check_counter(vocab)
    check_bias(bias, rows, vocab)
    seeds = noise.row_seeds(seed, rows, z.device)
    w = weight.float()
    ids = torch.empty(rows, dtype=torch.int64, device=z.device)
    for start in range(0, rows, _ROWS_PER_CHUNK):
        scores = z[start : start + _ROWS_PER_CHUNK].float() @ w.T
        if bias is not None:
            rows_bias = bias if bias.dim() == 1 else bias[start : start + _ROWS_PER_CHUNK]
            scores += rows_bias.float()
        ids[start : start + _ROWS_PER_CHUNK] = gumbel_argmax(
            scores, seed=seeds[start : start + _ROWS_PER_CHUNK], step=step
        )
    return ids
