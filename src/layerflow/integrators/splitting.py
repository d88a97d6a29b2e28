"""Euler and operator-splitting schemes for a field with terms F = F₁ + … + F_m."""

from __future__ import annotations

from .base import Integrator, register


@register
class ExplicitEuler(Integrator):
    """X ← X + h·F(X, t). On F = A + M this is the parallel block (GPT-J). Order 1."""

    name, order = "euler", 1

    def step(self, field, t, h, x):
        return x + h * field(x, t)


@register
class LieTrotter(Integrator):
    """X ← X + h·F₁(X); X ← X + h·F₂(X); … (Euler substeps in sequence). Order 1.

    With F = A + M and h = 1 this is exactly the pre-norm GPT block."""

    name, order = "lie_trotter", 1

    def step(self, field, t, h, x):
        for term in field.terms:
            x = x + h * term(x, t)
        return x
