"""Vector fields of imported pre-norm transformers (GPT-2 and Llama families).

A pre-norm block  X ← X + Attn(N₁(X));  X ← X + MLP(N₂(X))  is one Lie–Trotter step with h = 1 of
dX/dt = A(X) + M(X) (see `integrators/splitting.py`), so a pretrained GPT-2 (Radford et al. 2019)
or Llama (Touvron et al. 2023) is a `FlowLM` whose field is `PretrainedField`:

    A(X) = W_o · softmax(Q Kᵀ / √d_h + causal) V,   Q = R_θ(X W_q), K = R_θ(X W_k), V = X W_v
    M(X) = W_2 σ(W_1 X)                 (gpt2: σ = GELU, tanh approximation)
    M(X) = W_d (σ(W_g X) ⊙ W_u X)       (llama: SwiGLU, σ = SiLU; Shazeer 2020)

with N = LayerNorm (gpt2) or RMSNorm (llama; Zhang & Sennrich 2019), R_θ the rotary embedding
(Su et al. 2021, half-split pairs (x_i, x_{i+d/2}), HF's `rotate_half` convention, frequencies
ω_i = θ^(-2i/d_h), stored as a buffer so statically rescaled ones (linear, llama3) import too) and
grouped-query attention (Ainslie et al. 2023): n_kv_head ≤ n_head key/value heads, query head j
reading key/value head ⌊j / (n_head / n_kv_head)⌋. `PretrainedField` subclasses
`TransformerField`, so it has the same terms, term names and hook points.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .transformer import TransformerField, apply_rope, rope_inv_freq, rope_rotation

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def make_norm_eps(kind: str, dim: int, bias: bool = True, eps: float = 0.0) -> nn.Module:
    """LayerNorm or RMSNorm with an explicit epsilon (0 = 1e-5 for LayerNorm, 1e-6 for RMS)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps or 1e-6)
    return nn.LayerNorm(dim, eps=eps or 1e-5, bias=bias)


class GQAttention(nn.Module):
    """Causal attention with separate Q/K/V projections, grouped-query heads and optional RoPE.

    The KV cache stores the n_kv_head keys/values (after RoPE); heads are repeated at use."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int = 0, head_dim: int = 0,
                 bias: bool = True, rope: bool = False, rope_theta: float = 10000.0,
                 dropout: float = 0.0):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head or n_head
        self.head_dim = head_dim or n_embd // n_head
        self.rope, self.rope_theta, self.dropout = rope, float(rope_theta), dropout
        hd = self.head_dim
        self.q_proj = nn.Linear(n_embd, n_head * hd, bias=bias)
        self.k_proj = nn.Linear(n_embd, self.n_kv_head * hd, bias=bias)
        self.v_proj = nn.Linear(n_embd, self.n_kv_head * hd, bias=bias)
        self.o_proj = nn.Linear(n_head * hd, n_embd, bias=bias)
        if rope:  # θ^(-2i/d_h); saved with the weights, so scaled RoPE (llama3, linear) imports
            self.register_buffer("inv_freq", rope_inv_freq(hd, self.rope_theta))

    def rope_tables(self, start: int, T: int, device, dtype=torch.float32):
        """(C, S) of `apply_rope` for the angles p·ω_i, positions p = start..start+T-1."""
        pos = torch.arange(start, start + T, device=device, dtype=torch.float32)
        return rope_rotation(pos[:, None] * self.inv_freq.float()[None, :], dtype)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        B, T, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        cache = ctx.cache if ctx is not None else None
        past = cache.length if cache is not None else 0
        if self.rope:
            C, S = self.rope_tables(past, T, x.device, q.dtype)
            q, k = apply_rope(q, C, S), apply_rope(k, C, S)
        if cache is not None:
            k, v = cache.extend(k, v)
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        drop = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:  # a chunk of queries after a cached prefix: query i sees keys 0..past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd))

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Causal attention probabilities (B, n_head, T, T) on the (normed) input x, computed
        from the weights as `forward` uses them (no cache: positions 0..T-1)."""
        B, T, _ = x.shape
        hd, nh = self.head_dim, self.n_head
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if self.rope:
            C, S = self.rope_tables(0, T, x.device, q.dtype)
            q, k = apply_rope(q, C, S), apply_rope(k, C, S)
        k = k.repeat_interleave(nh // self.n_kv_head, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~mask, float("-inf")).softmax(-1)


class PlainMLP(nn.Module):
    """M(x) = W₂ σ(W₁ x + b₁) + b₂ (GPT-2: σ = GELU with the tanh approximation)."""

    def __init__(self, n_embd: int, hidden: int, bias: bool = True, activation: str = "gelu"):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.activation = activation

    def forward(self, x):
        return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))


class GatedMLP(nn.Module):
    """M(x) = W_d (σ(W_g x) ⊙ W_u x) (Llama: σ = SiLU, i.e. SwiGLU)."""

    def __init__(self, n_embd: int, hidden: int, bias: bool = False, activation: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.up_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.activation = activation

    def forward(self, x):
        return self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))


class PretrainedField(TransformerField):
    """F(X) = A(N₁(X)) + M(N₂(X)) for an imported block; same terms and hooks as
    `TransformerField` (`attn_term`, `mlp_term`, `term_names = ("attn", "mlp")`)."""

    def __init__(self, ln_1: nn.Module, attn: nn.Module, ln_2: nn.Module, mlp: nn.Module,
                 dropout: float = 0.0):
        nn.Module.__init__(self)
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp
        self.drop = nn.Dropout(dropout)

    @classmethod
    def from_config(cls, m) -> "PretrainedField":
        """The field of one block described by a ModelConfig `m` (family gpt2 or llama)."""
        hidden = m.mlp_hidden or m.mlp_ratio * m.n_embd
        attn = GQAttention(m.n_embd, m.n_head, m.n_kv_head, m.head_dim, m.bias,
                           m.pos_emb == "rope", m.rope_theta, m.dropout)
        if m.model == "llama":
            mlp = GatedMLP(m.n_embd, hidden, m.bias, m.activation)
        else:
            mlp = PlainMLP(m.n_embd, hidden, m.bias, m.activation)
        return cls(make_norm_eps(m.norm, m.n_embd, m.bias, m.norm_eps), attn,
                   make_norm_eps(m.norm, m.n_embd, m.bias, m.norm_eps), mlp, m.dropout)

    def output_projections(self) -> list[nn.Linear]:
        outs = [self.attn.o_proj, getattr(self.mlp, "c_proj", None),
                getattr(self.mlp, "down_proj", None)]
        return [p for p in outs if p is not None]


def build_pretrained(cfg, vocab_size: int | None = None):
    """A FlowLM of family gpt2 or llama from a RunConfig (weights initialised GPT-2 style; an
    import or a checkpoint then overwrites them)."""
    from ..config import ConfigError
    from ..integrators import INTEGRATORS
    from ..integrators.continuous import configure_flow
    from ..model import FlowLM

    m, fl = cfg.model, cfg.flow
    vocab_size = vocab_size or m.vocab_size
    if getattr(fl, "weights", "untied") != "untied" or getattr(fl, "macaron_weights", False):
        raise ConfigError(f"model {m.model} has one set of weights per layer: weights must be "
                          "untied (and macaron_weights off)")
    fields = [PretrainedField.from_config(m) for _ in range(m.n_layer)]
    for f in fields:
        f.init_weights(m.n_layer)
    model = FlowLM(vocab_size, m.n_embd, m.block_size, fields,
                   INTEGRATORS[fl.integrator].from_config(fl),
                   step_size=fl.resolve_step_size(m.n_layer), pos_emb=m.pos_emb, norm=m.norm,
                   bias=m.bias, dropout=m.dropout, tie_head=m.tie_head)
    model.ln_f = make_norm_eps(m.norm, m.n_embd, m.bias, m.norm_eps)
    nn.init.normal_(model.wte.weight, 0.0, 0.02)
    if model.wpe is not None:
        nn.init.normal_(model.wpe.weight, 0.0, 0.02)
    if model.lm_head is not None:
        nn.init.normal_(model.lm_head.weight, 0.0, 0.02)
    return configure_flow(model, cfg)  # learned step sizes, reversible/adaptive solvers
