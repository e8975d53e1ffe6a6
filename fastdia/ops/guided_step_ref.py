"""``guided_step``: one reverse step with critic guidance, and its PyTorch reference.

For ``N = B * L`` tokens of width ``d``::

    z'[n] = a * z[n] + b * eps[n] + c * lambda * g[n] + s * zeta(seed_b, step, i * d + j)

for token ``n = b L + i`` (position ``i`` of sequence ``b``), where ``g[n]`` is the gradient
of the token-local critic stack (plus an optional precomputed gradient from context
critics) and ``zeta`` is fastdia's counter-based Philox noise (:mod:`fastdia.noise`),
numbered per sequence under the sequence's own seed (:func:`fastdia.noise.randn_rows`),
so a sequence's trajectory does not depend on the rest of the batch. Coefficients are one
row ``[4]`` shared by the batch, or ``[B, 4]`` per sample; with ``noise_kappa > 0`` the
noise of sample ``b`` is scaled by ``exp(-kappa * h_b(z))`` (adaptive noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastdia import noise
from fastdia.models.critic import TokenLocalCritic, silu_grad


@dataclass
class TokenLocalStack:
    """Several token-local critics merged into one, weights folded in.

    ``h(z) = mean_i w2 . silu(W1 z_i + b1) + b2`` with the hidden units of all critics
    side by side, so the weighted sum of critics is one critic.

    Attributes:
        w1: ``[H, d]`` float32.
        b1: ``[R, H]`` float32, the hidden bias of every row of the step table.
        w2: ``[H]`` float32 (critic weights folded in).
        b2: ``[]`` float32.
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    @classmethod
    def merge(
        cls, critics: Sequence[tuple[TokenLocalCritic, float]], t: torch.Tensor
    ) -> TokenLocalStack:
        """Merge ``(critic, weight)`` pairs, evaluating hidden biases at times ``t [R]``."""
        with torch.no_grad():
            w1 = torch.cat([c.fc1.weight for c, _ in critics])
            b1 = torch.cat([c.hidden_bias(t.to(w1.device)) for c, _ in critics], dim=1)
            w2 = torch.cat([c.w2 * w for c, w in critics])
            b2 = sum((c.b2 * w for c, w in critics), torch.zeros((), device=w1.device))
        return cls(w1.float().contiguous(), b1.float().contiguous(), w2.float(), b2.float())

    def row(self, r: int) -> TokenLocalStack:
        """The stack with the hidden bias of row ``r`` only (``b1`` becomes ``[H]``)."""
        return TokenLocalStack(self.w1, self.b1[r], self.w2, self.b2)


def critic_value_and_grad(
    z: torch.Tensor, stack: TokenLocalStack, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value ``[B]`` and gradient ``[N, d]`` of a single-row stack (``b1 [H]``) at ``z [N, d]``."""
    pre = z @ stack.w1.T + stack.b1
    h = (nn.functional.silu(pre) @ stack.w2).view(-1, seq_len).mean(dim=1) + stack.b2
    grad = (silu_grad(pre) * stack.w2) @ stack.w1 / seq_len
    return h, grad


def guided_step_reference(
    z: torch.Tensor,
    eps: torch.Tensor,
    coef: torch.Tensor,
    *,
    seq_len: int,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
    guidance: float | torch.Tensor = 0.0,
    critic: TokenLocalStack | None = None,
    grad: torch.Tensor | None = None,
    noise_kappa: float = 0.0,
    return_h: bool = False,
    out: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One guided reverse step in plain PyTorch (the reference every variant matches).

    Graph-safe when ``seed``, ``step`` and ``guidance`` are device tensors: it creates no
    tensor from host values and reads nothing back (docs/design.md §2; the sampler's strict tests
    check this).

    Args:
        z: ``[N, d]`` current state, ``N = B * seq_len``, float32.
        eps: ``[N, d]`` the denoiser's noise estimate, float32.
        coef: ``[4]`` or ``[B, 4]`` float32, ``(a, b, c, s)``.
        seq_len: tokens per sequence ``L``.
        seed: per-sequence seeds, a ``[B]`` int64 tensor on ``z``'s device (read there), or
            one seed ``s`` (an int or a 1-element tensor) meaning ``s + b`` for sequence
            ``b`` (:func:`fastdia.noise.row_seeds`).
        step: the noise step (``int``, or a 1-element integer tensor on ``z``'s device).
        guidance: ``lambda`` (a number or a 1-element tensor).
        critic: token-local stack at this row (``b1 [H]``), or None.
        grad: ``[N, d]`` extra guidance gradient (context critics), or None.
        noise_kappa: adaptive noise strength; needs ``critic``.
        return_h: also return the stack's value per sequence.
        out: optional float32 ``[N, d]`` buffer for ``z'`` (must not overlap ``z``).
        h_out: optional float32 ``[B]`` buffer for ``h`` (with ``return_h`` and a critic).

    Returns:
        ``(z' [N, d] float32, h [B] float32 or None)``.
    """
    n, d = z.shape
    batch = n // seq_len
    z32, eps32 = z.float(), eps.float()
    g = torch.zeros_like(z32) if grad is None else grad.float().clone()
    h = None
    if critic is not None:
        h, g_critic = critic_value_and_grad(z32, critic, seq_len)
        g += g_critic
    coef = coef.float().to(z.device)
    if coef.dim() == 1:
        coef = coef.expand(batch, 4)
    # per-sequence coefficients [B, 1, 1] against the state viewed as [B, L, d]
    a, b, c, s = (coef[:, i].view(batch, 1, 1) for i in range(4))
    if noise_kappa and h is not None:
        s = s * torch.exp(-noise_kappa * h).view(batch, 1, 1)
    shape = (batch, seq_len, d)
    zeta = noise.randn_rows(noise.row_seeds(seed, batch, z.device), step, z32.view(shape))
    lam = guidance.float().reshape(()) if isinstance(guidance, torch.Tensor) else guidance
    result = a * z32.view(shape) + b * eps32.view(shape) + (c * lam) * g.view(shape) + s * zeta
    result = result.view(n, d)
    if out is not None:
        result = out.copy_(result)
    if not return_h:
        return result, None
    if h is not None and h_out is not None:
        h = h_out.copy_(h)
    return result, h
