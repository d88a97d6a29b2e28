"""Spectral norms, step-size bounds and Lipschitz certificates for the flow map.

Spectral norm by power iteration (Miyato et al. 2018): persistent vectors u, v per matrix W,
one iteration per training forward, σ̂ = uᵀWv (differentiable in W, with u, v held fixed). σ̂
approaches ‖W‖₂ from below, so the constraints use a safety factor ρ < 1 and the certificates
are computed from exact singular values (`torch.linalg.matrix_norm(W, 2)`), never from σ̂.

Step-size bounds (Sherry, Celledoni, Ehrhardt, Murari, Owren, Schönlieb, "Designing stable neural
networks using convex analysis and ODEs", 2024): the gradient step of the convex potential
φ(x) = 1ᵀΣ(Wx + b) (Σ' = σ monotone, 1-Lipschitz)

    x ← x − h·Wᵀσ(Wx + b)

has the symmetric Jacobian I − h·WᵀDW with D = diag(σ') ∈ [0, 1], whose eigenvalues lie in
[1 − h‖W‖₂², 1]; so its Lipschitz constant is max(1, h‖W‖₂² − 1) ≤ 1 exactly when h‖W‖₂² ≤ 2.
The expansive step x ← x + h·Wᵀσ(Wx + b) has Lipschitz constant ≤ 1 + h‖W‖₂².
A convex-combination step x ← (1 − h)x + h·g(x) has Lipschitz constant ≤ |1 − h| + h·Lip(g).
Compositions multiply: Lip(Φ_L ∘ … ∘ Φ_1) ≤ Π_k Lip(Φ_k).

L2 self-attention (Kim, Papamakarios & Mnih, "The Lipschitz constant of self-attention", ICML
2021, Thm 3.2): with tied query/key maps the map Y ↦ softmax(−‖y_i − y_j‖²/s)·Y on N tokens has
ℓ₂-Lipschitz constant ≤ C_N = √N·(4·W₀((N − 1)/e) + 1) for every scale s (W₀: Lambert W), which
is the theorem's bound at identity weights; the weights then enter by the chain rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

#: safety factor: constraints aim at ρ·bound so the power-iteration error (σ̂ ≤ σ) cannot break
#: the certified bound (the certificate itself uses exact singular values).
SAFETY = 0.98


class PowerIteration(nn.Module):
    """Persistent power-iteration vectors for a (batch of) matrix W of shape (*batch, m, n).

    `forward(W)` returns σ̂ = uᵀWv (shape `batch`), differentiable in W. In training mode it first
    runs `n_iter` iterations (u ← Wv/‖Wv‖, v ← Wᵀu/‖Wᵀu‖), so the estimate is maintained every
    training step; in eval mode the stored vectors are used, so eval is deterministic."""

    def __init__(self, shape: tuple[int, ...], n_iter: int = 1, init_iter: int = 30,
                 seed: int = 0):
        super().__init__()
        *batch, m, n = shape
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("u", F.normalize(torch.randn(*batch, m, generator=g), dim=-1))
        self.register_buffer("v", F.normalize(torch.randn(*batch, n, generator=g), dim=-1))
        self.n_iter, self.init_iter = n_iter, init_iter
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def iterate(self, W: torch.Tensor, n: int) -> None:
        u, v = self.u, self.v
        for _ in range(n):
            v = F.normalize((W.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1), dim=-1, eps=1e-12)
            u = F.normalize((W @ v.unsqueeze(-1)).squeeze(-1), dim=-1, eps=1e-12)
        self.u.copy_(u)
        self.v.copy_(v)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if not bool(self.started):
            self.iterate(W.detach(), self.init_iter)
            self.started.fill_(True)
        elif self.training:
            self.iterate(W.detach(), self.n_iter)
        u, v = self.u.clone(), self.v.clone()
        return (u.unsqueeze(-2) @ W @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def spectral_norm(W: torch.Tensor) -> torch.Tensor:
    """Exact ‖W‖₂ (largest singular value) of a matrix or a batch of matrices."""
    return torch.linalg.matrix_norm(W.detach().double(), ord=2)


def clip_scale(sigma: torch.Tensor, radius: float) -> torch.Tensor:
    """Factor min(1, radius/σ): W·factor has spectral norm ≤ radius (for σ ≥ ‖W‖₂)."""
    return torch.clamp(radius / sigma.clamp_min(1e-12), max=1.0)


def max_step_size(sigma: float) -> float:
    """Largest h with h·σ² ≤ 2 (non-expansive gradient step)."""
    return 2.0 / max(sigma, 1e-12) ** 2


def gradient_step_lipschitz(h: float, sigma: float, expansive: bool = False) -> float:
    """Lipschitz constant bound of x ↦ x ∓ h·Wᵀσ(Wx + b) with ‖W‖₂ = σ."""
    return 1.0 + h * sigma ** 2 if expansive else max(1.0, h * sigma ** 2 - 1.0)


def convex_step_lipschitz(h: float, lip: float) -> float:
    """Lipschitz constant bound of x ↦ (1 − h)·x + h·g(x) with Lip(g) = lip."""
    return abs(1.0 - h) + h * lip


def l2_attention_constant(n_tokens: int) -> float:
    """C_N = √N·(4·W₀((N − 1)/e) + 1), Kim et al. (2021) Thm 3.2 at identity weights."""
    from scipy.special import lambertw

    w = float(lambertw((n_tokens - 1) / math.e).real) if n_tokens > 1 else 0.0
    return math.sqrt(n_tokens) * (4.0 * w + 1.0)


@dataclass
class Certificate:
    """An upper bound of the flow map's ℓ₂ Lipschitz constant (per sequence, Frobenius norm over
    tokens × width): `per_step[k]` bounds step k, `flow` = Π_k per_step[k] bounds X_0 ↦ X_L.
    `components[k]` names the factors of step k."""

    per_step: list[float]
    flow: float
    integrator: str
    components: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        lo, hi = min(self.per_step), max(self.per_step)
        return (f"flow Lipschitz <= {self.flow:.6g} ({len(self.per_step)} steps, "
                f"per step {lo:.6g}..{hi:.6g}, {self.integrator})")


#: integrators whose step is a composition of Euler substeps on the field's terms (lie_trotter) or
#: one Euler step on their sum (euler); other schemes have no certificate here.
CERTIFIABLE = ("lie_trotter", "euler")


def flow_certificate(model) -> Certificate | None:
    """Certificate of `model`'s flow (X_0 ↦ X_L), or None when its components have no bound:
    dot-product attention is not globally Lipschitz (Kim et al. 2021, Thm 3.1) and neither is
    LayerNorm near 0, so only fields that expose `substep_lipschitz(h)` are certified."""
    name = getattr(model.integrator, "name", "")
    if name not in CERTIFIABLE:
        return None
    per_step, comps = [], []
    for k, h in enumerate(model.step_sizes()):
        f = model.field_module(k)
        if not hasattr(f, "substep_lipschitz"):
            return None
        h = float(h)
        parts = f.substep_lipschitz(h) if name == "lie_trotter" else {"euler": f.euler_lipschitz(h)}
        per_step.append(math.prod(parts.values()))
        comps.append(parts)
    return Certificate(per_step, math.prod(per_step), name, comps)


def why_no_certificate(model) -> str:
    name = getattr(model.integrator, "name", type(model.integrator).__name__)
    if name not in CERTIFIABLE:
        return f"integrator {name} has no certificate (only {', '.join(CERTIFIABLE)})"
    return ("dot-product attention and LayerNorm are not globally Lipschitz "
            "(use --vector-field nonexpansive)")
