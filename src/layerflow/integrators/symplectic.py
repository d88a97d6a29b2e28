"""Second-order (momentum) dynamics on the extended state (X, V).

These schemes discretise  X' = V,  V' = F(X, t)  (`dynamics = "second_order"`; X(0) = embedding,
V(0) = 0), or for the momentum step the damped system  X' = V,  ε V' = F(X, t) − V
(`dynamics = "damped"`). The model reads out X; hooks see `flow.step.{k}.velocity`.

- `symplectic_euler`: V ← V + h F(X, t);  X ← X + h V.  Order 1, symplectic.
- `leapfrog` (velocity Verlet, kick–drift–kick): V ← V + h/2 F(X, t); X ← X + h V;
  V ← V + h/2 F(X, t+h).  Order 2, symplectic, time-reversible; 2 evaluations per step.
- `verlet` (position Verlet, drift–kick–drift): X ← X + h/2 V; V ← V + h F(X, t+h/2);
  X ← X + h/2 V.  Order 2, symplectic; 1 evaluation per step (same cost as a GPT block).
- `momentum` (Momentum ResNets, Sander, Ablin, Blondel & Peyré, ICML 2021):
  V ← γ_h V + (1 − γ_h) F(X, t);  X ← X + h V,  γ_h = γ^h. With h = 1 this is exactly the
  momentum residual block; as h → 0 it is a first-order discretisation of the damped system
  with ε = −1/ln γ.

All four are exactly invertible in exact arithmetic (`inverse_step`), which is what
`integrators.reversible` uses to recompute states during backward instead of storing them.
"""

from __future__ import annotations

import math

import torch

from .base import Integrator, register


class SecondOrderIntegrator(Integrator):
    """State (X, V) with V(0) = 0; output X."""

    dynamics = "second_order"
    invertible = True

    def init_state(self, x):
        return (x, torch.zeros_like(x))

    def output(self, state):
        return state[0]

    def inverse_step(self, field, t, h, state):
        """The state before `step(field, t, h, ·)` produced `state`."""
        raise NotImplementedError


def _vjp(f, point, params, g):
    """(Jₓᵀg, [J_θᵀg]) of the evaluation f = F(point) (point a leaf)."""
    grads = torch.autograd.grad(f, (point, *params), g, allow_unused=True)
    return grads[0], grads[1:]


def _add(acc, grads):
    for i, g in enumerate(grads):
        if g is not None:
            acc[i] = acc[i] + g
    return acc


@register
class SymplecticEuler(SecondOrderIntegrator):
    name, order = "symplectic_euler", 1

    def step(self, field, t, h, state):
        x, v = state
        v = v + h * field(x, t)
        return (x + h * v, v)

    def inverse_step(self, field, t, h, state):
        x, v = state
        x = x - h * v
        return (x, v - h * field(x, t))


@register
class Leapfrog(SecondOrderIntegrator):
    name, order = "leapfrog", 2

    def step(self, field, t, h, state):
        x, v = state
        v = v + (h / 2) * field(x, t)
        x = x + h * v
        return (x, v + (h / 2) * field(x, t + h))

    def inverse_step(self, field, t, h, state):
        x, v = state
        v = v - (h / 2) * field(x, t + h)
        x = x - h * v
        return (x, v - (h / 2) * field(x, t))

    def reverse_step(self, field, t, h, state, grad, params, g_params):
        """Reconstruct the previous state and pull the gradient back through one step, reusing
        each field evaluation for both (2 evaluations, as in the forward step).

        forward: v½ = v + h/2·f₀, f₀ = F(x, t);  x' = x + h·v½;  v' = v½ + h/2·f₁, f₁ = F(x', t+h)
        """
        x1, v1 = state
        gx1, gv1 = grad
        with torch.enable_grad():
            x1l = x1.detach().requires_grad_()
            f1 = field(x1l, t + h)
            vh = v1 - (h / 2) * f1.detach()
            x = (x1 - h * vh).detach().requires_grad_()
            f0 = field(x, t)
            v = vh - (h / 2) * f0.detach()
            jx1, jp = _vjp(f1, x1l, params, (h / 2) * gv1)
            _add(g_params, jp)
            gx = gx1 + jx1
            gvh = gv1 + h * gx
            jx0, jp = _vjp(f0, x, params, (h / 2) * gvh)
            _add(g_params, jp)
        return (x.detach(), v.detach()), (gx + jx0, gvh)


@register
class PositionVerlet(SecondOrderIntegrator):
    name, order = "verlet", 2

    def step(self, field, t, h, state):
        x, v = state
        x = x + (h / 2) * v
        v = v + h * field(x, t + h / 2)
        return (x + (h / 2) * v, v)

    def inverse_step(self, field, t, h, state):
        x, v = state
        x = x - (h / 2) * v
        v = v - h * field(x, t + h / 2)
        return (x - (h / 2) * v, v)

    def reverse_step(self, field, t, h, state, grad, params, g_params):
        """Previous state and pulled-back gradient with ONE field evaluation (shared by the
        inverse and the vector–Jacobian product).

        forward: x½ = x + h/2·v;  v' = v + h·F(x½, t+h/2);  x' = x½ + h/2·v'"""
        x1, v1 = state
        gx1, gv1 = grad
        with torch.enable_grad():
            xh = (x1 - (h / 2) * v1).detach().requires_grad_()
            f = field(xh, t + h / 2)
            v = v1 - h * f.detach()
            gv1t = gv1 + (h / 2) * gx1
            jx, jp = _vjp(f, xh, params, h * gv1t)
            _add(g_params, jp)
        gxh = gx1 + jx
        return ((xh.detach() - (h / 2) * v).detach(), v.detach()), (gxh, gv1t + (h / 2) * gxh)


@register
class Momentum(SecondOrderIntegrator):
    name, order = "momentum", 1
    dynamics = "damped"

    def __init__(self, gamma: float = 0.9):
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"momentum gamma must be in (0, 1), got {gamma!r}")
        self.gamma = float(gamma)

    @classmethod
    def from_config(cls, flow_cfg):
        return cls(getattr(flow_cfg, "momentum", 0.9))

    @property
    def epsilon(self) -> float:
        """Time constant ε = −1/ln γ of the damped system this scheme discretises."""
        return -1.0 / math.log(self.gamma)

    def _gamma_h(self, h):
        return self.gamma ** h

    def step(self, field, t, h, state):
        x, v = state
        g = self._gamma_h(h)
        v = g * v + (1 - g) * field(x, t)
        return (x + h * v, v)

    def inverse_step(self, field, t, h, state):
        x, v = state
        g = self._gamma_h(h)
        x = x - h * v
        return (x, (v - (1 - g) * field(x, t)) / g)

    def __repr__(self):
        return f"Momentum(gamma={self.gamma})"
