"""Test problems with exact solutions, and helpers to measure empirical convergence orders.

ODE discretised by each integrator (its `dynamics` attribute):
- "first_order":  X' = F(X, t)
- "second_order": X' = V, V' = F(X, t), V(0) = 0           (symplectic Euler, leapfrog, verlet)
- "damped":       X' = V, ε V' = F(X, t) − V, V(0) = 0      (momentum, ε = −1/ln γ)
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from layerflow.integrators import integrate


class TermsField:
    """A field given by plain functions term(x, t); F = Σ terms (what integrators see)."""

    def __init__(self, *terms, module=None):
        self.terms, self.module = terms, module

    def __call__(self, x, t):
        out = None
        for term in self.terms:
            out = term(x, t) if out is None else out + term(x, t)
        return out


def linear_problem(n: int = 4, seed: int = 0):
    """F(x) = A₁x + A₂x with non-commuting random A₁, A₂ (‖A‖ ≈ 1): (A1, A2) as float64 arrays."""
    rng = np.random.default_rng(seed)
    a1 = rng.normal(size=(n, n)) / np.sqrt(n)
    a2 = rng.normal(size=(n, n)) / np.sqrt(n) - 0.3 * np.eye(n)
    return a1, a2


def linear_field(a1, a2):
    m1, m2 = torch.tensor(a1), torch.tensor(a2)
    return TermsField(lambda x, t: x @ m1.T, lambda x, t: x @ m2.T)


def dynamics_of(integrator) -> str:
    return getattr(integrator, "dynamics", "first_order")


def exact_linear(integrator, a, x0: np.ndarray, T: float) -> np.ndarray:
    """X(T) of the ODE the integrator discretises, for F(x) = A x, via the matrix exponential."""
    n = a.shape[0]
    dyn = dynamics_of(integrator)
    if dyn == "first_order":
        return scipy.linalg.expm(T * a) @ x0
    eye, zero = np.eye(n), np.zeros((n, n))
    if dyn == "second_order":
        big = np.block([[zero, eye], [a, zero]])
    else:
        eps = integrator.epsilon
        big = np.block([[zero, eye], [a / eps, -eye / eps]])
    return (scipy.linalg.expm(T * big) @ np.concatenate([x0, np.zeros(n)]))[:n]


def run(integrator, field, x0: torch.Tensor, T: float, n: int) -> torch.Tensor:
    return integrate(integrator, lambda k: field, [T / n] * n, x0)


def slope(ns, errs) -> float:
    """Least-squares slope of log(err) against log(h) (h ∝ 1/n)."""
    return float(np.polyfit(-np.log(np.asarray(ns, float)), np.log(np.asarray(errs)), 1)[0])


class AugmentedField:
    """The first-order system of an (X, V) scheme as one field on z = [X, V] (last dim)."""

    def __init__(self, field, dynamics: str, epsilon: float = 1.0):
        self.field, self.dynamics, self.epsilon = field, dynamics, epsilon
        self.terms = (self,)

    def __call__(self, z, t):
        x, v = z.chunk(2, dim=-1)
        f = self.field(x, t)
        dv = f if self.dynamics == "second_order" else (f - v) / self.epsilon
        return torch.cat([v, dv], dim=-1)


def reference_solution(integrator, field, x0, T: float, n: int = 1024) -> torch.Tensor:
    """Fine classical RK4 solution of the ODE that `integrator` discretises."""
    from layerflow.integrators import RungeKutta4

    dyn = dynamics_of(integrator)
    if dyn == "first_order":
        return run(RungeKutta4(), field, x0, T, n)
    aug = AugmentedField(field, dyn, getattr(integrator, "epsilon", 1.0))
    z = run(RungeKutta4(), aug, torch.cat([x0, torch.zeros_like(x0)], -1), T, n)
    return z.chunk(2, dim=-1)[0]


def frozen_transformer_field(n_embd: int = 16, n_head: int = 2, seed: int = 0, std: float = 0.2):
    """A random attention+MLP field (float64, eval mode) and a token state x₀ (1, 6, n_embd)."""
    from layerflow import TransformerField

    torch.manual_seed(seed)
    f = TransformerField(n_embd, n_head).double().eval()
    for p in f.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, 0.0, std)
    for p in f.parameters():
        p.requires_grad_(False)
    x0 = torch.randn(1, 6, n_embd, dtype=torch.float64)
    return f, x0


def harmonic_energy(x, v):
    return 0.5 * (x ** 2 + v ** 2)

