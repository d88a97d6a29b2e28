"""The integrator interface and the flow loop, written once.

An integrator is a small object with a declared `order` and a pure
`step(field, t, h, state) -> state`. The field is seen only as `field(x, t)` (the full vector
field) and `field.terms` (its split parts, e.g. attention and MLP). Schemes on an extended state
(e.g. position and velocity) override `init_state` and `output`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

INTEGRATORS: dict[str, type["Integrator"]] = {}


def register(cls):
    """Class decorator: make an integrator selectable by `cls.name` from config and CLI."""
    INTEGRATORS[cls.name] = cls
    return cls


def get_integrator(name: str, **kwargs) -> "Integrator":
    try:
        return INTEGRATORS[name](**kwargs)
    except KeyError:
        raise ValueError(
            f"unknown integrator {name!r}; choose one of: {', '.join(sorted(INTEGRATORS))}"
        ) from None


class Integrator(ABC):
    name: str = ""
    order: int = 1

    def init_state(self, x):
        return x

    def output(self, state):
        return state

    @abstractmethod
    def step(self, field, t, h, state):
        """One step of size h from time t."""

    @classmethod
    def from_config(cls, flow_cfg) -> "Integrator":
        """An instance configured from a FlowConfig (schemes with parameters override this)."""
        return cls()

    def __repr__(self):
        return f"{type(self).__name__}()"


class BoundField:
    """A field module bound to one step: its terms emit named hook points `{prefix}.{term}`."""

    def __init__(self, module, ctx=None, prefix: str = ""):
        self.module, self.ctx, self.prefix = module, ctx, prefix
        names = getattr(module, "term_names", None)
        fns = module.terms() if hasattr(module, "terms") else (module,)
        names = names or tuple(f"term{i}" for i in range(len(fns)))
        extra = tuple(getattr(ctx, "terms", None) or ())  # e.g. constraint forces (steering.py)
        names = tuple(names) + tuple(n for n, _ in extra)
        fns = tuple(fns) + tuple(f for _, f in extra)
        self.terms = tuple(self._wrap(n, f) for n, f in zip(names, fns))

    def _wrap(self, name, fn):
        ctx, hook = self.ctx, f"{self.prefix}.{name}"
        if ctx is None or not ctx.hooks:  # nothing listens (e.g. cached decoding): no emit
            return lambda x, t: fn(x, t, ctx)

        def term(x, t):
            return ctx.emit(hook, fn(x, t, ctx))

        return term

    def __call__(self, x, t):
        out = None
        for term in self.terms:
            out = term(x, t) if out is None else out + term(x, t)
        return out


def integrate(integrator: Integrator, field_at, step_sizes, x, ctx=None, t0: float = 0.0):
    """Run the flow: state_{k+1} = integrator.step(field_k, t_k, h_k, state_k).

    `field_at(k)` returns the (bound) field of step k; `step_sizes` is a sequence of h_k.
    Emits `flow.step.{k}.state` after every step when a context is given."""
    state = integrator.init_state(x)
    t = t0
    for k, h in enumerate(step_sizes):
        state = integrator.step(field_at(k), t, h, state)
        if ctx is not None:
            ctx.emit_state(k, state, integrator)
        t = t + h
    return integrator.output(state)
