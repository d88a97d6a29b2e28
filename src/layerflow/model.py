"""FlowLM: embed → integrate the field over layer-time → norm → tied unembedding.

    X_0 = s·(E[tokens] (+ P[positions]))        (s = embed_scale, 1 by default)
    X_{k+1} = integrator.step(F_k, t_k, h_k, X_k),  k = 0..L-1,  t_k = Σ_{j<k} h_j
    logits = Norm(X_L) Eᵀ

With `LieTrotter`, h = 1 and one `TransformerField` per step this is exactly nanoGPT's GPT.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fields.transformer import KVCache, make_norm
from .hooks import FlowContext
from .integrators import INTEGRATORS, BoundField, Integrator, integrate
from .integrators.continuous import configure_flow, make_fields
from .speed import cpu_settings_restored, small_ops


class FlowLM(nn.Module):
    def __init__(self, vocab_size: int, n_embd: int, block_size: int, fields, integrator:
                 Integrator, step_size: float = 1.0, pos_emb: str = "learned",
                 norm: str = "layernorm", bias: bool = True, dropout: float = 0.0,
                 n_steps: int | None = None, tie_head: bool = True, embed_scale: float = 1.0):
        """`fields`: one module per step (untied), or a single module shared by all `n_steps`
        steps (tied: an autonomous ODE, or smooth in t if the module uses t).
        `tie_head=False` gives the unembedding its own matrix `lm_head` (e.g. imported Llamas).
        `embed_scale` s multiplies the input: X_0 = s·(E[tok] + P[pos])."""
        super().__init__()
        fields = list(fields) if isinstance(fields, (list, tuple, nn.ModuleList)) else [fields]
        self.vocab_size, self.n_embd, self.block_size = vocab_size, n_embd, block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd) if pos_emb == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.embed_scale = float(embed_scale)
        self.fields = nn.ModuleList(fields)
        self.integrator = integrator
        self.n_steps = n_steps or len(fields)
        if len(fields) not in (1, self.n_steps):
            raise ValueError(f"{len(fields)} fields for {self.n_steps} steps")
        self.step_size = float(step_size)
        self.ln_f = make_norm(norm, n_embd, bias)
        self.lm_head = None if tie_head else nn.Linear(n_embd, vocab_size, bias=False)
        self._hooks: list = []
        # set by integrators/continuous.py when configured; plain None attributes until then, so
        # reading them never takes nn.Module's raising __getattr__ path (once per forward)
        self.solver = None  # reversible / adaptive / jittered steps
        self.raw_step_size = None  # learnable h_k = softplus(θ_k)

    # ------------------------------------------------------------------ the flow
    def step_sizes(self):
        raw = self.raw_step_size
        if raw is not None:
            return list(F.softplus(raw).unbind())
        return [self.step_size] * self.n_steps

    def field_module(self, k: int) -> nn.Module:
        return self.fields[k] if len(self.fields) > 1 else self.fields[0]

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.wte(idx)
        if self.wpe is not None:  # rows start.. of the table: the lookup of those positions
            x = x + self.wpe.weight.narrow(0, start, idx.shape[1])
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        return self.drop(x) if self.training and self.drop.p else x

    def flow(self, x: torch.Tensor, ctx: FlowContext | None = None) -> torch.Tensor:
        solver = self.solver
        if solver is not None:
            out = solver(self, x, ctx)
            if out is not None:
                return out
        def field_at(k):
            if ctx is None:
                return BoundField(self.field_module(k), None, f"flow.step.{k}")
            if k not in ctx.bound:
                ctx.bound[k] = BoundField(self.field_module(k), ctx, f"flow.step.{k}")
            return ctx.bound[k]

        return integrate(self.integrator, field_at, self.step_sizes(), x, ctx)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Unembedding: logits = x Eᵀ with the embedding matrix (tied), or x Wᵀ with the own
        `lm_head` matrix W when untied (x already normed)."""
        if self.lm_head is not None:
            return self.lm_head(x)
        return F.linear(x, self.wte.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False, constraints=None):
        """Returns (logits, loss). With a cache, `idx` holds only the new tokens.
        `constraints`: energies E_c whose forces −λ∇E_c join the field at every step
        (steering.py)."""
        if idx.shape[1] + (cache.length if cache else 0) > self.block_size:
            raise ValueError(f"sequence longer than block_size {self.block_size}")
        terms = None
        if constraints:
            from .steering import constraint_terms

            terms = constraint_terms(self, constraints)
        if cache is not None and not self._hooks and not terms:
            ctx = cache.context()
        else:
            ctx = FlowContext(cache, self._hooks, terms) if (self._hooks or terms) else None
        if cache is not None:
            cache.begin()
        x = self.embed(idx, cache.length if cache else 0)
        if ctx is not None:
            x = ctx.emit("embed", x)
        x = self.flow(x, ctx)
        x = self.ln_f(x)
        if ctx is not None:
            x = ctx.emit("final", x)
        if cache is not None:
            cache.end(idx.shape[1])
        if last_only and targets is None and x.shape[1] > 1:
            x = x[:, -1:]
        logits = self.head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, constraints=None) -> torch.Tensor:
        """Sample `max_new_tokens` tokens after `idx` (B, T). `constraints`: a list of
        constraint energies (steering.py) added to the dynamics while sampling.

        Context policy (identical with and without the cache, so both give the same tokens):
        the model sees tokens[start:]; when that exceeds block_size, start jumps forward so the
        newest block_size//2 tokens remain (the cache is then rebuilt from them)."""
        if constraints:
            from .steering import generate_constrained

            return generate_constrained(self, idx, max_new_tokens, temperature, top_k, use_cache,
                                        generator, constraints)
        if not getattr(getattr(self, "solver", None), "supports_cache", True):
            use_cache = False  # adaptive solves: no exact KV cache (integrators/adaptive.py)
        n0 = idx.shape[1]
        tokens = idx.new_empty(idx.shape[0], n0 + max_new_tokens)  # written in place, no cat
        tokens[:, :n0] = idx
        start, cache = 0, None
        small = idx.shape[0] == 1 and idx.device.type == "cpu"  # decode steps of tiny ops
        with cpu_settings_restored() as (threads, onednn), torch.inference_mode():
            for n in range(n0, n0 + max_new_tokens):  # inference mode: ~25 % less per token
                if n - start > self.block_size:
                    start = n - max(self.block_size // 2, 1)
                    cache = None
                if use_cache and cache is not None:
                    small_ops(small, threads, onednn)
                    logits, _ = self(tokens.narrow(1, n - 1, 1), cache=cache, last_only=True)
                else:
                    small_ops(False, threads, onednn)
                    cache = KVCache() if use_cache else None
                    logits, _ = self(tokens[:, start:n], cache=cache, last_only=True)
                next_token = sample_next(logits.select(1, -1), temperature, top_k, generator)
                tokens.narrow(1, n, 1).copy_(next_token)
        return tokens

    def lipschitz_bound(self):
        """Upper bound of the flow map's Lipschitz constant (X_0 ↦ X_L, ℓ₂ per sequence) from its
        components, per step and composed: a `constraints.Certificate`, or None when the model
        has no bound (dot-product attention and LayerNorm are not globally Lipschitz)."""
        from .constraints import flow_certificate

        return flow_certificate(self)

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    # inverse-CDF sampling: index of the first cumulative probability above u·total, u ~ U[0, 1)
    # (an exact sampler, like `torch.multinomial`, at a quarter of its cost for one row)
    cdf = F.softmax(logits, dim=-1).double().cumsum(-1)
    total = cdf[:, -1:]
    if not bool((total > 0).all()):  # NaN from nan/inf logits or all masked: no valid token
        raise RuntimeError("sampling: the next-token probabilities contain nan or inf "
                           "(non-finite logits)")
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device, generator=generator)
    return torch.searchsorted(cdf, u * total, right=True)


def build_model(cfg, vocab_size: int | None = None) -> FlowLM:
    """FlowLM from a RunConfig (strings resolved through the registries here, once)."""
    m, fl = cfg.model, cfg.flow
    vocab_size = vocab_size or m.vocab_size
    if m.model in ("gpt2", "llama"):  # imported architectures (see hf.py)
        from .fields.pretrained import build_pretrained

        return build_pretrained(cfg, vocab_size)
    if m.model == "energy":  # causal Energy Transformer (issue 5, energy_lm.py)
        from .energy_lm import build_energy_model

        return build_energy_model(cfg, vocab_size)
    if m.vector_field != "transformer" or fl.depth_param in ("rezero", "post_norm", "deepnorm"):
        from .depth_params import build_variant_model  # issue 4: stability variants

        model = build_variant_model(cfg, vocab_size)
        nn.init.normal_(model.wte.weight, 0.0, 0.02)
        if model.wpe is not None:
            nn.init.normal_(model.wpe.weight, 0.0, 0.02)
        return model
    fields = make_fields(cfg)  # untied / tied / smooth weights in time (integrators/continuous.py)
    model = FlowLM(vocab_size, m.n_embd, m.block_size, fields,
                   INTEGRATORS[fl.integrator].from_config(fl), n_steps=m.n_layer,
                   step_size=fl.resolve_step_size(m.n_layer), pos_emb=m.pos_emb, norm=m.norm,
                   bias=m.bias, dropout=m.dropout, tie_head=m.tie_head, embed_scale=m.embed_scale)
    nn.init.normal_(model.wte.weight, 0.0, 0.02)
    if model.lm_head is not None:
        nn.init.normal_(model.lm_head.weight, 0.0, 0.02)
    if model.wpe is not None:
        nn.init.normal_(model.wpe.weight, 0.0, 0.02)
    return configure_flow(model, cfg)
