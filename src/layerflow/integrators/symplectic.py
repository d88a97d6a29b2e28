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
