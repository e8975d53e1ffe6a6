"""Decoding a diffusion latent with the base model as prior (``decode="lm"``, docs/design.md §1).

Nearest-embedding rounding is the posterior mode of ``x`` given ``z`` under a uniform
prior over tokens. The base model is a far better prior: this module samples, left to
right with the base model's KV cache,

    p(x | z_t*)  ∝  p_LM(x)^(1/T) · Π_i N(z_i ; sqrt(abar) c E[x_i], (1 - abar) I)^w
                 · exp(beta · Σ_i u(x_i))

at the stop level ``t*`` (``abar = abar(t*)``), where ``T`` is the LM temperature, ``w``
the latent weight and ``u(v)`` the guiding critics' per-token value of token ``v`` (their
weighted sum, at noise level 0: ``w2 . silu(W1 c E_v + b1(0))``), ``beta`` its weight.
The sampler sets ``beta = tilt · lambda / W``, ``W`` the denoiser's window: a token-local
critic ``h = mean_i u(x_i) + b2`` over a window weighs each token ``lambda / W``, so
``tilt = 1`` gives every token the weight it has in the guided latent's ``lambda h``,
whatever the length of the text. (Sampled left to right with per-position
normalisation this is weighted decoding, FUDGE / PPLM-BoW style, not an exact draw from
``p(x) exp(lambda h(x))``.) One guidance strength ``lambda`` drives both the latent's
guidance and the decode.
For position ``i`` the log-score of token ``v`` is, up to a constant of ``v``::

    <h_i / T, E_v>  +  alpha <z_i, E_v>  -  w abar c^2 ||E_v||^2 / (2 (1 - abar))  +  beta u(v)
    alpha = w sqrt(abar) c / (1 - abar)

where ``h_i`` is the LM's final hidden state before position ``i``. When the LM ties its
input and output embeddings (SmolLM2 does) and has no output bias, the whole score is one
:func:`fastdia.ops.sample_vocab` call on the shifted query ``h_i / T + alpha z_i`` with
the bias above: a Gumbel-max draw over the vocabulary that never writes the ``[B, V]``
scores. Untied models take the general path (LM logits plus the latent term, then
Gumbel-max), which writes them. Banned tokens (template and role markers, and the end
tokens when they are masked: :mod:`fastdia.prompts`) get a score bias of ``-1e9``.

With ``tilt_once`` (:class:`DecodeConfig`) the sum runs over the *distinct* tokens of the
continuation: a token's ``beta u(v)`` is added until the row draws it, then dropped (a
per-row bias ``[B, V]``, updated in place after every draw). A strong tilt then cannot
buy reward by repeating its best words, which is what makes plain critic-weighted
decoding degenerate.

Noise: the Gumbel variable of token ``v`` for row ``b``'s ``g``-th generated token is drawn
under the row's own seed at step ``DECODE_STEP + g``, element ``v`` (:mod:`fastdia.noise`),
so a seed gives the same text on every backend and whatever else shares the batch.

``beta`` alone with ``w = 0`` is critic-weighted decoding of the base model (the tilt-only
row of ``fastdia eval``).

The loop (docs/design.md §2): the decode runs over a block loop's buffers
(:class:`fastdia.window.BlockState`): rows of different prompt lengths share a batch
left-padded, each row's padding masked out of attention and its positions counted from
its own first token. Where transformers' ``StaticCache`` serves the model, the KV cache is
static (``[B, heads, C, head_dim]`` per layer, allocated once per plan) and each position
is one call of :meth:`DecodePlan.step`, which reads everything it needs from device
buffers (the last token, its cache position, the attention mask, the generated count,
the seeds and the noise step) and advances them in place: it creates nothing from host
values that change between calls and reads nothing back to the host
(``tests/test_decode.py`` checks this on CPU under :class:`fastdia.strict.GraphSafeMode`).
The prompts are written to the cache by one eager forward per run (their lengths vary);
on a CUDA device with ``graph=True`` the step is captured once per plan as a CUDA graph
and replayed once per position, as gpt-fast does. Models that ``StaticCache`` cannot serve
decode eagerly with their own dynamic cache, the same step otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fastdia.device import capture_graph
from fastdia.errors import ConfigError
from fastdia.ops.gumbel import gumbel_argmax
from fastdia.settings import SAMPLING_KEYS

if TYPE_CHECKING:
    from fastdia.base_model import BaseModel
    from fastdia.models.critic import TokenLocalCritic
    from fastdia.window import BlockState

log = logging.getLogger(__name__)

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
        tilt: >= 0, the critics' per-token values weigh ``tilt * lambda / W`` (``W`` the
            denoiser's window: 1 gives a token the weight it has in ``lambda h``).
        tilt_once: a token earns its tilt at its first use in the continuation only (the
            prompt does not count): repeating a well-scored word gains nothing, which
            keeps a strong tilt from writing "great great love love". The tilt then weighs
            ``h`` over distinct tokens (and, sampled left to right with per-position
            normalisation, neither form is an exact draw from ``p(x) exp(lambda h(x))``).
        tilt_horizon: the tilt applies to a row's first ``tilt_horizon`` generated tokens
            only (0: to all of them): a long text then gets the tilt a text of that many
            tokens gets, instead of a total that grows with its length.
    """

    temperature: float = SAMPLING_KEYS["lm_temperature"].default
    latent_weight: float = SAMPLING_KEYS["latent_weight"].default
    tilt: float = SAMPLING_KEYS["tilt"].default
    tilt_once: bool = SAMPLING_KEYS["tilt_once"].default
    tilt_horizon: int = SAMPLING_KEYS["tilt_horizon"].default

    def __post_init__(self) -> None:
        check_positive(self.temperature, "the LM decode's temperature")
        check_positive(self.latent_weight, "the LM decode's latent weight", allow_zero=True)
        check_positive(self.tilt, "the LM decode's tilt", allow_zero=True)
        if not isinstance(self.tilt_once, bool):
            raise ConfigError(f"tilt_once must be true or false, got {self.tilt_once!r}")
        if (
            isinstance(self.tilt_horizon, bool)
            or not isinstance(self.tilt_horizon, int)
            or self.tilt_horizon < 0
        ):
            raise ConfigError(
                f"tilt_horizon must be an integer >= 0 (0: no horizon), got {self.tilt_horizon!r}"
            )


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
    """Whether the LM's logits are its final hidden state times its input embedding
    matrix and nothing else: a tied output layer without a bias, and no logit scaling or
    soft-capping (:func:`logit_transform`). Only then may the decode draw with the fused
    ``sample_vocab`` over the embedding."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or getattr(out, "bias", None) is not None:
        return False
    return out.weight.data_ptr() == inp.weight.data_ptr() and logit_transform(model) is None


def logit_transform(model: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the LM's causal-LM forward does to its output layer's logits, from its config
    (None: nothing): a multiplier (``logit_scale``, Cohere), a divisor (``logits_scaling``,
    Granite), then a soft cap ``cap * tanh(logits / cap)`` (``final_logit_softcapping``,
    Gemma 2 and 3). The decode's general path applies it, so the prior is the model's own
    next-token distribution."""
    config = getattr(model, "config", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    cap = getattr(config, "final_logit_softcapping", None)
    if scale == 1.0 and not cap:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        logits = logits * scale if scale != 1.0 else logits
        return torch.tanh(logits / cap) * cap if cap else logits

    return transform


def _cache_argument(module: Any) -> str:
    """The KV-cache keyword of a transformers model: ``cache`` (v5.20+) or
    ``past_key_values`` (earlier), read from its forward signature."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def static_cache(model: Any, batch_size: int, length: int) -> Any | None:
    """A transformers ``StaticCache`` for ``batch_size`` sequences of ``length`` tokens on
    the model's device and dtype, or None where this transformers or model has none.

    The constructor's arguments changed across transformers versions (``batch_size``,
    ``max_batch_size``, ``device``, ``dtype`` come and go): the ones it takes are passed.
    """
    import inspect

    try:
        from transformers import StaticCache
    except ImportError:
        return None
    params = inspect.signature(StaticCache.__init__).parameters
    given = {
        "config": model.config,
        "max_cache_len": length,
        "batch_size": batch_size,
        "max_batch_size": batch_size,
        "device": model.device,
        "dtype": model.dtype,
    }
    try:
        return StaticCache(**{k: v for k, v in given.items() if k in params})
    except (TypeError, ValueError, AttributeError, NotImplementedError) as err:
        name = type(model).__name__
        log.warning(
            "no static KV cache for %s (%s): the LM decode uses a dynamic one, and its "
            "per-token step is not captured as a CUDA graph",
            name,
            err,
        )
        return None


class LMDecoder:
    """The base model as the decode's prior; :meth:`plan` binds a block loop's buffers."""

    def __init__(self, base: BaseModel, config: DecodeConfig, backends: dict[str, str]) -> None:
        self.base, self.config, self.backends = base, config, backends

    def plan(
        self,
        state: BlockState,
        abar: float,
        critics: Sequence[tuple[TokenLocalCritic, float]],
        beta: float,
        banned: Sequence[int] = (),
        *,
        graph: bool = False,
        smc: bool = False,
        smc_tilted: bool = True,
    ) -> DecodePlan:
        """A decode over the block loop's buffers ``state`` from level ``abar``, the critics'
        per-token values weighted by ``beta``, the ``banned`` ids never drawn; ``graph``:
        capture the per-token step as a CUDA graph (on a CUDA device with a static cache);
        ``smc``: keep each row's SMC log-weight (:mod:`fastdia.smc`) in ``log_w``, toward
        the tilted target (``smc_tilted``) or the base model's alone (a reward twist)."""
        return DecodePlan(
            self, state, abar, critics, beta, banned, graph=graph, smc=smc, smc_tilted=smc_tilted
        )


class DecodePlan:
    """The static part of an LM decode over a block loop's buffers (:class:`BlockState`):
    the query shift ``alpha``, the score bias, the KV cache and the per-token step's
    buffers (see the module docstring).

    Rows are left-padded: row ``b``'s base-model prefix ends at ``P = state.prompt_cap``,
    its keys before ``state.pad[b]`` are masked, and its positions count from its first
    real token, so a row decodes as it would alone. Buffers (on the space's device unless
    said): ``noise_step []`` int64; ``h [B, hidden]`` float32, the LM's final hidden state
    after the last token read (what the next draw reads); on the model's device ``tok
    [B, 1]`` int64 (the last token), ``cache_pos [1]`` int64 (where the next token read
    goes in the KV cache) and ``mask [B, 1, 1, C]`` (the additive attention mask of the
    step: 0 where a key is visible). Each step draws from ``h`` and then reads the drawn
    token, so the states of every written token exist before the next block's diffusion
    (a run reads one token more than it needs).
    """

    def __init__(
        self,
        decoder: LMDecoder,
        state: BlockState,
        abar: float,
        critics: Sequence[tuple[TokenLocalCritic, float]],
        beta: float,
        banned: Sequence[int] = (),
        *,
        graph: bool = False,
        smc: bool = False,
        smc_tilted: bool = True,
    ) -> None:
        cfg = decoder.config
        base = decoder.base
        space = base.space
        self.decoder, self.state = decoder, state
        self.batch_size, self.capacity = state.tokens.shape[0], state.capacity
        self.model = model = base.model
        self.tied = ties_embeddings(model)
        self._logits = logit_transform(model)
        c = space.scale
        w = cfg.latent_weight
        if w and abar >= 1.0:
            raise ConfigError(
                "the LM decode reads a noisy latent: set a stop level t* > 0 (--stop-at); "
                "at t* = 0 the latent is clean data and its likelihood is a point mass"
            )
        self.alpha = w * math.sqrt(abar) * c / (1.0 - abar) if w else 0.0
        weight = space.weight
        device = weight.device
        bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=device)
        if w:
            bias -= w * abar * c * c / (2.0 * (1.0 - abar)) * weight.float().pow(2).sum(dim=1)
        tilt = beta * token_values(critics, weight, c) if beta and critics else None
        if tilt is not None:
            bias += tilt
        spent = bias - tilt if tilt is not None else None  # the bias without the tilt
        if banned:
            from fastdia.window import BANNED_SCORE

            bias[list(banned)] = BANNED_SCORE
            if spent is not None:
                spent[list(banned)] = BANNED_SCORE
        self.bias = bias
        # SMC's target per token: log p_T(v) + beta u(v) (without the tilt for a reward
        # twist), banned tokens out (fastdia.smc); twist: each row's sum of beta u so far
        self.log_w: torch.Tensor | None = None
        self.twist: torch.Tensor | None = None
        self._smc_tilt = self._smc_banned = torch.zeros_like(bias)
        if smc:
            if tilt is not None and smc_tilted:
                self._smc_tilt = tilt.clone()
            if banned:
                self._smc_banned = torch.zeros_like(bias).index_fill_(
                    0, torch.tensor(list(banned), device=device), -math.inf
                )
            self.log_w = torch.zeros(state.tokens.shape[0], dtype=torch.float64, device=device)
            self.twist = torch.zeros_like(self.log_w)
        self._horizon = cfg.tilt_horizon if tilt is not None else 0
        self._untilted = spent
        # tilt_once: a per-row bias [B, V] that loses a token's tilt once it is drawn
        once = cfg.tilt_once and tilt is not None
        self.row_bias = bias.repeat(self.batch_size, 1) if once else None
        self._spent = spent if once else None
        self._inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self._cache_arg = _cache_argument(self._inner)
        from fastdia.ops import SAMPLE_VOCAB, registry

        # the draw of the tied path, bound once (the sampler resolved its variant)
        backend = decoder.backends.get(SAMPLE_VOCAB)
        self._sample_vocab = registry.get(SAMPLE_VOCAB, backend) if backend else None
        # the one fused call per token over the embedding (SMC needs the explicit scores)
        self.fused = self.tied and self._sample_vocab is not None and self.log_w is None
        mdev = model.device
        self.noise_step = torch.zeros((), dtype=torch.int64, device=device)
        # the final hidden state of the last token read: what the next draw reads
        self.h = torch.zeros(self.batch_size, base.hidden_size, device=device)
        self.tok = torch.zeros(self.batch_size, 1, dtype=torch.int64, device=mdev)
        self.cache_pos = torch.zeros(1, dtype=torch.int64, device=mdev)
        self._blocked = torch.finfo(model.dtype).min
        self.mask = torch.zeros(
            self.batch_size, 1, 1, self.capacity, dtype=model.dtype, device=mdev
        )
        self._keys = torch.arange(self.capacity, dtype=torch.int64, device=mdev)
        self.cache = static_cache(model, self.batch_size, self.capacity)
        self._dynamic: Any = None  # the model's own cache when there is no static one
        self._dynamic_len = 0  # its length (eager only)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._want_graph = graph and device.type == "cuda" and self.cache is not None

    @property
    def static(self) -> bool:
        """Whether the KV cache is static (the step is graph-safe)."""
        return self.cache is not None

    @property
    def graphed(self) -> bool:
        """Whether :meth:`decode_tokens` replays the step as a captured CUDA graph."""
        return self._graph is not None

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The LM on ``tokens [B, n]`` at cache positions ``positions [n]`` with the additive
        mask ``[B, 1, n, C]``: the final hidden states ``[B, n, hidden]`` float32 on the
        space's device, also written to ``state.hist`` at ``positions`` when the block
        loop keeps them (a denoiser that reads base-model states)."""
        pad = self.state.pad.to(positions.device)
        position_ids = (positions[None, :] - pad[:, None]).clamp_(min=0)
        if self.cache is not None:
            out = self._inner(
                input_ids=tokens,
                use_cache=True,
                cache_position=positions,
                position_ids=position_ids,
                attention_mask=mask,
                **{self._cache_arg: self.cache},
            )
        else:  # a dynamic cache holds the keys written so far only
            n = tokens.shape[1]
            out = self._inner(
                input_ids=tokens,
                use_cache=True,
                position_ids=position_ids,
                attention_mask=mask[..., : self._dynamic_len + n],
                **{self._cache_arg: self._dynamic},
            )
            self._dynamic = getattr(out, self._cache_arg)
            self._dynamic_len += n
        h = out.last_hidden_state.to(device=self.bias.device, dtype=torch.float32)
        hist = self.state.hist
        if hist is not None:
            hist.index_copy_(1, positions.to(hist.device), h)
        return h

    def _draw(self, h: torch.Tensor) -> torch.Tensor:
        """One token per row from the decode score of the final hidden state ``h``, at the
        block position ``generated % K``: ``[B]`` int64, each row under its own seed."""
        cfg, st = self.decoder.config, self.state
        space = self.decoder.base.space
        query = h / cfg.temperature
        latent = None
        if self.alpha:
            latent = st.latent.index_select(1, st.generated % st.block)[:, 0]
            query = query + self.alpha * latent
        bias = self.bias if self.row_bias is None else self.row_bias
        if self._horizon:  # past the horizon the tilt is gone
            bias = torch.where(st.generated >= self._horizon, self._untilted, bias)
        if self.fused:
            return self._sample_vocab(
                query, space.weight, bias, seed=st.seeds, step=self.noise_step
            )
        head = self.model.get_output_embeddings()
        logits = head(h.to(device=self.model.device, dtype=self.model.dtype)).float()
        if self._logits is not None:
            logits = self._logits(logits)
        prior = logits.to(bias.device) / cfg.temperature
        logits = prior + bias
        if latent is not None:
            logits = logits + self.alpha * (latent @ space.weight.float().T)
        tok = gumbel_argmax(logits, seed=st.seeds, step=self.noise_step)
        if self.log_w is not None:  # SMC: target over proposal of the drawn token
            at = tok[:, None]
            target = torch.log_softmax(prior + self._smc_banned, dim=-1).gather(1, at)[:, 0]
            proposal = torch.log_softmax(logits, dim=-1).gather(1, at)[:, 0]
            twist = self._smc_tilt[tok].double()
            self.log_w += (target - proposal).double() + twist
            self.twist += twist
        return tok

    @torch.no_grad()
    def step(self) -> None:
        """One position: a token is drawn for position ``P + generated`` from the last
        hidden state ``h`` and written to ``state.tokens``; the LM then reads it at
        ``cache_pos`` (its state becomes ``h``, the next draw's); the counters advance by
        one. Reading the token right after drawing it keeps the states of every written
        token ready before the next block's diffusion. Graph-safe with a static cache (the
        module docstring)."""
        st = self.state
        tok = self._draw(self.h)
        st.tokens.index_copy_(1, st.generated + st.prompt_cap, tok[:, None])
        if self.row_bias is not None:  # the drawn token's tilt is spent in its row
            self.row_bias.scatter_(1, tok[:, None], self._spent.index_select(0, tok)[:, None])
        self.tok.copy_(tok[:, None])
        self.mask.index_fill_(3, self.cache_pos, 0.0)  # the step's own key becomes visible
        self.h.copy_(self._forward(self.tok, self.cache_pos, self.mask)[:, -1])
        self.cache_pos.add_(1)
        st.generated.add_(1)
        self.noise_step.add_(1)

    @torch.no_grad()
    def reorder(self, parents: torch.Tensor) -> None:
        """Make row ``b`` a copy of row ``parents[b]`` (SMC resampling, :mod:`fastdia.smc`):
        its tokens, prompt bookkeeping, base-model states, KV cache, last hidden state and
        per-row tilt, in place (eager: the caller reads weights back to the host)."""
        st = self.state
        idx = parents.to(st.tokens.device)
        rows = (st.tokens, st.prompt_len, st.pad, st.hist, self.h, self.row_bias, self.twist)
        for buf in rows:
            if buf is not None:
                buf.copy_(buf.index_select(0, idx.to(buf.device)))
        midx = idx.to(self.tok.device)
        for buf in (self.tok, self.mask):
            buf.copy_(buf.index_select(0, midx))
        if self.cache is not None:
            for layer in self.cache.layers:
                for buf in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(buf, torch.Tensor) and buf.dim() > 0:
                        buf.copy_(buf.index_select(0, midx.to(buf.device)))
        elif self._dynamic is not None:
            self._dynamic.reorder_cache(midx)

    @torch.no_grad()
    def start(self) -> None:
        """Begin a run on the inputs in ``state`` (tokens, pad, seeds; ``generated`` 0):
        reset the cache, the mask and the counters, and read every row's prefix into the
        KV cache with one forward (eager: the prefix length varies); ``h`` is then the
        state of its last token."""
        st = self.state
        prefix = st.prompt_cap
        mdev = self.tok.device
        if self.row_bias is not None:
            self.row_bias.copy_(self.bias.expand_as(self.row_bias))
        self.noise_step.fill_(DECODE_STEP)
        if self.log_w is not None:
            self.log_w.zero_()
            self.twist.zero_()
        self._dynamic, self._dynamic_len = None, 0
        if self.cache is not None:
            self.cache.reset()  # in place: the captured step keeps its addresses
        if st.hist is not None:
            st.hist.zero_()
        self.mask.fill_(self._blocked)
        self.cache_pos.zero_()
        tokens = st.tokens.to(mdev)
        self.h.copy_(self._read(tokens[:, :prefix])[:, -1])
        self.tok.copy_(tokens[:, prefix - 1 : prefix])

    @torch.no_grad()
    def absorb(self, count: int) -> None:
        """Read the ``count`` tokens written after the last one read (a nearest decode's
        block, which the diffusion wrote) into the KV cache, so that ``h`` and
        ``state.hist`` cover them: what a denoiser that reads base-model states needs
        before the next block. Eager (one forward of ``count`` tokens)."""
        positions = self.cache_pos + self._keys[:count]
        tokens = self.state.tokens.to(self.tok.device).index_select(1, positions)
        self.h.copy_(self._read(tokens, positions)[:, -1])

    def _read(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Forward ``tokens [B, n]`` at cache positions ``positions [n]`` (default
        ``0..n-1``), each row seeing its own keys from its padding on, causally; the keys
        become visible to later steps and ``cache_pos`` moves past them. Returns the
        states ``[B, n, hidden]``."""
        n = tokens.shape[1]
        if positions is None:
            positions = self._keys[:n]
        pad = self.state.pad.to(self.tok.device)
        keys = self._keys[None, None, :]
        causal = (keys >= pad[:, None, None]) & (keys <= positions[None, :, None])
        self.mask.index_fill_(3, positions, 0.0)
        self.mask.masked_fill_((self._keys < pad[:, None])[:, None, None, :], self._blocked)
        h = self._forward(tokens, positions, self._additive(causal)[:, None])
        self.cache_pos.add_(n)
        return h

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """A boolean visibility mask as an additive one (0 visible, dtype min hidden)."""
        zero = torch.zeros((), dtype=self.mask.dtype, device=visible.device)
        return torch.where(visible, zero, self._blocked)

    @torch.no_grad()
    def capture(self, warmup: Callable[[], None]) -> None:
        """Capture the step as one CUDA graph after ``warmup`` (a whole run on a side
        stream); a capture that fails leaves the decode eager, with a warning."""
        graph = capture_graph(self.tok.device, warmup, self.step, "the LM decode step")
        self._want_graph = False
        if graph is not None:
            self._graph = graph
            log.info("captured the LM decode step for B=%d, C=%d", self.batch_size, self.capacity)

    @property
    def wants_graph(self) -> bool:
        """Whether the step should be captured (CUDA, static cache, ``graph=True``)."""
        return self._want_graph

    def decode_tokens(self, count: int) -> None:
        """Decode ``count`` tokens of the block (replaying the captured step where there
        is one)."""
        for _ in range(count):
            if self._graph is not None:
                self._graph.replay()
            else:
                self.step()
