"""Reversible backpropagation through exactly invertible integrators (O(1) memory in depth).

For a scheme with an exact inverse step Ψ_h⁻¹ (leapfrog, position Verlet, symplectic Euler,
momentum), the forward pass keeps only the final state (X_L, V_L). During backward the states
are recomputed from the end, one step at a time,

    s_k = Ψ_{h_k}⁻¹(s_{k+1}),   then   (ḡ_k, ḡ_θ) += VJP of s_{k+1} = Ψ_{h_k}(s_k)

so only one step's graph is alive at any time: activation memory does not grow with L
(Gomez et al., "The Reversible Residual Network", NeurIPS 2017; Chang et al., "Reversible
Architectures for Arbitrarily Deep Residual Neural Networks", AAAI 2018; Sander et al.,
Momentum ResNets, ICML 2021). The price is one extra field evaluation per step.

In floating point the reconstruction is not bit-exact; `reconstruction_error` measures it, and
the gradients are exact up to that error. Fields must be deterministic (no dropout): the
recomputation evaluates F again. Set `FlowConfig.reversible = False` to store activations.
"""

from __future__ import annotations

import torch

from .base import BoundField


def _times(hs, k):
    t = 0.0
    for j in range(k):
        t = t + hs[j]
    return t


class _ReversibleFlow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, integrator, module_at, n_steps, H, x, *params):
        hs = [H[k] for k in range(n_steps)]
        with torch.no_grad():
            state = integrator.init_state(x)
            t = 0.0
            for k in range(n_steps):
                state = integrator.step(BoundField(module_at(k)), t, hs[k], state)
                t = t + hs[k]
        ctx.integrator, ctx.module_at, ctx.n_steps = integrator, module_at, n_steps
        ctx.n_params = len(params)
        ctx.save_for_backward(H, *state, *params)
        ctx.n_state = len(state)
        return integrator.output(state)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        H, state = saved[0], tuple(saved[1:1 + ctx.n_state])
        params = saved[1 + ctx.n_state:]
        integ, module_at = ctx.integrator, ctx.module_at
        g_state = (grad_out,) + tuple(torch.zeros_like(s) for s in state[1:])
        g_params = [torch.zeros_like(p) for p in params]
        g_H = torch.zeros_like(H)
        learn_h = ctx.needs_input_grad[3]
        fast = hasattr(integ, "reverse_step") and not learn_h
        for k in reversed(range(ctx.n_steps)):
            field = BoundField(module_at(k))
            if fast:  # the scheme reuses its field evaluations for inverse + VJP
                state, g_state = integ.reverse_step(field, _times(H, k).item() if k else 0.0,
                                                    H[k].item(), state, g_state, params,
                                                    g_params)
                continue
            with torch.no_grad():
                prev = integ.inverse_step(field, _times(H, k), H[k], state)
            with torch.enable_grad():
                Hl = H.detach().requires_grad_(learn_h)
                leaf = tuple(s.detach().requires_grad_() for s in prev)
                out = integ.step(field, _times(Hl, k), Hl[k], leaf)
                inputs = leaf + ((Hl,) if learn_h else ()) + tuple(params)
                grads = list(torch.autograd.grad(out, inputs, g_state, allow_unused=True))
            g_state = tuple(g if g is not None else torch.zeros_like(s)
                            for g, s in zip(grads[:len(leaf)], leaf))
            del grads[:len(leaf)]
            if learn_h:
                g = grads.pop(0)
                g_H = g_H + g if g is not None else g_H
            for i, g in enumerate(grads):
                if g is not None:
                    g_params[i] = g_params[i] + g
            state = prev
        # init_state(x) = (x, 0): the gradient w.r.t. the input is the X-component's.
        return (None, None, None, g_H if learn_h else None, g_state[0], *g_params)


def flow_parameters(modules) -> list[torch.Tensor]:
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def reversible_integrate(integrator, module_at, step_sizes, x):
    """X_L of the flow, with a backward that recomputes states instead of storing them.

    `module_at(k)`: the field module of step k; `step_sizes`: floats or 0-d tensors."""
    if not getattr(integrator, "invertible", False):
        raise ValueError(f"integrator {integrator.name!r} has no exact inverse step")
    n = len(step_sizes)
    H = torch.stack([torch.as_tensor(h, dtype=x.dtype, device=x.device) for h in step_sizes])
    params = flow_parameters({id(module_at(k)): module_at(k) for k in range(n)}.values())
    return _ReversibleFlow.apply(integrator, module_at, n, H, x, *params)


@torch.no_grad()
def reconstruction_error(integrator, module_at, step_sizes, x) -> float:
    """‖x − Ψ⁻¹(Ψ(x))‖ / ‖x‖ after integrating all steps forward and back."""
    state = integrator.init_state(x)
    t = 0.0
    for k, h in enumerate(step_sizes):
        state = integrator.step(BoundField(module_at(k)), t, h, state)
        t = t + h
    for k in reversed(range(len(step_sizes))):
        t = t - step_sizes[k]
        state = integrator.inverse_step(BoundField(module_at(k)), t, step_sizes[k], state)
    return ((state[0] - x).norm() / x.norm()).item()


class ReversibleSolver:
    """Plugged into `FlowLM.solver`: reversible backward when training without cache/hooks;
    returns None (= use the ordinary loop) otherwise (generation, hooks, no grad)."""

    supports_cache = True

    def __call__(self, model, x, ctx):
        if ctx is not None or not torch.is_grad_enabled():
            return None
        return reversible_integrate(model.integrator, model.field_module, model.step_sizes(), x)
