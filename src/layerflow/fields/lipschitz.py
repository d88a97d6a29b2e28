"""A vector field whose Euler substeps are certified non-expansive.

    attention term  A(X) = Â(X) − X          Euler substep: X ← (1 − h)·X + h·Â(X)
    MLP term        M(X) = −Wᵀσ(WX + b)       Euler substep: X ← X − h·Wᵀσ(WX + b)

Â is L2 multi-head self-attention with tied query/key maps (Kim, Papamakarios & Mnih, ICML 2021):

    P_h[i, j] = softmax_j(−‖q_i − q_j‖²/√d_h),  q = X·W_Q,h   (causal: j ≤ i)
    Â(X)      = s·[P_1 q_1 M_1, …, P_H q_H M_H]·W_O / √d_h,    M_h = W_Q,hᵀ·W_V,h

whose Lipschitz constant is ≤ s·‖W_O‖₂·√(Σ_h (C_N ‖W_Q,h‖₂ ‖M_h‖₂ / √d_h)²) with C_N from
`constraints.l2_attention_constant` (N = block_size; the bound grows with N, and a causal row
is L2 attention over a prefix). The factor s = min(1, ρ/bound̂) (bound̂ from power iteration)
keeps Lip(Â) ≤ 1, so for h ≤ 1 the attention substep is a convex combination of the identity and
a 1-Lipschitz map: non-expansive.

The MLP term is the negative gradient of the convex potential 1ᵀΣ(WX + b) (σ = ReLU, monotone
and 1-Lipschitz), with W rescaled so that h‖W‖₂² ≤ 2ρ: a non-expansive step (Sherry, Celledoni,
Ehrhardt, Murari, Owren, Schönlieb 2024). With `expansive=True` the sign flips (X ← X + h·Wᵀσ(…)),
the expansive steps their networks alternate with, bounded by 1 + h‖W‖₂².
No normalisation sits inside the branches (LayerNorm is not globally Lipschitz); the model's final
norm acts after the flow, outside the certificate.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..constraints import (
    SAFETY,
    PowerIteration,
    clip_scale,
    convex_step_lipschitz,
    gradient_step_lipschitz,
    l2_attention_constant,
    spectral_norm,
)


class L2SelfAttention(nn.Module):
    """Causal L2 multi-head self-attention with tied query/key maps, rescaled to Lipschitz ≤ 1
    (`max_lip`); `lipschitz_bound()` is the exact-σ bound of the map as used in forward."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, max_lip: float | None = 1.0,
                 std: float = 0.02, seed: int = 0):
        super().__init__()
        self.n_head, self.n_embd, self.hd = n_head, n_embd, n_embd // n_head
        self.w_q = nn.Parameter(torch.randn(n_head, n_embd, self.hd) * std)
        self.w_v = nn.Parameter(torch.randn(n_head, n_embd, self.hd) * std)
        self.w_o = nn.Parameter(torch.randn(n_embd, n_embd) * std)
        self.c_n = l2_attention_constant(block_size)
        self.max_lip = max_lip
        self.pi_q = PowerIteration((n_head, self.hd, n_embd), seed=seed)
        self.pi_m = PowerIteration((n_head, self.hd, self.hd), seed=seed + 1)
        self.pi_o = PowerIteration((n_embd, n_embd), seed=seed + 2)

    def value_maps(self) -> torch.Tensor:
        return self.w_q.transpose(1, 2) @ self.w_v  # M_h = W_Q,hᵀ W_V,h: (H, hd, hd)

    def _bound(self, sq, sm, so):
        per_head = self.c_n * sq * sm / math.sqrt(self.hd)
        return so * torch.sqrt((per_head ** 2).sum())

    def scale(self) -> torch.Tensor:
        """s = min(1, ρ·max_lip / bound̂), with bound̂ from the power-iteration norms."""
        if self.max_lip is None:
            return torch.ones((), device=self.w_o.device)
        est = self._bound(self.pi_q(self.w_q.transpose(1, 2)), self.pi_m(self.value_maps()),
                          self.pi_o(self.w_o))
        return clip_scale(est, SAFETY * self.max_lip)

    def raw(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        """The unscaled map: [P_h q_h M_h]_h W_O / √d_h."""
        B, T, C = x.shape
        q = torch.einsum("btc,hcd->bhtd", x, self.w_q)
        k = q
        past = ctx.cache.length if ctx is not None and ctx.cache is not None else 0
        if ctx is not None and ctx.cache is not None:
            k, _ = ctx.cache.extend(q, q)
        # −‖q_i − k_j‖² = 2 q_i·k_j − ‖k_j‖² − ‖q_i‖²; the last term is constant along j
        scores = (2 * q @ k.transpose(-1, -2) - (k * k).sum(-1).unsqueeze(-2)) / math.sqrt(self.hd)
        S = k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(past)
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (p @ k) @ self.value_maps().unsqueeze(0) / math.sqrt(self.hd)  # (B, H, T, hd)
        return y.transpose(1, 2).reshape(B, T, C) @ self.w_o

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.scale() * self.raw(x, ctx)

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """Exact-σ upper bound of Lip(x ↦ forward(x)) (ℓ₂ over tokens × width)."""
        b = float(self._bound(spectral_norm(self.w_q), spectral_norm(self.value_maps()),
                              spectral_norm(self.w_o)))
        was = self.training
        self.eval()
        s = float(self.scale())
        self.train(was)
        return s * b


class GradientMLP(nn.Module):
    """x ↦ ∓Wᵀσ(Wx + b), σ = ReLU, W rescaled so that h_max·‖W‖₂² ≤ 2ρ."""

    def __init__(self, n_embd: int, hidden: int, h_max: float, expansive: bool = False,
                 std: float = 0.02, seed: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden, n_embd) * std)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.radius = math.sqrt(2.0 * SAFETY / h_max)
        self.expansive = expansive
        self.pi = PowerIteration((hidden, n_embd), seed=seed)

    def effective_weight(self) -> torch.Tensor:
        return self.weight * clip_scale(self.pi(self.weight), self.radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.effective_weight()
        out = F.linear(F.relu(F.linear(x, W, self.bias)), W.t())
        return out if self.expansive else -out

    @torch.no_grad()
    def sigma(self) -> float:
        was = self.training
        self.eval()
        s = float(spectral_norm(self.effective_weight()))
        self.train(was)
        return s


class NonExpansiveField(nn.Module):
    """F(X) = (Â(X) − X) + (∓Wᵀσ(WX + b)) as two split terms (`attn`, `mlp`)."""

    term_names = ("attn", "mlp")

    def __init__(self, n_embd: int, n_head: int, mlp_ratio: int, block_size: int, h: float,
                 expansive: bool = False, seed: int = 0):
        super().__init__()
        if not 0 < h <= 1:
            raise ValueError(f"the non-expansive field needs a step size 0 < h <= 1, got {h}")
        self.h = h
        self.attn = L2SelfAttention(n_embd, n_head, block_size, seed=seed)
        self.mlp = GradientMLP(n_embd, mlp_ratio * n_embd, h, expansive, seed=seed + 3)

    def attn_term(self, x, t=None, ctx=None):
        return self.attn(x, ctx) - x

    def mlp_term(self, x, t=None, ctx=None):
        return self.mlp(x)

    def forward(self, x, t=None, ctx=None):
        return self.attn_term(x, t, ctx) + self.mlp_term(x, t, ctx)

    def terms(self):
        return (self.attn_term, self.mlp_term)

    # ------------------------------------------------------------------ certificates
    def substep_lipschitz(self, h: float) -> dict:
        """Bounds of the Euler substeps x ← x + h·A(x) and x ← x + h·M(x)."""
        return {"attn": convex_step_lipschitz(h, self.attn.lipschitz_bound()),
                "mlp": gradient_step_lipschitz(h, self.mlp.sigma(), self.mlp.expansive)}

    def euler_lipschitz(self, h: float) -> float:
        """Bound of x ← x + h·(A(x) + M(x)) = [(1 − h)x ∓ hWᵀσ(Wx + b)] + h·Â(x): the bracket's
        symmetric Jacobian (1 − h)I ∓ hWᵀDW has eigenvalues within [1 − h − hσ², 1 − h + hσ²]."""
        s2 = self.mlp.sigma() ** 2
        lo, hi = (1 - h - h * s2, 1 - h) if not self.mlp.expansive else (1 - h, 1 - h + h * s2)
        return max(abs(lo), abs(hi)) + h * self.attn.lipschitz_bound()
