"""Conserved quantities of the flow: linear invariants and energy / Hamiltonian drift.

Linear invariants. A direction w is conserved when w·x_{k,i} does not change along each token's
trajectory (k = 0..L) although it differs between tokens — e.g. any field orthogonal to w,
F(X)·w = 0, conserves it exactly. With the within-trajectory (temporal) covariance

    C_time = (1/(N(L+1))) Σ_i Σ_k (x_{k,i} − x̄_i)(x_{k,i} − x̄_i)ᵀ,   x̄_i = mean_k x_{k,i}

and the across-token covariance C_tok = mean_k cov_i(x_{k,i}), the best invariants minimise the
Rayleigh quotient wᵀC_time w / wᵀC_tok w: the smallest eigenpairs of the generalised symmetric
eigenproblem C_time w = μ C_tok w (μ = 0 for an exact invariant; C_tok is ridge-regularised
when tokens are fewer than dimensions). Their drift is mean_i |w·(x_{k,i} − x_{0,i})| relative
to std_i(w·x_{0,i}).

Energies. For a field that exposes `energy(x)` (F = −∇E) the energy along the states is reported;
for schemes on (X, V) the Hamiltonian H = ½‖V‖² + E(X) (a field may also define
`hamiltonian(x, v)`). A symplectic integrator keeps |H_k − H_0| bounded over long times (a
nearby modified Hamiltonian is conserved; Hairer, Lubich & Wanner, *Geometric Numerical
Integration*, ch. IX); an explicit Euler step lets it drift.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def linear_invariants(X: torch.Tensor, n: int = 3, ridge: float = 1e-8) -> dict:
    """X: (L+1, ..., d) trajectories (all token axes flattened).

    Returns {"ratio": (n,) μ (ascending), "w": (n, d) unit directions, "drift": (n, L+1)}."""
    Y = X.double().reshape(X.shape[0], -1, X.shape[-1]).cpu().numpy()  # (K, N, d)
    K, N, d = Y.shape
    D = Y - Y.mean(0, keepdims=True)
    C_time = np.einsum("kni,knj->ij", D, D) / (K * N)
    Z = Y - Y.mean(1, keepdims=True)
    C_tok = np.einsum("kni,knj->ij", Z, Z) / (K * N)
    C_tok = C_tok + ridge * (np.trace(C_tok) / d + 1e-300) * np.eye(d)
    mu, W = scipy.linalg.eigh(C_time, C_tok, subset_by_index=[0, min(n, d) - 1])
    W = (W / np.linalg.norm(W, axis=0, keepdims=True)).T  # (n, d)
    proj = np.einsum("knd,md->mkn", Y, W)  # (n, K, N)
    scale = proj[:, 0].std(axis=1) + 1e-300
    drift = np.abs(proj - proj[:, :1]).mean(2) / scale[:, None]
    return {"ratio": mu, "w": W, "drift": drift}


def _energy_of(module, x, v=None):
    if v is not None and hasattr(module, "hamiltonian"):
        return float(torch.as_tensor(module.hamiltonian(x, v)).detach().double().sum())
    e = float(torch.as_tensor(module.energy(x)).detach().double().sum())
    return e if v is None else e + 0.5 * float((v.double() ** 2).sum())


@torch.no_grad()
def energy_along(model, X: torch.Tensor, V: torch.Tensor | None = None) -> np.ndarray | None:
    """Energy (or Hamiltonian with velocities) of every state X_k, k = 0..L, evaluated with the
    field module of step min(k, L−1); None when the field has no `energy`.

    V: (L, ...) velocities after each step; the initial one is taken from
    `integrator.init_state(X_0)`."""
    L = X.shape[0] - 1
    mods = [model.field_module(min(k, L - 1)) for k in range(L + 1)]
    if not all(hasattr(m, "energy") or hasattr(m, "hamiltonian") for m in mods):
        return None
    if V is not None:
        s0 = model.integrator.init_state(X[0])
        v0 = s0[1] if isinstance(s0, tuple) else torch.zeros_like(X[0])
        V = torch.cat([v0[None], V])
    out = []
    for k, m in enumerate(mods):
        with torch.enable_grad():  # energies may be written with autograd inside
            out.append(_energy_of(m, X[k], None if V is None else V[k]))
    return np.array(out)


def energy_from_trajectory(traj) -> np.ndarray | None:
    """Energies emitted at hook points `flow.step.{k}.energy` (first value per step), if any."""
    names = [n for n in traj if n.endswith(".energy") and n.startswith("flow.step.")]
    if not names:
        return None
    out = []
    for k in sorted(int(n.split(".")[2]) for n in names):
        v = traj[f"flow.step.{k}.energy"]
        v = v[0] if isinstance(v, list) else v
        out.append(float(torch.as_tensor(v).detach().double().sum()))
    return np.array(out)


def energy_drift(E) -> dict:
    """Relative drift of an energy sequence: max_k |E_k − E_0| / |E_0|, the same over the second
    half only (bounded oscillation vs secular growth), and whether E is monotone."""
    E = np.asarray(E, dtype=float)
    scale = max(abs(E[0]), 1e-300)
    dev = np.abs(E - E[0]) / scale
    half = len(E) // 2
    dE = np.diff(E)
    return {"max_rel": float(dev.max()), "first_half": float(dev[:half + 1].max()),
            "second_half": float(dev[half:].max()),
            "monotone": "nonincreasing" if np.all(dE <= 0) else
            ("nondecreasing" if np.all(dE >= 0) else "no")}
