"""The time-conditioned bidirectional transformer denoiser ``eps_psi(z_t, t)``.

Three parametrisations (``DenoiserConfig.prediction``):

* ``"eps"``: the network predicts the noise (trained with the epsilon MSE).
* ``"x0"``: it predicts the clean embedding ``z_0`` (trained with the x0 MSE).
* ``"tokens"``: it predicts a distribution over a fixed token subset (the tokens of its
  training data) and returns the expected embedding ``softmax(logits) @ (c E[subset])``
  as its x0 estimate (score interpolation, Dieleman et al. 2022, "CDCD"); trained with
  cross-entropy. Rounding such an estimate is much better behaved than rounding an MSE
  regression, which averages far-apart embeddings under uncertainty.

``"x0"`` and ``"tokens"`` both return an x0 estimate from ``forward``; the sampler
converts it to an epsilon estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastdia.embedding import EmbeddingSpace
from fastdia.errors import ConfigError
from fastdia.models.common import TimeMLP, batch_times
from fastdia.schedules import SCHEDULES, check_choice

PREDICTIONS = ("eps", "x0", "tokens")


@dataclass
class DenoiserConfig:
    """Hyper-parameters of :class:`Denoiser`.

    Attributes:
        dim: embedding width ``d`` of the base model.
        max_length: the longest sequence ``L`` it accepts (learned positions).
        hidden: transformer width.
        layers: transformer layers.
        heads: attention heads (must divide ``hidden``).
        prediction: ``"eps"`` (noise), ``"x0"`` (clean embedding) or ``"tokens"``
            (distribution over ``vocab_size`` tokens) parametrisation.
        schedule: the noise schedule it was trained with.
        dropout: dropout in the transformer layers (training only).
        vocab_size: size ``K`` of the token subset of a ``"tokens"`` head (0 otherwise;
            :func:`fastdia.train.denoiser.train_denoiser` fills it in from the data).
    """

    dim: int
    max_length: int = 64
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    prediction: str = "eps"
    schedule: str = "sqrt"
    dropout: float = 0.0
    vocab_size: int = 0

    @property
    def predicts_x0(self) -> bool:
        """Whether ``forward`` returns an x0 estimate (``"x0"`` or ``"tokens"``)."""
        return self.prediction != "eps"

    def __post_init__(self) -> None:
        check_choice(self.prediction, PREDICTIONS, "prediction")
        check_choice(self.schedule, SCHEDULES, "schedule")
        if min(self.dim, self.max_length, self.hidden, self.layers, self.heads) < 1:
            raise ConfigError(f"denoiser sizes must be positive: {self}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.vocab_size < 0 or (self.vocab_size and self.prediction != "tokens"):
            raise ConfigError(
                f"vocab_size ({self.vocab_size}) is the size of a 'tokens' head; "
                f"leave it 0 for prediction={self.prediction!r}"
            )


class Denoiser(nn.Module):
    """Bidirectional transformer over ``[B, L, d]`` noisy embeddings.

    ``forward(z, t)`` takes ``z [B, L, d]`` float32 and ``t`` (scalar or ``[B]``, in
    ``[0, 1]``) and returns ``[B, L, d]`` float32: the predicted noise, or the predicted
    clean ``z_0`` when ``config.predicts_x0``.

    A ``"tokens"`` denoiser carries ``vocab_ids [K]`` (int64, sorted; saved with the
    weights) and needs the scaled embeddings of those tokens bound with
    :meth:`bind_embeddings` before ``forward`` (checkpoint loading does this); they come
    from the base model, so the checkpoint does not store them.
    """

    def __init__(self, config: DenoiserConfig, vocab_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        if config.prediction == "tokens" and not config.vocab_size:
            raise ConfigError(
                "a 'tokens' denoiser needs vocab_size > 0 (train_denoiser takes it "
                "from the training data)"
            )
        self.config = config
        h = config.hidden
        self.in_proj = nn.Linear(config.dim, h)
        self.pos = nn.Parameter(torch.zeros(config.max_length, h))
        nn.init.normal_(self.pos, std=0.02)
        self.time = TimeMLP(h, h)
        layer = nn.TransformerEncoderLayer(
            h,
            config.heads,
            4 * h,
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h)
        tokens = config.prediction == "tokens"
        self.out_proj = nn.Linear(h, config.vocab_size if tokens else config.dim)
        if tokens:
            ids = torch.zeros(config.vocab_size, dtype=torch.long)
            if vocab_ids is not None:
                ids = _sorted_ids(vocab_ids, config.vocab_size)
            self.register_buffer("vocab_ids", ids)
            self.register_buffer("token_embeddings", torch.zeros(0, config.dim), persistent=False)

    def bind_embeddings(self, space: EmbeddingSpace) -> Denoiser:
        """Attach ``c E[vocab_ids]`` from ``space`` (a no-op unless ``"tokens"``)."""
        if self.config.prediction == "tokens":
            emb = space.embed(self.vocab_ids.to(space.weight.device))
            self.token_embeddings = emb.to(self.out_proj.weight.device, torch.float32)
        return self

    def token_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Positions of token ``ids`` in ``vocab_ids`` (-100, the ignore index, if absent)."""
        pos = torch.searchsorted(self.vocab_ids, ids).clamp_max(self.config.vocab_size - 1)
        return torch.where(self.vocab_ids[pos] == ids, pos, torch.full_like(pos, -100))

    def features(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The network's output head: ``[B, L, d]``, or ``[B, L, K]`` logits for tokens."""
        batch, length, dim = z.shape
        if length > self.config.max_length or dim != self.config.dim:
            raise ConfigError(
                f"denoiser takes at most {self.config.max_length} tokens of width "
                f"{self.config.dim}, got [{batch}, {length}, {dim}]"
            )
        tt = batch_times(t, batch, z.device)
        x = self.in_proj(z) + self.pos[:length] + self.time(tt)[:, None, :]
        return self.out_proj(self.norm(self.encoder(x)))

    def forward(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        out = self.features(z, t)
        if self.config.prediction != "tokens":
            return out
        if self.token_embeddings.shape[0] != self.config.vocab_size:
            raise ConfigError(
                "a 'tokens' denoiser needs its embeddings: call bind_embeddings(space) "
                "(load_model does) before sampling"
            )
        probs = torch.softmax(out.float(), dim=-1)
        return probs @ self.token_embeddings


def _sorted_ids(vocab_ids: torch.Tensor, size: int) -> torch.Tensor:
    ids = torch.as_tensor(vocab_ids, dtype=torch.long).flatten()
    if ids.numel() != size or ids.unique().numel() != size:
        raise ConfigError(f"vocab_ids must be {size} distinct token ids, got {ids.numel()}")
    return ids.sort().values
