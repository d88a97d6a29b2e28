"""Dynamics metrics of a trained run (the numbers behind `layerflow analyze`), as one JSON line.

Measures the run's newest checkpoint on 8 windows of its own held-out tokens: logit-lens loss
per step, whether the lens equals the model's logits at the last step, mean pairwise cosine and
rank-one residual at the last step, the largest Jacobian singular value of each step map, the
three leading finite-time Lyapunov exponents, the best linear invariant's variance ratio, and
the wall time of the whole measurement.

    flock /tmp/layerflow-heavy.lock python benchmarks/analysis.py runs/shakespeare
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = leave as is")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from layerflow import load_run
    from layerflow.analysis.report import measure, run_tokens

    model, tok, cfg, ckpt = load_run(a.run_dir)
    idx, tgt = run_tokens(Path(a.run_dir), cfg, tok, None, a.sequences, model.block_size)
    t0 = time.perf_counter()
    m = measure(model, idx, tgt)
    wall = time.perf_counter() - t0
    r = lambda v, n=4: [round(float(x), n) for x in v]  # noqa: E731
    print(json.dumps({
        "bench": "analysis", "run": str(a.run_dir), "iter": ckpt.state.get("iter"),
        "integrator": m["integrator"], "steps": m["n_steps"], "tokens": list(idx.shape),
        "lens_loss": r(m["lens"]["loss"]), "lens_top1_agree": r(m["lens"]["agree"]),
        "lens_exact_at_last_step": m["lens_exact_at_last_step"],
        "final_cosine": round(float(m["geometry"]["cosine"][-1]), 4),
        "final_rank_residual": round(float(m["geometry"]["rank_residual"][-1]), 4),
        "sigma1_per_step": r(m["jacobian_sv"][:, 0], 3),
        "lyapunov_top3": r(m["lyapunov"]["exponents"][:3]),
        "best_invariant_ratio": round(float(m["invariants"]["ratio"][0]), 5),
        "wall_s": round(wall, 2), "threads": torch.get_num_threads(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
