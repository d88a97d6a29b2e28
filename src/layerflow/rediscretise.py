"""Re-discretisation: run a trained (or imported) flow with another integrator or step size.

A FlowLM integrates dX/dt = F_k(X) on layer-time with step h; its layers are *segments* of
layer-time on which the weights are constant: an untied model has one segment per layer (length
h), a tied model one segment of n_steps·h. Re-discretising with scale s keeps the weights and the
time grid's extent and changes the discretisation on every segment:

    h' = s·h,  steps per segment' = steps per segment / s  (so s = 1/m refines each layer into m
    substeps of h/m; s > 1 coarsens tied segments)

and optionally the integrator (parallel Euler X ← X + h(A + M) instead of Lie–Trotter, Strang,
Runge–Kutta, ... — anything in the registry). If the network were a good discretisation of an
ODE, these would barely move its outputs; the KL divergence of the next-token distributions

    KL(P ‖ P') = Σ_v P(v) (log P(v) − log P'(v)),  averaged over positions

measures how far they do move (cf. Sander et al. 2022, "Do residual neural networks discretize
neural ODEs?"; Chen et al. 2018). Weights are shared with the original, never copied or edited.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .integrators import INTEGRATORS, Integrator, get_integrator


def _steps_per_segment(model) -> tuple[list[nn.Module], int]:
    """(segment field modules, steps per segment) of a FlowLM."""
    fields = list(model.fields)
    if len(fields) == 1:
        return fields, model.n_steps
    return fields, 1


def rediscretise(model, integrator: str | Integrator | None = None, scale: float = 1.0):
    """A FlowLM sharing every weight of `model`, integrated with `integrator` (a name, an
    instance, or None = the model's own) at step scale·h with steps/scale steps per segment.

    Raises ValueError when steps/scale is not a positive integer."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if getattr(model, "raw_step_size", None) is not None:
        raise ValueError("this model learned one step size per step; re-discretising it is not "
                         "supported")
    fields, per_seg = _steps_per_segment(model)
    new_per_seg = per_seg / scale
    if abs(new_per_seg - round(new_per_seg)) > 1e-9 or round(new_per_seg) < 1:
        raise ValueError(f"scale {scale:g} gives {new_per_seg:g} steps per weight segment "
                         f"(segments have {per_seg} step(s)); choose scale = {per_seg}/m")
    new_per_seg = round(new_per_seg)
    if isinstance(integrator, str):
        integrator = get_integrator(integrator)
    new = copy.copy(model)  # shallow: same submodules; own module tables below
    for name in ("_modules", "_parameters", "_buffers"):
        setattr(new, name, dict(getattr(model, name)))
    new._hooks = []
    if getattr(model, "solver", None) is not None:  # adaptive/reversible: run the steps instead
        new.solver = None
    if len(fields) == 1:
        new.fields = nn.ModuleList(fields)
        new.n_steps = model.n_steps * new_per_seg // per_seg
    else:
        new.fields = nn.ModuleList([f for f in fields for _ in range(new_per_seg)])
        new.n_steps = len(fields) * new_per_seg
    new.step_size = model.step_size * scale
    new.integrator = integrator if integrator is not None else model.integrator
    return new


def next_token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref ‖ P) per position (…, vocab) → (…), in nats, computed in float64."""
    lp = F.log_softmax(ref_logits.double(), dim=-1)
    lq = F.log_softmax(logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@torch.no_grad()
def compare(model, variant, idx: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """Mean/max next-token KL(original ‖ variant) and top-1 agreement on token batch `idx`;
    with `targets`, also both models' cross-entropy losses."""
    ref, ref_loss = model(idx, targets)
    out, loss = variant(idx, targets)
    kl = next_token_kl(ref, out)
    agree = (ref.argmax(-1) == out.argmax(-1)).double().mean()
    row = {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(), "top1_agree": agree.item()}
    if targets is not None:
        row.update(loss_ref=ref_loss.item(), loss=loss.item())
    return row


def default_schemes(model) -> list[tuple[str, float]]:
    """Every registered integrator at scale 1 and 1/2, and Lie–Trotter at 1/4."""
    schemes = [(name, s) for name in sorted(INTEGRATORS) for s in (1.0, 0.5)]
    return schemes + [("lie_trotter", 0.25)]


@torch.no_grad()
def rediscretisation_table(model, idx: torch.Tensor, schemes=None,
                           targets: torch.Tensor | None = None) -> list[dict]:
    """One row per (integrator, scale): KL of the re-discretised model against `model`.

    An integrator that cannot run this field (e.g. one needing a field of another kind) gives a
    row with `error` instead of numbers."""
    was = model.training
    model.eval()
    rows = []
    try:
        for name, s in (schemes or default_schemes(model)):
            row = {"integrator": name, "scale": s}
            try:
                variant = rediscretise(model, name, s)
                row["steps"], row["h"] = variant.n_steps, variant.step_size
                row.update(compare(model, variant, idx, targets))
            except Exception as e:  # reported, not raised: one scheme must not sink the table
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
    finally:
        model.train(was)
    return rows


# ----------------------------------------------------------------------------- CLI
def add_rediscretise_parser(sub) -> None:
    """`layerflow rediscretise RUN_DIR (--text FILE | --prompt TEXT)`: the KL table."""
    r = sub.add_parser("rediscretise", help="KL of next-token distributions when a run is "
                       "integrated with other integrators / step sizes (same weights)")
    r.add_argument("run_dir")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="text file: windows of block_size tokens")
    src.add_argument("--prompt", help="text to run the model on")
    r.add_argument("--sequences", type=int, default=8, help="windows taken from --text")
    r.add_argument("--integrators", default="", help="comma-separated names (default: all)")
    r.add_argument("--scales", default="1,0.5,0.25", help="comma-separated step scales s")
    r.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def _windows(ids: list[int], block: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if len(ids) < 2:
        return torch.tensor([ids]), None
    if len(ids) <= block + 1:
        return torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    starts = torch.linspace(0, len(ids) - block - 1, n).long().unique().tolist()
    x = torch.tensor([ids[s:s + block] for s in starts])
    y = torch.tensor([ids[s + 1:s + 1 + block] for s in starts])
    return x, y


def cmd_rediscretise(args) -> int:
    import json

    from .config import ConfigError
    from .train import load_run

    try:
        scales = [float(s) for s in args.scales.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--scales must be comma-separated numbers, got {args.scales!r}"
                          ) from None
    if not scales or any(not (math.isfinite(s) and s > 0) for s in scales):
        raise ConfigError(f"--scales must be positive numbers, got {args.scales!r}")
    names = [n.strip() for n in args.integrators.split(",") if n.strip()] or sorted(INTEGRATORS)
    unknown = [n for n in names if n not in INTEGRATORS]
    if unknown:
        raise ConfigError(f"unknown integrator {unknown[0]!r}; choose from: "
                          f"{', '.join(sorted(INTEGRATORS))}")
    if args.sequences <= 0:
        raise ConfigError("--sequences must be positive")
    model, tok, cfg, _ = load_run(args.run_dir)
    for s in scales:
        try:
            rediscretise(model, None, s)
        except ValueError as e:
            raise ConfigError(f"--scales: {e}") from None
    if args.text:
        try:
            text = open(args.text, encoding="utf-8", errors="replace").read()
        except OSError as e:
            raise ConfigError(f"cannot read --text {args.text}: {e.strerror or e}") from None
    else:
        text = args.prompt
    ids = tok.encode(text)
    if not ids:
        raise ConfigError("the text encodes to no tokens")
    x, y = _windows(ids, model.block_size, args.sequences)
    rows = rediscretisation_table(model, x, [(n, s) for n in names for s in scales], y)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'integrator':<18}{'s':>6}{'steps':>7}{'KL mean':>11}{'KL max':>11}{'top-1':>7}"
          f"{'loss':>8}   ({x.numel()} tokens; original loss "
          f"{rows[0].get('loss_ref', float('nan')):.4f})")
    for r in rows:
        if "error" in r:
            print(f"{r['integrator']:<18}{r['scale']:>6g}  {r['error']}")
            continue
        print(f"{r['integrator']:<18}{r['scale']:>6g}{r['steps']:>7}{r['kl_mean']:>11.3g}"
              f"{r['kl_max']:>11.3g}{r['top1_agree']:>7.3f}{r.get('loss', float('nan')):>8.4f}")
    return 0
