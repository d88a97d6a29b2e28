"""A causal Energy Transformer language model (`--model energy`).

    X_0 = E[tokens] + P[positions]
    X_{k+1} = X_k − α·∂E_C/∂G  for every token C at once,  k = 0..L−1,  one shared block
    logits = LN(X_L) Eᵀ

Each token C descends its own conditional energy E_C(x_C; x_{<C}) (see fields/energy.py) with the
context held fixed during the step: queries and the self key come from x_C, the keys of earlier
tokens are constants of the step. What is guaranteed and what is not:

* Causality (exact): the update of token C reads only tokens ≤ C, so future tokens never change
  past logits, and the KV cache (the keys of every earlier token at every descent step) gives the
  same logits as recomputing the whole prefix.
* Per-token conditional descent, to first order: with the context fixed, the derivative of
  E_C(x_C; x_{<C}^k) along the step d = −∂E_C/∂g_C is −dᵀ∇²L(x_C)d ≤ 0 (L the convex Lagrangian
  of the energy LayerNorm), so a small enough α gives E_C(x_C^{k+1}; x_{<C}^k) ≤ E_C(x_C^k; ·)
  unless d lies in the kernel of ∇²L (the mean and radial directions LN removes). For a finite α
  it is not guaranteed; benchmarks/energy_lm.py measures the fraction of steps where it held.
* No global energy: the context moves in the same step, so E_C(x^{k+1}) can exceed E_C(x^k), and
  Σ_C E_C is not a Lyapunov function of the joint dynamics. benchmarks/energy_lm.py measures how
  often each happens on a trained model.

The energy of every step is observable: with a hook on `flow.step.*.energy` the forward emits
`embed.energy` (X_0) and `flow.step.{k}.energy` (after step k), each the per-token conditional
energies (B, T) with the context at the same step (uncached forwards only).
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from .fields.energy import EnergyTransformer
from .hooks import FlowContext
from .integrators import INTEGRATORS, BoundField
from .model import FlowLM


class EnergyLM(FlowLM):
    """FlowLM whose single shared field is a causal `EnergyTransformer` (n_steps descent steps)."""

    @property
    def block(self) -> EnergyTransformer:
        return self.fields[0]

    def _records_energy(self, ctx: FlowContext | None) -> bool:
        if ctx is None or ctx.cache is not None or getattr(self, "solver", None) is not None:
            return False
        return any(fnmatch.fnmatchcase("flow.step.0.energy", p) for p, _ in ctx.hooks)

    def flow(self, x: torch.Tensor, ctx: FlowContext | None = None) -> torch.Tensor:
        if not self._records_energy(ctx):
            return super().flow(x, ctx)
        integ, t = self.integrator, 0.0
        ctx.emit("embed.energy", self.block.token_energies(x)["total"])
        state = integ.init_state(x)
        for k, h in enumerate(self.step_sizes()):
            field = BoundField(self.field_module(k), ctx, f"flow.step.{k}")
            state = integ.step(field, t, h, state)
            ctx.emit_state(k, state, integ)
            ctx.emit(f"flow.step.{k}.energy",
                     self.block.token_energies(integ.output(state))["total"])
            t = t + h
        return integ.output(state)

    def energy_trajectory(self, idx: torch.Tensor):
        """States X_0..X_L (L+1, B, T, d) of an uncached forward, for energy analysis."""
        from .hooks import run_with_trajectory

        _, traj = run_with_trajectory(self, idx, "flow.step.*.state")
        with torch.no_grad():
            x0 = self.embed(idx)
        ks = sorted(int(n.split(".")[2]) for n in traj)
        return torch.stack([x0] + [traj[f"flow.step.{k}.state"] for k in ks])


def conditional_energy_steps(block: EnergyTransformer, states: torch.Tensor) -> dict:
    """From states X_0..X_L (L+1, B, T, d): for every step k and token C,

    fixed   = E_C(x_C^{k+1}; x_{<C}^k) − E_C(x_C^k; x_{<C}^k)   (context held fixed: the
              quantity each token descends)
    moving  = E_C(x^{k+1}) − E_C(x^k)                            (context also moved)

    Returns {"fixed": (L, B, T), "moving": (L, B, T), "energy": (L+1, B, T)}."""
    with torch.no_grad():
        e = torch.stack([block.token_energies(s)["total"] for s in states])
        fixed = torch.stack([block.token_energies(states[k + 1], states[k])["total"] - e[k]
                             for k in range(len(states) - 1)])
    return {"fixed": fixed, "moving": e[1:] - e[:-1], "energy": e}


def build_energy_model(cfg, vocab_size: int | None = None) -> EnergyLM:
    """The causal energy LM of a RunConfig: n_layer descent steps of one shared block, step size
    α = flow.step_size, integrator flow.integrator (euler = plain gradient descent)."""
    from . import model as model_module

    m, fl = cfg.model, cfg.flow
    vocab_size = vocab_size or m.vocab_size
    block = EnergyTransformer(m.n_embd, m.n_head, m.n_embd // m.n_head,
                              m.n_memories or 4 * m.n_embd, beta=m.energy_beta or None,
                              hopfield=m.hopfield, causal=True, bias=m.bias,
                              attn_init_std=0.02, mem_init_std=0.02)
    model = EnergyLM(vocab_size, m.n_embd, m.block_size, block,
                     INTEGRATORS[fl.integrator].from_config(fl), n_steps=m.n_layer,
                     step_size=fl.resolve_step_size(m.n_layer), pos_emb=m.pos_emb, norm=m.norm,
                     bias=m.bias, dropout=m.dropout)
    nn.init.normal_(model.wte.weight, 0.0, 0.02)
    if model.wpe is not None:
        nn.init.normal_(model.wpe.weight, 0.0, 0.02)
    configure = getattr(model_module, "configure_flow", None)  # learnable h etc. (issue 3)
    return configure(model, cfg) if configure is not None else model
