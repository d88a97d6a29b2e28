"""`layerflow sweep`: train a grid depths × learning rates × variants and compare stability.

Each run trains a small model for `iters` steps (AdamW, cosine decay, optional warm-up and
clipping as configured: the default is none of either, so instability is visible), and records:
the final validation loss, whether it diverged (a non-finite loss, or a final validation loss not
below the loss at initialisation), the largest loss jump (max over t of loss_t − min_{s<t} loss_s),
and the state-gradient norms ‖∂loss/∂X_k‖ over the steps k = 0..L at initialisation and at the end
(diagnostics.py). Runs are cached one JSON file each under `out/runs/`, so an interrupted or
chunked sweep (e.g. one depth per call) continues where it stopped. Outputs: `results.csv`,
`results.json`, `loss_vs_lr.png` (one panel per variant, one line per depth, × = diverged) and
`state_grad.png` (state-gradient norm vs step index k/L at the deepest depth).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, RunConfig
from .data import prepare_data, split_tokens
from .diagnostics import state_gradient_norms
from .model import build_model
from .train import estimate_loss, lr_at, make_optimizer

#: variant name -> config overrides
VARIANTS = {
    "standard": {},
    "post_norm": {"depth_param": "post_norm"},
    "ode": {"depth_param": "ode"},
    "sqrt": {"depth_param": "sqrt"},
    "rezero": {"depth_param": "rezero"},
    "deepnorm": {"depth_param": "deepnorm"},
    "nonexpansive": {"vector_field": "nonexpansive", "depth_param": "ode"},
    "leapfrog": {"integrator": "leapfrog", "depth_param": "ode"},
}
DEPTH_SCALED = ("ode", "sqrt", "nonexpansive", "leapfrog")
FIELDS = ("variant", "depth", "lr", "iters", "final_val", "final_train", "init_loss", "diverged",
          "diverged_at", "stalled", "max_jump", "grad_ratio_init", "grad_ratio_end", "seconds")


def base_config(data: str, n_embd=64, n_head=4, block_size=64, batch_size=8, iters=300,
                warmup_iters=0, grad_clip=0.0, eval_iters=20, seed=1337, **extra) -> RunConfig:
    return RunConfig().replace(
        data=data, tokenizer="char", n_embd=n_embd, n_head=n_head, block_size=block_size,
        batch_size=batch_size, max_iters=iters, warmup_iters=warmup_iters, grad_clip=grad_clip,
        eval_iters=eval_iters, seed=seed, dropout=0.0, sample_tokens=0,
        progress=False, **extra)


def run_one(base: RunConfig, data, vocab_size: int, variant: str, depth: int, lr: float) -> dict:
    """Train one grid point; returns its record (see module docstring)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    cfg = base.replace(n_layer=depth, lr=lr, min_lr=lr / 10,
                       vocab_size=vocab_size, **VARIANTS[variant])
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_model(cfg).train()
    opt = make_optimizer(model, tc, "cpu")
    gen = torch.Generator().manual_seed(tc.seed)
    t0 = time.perf_counter()
    probe_x, probe_y = data.get_batch("val", tc.batch_size, torch.Generator().manual_seed(0))
    init = state_gradient_norms(model, probe_x, probe_y)
    opt.zero_grad(set_to_none=True)
    losses, diverged_at = [], None
    for it in range(tc.max_iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, tc)
        x, y = data.get_batch("train", tc.batch_size, gen)
        _, loss = model(x, y)
        if not torch.isfinite(loss):
            diverged_at = it
            break
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    end = {"state_grad": [], "grad_ratio": float("nan")}
    final_val = float("nan")
    if diverged_at is None:
        final_val = estimate_loss(model, data, tc, tc.max_iters, "cpu", splits=("val",))["val"]
        model.train()
        end = state_gradient_norms(model, probe_x, probe_y)
        if not (math.isfinite(final_val) and final_val < init["loss"]):
            diverged_at = tc.max_iters
    jump, low = 0.0, math.inf
    for v in losses:
        jump, low = max(jump, v - low), min(low, v)
    tail = losses[-10:]
    return {"variant": variant, "depth": depth, "lr": lr, "iters": tc.max_iters,
            "final_val": final_val, "final_train": sum(tail) / len(tail) if tail else math.nan,
            "init_loss": init["loss"], "diverged": diverged_at is not None,
            "diverged_at": diverged_at, "max_jump": jump,
            "grad_ratio_init": init["grad_ratio"], "grad_ratio_end": end["grad_ratio"],
            "state_grad_init": init["state_grad"], "state_grad_end": end["state_grad"],
            "seconds": time.perf_counter() - t0}


def unigram_loss(ids) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of the best context-free model.
    A run whose final loss is not below it learned no more than unigram statistics."""
    counts = np.bincount(np.asarray(ids, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def mark_stalled(records: list[dict], unigram: float, margin: float = 0.05) -> None:
    for r in records:
        r["stalled"] = bool(not r["diverged"] and r["final_val"] >= unigram - margin)


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def run_sweep(data_path: str, out, depths, lrs, variants, iters=300, threads=0, progress=True,
              **model_kw) -> list[dict]:
    """Run (or continue) the grid; returns all records of the grid, also written to `out`."""
    from tqdm.auto import tqdm

    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if threads:
        torch.set_num_threads(threads)
    base = base_config(data_path, iters=iters, **model_kw)
    tokenizer, ids = prepare_data(base.data, out)
    data = split_tokens(ids, base.data.val_fraction, base.model.block_size)
    grid = [(v, d, lr) for d in depths for v in variants for lr in lrs]
    unigram = unigram_loss(data.splits["val"])
    records = []
    bar = tqdm(grid, desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    for v, d, lr in bar:
        path = out / "runs" / f"{v}_L{d}_lr{lr:g}_it{iters}.json"
        if path.exists():
            rec = json.loads(path.read_text())
        else:
            bar.set_postfix_str(f"{v} L={d} lr={lr:g}", refresh=True)
            rec = run_one(base, data, tokenizer.vocab_size, v, d, lr)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec, allow_nan=True))
            os.replace(tmp, path)
        records.append(rec)
    mark_stalled(records, unigram)
    write_results(records, out, unigram)
    return records


def write_results(records: list[dict], out, unigram: float | None = None) -> None:
    out = Path(out)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in FIELDS})
    clean = [{k: (_finite(v) if isinstance(v, float) else v) for k, v in r.items()}
             for r in records]
    (out / "results.json").write_text(json.dumps({"runs": clean, "summary": summarize(records),
                                                  "unigram_loss": unigram}, indent=1))
    plot_sweep(records, out, unigram)


def summarize(records: list[dict]) -> dict:
    """Per variant: runs diverged per depth, best lr per depth, and whether the best lr at the
    shallowest and deepest depth are the same grid point or neighbours."""
    out = {}
    lrs = sorted({r["lr"] for r in records})
    for v in dict.fromkeys(r["variant"] for r in records):
        rs = [r for r in records if r["variant"] == v]
        depths = sorted({r["depth"] for r in rs})
        best, div = {}, {}
        for d in depths:
            rd = [r for r in rs if r["depth"] == d]
            div[d] = sum(r["diverged"] for r in rd)
            ok = [r for r in rd if not r["diverged"]]
            best[d] = min(ok, key=lambda r: r["final_val"])["lr"] if ok else None
        lo, hi = best[depths[0]], best[depths[-1]]
        transfer = (lo is not None and hi is not None
                    and abs(lrs.index(lo) - lrs.index(hi)) <= 1)
        out[v] = {"diverged": {str(d): div[d] for d in depths},
                  "best_lr": {str(d): best[d] for d in depths},
                  "best_val": {str(d): min((r["final_val"] for r in rs if r["depth"] == d
                                            and not r["diverged"]), default=None)
                               for d in depths},
                  "stalled": {str(d): sum(bool(r.get("stalled")) for r in rs if r["depth"] == d)
                              for d in depths},
                  "lr_transfer": transfer}
    return out


def plot_sweep(records: list[dict], out, unigram: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in records))
    depths = sorted({r["depth"] for r in records})
    n = len(variants)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False,
                             sharey=True)
    finite = [r["final_val"] for r in records if not r["diverged"]]
    top = max(finite) + 0.15 if finite else 5.0
    for ax, v in zip(axes.flat, variants):
        for d in depths:
            rs = sorted((r for r in records if r["variant"] == v and r["depth"] == d),
                        key=lambda r: r["lr"])
            ok = [r for r in rs if not r["diverged"]]
            line, = ax.plot([r["lr"] for r in ok], [r["final_val"] for r in ok], "o-", ms=3,
                            label=f"L={d}")
            bad = [r["lr"] for r in rs if r["diverged"]]
            ax.plot(bad, [top] * len(bad), "x", color=line.get_color(), ms=8, mew=2)
        if unigram is not None:
            ax.axhline(unigram, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(v, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    axes.flat[0].set_ylabel("final val loss (x = diverged;\n-- = unigram loss)", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("learning rate", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_lr.png", dpi=80)
    plt.close(fig)

    deep = depths[-1]
    lrs = sorted({r["lr"] for r in records})
    ref = lrs[len(lrs) // 2]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for v in variants:
        r = next((r for r in records if r["variant"] == v and r["depth"] == deep
                  and r["lr"] == ref), None)
        if r is None:
            continue
        for ax, key in zip(axes, ("state_grad_init", "state_grad_end")):
            g = r[key]
            if g:
                ax.plot([k / (len(g) - 1) for k in range(len(g))], g, label=v)
    axes[0].set_title(f"init, L={deep}", fontsize=9)
    axes[1].set_title(f"after training (lr {ref:g}), L={deep}", fontsize=9)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step k / L")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("‖∂loss/∂X_k‖")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "state_grad.png", dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------- CLI (`layerflow sweep`)
def _list(kind):
    def parse(text: str):
        try:
            vals = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"not a comma-separated list of {kind.__name__}: {text!r}") from None
        if not vals:
            raise ValueError("empty list")
        return vals
    return parse


def add_sweep_parser(sub) -> None:
    import argparse

    def typed(kind):
        def parse(text):
            try:
                return _list(kind)(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return parse

    p = sub.add_parser("sweep", help="train a grid depths x learning rates x variants")
    p.add_argument("--data", required=True, help="text file (char tokenizer)")
    p.add_argument("--out", default="runs/sweep", help="output directory (runs are cached)")
    p.add_argument("--depths", type=typed(int), default=[4, 16, 64])
    p.add_argument("--lrs", type=typed(float), default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    p.add_argument("--variants", type=typed(str), default=list(VARIANTS),
                   help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest for small widths); 0 = torch default")


def cmd_sweep(args) -> int:
    if min(args.depths) < 1 or min(args.lrs) <= 0 or args.iters < 1:
        raise ConfigError("--depths, --lrs and --iters must be positive")
    if not 0 <= args.threads <= 1024:  # issue 8: torch refuses (or overflows on) the rest
        raise ConfigError("--threads must be in 0..1024")
    records = run_sweep(args.data, args.out, args.depths, args.lrs, args.variants,
                        iters=args.iters, threads=args.threads, n_embd=args.n_embd,
                        n_head=args.n_head, block_size=args.block_size,
                        batch_size=args.batch_size, warmup_iters=args.warmup_iters,
                        grad_clip=args.grad_clip, eval_iters=args.eval_iters, seed=args.seed)
    summary = summarize(records)
    print(f"{'variant':13s} " + " ".join(f"{'L=' + k:>16s}" for k in
                                          next(iter(summary.values()))["best_lr"]) + "  transfer")
    for v, s in summary.items():
        cells = [f"{'-' if b is None else f'{b:g}'}/{s['diverged'][d]} div" for d, b in
                 s["best_lr"].items()]
        print(f"{v:13s} " + " ".join(f"{c:>16s}" for c in cells) + f"  {s['lr_transfer']}")
    print(f"results: {Path(args.out) / 'results.csv'}, figures: loss_vs_lr.png, state_grad.png")
    return 0
