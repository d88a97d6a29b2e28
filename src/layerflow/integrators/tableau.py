"""Explicit Runge–Kutta methods from Butcher tableaux that check themselves.

An s-stage explicit Runge–Kutta step for dX/dt = F(X, t) is

    K_i = F(X + h Σ_{j<i} a_ij K_j,  t + c_i h),   i = 1..s
    X  ← X + h Σ_i b_i K_i

(Butcher, "Numerical Methods for Ordinary Differential Equations", 2016, ch. 3). On the
transformer field F = A + M every stage reuses the *same* weights of the step, as in the
ODE Transformer (Li et al., ACL 2022): RK2/RK4 blocks cost 2/4 field evaluations per step.

`ButcherTableau` verifies on construction: the row-sum condition c_i = Σ_j a_ij, Σ_i b_i = 1,
explicitness (A strictly lower triangular), and the order conditions (one per rooted tree, up
to order 4) for its declared order:

    p ≥ 1: Σ b_i = 1
    p ≥ 2: Σ b_i c_i = 1/2
    p ≥ 3: Σ b_i c_i² = 1/3,   Σ b_i a_ij c_j = 1/6
    p ≥ 4: Σ b_i c_i³ = 1/4,   Σ b_i c_i a_ij c_j = 1/8,   Σ b_i a_ij c_j² = 1/12,
           Σ b_i a_ij a_jk c_k = 1/24
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Integrator, register

_TOL = 1e-12


class TableauError(ValueError):
    """A Butcher tableau violates a consistency or order condition (the message says which)."""


def _dot(u, v):
    return sum(x * y for x, y in zip(u, v))


def _matvec(a, v):
    return [_dot(row, v) for row in a]


@dataclass(frozen=True)
class ButcherTableau:
    """Coefficients (A, b, c) of an explicit Runge–Kutta method of declared `order` (≤ 4)."""

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int

    def __post_init__(self):
        s = len(self.b)
        if s == 0 or len(self.c) != s or len(self.a) != s or any(len(r) != s for r in self.a):
            raise TableauError(f"{self.name}: A must be {s}x{s} and c of length {s}")
        for i, row in enumerate(self.a):
            if any(abs(row[j]) > _TOL for j in range(i, s)):
                raise TableauError(f"{self.name}: not explicit (A must be strictly lower "
                                   f"triangular; row {i} has a nonzero on/above the diagonal)")
            if abs(sum(row) - self.c[i]) > _TOL:
                raise TableauError(f"{self.name}: row-sum condition c_{i} = Σ_j a_{i}j fails "
                                   f"({self.c[i]} != {sum(row)})")
        if not 1 <= self.order <= 4:
            raise TableauError(f"{self.name}: order conditions are checked up to 4, "
                               f"got order {self.order}")
        for cond, lhs, rhs in self.order_conditions():
            if abs(lhs - rhs) > _TOL:
                raise TableauError(f"{self.name}: order condition {cond} = {rhs} fails "
                                   f"(got {lhs})")

    @property
    def stages(self) -> int:
        return len(self.b)

    def order_conditions(self):
        """(name, value, required value) for every rooted tree up to the declared order."""
        a, b, c = self.a, self.b, self.c
        ac = _matvec(a, c)
        out = [("Σb", sum(b), 1.0)]
        if self.order >= 2:
            out.append(("Σbc", _dot(b, c), 1 / 2))
        if self.order >= 3:
            out += [("Σbc²", _dot(b, [x * x for x in c]), 1 / 3),
                    ("ΣbAc", _dot(b, ac), 1 / 6)]
        if self.order >= 4:
            out += [("Σbc³", _dot(b, [x ** 3 for x in c]), 1 / 4),
                    ("Σb·c·Ac", _dot(b, [x * y for x, y in zip(c, ac)]), 1 / 8),
                    ("ΣbAc²", _dot(b, _matvec(a, [x * x for x in c])), 1 / 12),
                    ("ΣbAAc", _dot(b, _matvec(a, ac)), 1 / 24)]
        return out


EULER = ButcherTableau("euler", ((0.0,),), (1.0,), (0.0,), 1)
MIDPOINT = ButcherTableau("midpoint", ((0.0, 0.0), (0.5, 0.0)), (0.0, 1.0), (0.0, 0.5), 2)
HEUN = ButcherTableau("heun", ((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), (0.0, 1.0), 2)
RK4 = ButcherTableau(
    "rk4",
    ((0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0), (0.0, 0.5, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0)),
    (1 / 6, 1 / 3, 1 / 3, 1 / 6), (0.0, 0.5, 0.5, 1.0), 4,
)


class ExplicitRungeKutta(Integrator):
    """Generic explicit RK step driven by `tableau`; subclasses only set name and tableau.

    Zero coefficients are skipped, so Euler's single stage is exactly X + h·F(X, t)."""

    tableau: ButcherTableau = EULER

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.order = cls.tableau.order

    def step(self, field, t, h, x):
        tab = self.tableau
        ks = []
        for i in range(tab.stages):
            xi = x
            for j in range(i):
                if tab.a[i][j] != 0.0:
                    xi = xi + (h * tab.a[i][j]) * ks[j]
            ks.append(field(xi, t + tab.c[i] * h) if tab.c[i] else field(xi, t))
        out = None
        for bi, k in zip(tab.b, ks):
            if bi != 0.0:
                out = bi * k if out is None else out + bi * k
        return x + h * out if tab.stages > 1 else x + h * ks[0]


@register
class Midpoint(ExplicitRungeKutta):
    """Explicit midpoint: X ← X + h·F(X + h/2·F(X, t), t + h/2). Order 2, 2 evaluations."""

    name, tableau = "midpoint", MIDPOINT


@register
class Heun(ExplicitRungeKutta):
    """Heun (explicit trapezoid, RK2 of ODE Transformer): K₁ = F(X), K₂ = F(X + hK₁);
    X ← X + h/2·(K₁ + K₂). Order 2, 2 evaluations."""

    name, tableau = "heun", HEUN


@register
class RungeKutta4(ExplicitRungeKutta):
    """Classical RK4 (the RK4 block of ODE Transformer). Order 4, 4 evaluations."""

    name, tableau = "rk4", RK4
