"""Weights that are smooth functions of layer-time (Galerkin-style, continuous depth).

Each weight matrix of the transformer field is a combination of K basis functions of the
normalised time s = t / T ∈ [0, 1]:

    W(t) = Σ_{i<K} C_i φ_i(s)

as in torchdyn's Galerkin layers (Massaroli, Poli, Park, Yamashita & Asama, "Dissecting Neural
ODEs", NeurIPS 2020) and the time-dependent weights of Neural ODE Transformers (Tong et al.,
2025). Bases: shifted Legendre polynomials P_i(2s − 1) (φ₀ = 1), or Fourier
(1, cos 2πs, sin 2πs, cos 4πs, …). C₀ is initialised like an ordinary layer and C_{i>0} = 0, so
training starts from the tied (autonomous) field. Biases and norm gains are constant in t.

Because F is defined for every t, a model trained with L steps can be integrated with any other
number of steps (or an adaptive solver) on the same interval [0, T].
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .transformer import TransformerField


def time_basis(kind: str, size: int, s) -> torch.Tensor:
    """(size,) values φ_i(s) of the basis on s ∈ [0, 1] (s a float or a 0-d tensor)."""
    s = torch.as_tensor(s, dtype=torch.float64 if not torch.is_tensor(s) else s.dtype)
    if kind == "legendre":
        x = 2 * s - 1
        vals = [torch.ones_like(x), x]
        for n in range(1, size - 1):  # (n+1) P_{n+1} = (2n+1) x P_n − n P_{n−1}
            vals.append(((2 * n + 1) * x * vals[n] - n * vals[n - 1]) / (n + 1))
        return torch.stack(vals[:size])
    if kind == "fourier":
        vals = [torch.ones_like(s)]
        for i in range(1, size):
            k = (i + 1) // 2
            vals.append(torch.cos(2 * math.pi * k * s) if i % 2 else torch.sin(2 * math.pi * k * s))
        return torch.stack(vals)
    raise ValueError(f"unknown time basis {kind!r}; choose legendre or fourier")


class GalerkinLinear(nn.Module):
    """y = x W(t)ᵀ + b with W(t) = Σ_i C_i φ_i(t); `phi` is set by the owning field."""

    def __init__(self, linear: nn.Linear, size: int):
        super().__init__()
        out_f, in_f = linear.weight.shape
        coeff = torch.zeros(size, out_f, in_f, dtype=linear.weight.dtype)
        coeff[0] = linear.weight.detach()
        self.coeff = nn.Parameter(coeff)
        self.bias = linear.bias
        self.phi: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        phi = self.phi.to(self.coeff.dtype)
        return torch.einsum("k,koi->oi", phi, self.coeff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SmoothTransformerField(TransformerField):
    """F(X, t) = A_t(X) + M_t(X), every weight matrix smooth in t on a K-function basis."""

    def __init__(self, *args, basis: str = "legendre", basis_size: int = 4,
                 total_time: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.basis, self.basis_size, self.total_time = basis, basis_size, float(total_time)
        time_basis(basis, basis_size, 0.0)  # validate early

    def galerkinize(self) -> "SmoothTransformerField":
        """Replace the four projections by Galerkin layers (call after `init_weights`)."""
        self.attn.c_attn = GalerkinLinear(self.attn.c_attn, self.basis_size)
        self.attn.c_proj = GalerkinLinear(self.attn.c_proj, self.basis_size)
        self.mlp.c_fc = GalerkinLinear(self.mlp.c_fc, self.basis_size)
        self.mlp.c_proj = GalerkinLinear(self.mlp.c_proj, self.basis_size)
        return self

    def set_time(self, t) -> None:
        s = t / self.total_time
        phi = time_basis(self.basis, self.basis_size, s)
        for m in (self.attn.c_attn, self.attn.c_proj, self.mlp.c_fc, self.mlp.c_proj):
            m.phi = phi

    def attn_term(self, x, t=None, ctx=None):
        self.set_time(0.0 if t is None else t)
        return super().attn_term(x, t, ctx)

    def mlp_term(self, x, t=None, ctx=None):
        self.set_time(0.0 if t is None else t)
        return super().mlp_term(x, t, ctx)
