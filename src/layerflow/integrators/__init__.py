"""Integrators over layer-time. Add one by writing a class and decorating it with `@register`."""

from .base import INTEGRATORS, BoundField, Integrator, get_integrator, integrate, register
from .splitting import ExplicitEuler, LieTrotter, MacaronSplitting, StrangSplitting
from .symplectic import Leapfrog, Momentum, PositionVerlet, SecondOrderIntegrator, SymplecticEuler
from .tableau import ButcherTableau, ExplicitRungeKutta, Heun, Midpoint, RungeKutta4, TableauError

__all__ = [
    "INTEGRATORS", "BoundField", "Integrator", "get_integrator", "integrate", "register",
    "ExplicitEuler", "LieTrotter",
    "MacaronSplitting", "StrangSplitting", "Leapfrog", "Momentum", "PositionVerlet",
    "SecondOrderIntegrator", "SymplecticEuler", "ButcherTableau", "ExplicitRungeKutta", "Heun",
    "Midpoint", "RungeKutta4", "TableauError",
]
