"""Macaron field: separate MLP weights for the two half steps of a Strang/Macaron step.

    F(X) = ½ M_a(X) + A(X) + ½ M_b(X),   terms (½M_a, A, ½M_b)

(Lu et al., "Understanding and Improving Transformer From a Multi-Particle Dynamic System Point
of View", 2019: FFN(½) → attention → FFN(½) with two FFNs). `strang`/`macaron` integrators see
`macaron = True` and advance ½M_a, A, ½M_b each for the whole step (= M_a for h/2, A for h, M_b
for h/2). Every other integrator simply sees a three-term field F.
"""

from __future__ import annotations

from .transformer import MLP, TransformerField, make_norm


class MacaronField(TransformerField):
    term_names = ("mlp_a", "attn", "mlp_b")
    macaron = True

    def __init__(self, n_embd: int, n_head: int, mlp_ratio: int = 4, bias: bool = True,
                 rope: bool = False, dropout: float = 0.0, norm: str = "layernorm"):
        super().__init__(n_embd, n_head, mlp_ratio, bias, rope, dropout, norm)
        self.ln_3 = make_norm(norm, n_embd, bias)
        self.mlp_b = MLP(n_embd, mlp_ratio * n_embd, bias)

    def mlp_a_term(self, x, t=None, ctx=None):
        return 0.5 * self.drop(self.mlp(self.ln_2(x)))

    def mlp_b_term(self, x, t=None, ctx=None):
        return 0.5 * self.drop(self.mlp_b(self.ln_3(x)))

    def forward(self, x, t=None, ctx=None):
        return self.mlp_a_term(x, t, ctx) + self.attn_term(x, t, ctx) + self.mlp_b_term(x, t, ctx)

    def terms(self):
        return (self.mlp_a_term, self.attn_term, self.mlp_b_term)

    def output_projections(self):
        return super().output_projections() + [self.mlp_b.c_proj]
