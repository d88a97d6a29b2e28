"""Named hook points and trajectory caches.

Every step and substep of the flow is a named point: `embed`, `flow.step.{k}.attn`,
`flow.step.{k}.mlp` (the field's term outputs, once per evaluation), `flow.step.{k}.state` (the
state after step k; `flow.step.{k}.velocity` for schemes on (X, V)), `final` (the normed state
fed to the head). A hook is `fn(value, name) -> value | None`; returning a tensor replaces the
value (term outputs and `embed` only). Hooks are attached with a context manager, so they never
leak past the `with` block, and the model itself is never edited.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager


class FlowContext:
    """Per-forward state shared by the flow: the KV cache and the active hooks."""

    def __init__(self, cache=None, hooks=None, terms=None):
        self.cache = cache
        self.hooks = hooks or []  # list of (pattern, fn)
        # extra vector-field terms (name, fn(x, t, ctx)) appended to every step's field, e.g.
        # constraint forces −λ∇E_c (steering.py); integrators see them in `field.terms`
        self.terms = list(terms or [])
        self.bound: dict = {}  # step k -> its BoundField, built once per context (flow loops)

    def emit(self, name: str, value):
        for pattern, fn in self.hooks:
            if pattern == name or fnmatch.fnmatchcase(name, pattern):
                out = fn(value, name)
                if out is not None:
                    value = out
        return value

    def emit_state(self, k: int, state, integrator):
        if not self.hooks:
            return
        if isinstance(state, tuple):
            self.emit(f"flow.step.{k}.state", state[0])
            self.emit(f"flow.step.{k}.velocity", state[1])
        else:
            self.emit(f"flow.step.{k}.state", state)


@contextmanager
def hooks(model, mapping: dict):
    """`with hooks(model, {"flow.step.*.attn": fn}): model(idx)` — hooks live only in the block."""
    added = list(mapping.items())
    model._hooks.extend(added)
    try:
        yield model
    finally:
        for item in added:
            model._hooks.remove(item)


class Trajectory(dict):
    """name -> tensor (or list of tensors when a point fires several times) of one forward."""

    def states(self):
        """States X_0 (embedding) .. X_L over layer-time, stacked: (L+1, B, T, d)."""
        import torch

        ks = sorted(int(n.split(".")[2]) for n in self if n.endswith(".state"))
        return torch.stack([self["embed"]] + [self[f"flow.step.{k}.state"] for k in ks])

    def record(self, value, name):
        """A hook that keeps a detached copy of `value` (a list once `name` fires twice)."""
        v = value.detach()
        if name in self:
            prev = self[name]
            self[name] = (prev if isinstance(prev, list) else [prev]) + [v]
        else:
            self[name] = v


def run_with_trajectory(model, idx, pattern: str = "*", **kwargs):
    """Run `model(idx)` and cache every hook point matching `pattern`.

    Returns (logits, Trajectory)."""
    cache = Trajectory()
    with hooks(model, {pattern: cache.record}):
        logits, _ = model(idx, **kwargs)
    return logits, cache
