"""Integrators over layer-time. Add one by writing a class and decorating it with `@register`."""

from .base import INTEGRATORS, BoundField, Integrator, get_integrator, integrate, register
from .splitting import ExplicitEuler, LieTrotter

__all__ = [
    "INTEGRATORS", "BoundField", "Integrator", "get_integrator", "integrate", "register",
    "ExplicitEuler", "LieTrotter",
]
