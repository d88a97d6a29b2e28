"""Depth as time: weights in time, step sizes, and the solver options of a FlowLM.

- Weights in time (`FlowConfig.weights`): `untied` — one field per step (F piecewise constant
  in t); `tied` — one field for all steps (an autonomous ODE); `smooth` — one
  `SmoothTransformerField` whose weights are Σ_i C_i φ_i(t/T) (fields/galerkin.py).
- Step sizes: fixed h, `T/L`, `c/L` (FlowConfig.step_size); `learn_step_size` makes every
  step size a positive parameter h_k = softplus(θ_k), θ_k initialised at softplus⁻¹(h).
- `set_steps(model, n)` re-discretises a tied/smooth model on the same interval [0, T]
  (h ← T/n), so a model trained with 8 steps can be run with 32.
- Solvers: `reversible` plugs integrators.reversible into `FlowLM.solver`; `adaptive`
  plugs integrators.adaptive (torchdiffeq).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ConfigError
from ..fields.galerkin import SmoothTransformerField
from ..fields.macaron import MacaronField
from ..fields.transformer import TransformerField


def make_fields(cfg) -> list[nn.Module]:
    """The field modules of a flow model: n_layer of them (untied) or one (tied/smooth)."""
    m, fl = cfg.model, cfg.flow
    args = (m.n_embd, m.n_head, m.mlp_ratio, m.bias, m.pos_emb == "rope", m.dropout, m.norm)
    n = m.n_layer if fl.weights == "untied" else 1
    if fl.weights == "smooth":
        if fl.macaron_weights:
            raise ConfigError("macaron_weights is not available with smooth weights")
        total = fl.resolve_step_size(m.n_layer) * m.n_layer
        f = SmoothTransformerField(*args, basis=fl.time_basis, basis_size=fl.basis_size,
                                   total_time=total)
        f.init_weights(m.n_layer)
        return [f.galerkinize()]
    cls = MacaronField if fl.macaron_weights else TransformerField
    fields = [cls(*args) for _ in range(n)]
    for f in fields:
        f.init_weights(m.n_layer)
    return fields


def configure_flow(model, cfg):
    """Attach learnable step sizes and the reversible/adaptive solver described by `cfg.flow`."""
    fl = cfg.flow
    if fl.learn_step_size:
        h = model.step_size
        raw = math.log(math.expm1(h)) if h < 20 else h  # softplus⁻¹(h)
        model.raw_step_size = nn.Parameter(torch.full((model.n_steps,), raw))
    if fl.reversible:
        if cfg.model.dropout > 0:
            raise ConfigError("reversible needs dropout = 0 (states are recomputed in backward)")
        from .reversible import ReversibleSolver

        model.solver = ReversibleSolver()
    if fl.adaptive:
        from .adaptive import AdaptiveSolver

        model.solver = AdaptiveSolver(fl.adaptive, fl.rtol, fl.atol, fl.adjoint)
    if getattr(fl, "step_jitter", 1) > 1:
        if len(model.fields) != 1 or fl.learn_step_size or fl.reversible or fl.adaptive:
            raise ConfigError("step_jitter needs weights tied or smooth, fixed step sizes, and "
                              "neither reversible nor adaptive")
        model.solver = StepJitter(fl.step_jitter)
    return model


class StepJitter:
    """Training-time re-discretisation: each training forward integrates [0, T] with
    n = L·m steps, m drawn uniformly from 1..`max_factor` (torch RNG, so exact resume holds);
    evaluation and generation use the L steps of the model. Training a tied/smooth model at
    several step sizes asks it to be a discretisation of one ODE rather than of one grid."""

    supports_cache = True

    def __init__(self, max_factor: int):
        self.max_factor = int(max_factor)

    def __call__(self, model, x, ctx):
        if not (model.training and torch.is_grad_enabled()) or ctx is not None:
            return None
        from .base import BoundField, integrate

        m = int(torch.randint(1, self.max_factor + 1, (1,)).item())
        n = model.n_steps * m
        h = model.step_size / m
        module = model.fields[0]
        return integrate(model.integrator, lambda k: BoundField(module), [h] * n, x)


def total_time(model) -> float:
    return float(sum(float(h) for h in model.step_sizes()))


def set_steps(model, n_steps: int):
    """Integrate the same interval [0, T] with `n_steps` steps (tied or smooth weights only)."""
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"steps must be a positive integer, got {n_steps!r}")
    if n_steps == model.n_steps:
        return model
    if len(model.fields) != 1:
        raise ValueError(f"this model has untied weights ({len(model.fields)} fields, one per "
                         "step): its number of steps is fixed; train with weights tied or smooth")
    if getattr(model, "raw_step_size", None) is not None:
        raise ValueError("this model learned one step size per step: its steps are fixed")
    T = total_time(model)
    model.n_steps, model.step_size = n_steps, T / n_steps
    return model
