"""Depth parametrisation as one switch (`--depth-param`), and the models it builds.

- standard:  X ← X + h·A(X); X ← X + h·M(X), h from `step_size` (default 1): pre-norm GPT.
- ode:       the same with h = T/L: depth refines one flow on [0, T] (neural-ODE view).
- sqrt:      the same with h = T/√L, branch scale 1/√L (depth-μP: Yang et al. 2023,
             Bordelon et al. 2023).
- rezero:    X ← X + α_k·A(X); X ← X + β_k·M(X), α_k = β_k = 0 at init, no norms
             (ReZero, Bachlechner et al. 2020).
- post_norm: X ← LN(X + A(X)); X ← LN(X + M(X)), no pre-norms (Vaswani et al. 2017).
- deepnorm:  X ← LN(a·X + A(X)); X ← LN(a·X + M(X)) with a = (2L)^¼ and Xavier init with gain
             b = (8L)^-¼ on the value, output and MLP projections (DeepNet, Wang et al. 2022,
             decoder-only constants).

standard / ode / sqrt only change the step size, so they combine with every integrator and field
(`FlowConfig.resolve_step_size`). rezero swaps the field; post_norm and deepnorm are not pre-norm
flows, so they use their own step (`PostNormSteps`, an `Integrator` that is deliberately *not* in
the integrator registry: it is no discretisation of an ODE and has no order).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import ConfigError
from .fields.transformer import TransformerField
from .integrators.base import Integrator

DEPTH_PARAMS = ("standard", "ode", "sqrt", "rezero", "post_norm", "deepnorm")
VECTOR_FIELDS = ("transformer", "nonexpansive")


class ReZeroField(TransformerField):
    """F = α·Attn(X) + β·MLP(X), no normalisation, α = β = 0 at initialisation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ln_1, self.ln_2 = nn.Identity(), nn.Identity()
        self.gate = nn.Parameter(torch.zeros(2))

    def attn_term(self, x, t=None, ctx=None):
        return self.gate[0] * super().attn_term(x, t, ctx)

    def mlp_term(self, x, t=None, ctx=None):
        return self.gate[1] * super().mlp_term(x, t, ctx)


class PostNormField(TransformerField):
    """Attention and MLP without pre-norms; `ln_1`, `ln_2` are applied after each residual sum by
    `PostNormSteps`: X ← LN_i(a·X + h·F_i(X))."""

    def __init__(self, *args, residual_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.residual_scale = residual_scale

    def attn_term(self, x, t=None, ctx=None):
        return self.drop(self.attn(x, ctx))

    def mlp_term(self, x, t=None, ctx=None):
        return self.drop(self.mlp(x))

    def post_norm(self, i: int, x):
        """LN after term i (attn, mlp); extra terms (e.g. steering forces) get no norm."""
        return (self.ln_1, self.ln_2)[i](x) if i < 2 else x

    def deepnorm_init(self, beta: float) -> None:
        """DeepNet init: Xavier-normal, gain β on value, output projection and MLP, 1 on Q, K."""
        C = self.attn.n_embd
        with torch.no_grad():
            w = self.attn.c_attn.weight  # rows: q, k, v
            for part, gain in zip(range(3), (1.0, 1.0, beta)):
                nn.init.xavier_normal_(w[part * C:(part + 1) * C], gain=gain)
            for lin in (self.attn.c_proj, self.mlp.c_fc, self.mlp.c_proj):
                nn.init.xavier_normal_(lin.weight, gain=beta)


class PostNormSteps(Integrator):
    """X ← LN_i(a·X + h·F_i(X)) for each term i of a `PostNormField` (a = residual_scale)."""

    name, order = "post_norm", 0

    def step(self, field, t, h, x):
        module = field.module
        for i, term in enumerate(field.terms):
            a = module.residual_scale if i < 2 else 1.0
            x = module.post_norm(i, a * x + h * term(x, t))
        return x


def build_variant_model(cfg, vocab_size: int):
    """FlowLM for the configurations the plain builder does not cover: depth_param rezero,
    post_norm, deepnorm, or vector_field nonexpansive."""
    from .fields.lipschitz import NonExpansiveField
    from .integrators import INTEGRATORS
    from .model import FlowLM

    m, fl = cfg.model, cfg.flow
    L, dp = m.n_layer, fl.depth_param
    h = fl.resolve_step_size(L)
    what = f"depth_param {dp}" if m.vector_field == "transformer" else "vector_field nonexpansive"
    for key, default in (("weights", "untied"), ("learn_step_size", False), ("adaptive", ""),
                         ("reversible", False)):
        if getattr(fl, key, default) != default:
            raise ConfigError(f"{what} supports only {key} = {default!r}")
    integrator = INTEGRATORS[fl.integrator].from_config(fl)
    if m.vector_field == "nonexpansive":
        if dp not in ("standard", "ode", "sqrt"):
            raise ConfigError(f"vector_field nonexpansive needs depth_param standard, ode or "
                              f"sqrt (got {dp!r})")
        if h > 1:
            raise ConfigError(f"vector_field nonexpansive needs a step size h <= 1, got {h:g}; "
                              f"use --depth-param ode")
        k = m.expansive_every
        fields = [NonExpansiveField(m.n_embd, m.n_head, m.mlp_ratio, m.block_size, h,
                                    expansive=bool(k) and (i % k == k - 1), seed=7 * i)
                  for i in range(L)]
        for f in fields:  # same N(0, 0.02) draws as the transformer field, from the global RNG
            for p in (f.attn.w_q, f.attn.w_v, f.attn.w_o, f.mlp.weight):
                nn.init.normal_(p, 0.0, 0.02)
    elif dp == "rezero":
        fields = [ReZeroField(m.n_embd, m.n_head, m.mlp_ratio, m.bias, m.pos_emb == "rope",
                              m.dropout, m.norm) for _ in range(L)]
        for f in fields:
            f.init_weights(L)
    elif dp in ("post_norm", "deepnorm"):
        if fl.integrator != "lie_trotter":
            raise ConfigError(f"depth_param {dp} is a Lie–Trotter-ordered post-norm step; "
                              f"it needs integrator lie_trotter (got {fl.integrator!r})")
        a = (2 * L) ** 0.25 if dp == "deepnorm" else 1.0
        fields = [PostNormField(m.n_embd, m.n_head, m.mlp_ratio, m.bias, m.pos_emb == "rope",
                                m.dropout, m.norm, residual_scale=a) for _ in range(L)]
        for f in fields:
            f.init_weights(L)
            if dp == "deepnorm":
                f.deepnorm_init((8 * L) ** -0.25)
        integrator = PostNormSteps()
    else:
        raise ConfigError(f"no variant builder for depth_param {dp!r}")
    return FlowLM(vocab_size, m.n_embd, m.block_size, fields, integrator, step_size=h,
                  pos_emb=m.pos_emb, norm=m.norm, bias=m.bias, dropout=m.dropout)
