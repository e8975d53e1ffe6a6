"""Decoding a diffusion latent with the base model as prior (``decode="lm"``, DESIGN §1).

Nearest-embedding rounding is the posterior mode of ``x`` given ``z`` under a uniform
prior over tokens. The base model is a far better prior: this module samples, left to
right with the base model's KV cache,

    p(x | z_t*)  ∝  p_LM(x)^(1/T) · Π_i N(z_i ; sqrt(abar) c E[x_i], (1 - abar) I)^w
                 · exp(beta · Σ_i u(x_i))

at the stop level ``t*`` (``abar = abar(t*)``), where ``T`` is the LM temperature, ``w``
the latent weight and ``u(v)`` the guiding critics' per-token value of token ``v`` (their
weighted sum, at noise level 0: ``w2 . silu(W1 c E_v + b1(0))``), ``beta`` its weight.
The sampler sets ``beta = tilt · lambda / L``: with ``tilt = 1`` the last factor is
exactly ``exp(lambda h(x))`` for a token-local critic ``h = mean_i u(x_i) + b2``, the
tilt of the target ``p(x) exp(lambda r(x))``, so one guidance strength ``lambda`` drives
both the latent's guidance and the decode.
For position ``i`` the log-score of token ``v`` is, up to a constant of ``v``::

    <h_i / T, E_v>  +  alpha <z_i, E_v>  -  w abar c^2 ||E_v||^2 / (2 (1 - abar))  +  beta u(v)
    alpha = w sqrt(abar) c / (1 - abar)

where ``h_i`` is the LM's final hidden state before position ``i``. When the LM ties its
input and output embeddings (SmolLM2 does) and has no output bias, the whole score is one
:func:`fastdia.ops.sample_vocab` call on the shifted query ``h_i / T + alpha z_i`` with
the bias above: a Gumbel-max draw over the vocabulary that never writes the ``[B, V]``
scores. Untied models take the general path (LM logits plus the latent term, then
Gumbel-max), which writes them.

Noise: the Gumbel variable of token ``v`` for sequence ``b`` at position ``i`` is drawn
with fastdia's Philox numbering (:mod:`fastdia.noise`) at step ``DECODE_STEP + i``,
element ``b V + v``, so a seed gives the same text on every backend.

``beta`` alone with ``w = 0`` is critic-weighted decoding of the base model (the
baseline in ``fastdia eval``).

Not captured in a CUDA graph (a known gap): the decode runs eagerly after the sampler's
replayed diffusion loop, one base-model forward per position with the model's own dynamic
KV cache. Its loop reads nothing back to the host in fastdia's code (the noise counters
are host constants per position); a static KV cache with a captured per-token step, as in
gpt-fast, would need a cache class per model family and is not done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fastdia.errors import ConfigError

if TYPE_CHECKING:
    from fastdia.base_model import BaseModel
    from fastdia.models.critic import TokenLocalCritic

DECODES = ("nearest", "lm")
DECODE_STEP = 2**30  # noise step of decode position 0 (far above any diffusion row)


def check_positive(value: float, what: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` if it is a finite number > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{what} must be a finite number {bound}, got {value!r}")
    return float(value)


@dataclass
class DecodeConfig:
    """The weights of the LM decode (see the module docstring).

    Attributes:
        temperature: LM temperature ``T`` > 0.
        latent_weight: ``w`` >= 0, the weight of the latent's Gaussian likelihood (0: the
            latent is ignored).
        tilt: >= 0, the critics' per-token values weigh ``tilt * lambda / L`` (1: the
            exact tilt of ``p(x) exp(lambda h(x))``).
    """

    temperature: float = 1.0
    latent_weight: float = 1.0
    tilt: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self.temperature, "the LM decode's temperature")
        check_positive(self.latent_weight, "the LM decode's latent weight", allow_zero=True)
        check_positive(self.tilt, "the LM decode's tilt", allow_zero=True)


def token_values(
    critics: Sequence[tuple[TokenLocalCritic, float]], weight: torch.Tensor, scale: float
) -> torch.Tensor:
    """The weighted critics' per-token values ``u(v)`` at noise level 0: ``[V]`` float32.

    Args:
        critics: ``(token-local critic, weight)`` pairs.
        weight: ``[V, d]`` the embedding matrix ``E``.
        scale: the data scale ``c``.
    """
    out = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    zero = torch.zeros(1, device=weight.device)
    with torch.no_grad():
        for critic, w in critics:
            b1 = critic.hidden_bias(zero)[0]
            for start in range(0, weight.shape[0], 8192):
                emb = weight[start : start + 8192].float() * scale
                pre = emb @ critic.fc1.weight.float().T + b1
                out[start : start + 8192] += w * (torch.nn.functional.silu(pre) @ critic.w2)
    return out


def ties_embeddings(model: Any) -> bool:
    """Whether the LM's output layer is its input embedding matrix, without a bias."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or getattr(out, "bias", None) is not None:
        return False
    return out.weight.data_ptr() == inp.weight.data_ptr()


def _cache_argument(module: Any) -> str:
    """The KV-cache keyword of a transformers model: ``cache`` (v5.20+) or
    ``past_key_values`` (earlier), read from its forward signature."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class LMDecoder:
    """The base model as the decode's prior; :meth:`plan` binds a shape and level."""

    def __init__(self, base: BaseModel, config: DecodeConfig, backends: dict[str, str]) -> None:
        self.base, self.config, self.backends = base, config, backends

    def plan(
        self,
        batch_size: int,
        length: int,
        abar: float,
        critics: Sequence[tuple[TokenLocalCritic, float]],
        beta: float,
    ) -> DecodePlan:
        """A decode of ``batch_size`` sequences of ``length`` tokens from level ``abar``,
        the critics' per-token values weighted by ``beta``."""
        return DecodePlan(self, batch_size, length, abar, critics, beta)


class DecodePlan:
    """The static part of an LM decode: the query shift ``alpha`` and the score bias."""

    def __init__(
        self,
        decoder: LMDecoder,
        batch_size: int,
        length: int,
        abar: float,
        critics: Sequence[tuple[TokenLocalCritic, float]],
        beta: float,
    ) -> None:
        cfg = decoder.config
        space = decoder.base.space
        self.decoder, self.batch_size, self.length = decoder, batch_size, length
        self.model = decoder.base.model
        self.tied = ties_embeddings(self.model)
        c = space.scale
        w = cfg.latent_weight
        if w and abar >= 1.0:
            raise ConfigError(
                "the LM decode reads a noisy latent: set a stop level t* > 0 (--stop-at); "
                "at t* = 0 the latent is clean data and its likelihood is a point mass"
            )
        self.alpha = w * math.sqrt(abar) * c / (1.0 - abar) if w else 0.0
        weight = space.weight
        bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        if w:
            bias -= w * abar * c * c / (2.0 * (1.0 - abar)) * weight.float().pow(2).sum(dim=1)
        if beta and critics:
            bias += beta * token_values(critics, weight, c)
        self.bias = bias

    @torch.no_grad()
    def run(self, z: torch.Tensor | None, prompt: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Decode ``z [B, L, d]`` (or None: the prior and tilt alone) after ``prompt [p]``.

        Returns ``[B, L]`` int64 token ids on ``z``'s device, the prompt included.
        """
        from fastdia import ops

        base, cfg = self.decoder.base, self.decoder.config
        space, model = base.space, self.model
        batch, length = self.batch_size, self.length
        device = space.weight.device
        p = int(prompt.shape[0])
        ids = torch.empty(batch, length, dtype=torch.int64, device=device)
        ids[:, :p] = prompt
        if p:
            context = prompt.to(model.device)[None, :].expand(batch, -1)
        else:
            start = base.tokenizer.bos_token_id
            if start is None:
                start = base.tokenizer.eos_token_id
            context = torch.full((batch, 1), int(start), dtype=torch.int64, device=model.device)
        inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        cache_arg = _cache_argument(inner)
        cache = None
        backend = self.decoder.backends.get(ops.ROUND_TO_VOCAB)
        for i in range(p, length):
            out = inner(input_ids=context, use_cache=True, **{cache_arg: cache})
            cache = getattr(out, cache_arg)
            h = out.last_hidden_state[:, -1].to(device=device, dtype=torch.float32)
            query = h / cfg.temperature
            if self.alpha:
                query = query + self.alpha * z[:, i].float()
            if self.tied:
                tok = ops.sample_vocab(
                    query,
                    space.weight,
                    self.bias,
                    seed=seed,
                    step=DECODE_STEP + i,
                    backend=backend,
                )
            else:
                logits = model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()
                logits = logits.to(device) / cfg.temperature + self.bias
                if self.alpha:
                    logits = logits + self.alpha * (z[:, i].float() @ space.weight.float().T)
                tok = ops.gumbel_argmax(logits, seed=seed, step=DECODE_STEP + i)
            ids[:, i] = tok
            context = tok.to(model.device)[:, None]
        return ids
