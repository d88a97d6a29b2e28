"""Jacobian spectra of the step maps and finite-time Lyapunov exponents of the whole flow.

Step map k: Φ_k(S) = integrator.step(F_k, t_k, h_k, S) on the integrator's full state S
(X, or (X, V) for momentum schemes), flattened to one vector of the whole sequence. Its
Jacobian J_k = DΦ_k(S_k) is never formed: we only apply it (forward mode, `torch.func.jvp`) and
its transpose (reverse mode, `torch.func.vjp`). Attention runs on the SDPA "math" kernel here,
because the fused CPU kernels have no forward-mode derivative.

* Largest singular values of J_k: block power (orthogonal) iteration on J_kᵀJ_k followed by a
  Rayleigh–Ritz step (singular values of J_k Q). For the pre-norm residual step
  X + h·F(X) they sit near 1 + h·‖DF‖; values below 1 contract, above 1 expand.
* Finite-time Lyapunov exponents (FTLE) of the flow map Φ = Φ_{L−1} ∘ … ∘ Φ_0 over time
  T = Σ h_k: λ_i = (1/T) log σ_i(DΦ(S_0)). Computed by the QR method (Benettin et al. 1980;
  Dieci, Russell & Van Vleck 1997): Q ← qr(J_k Q) at every step, λ_i = (1/T) Σ_k log|R_k,ii|.
  One forward pass from a random Q_0 is the classical estimate (biased by O(1/T) at finite T);
  `sweeps` extra backward (J_kᵀ) / forward passes turn Q_0 into the leading right singular
  vectors of DΦ (orthogonal iteration on DΦᵀDΦ), after which the QR product gives the FTLEs
  exactly, since DΦ Q_0 = U Σ has R = Σ.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..integrators.base import BoundField


def _flatten(state):
    parts = state if isinstance(state, tuple) else (state,)
    return torch.cat([p.reshape(-1) for p in parts])


def _unflatten(vec, template):
    parts = template if isinstance(template, tuple) else (template,)
    out, i = [], 0
    for p in parts:
        out.append(vec[i:i + p.numel()].view_as(p))
        i += p.numel()
    return tuple(out) if isinstance(template, tuple) else out[0]


def step_maps(model):
    """[(Φ_k on flat vectors)] for k = 0..L−1 (no hooks, no cache)."""
    hs = list(model.step_sizes())
    ts = np.concatenate([[0.0], np.cumsum(hs)])
    maps = []
    for k, h in enumerate(hs):
        field = BoundField(model.field_module(k), None, f"flow.step.{k}")
        maps.append((field, float(ts[k]), float(h)))
    return maps


@torch.no_grad()
def full_states(model, x0: torch.Tensor) -> list:
    """Integrator states S_0 = init_state(x0), S_{k+1} = step(F_k, t_k, h_k, S_k)."""
    S = [model.integrator.init_state(x0)]
    with sdpa_kernel([SDPBackend.MATH]):
        for field, t, h in step_maps(model):
            S.append(model.integrator.step(field, t, h, S[-1]))
    return S


def _flat_map(model, field, t, h, template):
    def f(vec):
        return _flatten(model.integrator.step(field, t, h, _unflatten(vec, template)))
    return f


def _apply(f, v0, Q):
    """J Q, column by column (forward mode)."""
    return vmap(lambda q: jvp(f, (v0,), (q,))[1], in_dims=1, out_dims=1)(Q).detach()


def _apply_t(back, Q):
    """Jᵀ Q, column by column (reverse mode, `back` from `vjp`)."""
    return vmap(lambda q: back(q)[0], in_dims=1, out_dims=1)(Q).detach()


def _qr(M: torch.Tensor):
    """Thin QR through LAPACK via numpy (torch's threaded QR is slow on small matrices)."""
    q, r = np.linalg.qr(M.detach().cpu().numpy())
    return torch.from_numpy(q).to(M), torch.from_numpy(r).to(M)


def _orth(M: torch.Tensor) -> torch.Tensor:
    return _qr(M)[0]


def step_singular_values(model, x0: torch.Tensor, top: int = 4, iters: int = 30,
                         seed: int = 0) -> np.ndarray:
    """(L, top): largest singular values of each step map's Jacobian at the trajectory from x0
    (one sequence, shape (1, T, d)), by block power iteration with jvp/vjp."""
    S = full_states(model, x0)
    g = torch.Generator().manual_seed(seed)
    out = []
    with sdpa_kernel([SDPBackend.MATH]):
        for (field, t, h), s in zip(step_maps(model), S[:-1]):
            f = _flat_map(model, field, t, h, s)
            v0 = _flatten(s)
            n = v0.numel()
            p = min(top, n)
            Q = _orth(torch.randn(n, p, generator=g, dtype=torch.float64).to(v0))
            _, back = vjp(f, v0)
            for _ in range(iters):
                JQ = _apply(f, v0, Q)
                Q = _orth(_apply_t(back, JQ))
            JQ = _apply(f, v0, Q)
            out.append(np.linalg.svd(JQ.double().cpu().numpy(), compute_uv=False))
    return np.stack(out)


def lyapunov_spectrum(model, x0: torch.Tensor, n_exp: int = 8, sweeps: int = 2,
                      seed: int = 0) -> dict:
    """Finite-time Lyapunov exponents of the flow from x0 (1, T, d) by the QR method.

    Returns {"exponents": (n_exp,) λ_i in units of 1/layer-time, "stretch": (L, n_exp) per-step
    log|R_k,ii| of the final forward pass, "time": T}."""
    S = full_states(model, x0)
    maps = step_maps(model)
    T = sum(h for _, _, h in maps)
    g = torch.Generator().manual_seed(seed)
    v0s = [_flatten(s) for s in S]
    n = v0s[0].numel()
    p = min(n_exp, n)
    Q = _orth(torch.randn(n, p, generator=g, dtype=torch.float64).to(v0s[0]))
    with sdpa_kernel([SDPBackend.MATH]):
        fs = [_flat_map(model, fld, t, h, s) for (fld, t, h), s in zip(maps, S[:-1])]

        def forward(Q):
            logs = []
            for f, v0 in zip(fs, v0s[:-1]):
                Q, R = _qr(_apply(f, v0, Q))
                logs.append(torch.log(torch.diagonal(R).abs().double().clamp_min(1e-300)))
            return Q, torch.stack(logs)

        for _ in range(sweeps):
            Q, _ = forward(Q)
            for f, v0 in zip(reversed(fs), reversed(v0s[:-1])):
                _, back = vjp(f, v0)
                Q = _orth(_apply_t(back, Q))
        _, logs = forward(Q)
    return {"exponents": (logs.sum(0) / T).cpu().numpy(), "stretch": logs.cpu().numpy(),
            "time": float(T)}
