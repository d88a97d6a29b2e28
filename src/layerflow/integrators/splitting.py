"""Euler and operator-splitting schemes for a field with terms F = F₁ + … + F_m.

Splitting advances one term at a time. Lie–Trotter (one Euler substep per term, in order) is
first order and, with F = A + M and h = 1, exactly the pre-norm GPT block. Strang splitting
(Strang, SIAM J. Numer. Anal. 1968) is the symmetric composition

    Φ_h = φ^M_{h/2} ∘ φ^A_h ∘ φ^M_{h/2}

which is second order *when every sub-flow φ is solved to second order*; the Macaron layer
(Lu et al., "Understanding and Improving Transformer From a Multi-Particle Dynamic System
Point of View", 2019) is this schedule with one explicit-Euler substep per sub-flow, which is
only first order (its h² term misses ½A'A and ¼M'M). We register both:

- `strang`: every sub-flow advanced by the explicit midpoint rule (order 2; per step 2
  attention and 4 MLP evaluations);
- `macaron`: Euler substeps, exactly Macaron Net's ½MLP → attention → ½MLP block (order 1).

Time: the non-autonomous field is split on the augmented state (X, τ), τ' = 1 carried by the
outermost term, so the outer half steps cover [t, t+h/2] and [t+h/2, t+h] and the inner terms
are frozen at t + h/2 (this keeps Strang second order for fields that depend on t).

Macaron with *separate* weights for the two half steps (`fields.macaron.MacaronField`, terms
(½M_a, A, ½M_b), F = A + ½(M_a + M_b)) is handled by the schedule ½M_a for h, A for h, ½M_b for
h; it equals the tied Strang step when M_a = M_b and is first-order consistent otherwise.
"""

from __future__ import annotations

from .base import Integrator, register
from .tableau import EULER, ExplicitRungeKutta


@register
class ExplicitEuler(ExplicitRungeKutta):
    """X ← X + h·F(X, t). On F = A + M this is the parallel block (GPT-J). Order 1."""

    name, tableau = "euler", EULER


@register
class LieTrotter(Integrator):
    """X ← X + h·F₁(X); X ← X + h·F₂(X); … (Euler substeps in sequence). Order 1.

    With F = A + M and h = 1 this is exactly the pre-norm GPT block."""

    name, order = "lie_trotter", 1

    def step(self, field, t, h, x):
        unit = isinstance(h, float) and h == 1.0  # 1·y == y exactly: skip one op per term
        for term in field.terms:
            x = x + term(x, t) if unit else x + h * term(x, t)
        return x


def strang_schedule(field, t, h):
    """[(term, duration, τ at start, dτ/d(duration))] of one symmetric splitting step."""
    terms = field.terms
    if getattr(getattr(field, "module", None), "macaron", False) and len(terms) == 3:
        pre, inner, post = terms
        return [(pre, h, t, 0.5), (inner, h, t + h / 2, 0.0), (post, h, t + h / 2, 0.5)]
    inner, outer = terms[0], list(terms[1:])
    mid = t + h / 2
    first = [(f, h / 2, t if i == 0 else mid, 1.0 if i == 0 else 0.0)
             for i, f in enumerate(reversed(outer))]
    # first[0] is the outermost term: it carries τ over [t, t+h/2]; the others are frozen.
    return first + [(inner, h, mid, 0.0)] + [
        (f, h / 2, mid, 1.0 if i == len(outer) - 1 else 0.0) for i, f in enumerate(outer)
    ]


class _Splitting(Integrator):
    substep_order = 1

    def step(self, field, t, h, x):
        for term, dur, tau, rate in strang_schedule(field, t, h):
            if self.substep_order == 1:
                x = x + dur * term(x, tau)
            else:  # explicit midpoint on the sub-flow
                x = x + dur * term(x + (dur / 2) * term(x, tau), tau + rate * dur / 2)
        return x


@register
class StrangSplitting(_Splitting):
    """Strang splitting ½M → A → ½M with midpoint-rule substeps. Order 2."""

    name, order, substep_order = "strang", 2, 2


@register
class MacaronSplitting(_Splitting):
    """Macaron block X += h/2·M(X); X += h·A(X); X += h/2·M(X) (Euler substeps). Order 1."""

    name, order, substep_order = "macaron", 1, 1
