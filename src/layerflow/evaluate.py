"""`layerflow eval RUN_DIR [--steps N] [--integrator NAME] [--adaptive dopri5]`: validation loss
of a trained run, optionally re-discretised in depth-time.

A model with weights tied or smooth in t defines F(X, t) on all of [0, T], so it can be
integrated with a different number of steps (h = T/N) or an adaptive solver (dopri5) than it was
trained with; untied models and learned per-step sizes keep their steps (one-line error, exit 2).
Prints one JSON line: val loss, steps, integrator, and NFE for adaptive solves.
"""

from __future__ import annotations

import json

from .config import ConfigError


def add_steps_argument(p) -> None:
    p.add_argument("--steps", type=int, default=0,
                   help="integrate with N steps on the same [0, T] (tied/smooth weights; "
                        "0 = as trained)")


def apply_steps(model, steps: int) -> None:
    """Re-discretise `model` with `steps` steps (0 = unchanged); bad requests -> ConfigError."""
    from .integrators.continuous import set_steps

    if not 0 <= steps <= 10_000:  # an absurd count would hang (issue 8)
        raise ConfigError(f"--steps must be in 0..10000, got {steps}")
    if steps:
        try:
            set_steps(model, steps)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="validation loss of a run (optionally with --steps N)")
    e.add_argument("run_dir")
    add_steps_argument(e)
    e.add_argument("--integrator", default="", help="integrate with another registered scheme")
    e.add_argument("--adaptive", default="", help="adaptive torchdiffeq method, e.g. dopri5")
    e.add_argument("--rtol", type=float, default=1e-5, help="adaptive relative tolerance")
    e.add_argument("--atol", type=float, default=1e-6, help="adaptive absolute tolerance")
    e.add_argument("--eval-iters", type=int, default=0, help="batches (0 = as trained)")
    e.add_argument("--split", default="val", choices=("train", "val"))


def evaluate_run(run_dir, steps: int = 0, integrator: str = "", adaptive: str = "",
                 rtol: float = 1e-5, atol: float = 1e-6, eval_iters: int = 0,
                 split: str = "val") -> dict:
    """Loss of the run's newest checkpoint on `split` (same batches for every discretisation)."""
    import dataclasses

    from .config import ADAPTIVE_METHODS
    from .data import prepare_data, split_tokens
    from .integrators import INTEGRATORS
    from .integrators.adaptive import AdaptiveSolver
    from .train import estimate_loss, load_run

    model, tok, cfg, _ = load_run(run_dir)
    if integrator:
        if integrator not in INTEGRATORS:
            raise ConfigError(f"unknown integrator {integrator!r}; choose one of: "
                              f"{', '.join(sorted(INTEGRATORS))}")
        model.integrator = INTEGRATORS[integrator].from_config(cfg.flow)
    apply_steps(model, steps)
    solver = getattr(model, "solver", None)
    if adaptive:
        if adaptive not in ADAPTIVE_METHODS:
            raise ConfigError(f"unknown adaptive method {adaptive!r}; choose one of: "
                              f"{', '.join(ADAPTIVE_METHODS)}")
        if len(model.fields) != 1:
            raise ConfigError("adaptive solves need weights tied or smooth")
        solver = model.solver = AdaptiveSolver(adaptive, rtol, atol)
    if eval_iters < 0:
        raise ConfigError("--eval-iters must be positive")
    tokenizer, ids = prepare_data(cfg.data, run_dir, tok)
    data = split_tokens(ids, cfg.data.val_fraction, cfg.model.block_size)
    tc = cfg.train if not eval_iters else dataclasses.replace(cfg.train, eval_iters=eval_iters)
    nfe = []
    if isinstance(solver, AdaptiveSolver):  # record NFE of every solve
        inner = solver.solve

        def counting(*a, **k):
            out = inner(*a, **k)
            nfe.append(solver.nfe)
            return out

        solver.solve = counting
    loss = estimate_loss(model, data, tc, 0, "cpu", splits=(split,))[split]
    rec = {"run_dir": str(run_dir), f"{split}_loss": round(loss, 5), "steps": model.n_steps,
           "h": model.step_size, "integrator": model.integrator.name,
           "weights": cfg.flow.weights}
    if nfe:
        rec.update(adaptive=adaptive, rtol=rtol, atol=atol, nfe_mean=sum(nfe) / len(nfe))
    return rec


def cmd_eval(args) -> int:
    rec = evaluate_run(args.run_dir, args.steps, args.integrator, args.adaptive, args.rtol,
                       args.atol, args.eval_iters, args.split)
    print(json.dumps(rec))
    return 0
