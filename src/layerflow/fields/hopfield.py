"""Hopfield memories as energies on normalised token states g (one term of the Energy Transformer).

Two energies over a memory matrix ξ ∈ R^{M×D} (rows ξ_μ), summed over tokens B:

    relu:     E = −½ Σ_B Σ_μ ReLU(ξ_μ·g_B)²                       (Hoover et al. 2023, eq. 6)
              −∂E/∂g_B = ξᵀ ReLU(ξ g_B)                           (a ReLU MLP with tied weights)
    softmax:  E = −(1/β) Σ_B log Σ_μ exp(β ξ_μ·g_B)               (modern Hopfield, Ramsauer et al.
              −∂E/∂g_B = ξᵀ softmax(β ξ g_B)                       2021, "Hopfield Networks is All
                                                                  You Need")

With the ½‖g‖² term of Ramsauer et al. the concave–convex update g ← ξᵀ softmax(β ξ g) is
`retrieve`: for well-separated stored patterns and large β it lands on the stored pattern nearest
the query in a single update, with an error exponentially small in β·separation (their Thm. 4).
The gradients are written by hand (cheap inside the flow) and tested against autograd in float64.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

HOPFIELD_KINDS = ("relu", "softmax")


class HopfieldMLP(nn.Module):
    """Energy of M memories ξ_μ ∈ R^D acting on each token independently (no token mixing)."""

    def __init__(self, dim: int, n_memories: int, kind: str = "relu", beta: float = 1.0,
                 init_std: float = 0.02):
        super().__init__()
        if kind not in HOPFIELD_KINDS:
            raise ValueError(f"unknown Hopfield kind {kind!r}; choose one of: relu, softmax")
        if beta <= 0:
            raise ValueError(f"Hopfield beta must be positive, got {beta}")
        self.kind, self.beta = kind, float(beta)
        self.xi = nn.Parameter(torch.randn(n_memories, dim) * init_std)

    def token_energies(self, g: torch.Tensor) -> torch.Tensor:
        """Per-token energies, shape g.shape[:-1]."""
        h = g @ self.xi.T
        if self.kind == "relu":
            return -0.5 * F.relu(h).pow(2).sum(-1)
        return -torch.logsumexp(self.beta * h, dim=-1) / self.beta

    def energy(self, g: torch.Tensor) -> torch.Tensor:
        return self.token_energies(g).sum()

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        """∂E/∂g, written by hand (equals autograd; see tests/test_energy.py)."""
        h = g @ self.xi.T
        act = F.relu(h) if self.kind == "relu" else torch.softmax(self.beta * h, dim=-1)
        return -act @ self.xi

    def retrieve(self, query: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """One modern-Hopfield update ξᵀ softmax(β ξ q) (Ramsauer et al. 2021, eq. 3)."""
        b = self.beta if beta is None else beta
        return torch.softmax(b * (query @ self.xi.T), dim=-1) @ self.xi
