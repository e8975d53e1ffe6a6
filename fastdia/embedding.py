"""The fixed embedding space the diffusion runs in.

The base model's input embedding matrix ``E`` (``[V, d]``, never trained) defines the
space. Data lives at ``z_0 = c * E[x]`` where the scalar ``c = 1 / rms(E)`` makes the
embedding entries unit-variance on average over the vocabulary, so that the forward
process ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`` mixes signal and noise of
comparable scale. ``c`` depends on ``E`` alone, so it is covered by the fingerprint.

Rounding back to tokens is ``argmax_v <E_v, z_i> + bias_v`` on the *scaled* ``z``:

* ``"inner"``: ``bias = 0`` (the seeds' ``G(z)``, argmax of the tied LM-head logits);
* ``"l2"``: nearest embedding, ``argmin_v ||z_i / c - E_v||^2``, which on scaled ``z`` is
  ``argmax_v <E_v, z_i> - c ||E_v||^2 / 2`` (Diffusion-LM's rounding).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdia.errors import CheckpointError, ConfigError

ROUNDINGS = ("l2", "inner")


def embedding_fingerprint(weight: torch.Tensor) -> str:
    """A short, stable identity of an embedding matrix.

    Args:
        weight: ``[V, d]`` embedding matrix, any float dtype, any device.

    Returns:
        ``"v{V}-d{d}-{sha256 of the fp32 bytes, first 16 hex digits}"``.
    """
    w = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    digest = hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]
    return f"v{w.shape[0]}-d{w.shape[1]}-{digest}"


@dataclass
class EmbeddingSpace:
    """The base model's fixed token embeddings and the tokenizer around them.

    Attributes:
        weight: ``[V, d]`` float32 embedding matrix ``E`` (a detached copy; never trained).
        tokenizer: the base model's tokenizer (Hugging Face interface).
        scale: the data scale ``c`` (``z_0 = c * E[x]``).
        fingerprint: identity of ``weight`` (see :func:`embedding_fingerprint`).
    """

    weight: torch.Tensor
    tokenizer: Any = field(repr=False)
    scale: float = 0.0
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.weight.dim() != 2:
            raise ConfigError(
                f"embedding matrix must be [V, d], got shape {tuple(self.weight.shape)}"
            )
        self.weight = self.weight.detach().to(torch.float32)
        if not self.scale:
            rms = self.weight.pow(2).mean().sqrt().item()
            self.scale = 1.0 / rms
        if not self.fingerprint:
            self.fingerprint = embedding_fingerprint(self.weight)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def to(self, device: torch.device | str) -> EmbeddingSpace:
        """Move ``weight`` to ``device`` in place; returns self."""
        self.weight = self.weight.to(device)
        return self

    # ---- text <-> ids <-> embeddings -------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence, special tokens dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        """Texts of ``ids`` ``[B, L]`` (int64)."""
        return [self.decode(row) for row in ids.tolist()]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Scaled embeddings ``c * E[ids]``: ``[...]`` int64 in, ``[..., d]`` float32 out."""
        return self.weight[ids.to(self.weight.device)] * self.scale

    def rounding_bias(self, rounding: str = "l2") -> torch.Tensor | None:
        """The bias of :func:`fastdia.ops.round_to_vocab` on scaled ``z``.

        Returns ``[V]`` float32 for ``"l2"``, ``None`` (no bias) for ``"inner"``.
        """
        if rounding == "inner":
            return None
        if rounding == "l2":
            return -0.5 * self.scale * self.weight.pow(2).sum(dim=1)
        raise ConfigError(f"unknown rounding {rounding!r}; known: {', '.join(ROUNDINGS)}")

    def check_fingerprint(self, fingerprint: str, what: str) -> None:
        """Raise :class:`CheckpointError` unless ``fingerprint`` matches this space."""
        if fingerprint != self.fingerprint:
            raise CheckpointError(
                f"{what} was trained on another base model's embeddings "
                f"(fingerprint {fingerprint}, this base model has {self.fingerprint}); "
                "load it with the base model it was trained on (--base-model) "
                "or train one for this base model"
            )
