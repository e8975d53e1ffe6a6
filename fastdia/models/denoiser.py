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

Two architectures (``DenoiserConfig.arch``):

* ``"encoder"``: a pre-norm transformer encoder; time enters once, added at the input.
* ``"adaln"``: time conditions every layer through adaptive LayerNorm (shift, scale and
  a zero-initialised gate per sub-layer, computed from the time embedding, as in DiT).

Two conditioning inputs, each switched on in the config and trained for:

* ``self_condition``: the previous x0 estimate ``x0_prev [B, L, d]`` enters through its
  own input projection (Chen et al. 2022, "Analog Bits"); zeros mean "no estimate yet".
  Training feeds the model's own (stop-gradient) estimate on half of the batches.
* ``clean_prompt``: positions flagged by ``clean_mask [B, L]`` carry the *clean* scaled
  embedding ``c E[x]`` (not noised) and a learned flag embedding; they are the prompt,
  and the loss ignores them. The sampler writes the prompt clean at every step, so a
  continuation sees its prompt exactly instead of buried in noise.

And one input that reads the base model (``prefix_states = M > 0``, ``"adaln"`` only):
the base model's last-layer hidden states of the ``M`` tokens right before the window's
first noisy position, ``states [B, M, state_dim]`` (``states_mask [B, M]``: False where a
row has fewer tokens before it), projected to the model's width with learned positions
and prepended to the window as ``M`` extra tokens that every layer attends to (masked
ones are never attended to); the output keeps the window's ``L`` positions only. The base
model does the context (its states before the block predict the block's first token),
the denoiser models the block. The projection starts at zero (the states enter first as
their learned positions only), so a denoiser fine-tuned from an unconditioned one
(``train-denoiser --init``) starts close to that one. With ``lm_prior`` (a ``"tokens"``
head, a base model that ties its input and output embeddings) the base model's own
next-token logits over the head's tokens, ``h_last E[subset]^T`` from the last state,
are added (times a learned gain, starting at 1) to the logits of the window's first noisy
position: the position the last state predicts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from fastdia.embedding import EmbeddingSpace
from fastdia.errors import ConfigError
from fastdia.models.common import TimeMLP, batch_times
from fastdia.schedules import SCHEDULES, check_choice

PREDICTIONS = ("eps", "x0", "tokens")
ARCHS = ("encoder", "adaln")


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
        arch: ``"encoder"`` (time at the input) or ``"adaln"`` (time in every layer).
        self_condition: takes the previous x0 estimate as a second input.
        clean_prompt: takes a clean prefix flagged by a mask (the prompt).
        time_grid: the measured step allocation (CDCD time warping), ``[G]`` ascending
            times from 0 to 1 whose quantiles place sampling steps; empty for uniform
            steps. :func:`fastdia.train.denoiser.measure_time_warp` fills it in.
        prefix_states: ``M``, the base-model states it reads before the window (0: none).
        state_dim: the width of those states (the base model's hidden size; 0 unless
            ``prefix_states``).
        lm_prior: add the base model's next-token logits to the first noisy position's
            (needs ``prefix_states``, a ``"tokens"`` head and a tied base model).
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
    arch: str = "encoder"
    self_condition: bool = False
    clean_prompt: bool = False
    time_grid: list[float] = field(default_factory=list)
    prefix_states: int = 0
    state_dim: int = 0
    lm_prior: bool = False

    @property
    def reads_states(self) -> bool:
        """Whether ``forward`` needs the base model's prefix states."""
        return self.prefix_states > 0

    @property
    def predicts_x0(self) -> bool:
        """Whether ``forward`` returns an x0 estimate (``"x0"`` or ``"tokens"``)."""
        return self.prediction != "eps"

    def __post_init__(self) -> None:
        check_choice(self.prediction, PREDICTIONS, "prediction")
        check_choice(self.arch, ARCHS, "arch")
        grid = self.time_grid
        if grid and (
            len(grid) < 2
            or grid[0] != 0.0
            or grid[-1] != 1.0
            or any(b <= a for a, b in itertools.pairwise(grid))
        ):
            raise ConfigError(
                "time_grid must rise strictly from 0 to 1 (a measured step allocation); "
                f"got {len(grid)} values"
            )
        check_choice(self.schedule, SCHEDULES, "schedule")
        if min(self.dim, self.max_length, self.hidden, self.layers, self.heads) < 1:
            raise ConfigError(f"denoiser sizes must be positive: {self}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.prefix_states < 0 or (self.prefix_states > 0) != (self.state_dim > 0):
            raise ConfigError(
                f"prefix_states ({self.prefix_states}) and state_dim ({self.state_dim}) go "
                "together: both positive (a denoiser that reads base-model states) or both 0"
            )
        if self.lm_prior and not (self.prefix_states and self.prediction == "tokens"):
            raise ConfigError(
                "lm_prior adds the base model's next-token logits to a tokens head: it needs "
                "prefix_states > 0 and prediction='tokens'"
            )
        if self.prefix_states and self.arch != "adaln":
            raise ConfigError(
                "prefix_states needs arch='adaln' (the encoder arch has no state input)"
            )
        if self.vocab_size < 0 or (self.vocab_size and self.prediction != "tokens"):
            raise ConfigError(
                f"vocab_size ({self.vocab_size}) is the size of a 'tokens' head; "
                f"leave it 0 for prediction={self.prediction!r}"
            )


class Denoiser(nn.Module):
    """Bidirectional transformer over ``[B, L, d]`` noisy embeddings.

    ``forward(z, t)`` takes ``z [B, L, d]`` float32 and ``t`` (scalar, ``[B]``, or ``[B, L]``
    for one noise level per position; in ``[0, 1]``) and returns ``[B, L, d]`` float32: the
    predicted noise, or the predicted clean ``z_0`` when ``config.predicts_x0``.

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
        if config.self_condition:
            self.sc_proj = nn.Linear(config.dim, h, bias=False)
        if config.clean_prompt:
            self.clean_flag = nn.Parameter(torch.zeros(h))
            nn.init.normal_(self.clean_flag, std=0.02)
        if config.reads_states:
            self.state_norm = nn.LayerNorm(config.state_dim)
            self.state_proj = nn.Linear(config.state_dim, h)
            nn.init.zeros_(self.state_proj.weight)
            nn.init.zeros_(self.state_proj.bias)
            self.state_pos = nn.Parameter(torch.zeros(config.prefix_states, h))
        if config.lm_prior:
            self.lm_gain = nn.Parameter(torch.ones(()))
            self.register_buffer("lm_rows", torch.zeros(0, config.state_dim), persistent=False)
        if config.arch == "adaln":
            self.blocks = nn.ModuleList(
                AdaLNBlock(h, config.heads, config.dropout) for _ in range(config.layers)
            )
            self.final_mod = nn.Linear(h, 2 * h)
            nn.init.zeros_(self.final_mod.weight)
            nn.init.zeros_(self.final_mod.bias)
            self.norm = nn.LayerNorm(h, elementwise_affine=False)
        else:
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
        if self.config.lm_prior:
            if space.dim != self.config.state_dim:
                raise ConfigError(
                    f"an lm_prior denoiser reads next-token logits from states of width "
                    f"{self.config.state_dim} against the embeddings (width {space.dim}): "
                    "it needs a base model that ties its input and output embeddings"
                )
            rows = space.weight[self.vocab_ids.to(space.weight.device)]
            self.lm_rows = rows.to(self.out_proj.weight.device, torch.float32)
        return self

    def token_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Positions of token ``ids`` in ``vocab_ids`` (-100, the ignore index, if absent)."""
        pos = torch.searchsorted(self.vocab_ids, ids).clamp_max(self.config.vocab_size - 1)
        return torch.where(self.vocab_ids[pos] == ids, pos, torch.full_like(pos, -100))

    def time_embedding(
        self, t: torch.Tensor | float, batch: int, device: torch.device
    ) -> torch.Tensor:
        """The time features every layer reads (precomputable per step): ``[B, hidden]``
        for a scalar or ``[B]`` time ``t``, ``[B, L, hidden]`` for per-position ``[B, L]``."""
        return self.time(batch_times(t, batch, device))

    def features(
        self,
        z: torch.Tensor,
        t: torch.Tensor | float,
        *,
        x0_prev: torch.Tensor | None = None,
        clean_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        states: torch.Tensor | None = None,
        states_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network's output head: ``[B, L, d]``, or ``[B, L, K]`` logits for tokens.

        Args:
            z: ``[B, L, d]`` float32 noisy embeddings (clean at prompt positions).
            t: scalar, ``[B]`` or ``[B, L]`` (one time per position) times in ``[0, 1]``.
            x0_prev: ``[B, L, d]`` previous x0 estimate (self-conditioning), or None
                (zeros); ignored unless ``config.self_condition``.
            clean_mask: ``[B, L]`` bool/float, 1 at clean (prompt) positions, or None;
                ignored unless ``config.clean_prompt``.
            temb: ``[B, hidden]`` (or ``[B, L, hidden]``) precomputed
                :meth:`time_embedding` (overrides ``t``).
            states: ``[B, M, state_dim]`` (any float dtype) base-model states of the ``M``
                tokens before the window's first noisy position; required when
                ``config.prefix_states``, ignored otherwise.
            states_mask: ``[B, M]`` bool, True where a state exists (None: all do).
        """
        batch, length, dim = z.shape
        if length > self.config.max_length or dim != self.config.dim:
            raise ConfigError(
                f"denoiser takes at most {self.config.max_length} tokens of width "
                f"{self.config.dim}, got [{batch}, {length}, {dim}]"
            )
        if temb is None:
            temb = self.time_embedding(t, batch, z.device)
        x = self.in_proj(z) + self.pos[:length]
        if self.config.self_condition and x0_prev is not None:
            x = x + self.sc_proj(x0_prev.to(x.dtype))
        if self.config.clean_prompt and clean_mask is not None:
            x = x + clean_mask.to(x.dtype)[..., None] * self.clean_flag
        if temb.dim() == 2:  # one time per window: broadcast over the positions
            temb = temb[:, None, :]
        if self.config.arch == "adaln":
            cond = F.silu(temb)
            attn_mask = None
            if self.config.reads_states:
                x, cond, attn_mask = self._prepend_states(x, cond, states, states_mask)
            for block in self.blocks:
                x = block(x, cond, attn_mask)
            if self.config.reads_states:  # keep the window's positions
                x = x[:, -length:]
                if cond.shape[1] > 1:
                    cond = cond[:, -length:]
            shift, scale = self.final_mod(cond).chunk(2, dim=-1)
            out = self.out_proj(self.norm(x) * (1 + scale) + shift)
            if self.config.lm_prior:
                out = out + self._lm_logits(states, states_mask, clean_mask, length)
            return out
        x = x + temb
        return self.out_proj(self.norm(self.encoder(x)))

    def _prepend_states(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        states: torch.Tensor | None,
        states_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``x [B, L, h]`` with the projected states prepended: ``[B, M + L, h]``, the
        conditioning broadcast to match, and the attention mask ``[B, 1, 1, M + L]`` (None
        when every state exists)."""
        m = self.config.prefix_states
        batch = x.shape[0]
        if states is None or tuple(states.shape) != (batch, m, self.config.state_dim):
            got = None if states is None else tuple(states.shape)
            raise ConfigError(
                f"this denoiser reads the base model's states of the {m} tokens before the "
                f"window: pass states [{batch}, {m}, {self.config.state_dim}], got {got}"
            )
        s = self.state_proj(self.state_norm(states.to(x.dtype))) + self.state_pos
        x = torch.cat([s, x], dim=1)
        if cond.shape[1] > 1:  # per-position times: the states take the window's mean
            cond = torch.cat([cond.mean(dim=1, keepdim=True).expand(-1, m, -1), cond], dim=1)
        if states_mask is None:
            return x, cond, None
        keep = F.pad(states_mask.to(torch.bool), (0, x.shape[1] - m), value=True)
        return x, cond, keep[:, None, None, :]

    def _lm_logits(
        self,
        states: torch.Tensor,
        states_mask: torch.Tensor | None,
        clean_mask: torch.Tensor | None,
        length: int,
    ) -> torch.Tensor:
        """The base model's next-token logits over the head's tokens from the last state,
        times the gain, at each row's first noisy position (the count of its clean
        positions): ``[B, L, K]``, zero elsewhere and for a row without states."""
        if self.lm_rows.shape[0] != self.config.vocab_size:
            raise ConfigError(
                "an lm_prior denoiser needs its embeddings: call bind_embeddings(space) "
                "(load_model does) before using it"
            )
        last = states[:, -1].to(self.lm_rows.dtype)
        if states_mask is not None:
            last = last * states_mask[:, -1:].to(last.dtype)
        logits = last @ self.lm_rows.T  # [B, K]
        batch = states.shape[0]
        first = (
            clean_mask.to(torch.int64).sum(dim=1)
            if clean_mask is not None
            else torch.zeros(batch, dtype=torch.int64, device=states.device)
        )
        at = torch.arange(length, device=states.device)[None, :] == first[:, None]  # [B, L]
        return self.lm_gain * at[..., None].to(logits.dtype) * logits[:, None, :]

    def x0_from_logits(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Expected embedding ``softmax(logits / temperature) @ c E[subset]`` ``[B, L, d]``."""
        if self.token_embeddings.shape[0] != self.config.vocab_size:
            raise ConfigError(
                "a 'tokens' denoiser needs its embeddings: call bind_embeddings(space) "
                "(load_model does) before sampling"
            )
        if temperature != 1.0:
            logits = logits / temperature
        probs = torch.softmax(logits.float(), dim=-1)
        return probs @ self.token_embeddings

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor | float,
        *,
        x0_prev: torch.Tensor | None = None,
        clean_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        temperature: float = 1.0,
        states: torch.Tensor | None = None,
        states_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, L, d]`` float32: the noise estimate, or the x0 estimate (see the class).

        ``temperature`` sharpens (< 1) the token distribution of a ``"tokens"`` head
        (score temperature); other heads ignore it.
        """
        out = self.features(
            z,
            t,
            x0_prev=x0_prev,
            clean_mask=clean_mask,
            temb=temb,
            states=states,
            states_mask=states_mask,
        )
        if self.config.prediction != "tokens":
            return out
        return self.x0_from_logits(out, temperature)


class AdaLNBlock(nn.Module):
    """A pre-norm transformer block whose norms are modulated by the time embedding.

    ``x [B, L, h]``, ``cond [B, 1, h]`` or ``[B, L, h]`` (SiLU of the time embedding, per
    window or per position) -> ``[B, L, h]``.
    The modulation (shift, scale, gate for attention and MLP) starts at zero, so every
    block starts as the identity (adaLN-zero).
    """

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * hidden, hidden),
        )
        self.mod = nn.Linear(hidden, 6 * hidden)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``attn_mask``: None or ``[B, 1, 1, L]`` bool, False at keys never attended to."""
        batch, length, hidden = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.mod(cond).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        x = x + g1 * self.proj(att.transpose(1, 2).reshape(batch, length, hidden))
        h = self.norm2(x) * (1 + sc2) + sh2
        return x + g2 * F.dropout(self.mlp(h), drop, self.training)


def _sorted_ids(vocab_ids: torch.Tensor, size: int) -> torch.Tensor:
    ids = torch.as_tensor(vocab_ids, dtype=torch.long).flatten()
    if ids.numel() != size or ids.unique().numel() != size:
        raise ConfigError(f"vocab_ids must be {size} distinct token ids, got {ids.numel()}")
    return ids.sort().values
