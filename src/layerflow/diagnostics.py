"""Gradient and signal diagnostics over layer-time.

For the states X_0 (embedding), X_1, …, X_L (after each step) of one training forward:

    state_norm[k] = ‖X_k‖_F / √(B·T)          (root-mean-square token norm)
    state_grad[k] = ‖∂loss/∂X_k‖_F              (backpropagated signal; vanishing/exploding
                                                 gradients show as a trend in k)
    grad_ratio    = state_grad[0] / state_grad[L]
    weight_grad[k] = ‖∂loss/∂θ_k‖ and update_ratio[k] = ‖Δθ_k‖/‖θ_k‖ for the weights of step k

The states are captured through the hook points `embed` and `flow.step.{k}.state` (hooks.py) with
`retain_grad`, so the model is never edited. `Diagnostics` does this every `diag_interval` steps
inside `train()` and writes one `kind=diag` line to metrics.jsonl; it prints a one-line warning
(once per run) when grad_ratio leaves [1e-2, 1e2].
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager

import torch

from .hooks import hooks

RATIO_RANGE = (1e-2, 1e2)


class StateProbe:
    """Hook that keeps X_0..X_L of one forward and retains their gradients."""

    def __init__(self):
        self.states: dict[int, torch.Tensor] = {}

    def __call__(self, value, name):
        k = -1 if name == "embed" else int(name.split(".")[2])
        if value.requires_grad:
            value.retain_grad()
        self.states[k] = value

    @contextmanager
    def attach(self, model):
        with hooks(model, {"embed": self, "flow.step.*.state": self}):
            yield self

    def ordered(self) -> list[torch.Tensor]:
        return [self.states[k] for k in sorted(self.states)]

    def norms(self) -> list[float]:
        out = []
        for x in self.ordered():
            tokens = x.numel() // x.shape[-1]
            out.append(float(x.detach().float().norm()) / math.sqrt(max(tokens, 1)))
        return out

    def grad_norms(self) -> list[float]:
        return [float(x.grad.float().norm()) if x.grad is not None else float("nan")
                for x in self.ordered()]


def state_gradient_norms(model, idx, targets) -> dict:
    """One forward/backward (gradients of the weights are left in `.grad`): the state norms,
    state-gradient norms over k = 0..L, and grad_ratio = state_grad[0]/state_grad[L]."""
    probe = StateProbe()
    with probe.attach(model):
        _, loss = model(idx, targets)
    loss.backward()
    g = probe.grad_norms()
    return {"loss": loss.item(), "state_norm": probe.norms(), "state_grad": g,
            "grad_ratio": g[0] / g[-1] if g[-1] > 0 else float("inf")}


def step_parameters(model) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters of each field module (one list per step, or one if tied)."""
    return [[p for p in f.parameters() if p.requires_grad] for f in model.fields]


def _norm(tensors) -> float:
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([t.float().norm() for t in tensors])))


class Diagnostics:
    """Used by `train()`: `with diag.forward(it): loss = …`, then `diag.before_step(it)` after
    backward and `diag.after_step(it)` after the optimizer step, which returns the record (or
    None when `it` is not a diagnostics step)."""

    def __init__(self, model, interval: int, stream=None):
        self.model = getattr(model, "module", model)  # unwrap DDP
        self.interval, self.stream = interval, stream
        self.probe: StateProbe | None = None
        self.before: list[list[torch.Tensor]] | None = None
        self.rec: dict | None = None
        self.warned = False

    def due(self, it: int) -> bool:
        return self.interval > 0 and it % self.interval == 0

    @contextmanager
    def forward(self, it: int):
        if not self.due(it):
            yield
            return
        self.probe = StateProbe()
        with self.probe.attach(self.model):
            yield

    def before_step(self, it: int) -> str | None:
        """After backward: read the gradients. Returns an error message when a state or weight
        gradient is not finite (the caller stops and keeps the last good checkpoint)."""
        if self.probe is None:
            return None
        params = step_parameters(self.model)
        g = self.probe.grad_norms()
        wg = [_norm([p.grad for p in ps]) for ps in params]
        self.rec = {"kind": "diag", "iter": it, "state_norm": self.probe.norms(),
                    "state_grad": g, "weight_grad": wg,
                    "grad_ratio": g[0] / g[-1] if g[-1] > 0 else float("inf")}
        self.before = [[p.detach().clone() for p in ps] for ps in params]
        self.probe = None
        bad = [k for k, v in enumerate(g + wg) if not math.isfinite(v)]
        if bad:
            where = "state" if bad[0] < len(g) else "weight"
            return (f"stopped: non-finite {where} gradient at iteration {it}; "
                    f"the last good checkpoint is kept")
        return None

    @torch.no_grad()
    def after_step(self, it: int) -> dict | None:
        if self.rec is None:
            return None
        rec, self.rec = self.rec, None
        ratios = []
        for old, ps in zip(self.before, step_parameters(self.model)):
            num = _norm([p - o for p, o in zip(ps, old)])
            ratios.append(num / max(_norm(old), 1e-12))
        rec["update_ratio"] = ratios
        self.before = None
        r = rec["grad_ratio"]
        if not RATIO_RANGE[0] <= r <= RATIO_RANGE[1]:
            rec["warning"] = "state-gradient ratio out of range"
            if not self.warned:
                self.warned = True
                print(f"layerflow: warning: state-gradient ratio |dL/dX_0|/|dL/dX_L| = {r:.3g} "
                      f"at iteration {it} is outside [{RATIO_RANGE[0]:g}, {RATIO_RANGE[1]:g}] "
                      f"(vanishing/exploding gradients over depth)", file=self.stream or sys.stderr)
        return rec
