"""Trajectories over layer-time and their simplest measurements.

A model is read only through the generic flow interface — `model.flow(x, ctx)`,
`model.n_steps`, `model.step_sizes()`, `model.field_module(k)`, `model.integrator` — and the hook
points of `layerflow.hooks`, so every metric here works for any field and any integrator
(schemes on (X, V) included: their velocities are the points `flow.step.{k}.velocity`).

    X_0 = embedding,   X_{k+1} = Φ_k(X_k),   t_k = Σ_{j<k} h_j

State norms ‖x_{k,i}‖ and increments ‖x_{k+1,i} − x_{k,i}‖ / h_k (a finite-difference estimate of
the speed ‖F‖ of the flow) are averaged over tokens i.
"""

from __future__ import annotations

import numpy as np
import torch

from ..hooks import FlowContext, Trajectory, run_with_trajectory


def layer_times(model) -> np.ndarray:
    """t_0 = 0, t_k = Σ_{j<k} h_j for k = 0..L (length L+1)."""
    return np.concatenate([[0.0], np.cumsum(np.asarray(model.step_sizes(), dtype=float))])


@torch.no_grad()
def collect(model, idx: torch.Tensor):
    """Run the model on token ids (B, T) and cache every hook point: (logits, Trajectory)."""
    was = model.training
    model.eval()
    try:
        return run_with_trajectory(model, idx)
    finally:
        model.train(was)


@torch.no_grad()
def flow_from(model, x0: torch.Tensor) -> Trajectory:
    """Integrate the model's flow from an arbitrary initial state x0 (B, T, d), no embedding.

    Returns a Trajectory with `embed` = x0 and every `flow.step.*` point, so toy systems (particles
    on a sphere, linear fields) are measured with the same functions as language models."""
    traj = Trajectory()
    traj["embed"] = x0.detach()
    model.flow(x0, FlowContext(None, [("flow.step.*", traj.record)]))
    return traj


def states(traj: Trajectory) -> torch.Tensor:
    """(L+1, B, T, d): X_0 .. X_L."""
    return traj.states()


def velocities(traj: Trajectory) -> torch.Tensor | None:
    """(L, B, T, d): V_1 .. V_L for schemes on (X, V), else None."""
    names = [n for n in traj if n.endswith(".velocity")]
    if not names:
        return None
    ks = sorted(int(n.split(".")[2]) for n in names)
    return torch.stack([traj[f"flow.step.{k}.velocity"] for k in ks])


def state_norms(X: torch.Tensor) -> np.ndarray:
    """Mean over tokens of ‖x_{k,i}‖₂, for k = 0..L.  X: (L+1, ..., d)."""
    return X.double().norm(dim=-1).flatten(1).mean(1).cpu().numpy()


def increment_norms(X: torch.Tensor, step_sizes) -> dict:
    """Per step k: mean ‖ΔX_k‖ (`abs`), mean ‖ΔX_k‖/h_k (`speed`, ≈ ‖F‖) and the relative
    increment mean ‖ΔX_k‖ / mean ‖X_k‖ (`rel`)."""
    X = X.double()
    d = (X[1:] - X[:-1]).norm(dim=-1).flatten(1).mean(1).cpu().numpy()
    h = np.asarray(list(step_sizes), dtype=float)
    base = X[:-1].norm(dim=-1).flatten(1).mean(1).cpu().numpy()
    return {"abs": d, "speed": d / h, "rel": d / np.maximum(base, 1e-30)}


def pca_paths(X: torch.Tensor, tokens=None, n_components: int = 2) -> dict:
    """Project token trajectories through layer-time on the top principal components of all
    states pooled (over steps and tokens) of the first sequence.

    Returns {"paths": (L+1, n_tok, n_components), "explained": variance fractions, "tokens"}."""
    Y = X[:, 0].double() if X.dim() == 4 else X.double()  # (L+1, T, d)
    T = Y.shape[1]
    if tokens is None:
        tokens = sorted({0, T // 4, T // 2, (3 * T) // 4, T - 1})
    flat = Y.reshape(-1, Y.shape[-1])
    mu = flat.mean(0)
    _, S, Vh = torch.linalg.svd(flat - mu, full_matrices=False)
    comps = Vh[:n_components]
    paths = (Y[:, tokens] - mu) @ comps.T
    var = S**2
    return {"paths": paths.cpu().numpy(), "explained": (var[:n_components] / var.sum()).numpy(),
            "tokens": list(tokens)}
