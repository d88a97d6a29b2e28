"""Numerical-fault guard for the training step, and test-only fault injection.

`StepGuard` checks every step before the optimizer moves: the loss ℓ and the global gradient norm
‖g‖₂ = (Σ_p ‖∇_p ℓ‖²)^{1/2} must both be finite. The norm is the cheapest complete test for the
gradients: one NaN or ±Inf anywhere makes it non-finite, and with clipping on it is computed
anyway (`clip_grad_norm_` returns it). Checking the loss alone is not enough: a loss of +Inf can
come with finite gradients (d(ℓ + ∞)/dθ = dℓ/dθ) and finite losses can come with NaN gradients
(e.g. sqrt at 0 in a backward pass). In data-parallel training the norm is taken over the
all-reduced gradients, so every rank reaches the same verdict.

Policy (`TrainConfig.nan_policy`): `stop` ends the run with a message naming the iteration and
the last good checkpoint (which is never overwritten by the bad state); `skip` drops the update
(no optimizer step, the data and RNG streams still advance) and goes on, but stops anyway after
`MAX_CONSECUTIVE_SKIPS` bad steps in a row, because then the state itself is broken.

Fault injection (tests only): the environment variable `LAYERFLOW_FAULTS` holds comma-separated
`name=value` items, e.g. `nan_loss=5,slow_write=0.05`. Unset, every hook is a no-op.
  nan_loss=I[+J..]   the loss at iteration I becomes NaN (so do the gradients)
  inf_loss=I[+J..]   the loss at iteration I becomes +Inf (the gradients stay finite)
  nan_grad=I[+J..]   one gradient entry at iteration I becomes NaN (the loss stays finite)
  inf_grad=I[+J..]   the same with +Inf
  slow_write=S       every atomic file write writes half, flushes, sleeps S seconds, finishes
  enospc=GLOB        atomic writes to files whose name matches GLOB write half, then fail with
                     OSError(ENOSPC), as a full disk does
  hang_write=GLOB    atomic writes to files whose name matches GLOB write half, then sleep an
                     hour (a test kills the process there: mid-write by construction)
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import os
import time
from pathlib import Path

import torch

ENV = "LAYERFLOW_FAULTS"
MAX_CONSECUTIVE_SKIPS = 10
_ITER_KEYS = ("nan_loss", "inf_loss", "nan_grad", "inf_grad")


@functools.lru_cache(maxsize=16)
def _parse(spec: str) -> dict:
    out: dict = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        try:
            if name in _ITER_KEYS:
                out[name] = frozenset(int(v) for v in value.split("+"))
            elif name == "slow_write":
                out[name] = float(value)
            elif name in ("enospc", "hang_write"):
                out[name] = value
            else:
                raise ValueError(f"unknown fault {name!r}")
        except ValueError as e:
            raise ValueError(f"bad {ENV} item {item!r}: {e}") from None
    return out


def active() -> dict:
    """The parsed fault spec ({} when `LAYERFLOW_FAULTS` is unset)."""
    spec = os.environ.get(ENV)
    return _parse(spec) if spec else {}


def inject_loss(it: int, loss: torch.Tensor) -> torch.Tensor:
    f = active()
    if f and it in f.get("nan_loss", ()):
        return loss + float("nan")
    if f and it in f.get("inf_loss", ()):
        return loss + float("inf")
    return loss


def inject_grads(it: int, model: torch.nn.Module) -> None:
    f = active()
    if not f:
        return
    for key, value in (("nan_grad", float("nan")), ("inf_grad", float("inf"))):
        if it in f.get(key, ()):
            p = next(p for p in model.parameters() if p.grad is not None)
            with torch.no_grad():
                p.grad.view(-1)[0] = value


def write(fileobj, data: bytes, path) -> None:
    """`fileobj.write(data)`, unless a test injected a slow or failing write for `path`."""
    f = active()
    if not f or not ("slow_write" in f or "enospc" in f or "hang_write" in f):
        fileobj.write(data)
        return
    half = len(data) // 2
    fileobj.write(data[:half])
    fileobj.flush()
    name = Path(path).name
    if "enospc" in f and fnmatch.fnmatch(name, f["enospc"]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if "hang_write" in f and fnmatch.fnmatch(name, f["hang_write"]):
        time.sleep(3600)
    time.sleep(f.get("slow_write", 0.0))
    fileobj.write(data[half:])


class StepGuard:
    """Decides, once per step, whether the update may be applied (see the module docstring)."""

    def __init__(self, policy: str = "stop", max_skips: int = MAX_CONSECUTIVE_SKIPS):
        if policy not in ("stop", "skip"):
            raise ValueError(f"unknown nan_policy {policy!r}")
        self.policy, self.max_skips = policy, max_skips
        self.consecutive = 0
        self.skipped = 0

    def check(self, it: int, loss: torch.Tensor, model: torch.nn.Module,
              grad_clip: float) -> str | None:
        """Clip the gradients (if `grad_clip` > 0) and return None when loss and gradient norm
        are finite, else a message naming the iteration. One host sync in total."""
        params = [p for p in model.parameters() if p.grad is not None]
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        elif hasattr(torch.nn.utils, "get_total_norm") and params:  # torch >= 2.6
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        elif params:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
        else:
            norm = torch.zeros((), device=loss.device)
        if bool(torch.isfinite(loss.detach()) & torch.isfinite(norm)):
            self.consecutive = 0
            return None
        self.consecutive += 1
        if not torch.isfinite(loss.detach()):
            what = f"loss is {loss.item()}"
        else:
            what = f"gradient norm is {norm.item()} (loss {loss.item():.4f})"
        return f"non-finite {what} at iteration {it}"

    def skip(self) -> bool:
        """True if the bad step should be skipped rather than stop the run."""
        if self.policy == "skip" and self.consecutive <= self.max_skips:
            self.skipped += 1
            return True
        return False

    def stop_message(self, fault: str, run_dir) -> str:
        from .checkpoint import list_checkpoints

        why = fault if self.policy == "stop" else f"{fault} ({self.consecutive} bad steps in a row)"
        ckpts = list_checkpoints(run_dir)
        kept = (f"the last good checkpoint {ckpts[-1].name} is kept" if ckpts
                else "no checkpoint was written yet")
        return f"stopped: {why}; {kept}"
