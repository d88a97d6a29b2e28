"""The Energy Transformer (Hoover et al. 2023, "Energy Transformer", NeurIPS): a block whose
update is gradient descent on one scalar energy of all token states.

    G = EnergyLN(X)                                     g_B = ∂L/∂x_B, L convex (a Lagrangian)
    E(G) = E_att(G) + E_hop(G)
    E_att = −(1/β) Σ_h Σ_C log Σ_{B≠C} exp(β K_hB·Q_hC),  Q_hC = W^Q_h g_C, K_hB = W^K_h g_B
    E_hop = −½ Σ_B Σ_μ ReLU(ξ_μ·g_B)²                   (or the log-sum-exp memory, hopfield.py)
    dX/dt = −∂E/∂G                                      discretised: X ← X − α·∂E/∂G

Lyapunov property: dE/dt = (∂E/∂G)ᵀ (∂G/∂X) Ẋ = −(∂E/∂G)ᵀ ∇²L(X) (∂E/∂G) ≤ 0 because the
Hessian of the convex Lagrangian is positive semi-definite; E is bounded below (|g| is bounded by
√D·γ + |δ|, so both terms are). The Euler step X ← X − α∂E/∂G keeps this for small enough α.

Causal variant (NRGPT, Dehmamy, Hoover, …, Krotov; Causal Energy Minimisation, Xu et al. 2026):
token C descends its own conditional energy with its context held fixed,

    E_C(x_C; x_{<C}) = −(1/β) Σ_h log Σ_{B≤C} exp(β K_hB·Q_hC) + E_hop(g_C),

where Q_hC and the self key K_hC are functions of x_C and the keys K_hB (B<C) are constants.
The field of token C is −∂E_C/∂g_C; it depends only on tokens ≤ C (causal), and one step
decreases E_C at fixed context for small α. There is NO global energy: Σ_C E_C is not decreased
by the joint step (token B's step moves the keys token C sees), see README section `energy`.
The self term (B = C) is included so that the first token has a well-defined attention energy.

Gradients are written by hand (the flow runs them as ordinary tensor code, so training
backpropagates once, not through a double backward); `analytic=False` uses
`torch.autograd.grad(E, G, create_graph=...)` instead. tests/test_energy.py checks both agree in
float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hopfield import HopfieldMLP


class EnergyLayerNorm(nn.Module):
    """g = γ (x − mean x)/√(var x + ε) + δ, the gradient of the convex Lagrangian

        L(x) = D·γ·√(var(x) + ε) + Σ_i δ_i x_i     (var with 1/D, γ > 0 a scalar)

    γ is kept positive (softplus) so that L is convex; a per-dimension γ would not be a gradient.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.raw_gamma = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))  # softplus → 1
        self.delta = nn.Parameter(torch.zeros(dim)) if bias else None

    @property
    def gamma(self) -> torch.Tensor:
        return F.softplus(self.raw_gamma)

    def lagrangian(self, x: torch.Tensor) -> torch.Tensor:
        """L(x) per token, shape x.shape[:-1]."""
        var = x.var(dim=-1, unbiased=False)
        out = self.dim * self.gamma * torch.sqrt(var + self.eps)
        return out if self.delta is None else out + x @ self.delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(dim=-1, keepdim=True)
        g = self.gamma * xc / torch.sqrt(xc.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return g if self.delta is None else g + self.delta


class EnergyAttention(nn.Module):
    """Attention energy with query and key maps only (no values, no output projection).

    `causal=False`: the exact energy E_att above (every token couples to every other).
    `causal=True`: the sum of conditional energies Σ_C E_C with the context keys held fixed.
    """

    def __init__(self, dim: int, n_head: int, head_dim: int, beta: float | None = None,
                 causal: bool = False, init_std: float = 0.002):
        super().__init__()
        self.n_head, self.head_dim, self.causal = n_head, head_dim, causal
        self.beta = float(beta) if beta else 1.0 / math.sqrt(head_dim)
        self.wq = nn.Parameter(torch.randn(n_head, head_dim, dim) * init_std)
        self.wk = nn.Parameter(torch.randn(n_head, head_dim, dim) * init_std)

    def _qk(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btd,hyd->bhty", g, w)

    def _scores(self, q, k_ctx, k_self):
        """β·scores (B, H, T, P+T) with disallowed pairs at −inf. k_ctx holds P cached keys
        followed by the T keys of the current chunk; the diagonal uses k_self."""
        T, S = q.shape[2], k_ctx.shape[2]
        P = S - T
        s = self.beta * q @ k_ctx.transpose(-1, -2)
        eye = torch.zeros(T, S, dtype=torch.bool, device=q.device)
        eye[torch.arange(T), P + torch.arange(T)] = True
        if self.causal:
            s = torch.where(eye, self.beta * (q * k_self).sum(-1, keepdim=True), s)
            allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(P)
            return s.masked_fill(~allowed, float("-inf"))
        return s.masked_fill(eye, float("-inf"))

    def _keys(self, context: torch.Tensor, cache) -> torch.Tensor:
        k = self._qk(context, self.wk)
        if cache is not None:
            if not self.causal:
                raise ValueError("the bidirectional energy attention cannot use a KV cache")
            k, _ = cache.extend(k.detach(), k.new_empty(*k.shape[:3], 0))
        return k

    def token_energies(self, g: torch.Tensor, context: torch.Tensor | None = None,
                       cache=None) -> torch.Tensor:
        """Per-query-token energies (B, T), summed over heads. `context` (default g) gives the
        keys of the other tokens; queries and (causal) the self key come from g."""
        if not self.causal and g.shape[1] == 1:
            return g.new_zeros(g.shape[:2])
        q, k_self = self._qk(g, self.wq), self._qk(g, self.wk)
        k = self._keys(g if context is None else context, cache)
        lse = torch.logsumexp(self._scores(q, k, k_self), dim=-1)
        return -lse.sum(1) / self.beta

    def energy(self, g: torch.Tensor) -> torch.Tensor:
        return self.token_energies(g).sum()

    def grad(self, g: torch.Tensor, cache=None) -> torch.Tensor:
        """Hand-written ∂E/∂g: (bidirectional) of the exact energy; (causal) of each token's own
        conditional energy E_C wrt g_C, context fixed. Equal to autograd (tests)."""
        if not self.causal and g.shape[1] == 1:
            return torch.zeros_like(g)
        q, k_self = self._qk(g, self.wq), self._qk(g, self.wk)
        k = self._keys(g, cache)
        p = torch.softmax(self._scores(q, k, k_self), dim=-1)  # (B, H, T, P+T)
        d_q = -(p @ k)
        if self.causal:
            T = g.shape[1]
            p_self = p[..., k.shape[2] - T:].diagonal(dim1=-2, dim2=-1)  # (B, H, T)
            d_k = -p_self.unsqueeze(-1) * q
        else:
            d_k = -(p.transpose(-1, -2) @ q)
        return (torch.einsum("bhty,hyd->btd", d_q, self.wq)
                + torch.einsum("bhty,hyd->btd", d_k, self.wk))

    def autograd_grad(self, g: torch.Tensor, cache=None) -> torch.Tensor:
        """The same gradient by `torch.autograd.grad` (the causal context enters as a separate
        copy of g, so only each token's own query/self-key path is differentiated)."""
        create = torch.is_grad_enabled() and g.requires_grad
        with torch.enable_grad():
            own = g.clone() if g.requires_grad else g.detach().requires_grad_()
            ctx_g = g.clone() if self.causal else own
            e = self.token_energies(own, ctx_g, cache).sum()
            (d,) = torch.autograd.grad(e, own, create_graph=create)
        return d


class EnergyTransformer(nn.Module):
    """One shared block: E(X) = E_att(LN(X)) + E_hop(LN(X)); the vector field is −∂E/∂G.

    As a field it has two terms (`attn`, `hopfield`), −∂E_att/∂G and −∂E_hop/∂G, so the explicit
    Euler integrator with step α is exactly the Energy Transformer update X ← X − α·∂E/∂G."""

    term_names = ("attn", "hopfield")

    def __init__(self, dim: int, n_head: int, head_dim: int | None = None,
                 n_memories: int | None = None, beta: float | None = None,
                 hopfield: str = "relu", hopfield_beta: float = 1.0, causal: bool = False,
                 bias: bool = True, eps: float = 1e-5, attn_init_std: float = 0.002,
                 mem_init_std: float = 0.02, analytic: bool = True):
        super().__init__()
        head_dim = head_dim or dim // n_head
        self.causal, self.analytic = causal, analytic
        self.norm = EnergyLayerNorm(dim, eps, bias)
        self.attn = EnergyAttention(dim, n_head, head_dim, beta, causal, attn_init_std)
        self.hopfield = HopfieldMLP(dim, n_memories or 4 * dim, hopfield, hopfield_beta,
                                    mem_init_std)

    # ------------------------------------------------------------------ energies
    def token_energies(self, x: torch.Tensor, context: torch.Tensor | None = None) -> dict:
        """Per-token energies {attn, hopfield, total}, each (B, T). For the causal block these
        are the conditional energies E_C(x_C; context_{<C}) (context defaults to x)."""
        g = self.norm(x)
        gc = None if context is None else self.norm(context)
        e_att = self.attn.token_energies(g, gc)
        e_hop = self.hopfield.token_energies(g)
        return {"attn": e_att, "hopfield": e_hop, "total": e_att + e_hop}

    def energies(self, x: torch.Tensor) -> dict:
        """Per-sequence breakdown {attn, hopfield, total}, each (B,)."""
        return {k: v.sum(-1) for k, v in self.token_energies(x).items()}

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """The scalar energy E(X) (summed over the batch)."""
        return self.token_energies(x)["total"].sum()

    @torch.no_grad()
    def lower_bound(self, n_tokens: int) -> float:
        """A bound E(X) ≥ lower_bound for every X of n_tokens tokens (per sequence).

        ‖g‖ ≤ r = γ√D + ‖δ‖ (the normalised part has norm √(D·var/(var+ε)) < √D), so
        |K_hB·Q_hC| ≤ ‖W^K_h‖₂‖W^Q_h‖₂ r², a log-sum-exp over ≤ N terms is ≤ max + log N, and
        ReLU(ξ_μ·g)² ≤ ‖ξ_μ‖² r²; for the softmax memory −(1/β)lse ≥ −max‖ξ_μ‖r − log M/β."""
        n = self.norm
        r = float(n.gamma) * n.dim ** 0.5 + (float(n.delta.norm()) if n.delta is not None else 0)
        a = self.attn
        sq = torch.linalg.matrix_norm(a.wq, ord=2) * torch.linalg.matrix_norm(a.wk, ord=2)
        e_att = -n_tokens * float((sq * r * r).sum() + a.n_head * math.log(n_tokens) / a.beta)
        xi = self.hopfield.xi
        if self.hopfield.kind == "relu":
            e_hop = -0.5 * n_tokens * float(xi.pow(2).sum()) * r * r
        else:
            b = self.hopfield.beta
            e_hop = -n_tokens * (float(xi.norm(dim=-1).max()) * r + math.log(len(xi)) / b)
        return e_att + e_hop

    # ------------------------------------------------------------------ the field
    def attn_term(self, x, t=None, ctx=None):
        g = self.norm(x)
        cache = ctx.cache if ctx is not None else None
        return -(self.attn.grad(g, cache) if self.analytic else self.attn.autograd_grad(g, cache))

    def hopfield_term(self, x, t=None, ctx=None):
        g = self.norm(x)
        if self.analytic:
            return -self.hopfield.grad(g)
        create = torch.is_grad_enabled() and g.requires_grad
        with torch.enable_grad():
            gg = g if g.requires_grad else g.detach().requires_grad_()
            (d,) = torch.autograd.grad(self.hopfield.energy(gg), gg, create_graph=create)
        return -d

    def terms(self):
        return (self.attn_term, self.hopfield_term)

    def forward(self, x, t=None, ctx=None):
        return self.attn_term(x, t, ctx) + self.hopfield_term(x, t, ctx)


def descend(block: EnergyTransformer, x: torch.Tensor, n_steps: int, alpha: float,
            record: bool = True):
    """Plain gradient descent X ← X − α ∂E/∂G for `n_steps` steps (the bidirectional Energy
    Transformer as an encoder). Returns (X, energies) with energies[k] = E(X_k), k = 0..n_steps
    (floats; empty if `record` is False)."""
    energies = []
    for _ in range(n_steps):
        if record:
            energies.append(float(block.energy(x)))
        x = x + alpha * block(x)
    if record:
        energies.append(float(block.energy(x)))
    return x, energies
