"""Adaptive continuous-depth solves through torchdiffeq (Chen et al., "Neural Ordinary
Differential Equations", NeurIPS 2018; github.com/rtqichen/torchdiffeq).

For tied weights (autonomous F) or weights smooth in t (`fields.galerkin`), the flow is a true
ODE on [0, T] and can be solved by an error-controlled embedded Runge–Kutta method such as
dopri5 (Dormand & Prince 1980) to tolerances rtol/atol, with backprop through the solver's
operations (`odeint`) or by the adjoint method (`odeint_adjoint`, O(1) memory, one more solve).
The number of function evaluations (NFE) of the last solve is kept in `solver.nfe`.

For (X, V) integrators the same second-order / damped system they discretise is solved
(see `integrators.symplectic`), so a fixed-step and an adaptive model share one ODE.

KV cache: an adaptive solve evaluates F at data-dependent times, so keys/values computed for the
prefix at one set of times do not match the times used for a new token; an exact cache does not
exist. `supports_cache = False` makes `FlowLM.generate` recompute the context every token, and a
forward with a cache raises.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import BoundField


class _ODEFunc(nn.Module):
    """dz/dt for torchdiffeq, counting evaluations of F."""

    def __init__(self, module, dynamics: str = "first_order", epsilon: float = 1.0):
        super().__init__()
        self.module, self.dynamics, self.epsilon = module, dynamics, epsilon
        self.nfe = 0

    def forward(self, t, z):
        self.nfe += 1
        field = BoundField(self.module)
        if self.dynamics == "first_order":
            return field(z, t)
        x, v = z
        f = field(x, t)
        return (v, f) if self.dynamics == "second_order" else (v, (f - v) / self.epsilon)


class AdaptiveSolver:
    """Plugged into `FlowLM.solver`: integrates the model's single field over [0, T]."""

    supports_cache = False

    def __init__(self, method: str = "dopri5", rtol: float = 1e-3, atol: float = 1e-4,
                 adjoint: bool = False):
        self.method, self.rtol, self.atol, self.adjoint = method, rtol, atol, adjoint
        self.nfe = 0

    def __call__(self, model, x, ctx):
        if ctx is not None and ctx.cache is not None:
            raise ValueError("adaptive solves have no exact KV cache; generate without a cache")
        if len(model.fields) != 1:
            raise ValueError("adaptive solves need tied or smooth weights (one field module)")
        T = float(sum(float(h) for h in model.step_sizes()))
        return self.solve(model.fields[0], model.integrator, x, T)

    def solve(self, module, integrator, x, T: float):
        from torchdiffeq import odeint, odeint_adjoint

        dyn = getattr(integrator, "dynamics", "first_order")
        func = _ODEFunc(module, dyn, getattr(integrator, "epsilon", 1.0))
        z0 = x if dyn == "first_order" else (x, torch.zeros_like(x))
        ts = torch.tensor([0.0, T], dtype=x.dtype, device=x.device)
        kw = dict(method=self.method, rtol=self.rtol, atol=self.atol)
        if self.adjoint:
            zs = odeint_adjoint(func, z0, ts, adjoint_params=tuple(module.parameters()), **kw)
        else:
            zs = odeint(func, z0, ts, **kw)
        self.nfe = func.nfe
        return zs[-1] if dyn == "first_order" else zs[0][-1]
