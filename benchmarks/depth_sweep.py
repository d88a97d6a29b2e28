"""Depth sweep on tinyshakespeare: stability and learning-rate transfer across depth.

Grid (issue 4): width 64, 4 heads, block 64, batch 8, 300 iterations, no clipping, no warm-up;
depths 4, 16, 64; lrs 3e-4 … 3e-2; variants standard, post_norm, ode, sqrt, rezero, deepnorm,
nonexpansive, leapfrog. Runs are cached in --out, so the grid can be run in chunks
(e.g. `--depths 4`, then `--depths 64`, then all depths to print the summary).
Prints ONE JSON line: per variant the diverged runs and the best lr per depth, and the targets:
the depth-scaled variants (ode, sqrt, nonexpansive, leapfrog) never diverge at the deepest depth,
and their best lr at the shallowest and deepest depth are the same grid point or neighbours.

    flock /tmp/layerflow-heavy.lock python benchmarks/depth_sweep.py --depths 4
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from layerflow.sweep import DEPTH_SCALED, VARIANTS, run_sweep, summarize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depths", default="4,16,64")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/layerflow-depth-sweep")
    p.add_argument("--figures", default="", help="copy the figures into this folder")
    a = p.parse_args()
    if not DATA.exists():
        print(json.dumps({"benchmark": "depth_sweep", "skipped": f"{DATA} not found"}))
        return 0
    depths = [int(x) for x in a.depths.split(",")]
    lrs = [float(x) for x in a.lrs.split(",")]
    variants = a.variants.split(",")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    records = run_sweep(str(DATA), a.out, depths, lrs, variants, iters=a.iters,
                        threads=a.threads, progress=sys.stderr.isatty())
    summary = summarize(records)
    deep, shallow = str(max(depths)), str(min(depths))
    scaled = [v for v in DEPTH_SCALED if v in summary]
    if a.figures:
        Path(a.figures).mkdir(parents=True, exist_ok=True)
        for name in ("loss_vs_lr.png", "state_grad.png"):
            shutil.copy(Path(a.out) / name, Path(a.figures) / f"depth_sweep_{name}")
    print(json.dumps({
        "benchmark": "depth_sweep", "iters": a.iters, "depths": depths, "lrs": lrs,
        "width": 64, "heads": 4, "block": 64, "batch": 8, "grad_clip": 0, "warmup": 0,
        "runs": len(records),
        "diverged_at_deepest": {v: summary[v]["diverged"][deep] for v in summary},
        "best_lr": {v: summary[v]["best_lr"] for v in summary},
        "best_val": {v: {d: (round(x, 4) if x is not None else None)
                         for d, x in summary[v]["best_val"].items()} for v in summary},
        "target_no_divergence_depth_scaled": all(summary[v]["diverged"][deep] == 0
                                                 for v in scaled),
        "target_lr_transfer_depth_scaled": {v: summary[v]["lr_transfer"] for v in scaled},
        "shallow_deep": [int(shallow), int(deep)],
        "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
