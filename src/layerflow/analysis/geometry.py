"""Geometry of the token cloud over layer-time: clustering, rank collapse, attention entropy.

* Clustering (Geshkovski, Letrouit, Polyanskiy & Rigollet, "A mathematical perspective on
  transformers", 2023): tokens x_i/‖x_i‖ on the sphere; the mean pairwise cosine
  (1/(n(n−1))) Σ_{i≠j} ⟨x̂_i, x̂_j⟩ → 1 when they collapse to one point, and the number of
  clusters = connected components of the graph {i ~ j : ⟨x̂_i, x̂_j⟩ > τ}. Their interaction
  energy E_β(X) = (1/(2βn²)) Σ_{i,j} exp(β⟨x_i, x_j⟩) grows along the attention flow on the sphere.
* Rank collapse (Dong, Cordonnier & Loukas, "Attention is not all you need", ICML 2021): the
  relative residual to the nearest rank-one "all tokens equal" matrix,
  res(X) = ‖X − 1x̄ᵀ‖_F / ‖X‖_F with x̄ the token mean (the Frobenius-optimal x), and the
  effective rank exp(H(σ/‖σ‖₁)) of X (Roy & Vetterli 2007).
* Attention entropy per head: H_i = −Σ_j P_ij log P_ij averaged over query positions i, with P
  recomputed from the attention module's own weights on the normed input it actually received
  (captured during a forward pass; the model is not modified).
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import numpy as np
import torch

from ..fields.transformer import CausalSelfAttention, apply_rope, rope_tables
from ..hooks import hooks


def _unit(X: torch.Tensor) -> torch.Tensor:
    X = X.double()
    return X / X.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def mean_pairwise_cosine(X: torch.Tensor) -> torch.Tensor:
    """(..., n, d) -> (...): mean of ⟨x̂_i, x̂_j⟩ over ordered pairs i ≠ j."""
    U = _unit(X)
    n = U.shape[-2]
    s = U.sum(-2)
    return ((s * s).sum(-1) - n) / (n * (n - 1))


def n_clusters(X: torch.Tensor, threshold: float = 0.99) -> int:
    """Connected components of {i ~ j : cos(x_i, x_j) > threshold} for one cloud X (n, d)."""
    U = _unit(X)
    adj = ((U @ U.T) > threshold).cpu().numpy()
    n = adj.shape[0]
    label = -np.ones(n, dtype=int)
    c = 0
    for s in range(n):
        if label[s] >= 0:
            continue
        stack, label[s] = [s], c
        while stack:
            i = stack.pop()
            for j in np.flatnonzero(adj[i] & (label < 0)):
                label[j] = c
                stack.append(j)
        c += 1
    return c


def rank_one_residual(X: torch.Tensor) -> torch.Tensor:
    """(..., n, d) -> (...): ‖X − 1x̄ᵀ‖_F / ‖X‖_F."""
    X = X.double()
    R = X - X.mean(-2, keepdim=True)
    return R.flatten(-2).norm(dim=-1) / X.flatten(-2).norm(dim=-1).clamp_min(1e-300)


def effective_rank(X: torch.Tensor) -> torch.Tensor:
    """(..., n, d) -> (...): exp of the Shannon entropy of the normalised singular values."""
    s = torch.linalg.svdvals(X.double())
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.exp(h)


def interaction_energy(X: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """(..., n, d) -> (...): E_β = (1/(2βn²)) Σ_{i,j} exp(β⟨x_i, x_j⟩)."""
    X = X.double()
    n = X.shape[-2]
    G = X @ X.transpose(-1, -2)
    return torch.exp(beta * G).sum((-1, -2)) / (2 * beta * n * n)


def geometry_curves(X: torch.Tensor, threshold: float = 0.99) -> dict:
    """Per step k of X (L+1, B, T, d): mean pairwise cosine, clusters (first sequence), rank-one
    residual and effective rank (both averaged over the batch)."""
    return {
        "cosine": mean_pairwise_cosine(X).mean(-1).cpu().numpy(),
        "clusters": np.array([n_clusters(X[k, 0], threshold) for k in range(X.shape[0])]),
        "rank_residual": rank_one_residual(X).mean(-1).cpu().numpy(),
        "effective_rank": effective_rank(X).mean(-1).cpu().numpy(),
    }


# ---------------------------------------------------------------------------- attention
@torch.no_grad()
def attention_probs(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities (B, H, T, T) of `attn` on its (normed) input x (B, T, C),
    recomputed from the module's weights exactly as its SDPA call uses them."""
    B, T, C = x.shape
    nh, hd = attn.n_head, C // attn.n_head
    q, k, _ = attn.c_attn(x).view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4)
    if attn.rope:
        rc, rs = rope_tables(hd, 0, T, x.device, q.dtype)
        q, k = apply_rope(q, rc, rs), apply_rope(k, rc, rs)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


@torch.no_grad()
def capture_attention(model, idx: torch.Tensor) -> list[list[torch.Tensor]]:
    """Attention probabilities of every attention call, grouped by step: out[k] is a list of
    (B, H, T, T) tensors, one per attention module call during step k (several for integrators
    that evaluate the field more than once). Works for any field containing
    `CausalSelfAttention` modules or modules with their own `attention_probs(x)` method (e.g.
    imported GQA attention); returns [] when there is none."""
    mods = {id(m): m for k in range(model.n_steps) for m in model.field_module(k).modules()
            if isinstance(m, CausalSelfAttention) or callable(getattr(m, "attention_probs", None))}
    if not mods:
        return []
    out: list[list[torch.Tensor]] = [[] for _ in range(model.n_steps)]
    current = [0]

    def pre(module, args):
        own = getattr(module, "attention_probs", None)
        probs = own(args[0]) if callable(own) else attention_probs(module, args[0])
        out[min(current[0], model.n_steps - 1)].append(probs)

    def advance(value, name):
        current[0] = int(name.split(".")[2]) + 1

    was = model.training
    model.eval()
    with ExitStack() as stack:
        for m in mods.values():
            stack.callback(m.register_forward_pre_hook(pre).remove)
        stack.enter_context(hooks(model, {"flow.step.*.state": advance}))
        model(idx)
    model.train(was)
    return out


def attention_entropy(probs: torch.Tensor, normalise: bool = False) -> torch.Tensor:
    """(B, H, T, T) -> (H,): mean over batch and queries of −Σ_j P_ij log P_ij (nats). With
    `normalise`, each query's entropy is divided by its maximum log(i+1) (query 0 excluded)."""
    P = probs.double()
    h = -(P * torch.log(P.clamp_min(1e-300))).sum(-1)  # (B, H, T)
    if normalise:
        T = P.shape[-1]
        cap = torch.log(torch.arange(1, T + 1, dtype=torch.float64, device=P.device))
        return (h[..., 1:] / cap[1:]).mean((0, 2))
    return h.mean((0, 2))


def entropy_per_head(model, idx: torch.Tensor) -> np.ndarray | None:
    """(L, H) mean attention entropy of the first attention call of each step, or None."""
    calls = capture_attention(model, idx)
    if not calls or any(not c for c in calls):
        return None
    return torch.stack([attention_entropy(c[0]) for c in calls]).cpu().numpy()
