"""Toy systems with known behaviour, written as ordinary layerflow fields and integrators.

* `SphereAttention`: the interacting-particle model of transformers of Geshkovski, Letrouit,
  Polyanskiy & Rigollet (2023) with Q = K = V = I:

      ẋ_i = P_{x_i}( Σ_j exp(β⟨x_i, x_j⟩) x_j / Z_i ),   Z_i = Σ_j exp(β⟨x_i, x_j⟩)

  (P_x = I − x xᵀ projects on the tangent space of the sphere). Tokens cluster: for d ≥ 3 and
  almost every start they converge to a single point.
* `RenormalisedEuler`: x ← (x + h F(x)) / ‖x + h F(x)‖ — Euler followed by the normalisation
  that keeps particles on the sphere (a layer norm without parameters).
* `PlainAttention`: one bidirectional softmax self-attention head
  SA(X) = softmax(XW_QW_KᵀXᵀ/√d)XW_V,
  the building block of the rank-collapse analysis of Dong, Cordonnier & Loukas (2021).
* `ReplaceStep`: X ← F(X) — a layer without a skip connection (not an ODE integrator).

The integrators here are deliberately not registered: they exist to test the analysis.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..integrators.base import Integrator


class SphereAttention(nn.Module):
    """F(X) = P_X(softmax(β X Xᵀ) X) on the unit sphere (Q = K = V = I), all tokens visible."""

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def forward(self, x, t=None, ctx=None):
        a = torch.softmax(self.beta * x @ x.transpose(-1, -2), dim=-1) @ x
        return a - (a * x).sum(-1, keepdim=True) * x

    def energy(self, x):
        """−E_β: the interaction energy E_β = (1/(2βn²)) Σ exp(β⟨x_i,x_j⟩) increases along the
        flow, so its negative is the descending 'energy' of this field."""
        n = x.shape[-2]
        return -torch.exp(self.beta * x @ x.transpose(-1, -2)).sum((-1, -2)) / (
            2 * self.beta * n * n)


class PlainAttention(nn.Module):
    """A single-head bidirectional self-attention with random weights of scale `gain`/√d."""

    def __init__(self, d: int, gain: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        self.d = d
        w = [torch.randn(d, d, generator=generator) * gain / math.sqrt(d) for _ in range(3)]
        self.wq, self.wk, self.wv = (nn.Parameter(m) for m in w)

    def forward(self, x, t=None, ctx=None):
        scores = (x @ self.wq) @ (x @ self.wk).transpose(-1, -2) / math.sqrt(self.d)
        return torch.softmax(scores, dim=-1) @ (x @ self.wv)


class RenormalisedEuler(Integrator):
    name, order = "renormalised_euler", 1

    def step(self, field, t, h, x):
        y = x + h * field(x, t)
        return y / y.norm(dim=-1, keepdim=True)


class ReplaceStep(Integrator):
    name, order = "replace", 0

    def step(self, field, t, h, x):
        return field(x, t)


def particle_flow(n_steps: int, h: float, d: int, field: nn.Module, integrator: Integrator):
    """A FlowLM carrying only a flow (the embedding is never used: start it with `flow_from`)."""
    from ..model import FlowLM

    return FlowLM(vocab_size=1, n_embd=d, block_size=1, fields=field, integrator=integrator,
                  step_size=h, pos_emb="none", n_steps=n_steps).eval()
