"""The transformer vector field F(X, t) = A(X) + M(X), kept as two split terms.

A(X) = Attn(Norm₁(X))  — causal multi-head self-attention (`scaled_dot_product_attention`)
M(X) = MLP(Norm₂(X))   — two-layer GELU perceptron
An integrator sees the field only through `field(x, t)` (the sum) and `field.terms` (the parts),
so Lie–Trotter, Strang and Runge–Kutta schemes are all written against the same object.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..speed import sdpa  # SDPA with the per-op precision policy (fp32 kernel under CPU bf16)


def make_norm(kind: str, dim: int, bias: bool = True) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, bias=bias)


_ROPE_TABLES: dict = {}  # (head_dim, base, device, dtype) -> (C, S) for positions 0..n-1


def rope_inv_freq(head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """RoPE frequencies ω_i = base^(−2i/d), i = 0..d/2−1 (Su et al. 2021)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device,
                                        dtype=torch.float32) / head_dim))


def rope_rotation(ang: torch.Tensor, dtype=torch.float32):
    """Full-width RoPE tables from the angles (T, D/2): C = [cos, cos], S = [−sin, sin]."""
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)


def rope_tables(head_dim: int, start: int, T: int, device, dtype=torch.float32,
                base: float = 10000.0):
    """(C, S) of rotary embeddings (Su et al. 2021) for positions start..start+T-1, shape
    (T, head_dim): angles p·base^(−2i/d). Computed once per (shape, device, dtype) for a prefix
    of positions that doubles when outgrown, then sliced (no per-call trigonometry)."""
    key = (head_dim, float(base), str(device), dtype)
    tab = _ROPE_TABLES.get(key)
    if tab is None or tab[0].shape[0] < start + T:
        n = max(2 * (start + T), 64)
        with torch.inference_mode(False), torch.no_grad():  # usable later under autograd
            inv = rope_inv_freq(head_dim, base, device)
            ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None, :]
            tab = _ROPE_TABLES[key] = rope_rotation(ang, dtype)
    return tab[0][start:start + T], tab[1][start:start + T]


def apply_rope(x: torch.Tensor, C: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) by the position angle (half-split convention):
    x·C + [x₂, x₁]·S = [x₁cos − x₂sin, x₂cos + x₁sin]."""
    d = x.shape[-1] // 2
    return torch.addcmul(x * C, torch.cat([x[..., d:], x[..., :d]], dim=-1), S)


class KVCache:
    """Keys and values of every attention evaluation of a forward pass, in call order.

    Each attention call during a forward pass takes the next slot, so any integrator (several
    field evaluations per step, substeps, stages) is cached without the model knowing its shape.
    Without autograd, a slot is a preallocated buffer whose capacity doubles when full, so adding
    a token writes O(1) new rows (amortised) instead of copying the whole prefix (`torch.cat`);
    `slots[i]` is always the (k, v) view of the filled part.
    """

    def __init__(self):
        self.slots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.cursor = 0
        self.length = 0  # tokens already cached
        self._context = None

    def context(self):
        """The hook-free FlowContext of this cache, made once: token-by-token decoding then
        reuses its bound fields instead of rebuilding them for every token."""
        if self._context is None:
            from ..hooks import FlowContext

            self._context = FlowContext(self)
        return self._context

    def begin(self):
        self.cursor = 0

    def end(self, n_new: int):
        self.length += n_new

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        i = self.cursor
        self.cursor += 1
        new = i >= len(self.slots)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            if new:
                self.slots.append((k, v))
                self._buffers.append(None)
            else:  # autograd through the cache: plain concatenation
                pk, pv = self.slots[i]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
                self.slots[i], self._buffers[i] = (k, v), None
            return k, v
        n_old = 0 if new else self.slots[i][0].shape[2]
        n = n_old + k.shape[2]
        buf = None if new else self._buffers[i]
        if buf is None or buf[0].shape[2] < n or buf[0].shape[:2] != k.shape[:2] \
                or buf[0].shape[3] != k.shape[3] or buf[1].shape[3] != v.shape[3]:
            cap = max(2 * n, 16)
            bk = k.new_empty(*k.shape[:2], cap, k.shape[3])
            bv = v.new_empty(*v.shape[:2], cap, v.shape[3])
            if n_old:
                bk.narrow(2, 0, n_old).copy_(self.slots[i][0])
                bv.narrow(2, 0, n_old).copy_(self.slots[i][1])
            buf = (bk, bv)
        bk, bv = buf
        bk.narrow(2, n_old, n - n_old).copy_(k)  # narrow: a view without Python slicing
        bv.narrow(2, n_old, n - n_old).copy_(v)
        kv = (bk.narrow(2, 0, n), bv.narrow(2, 0, n))
        if new:
            self.slots.append(kv)
            self._buffers.append(buf)
        else:
            self.slots[i], self._buffers[i] = kv, buf
        return kv


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, rope: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.n_head, self.n_embd, self.rope = n_head, n_embd, rope
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        B, T, C = x.shape
        nh, hd = self.n_head, C // self.n_head
        qkv = self.c_attn(x).view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4)
        past = ctx.cache.length if ctx is not None and ctx.cache is not None else 0
        if self.rope:  # q and k rotated together: one set of ops
            rc, rs = rope_tables(hd, past, T, x.device, qkv.dtype)
            (q, k), v = apply_rope(qkv[:2], rc, rs).unbind(0), qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        if ctx is not None and ctx.cache is not None:
            k, v = ctx.cache.extend(k, v)
        drop = self.dropout if self.training else 0.0
        if past == 0:
            y = sdpa(q, k, v, dropout_p=drop, is_causal=True)
        elif T == 1:
            y = sdpa(q, k, v, dropout_p=drop)
        else:  # a chunk of queries after a cached prefix: query i sees keys 0..past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = sdpa(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class TransformerField(nn.Module):
    """F(X) = A(X) + M(X) with A = Attn∘Norm₁, M = MLP∘Norm₂ (one set of weights)."""

    term_names = ("attn", "mlp")

    def __init__(self, n_embd: int, n_head: int, mlp_ratio: int = 4, bias: bool = True,
                 rope: bool = False, dropout: float = 0.0, norm: str = "layernorm"):
        super().__init__()
        self.ln_1 = make_norm(norm, n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias, rope, dropout)
        self.ln_2 = make_norm(norm, n_embd, bias)
        self.mlp = MLP(n_embd, mlp_ratio * n_embd, bias)
        self.drop = nn.Dropout(dropout)

    def attn_term(self, x, t=None, ctx=None):
        y = self.attn(self.ln_1(x), ctx)
        return self.drop(y) if self.training and self.drop.p else y  # no call when inactive

    def mlp_term(self, x, t=None, ctx=None):
        y = self.mlp(self.ln_2(x))
        return self.drop(y) if self.training and self.drop.p else y

    def forward(self, x, t=None, ctx=None):
        return self.attn_term(x, t, ctx) + self.mlp_term(x, t, ctx)

    def terms(self):
        return (self.attn_term, self.mlp_term)

    def init_weights(self, n_layer: int, std: float = 0.02):
        """GPT-2 init: N(0, 0.02), output projections scaled by 1/sqrt(2L)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for proj in self.output_projections():
            nn.init.normal_(proj.weight, 0.0, std / math.sqrt(2 * n_layer))

    def output_projections(self) -> list[nn.Linear]:
        """The layers that write into the residual stream (scaled down at init)."""
        return [self.attn.c_proj, self.mlp.c_proj]
