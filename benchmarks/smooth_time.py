"""Smooth-in-time weights: train with L = 8 steps, evaluate with 16 and 32, and adaptively.

A `weights = smooth` model (every weight matrix Σ_i C_i P_i(2t/T − 1), 4 Legendre functions,
char tinyshakespeare, width 128, 4 heads, block 64, batch 12, baby optimiser recipe, `--iters`)
is trained with 8 steps of `--integrator` on [0, T] (h = T/8). Its val loss (same batches for
all) is then measured with 8, 16 and 32 steps of the same integrator, with 8 steps of RK4, and
with an adaptive dopri5 solve (rtol/atol below, mean NFE reported). Targets: loss(16), loss(32)
at most 0.02 above loss(8); dopri5 within 0.01 of fixed-step RK4. Prints ONE JSON line.

Two options make the trained model a discretisation of one ODE rather than of one grid:
`--step-jitter m` (train on 8·j steps, j uniform in 1..m) and `--embed-scale √d` (the flow starts
at O(√d) instead of O(0.02·√d): with pre-norm terms F(X) depends on X/‖X‖, so a tiny X_0 makes
‖F‖/‖X‖ ≈ 50 near t = 0, a stiff start that no fixed step resolves).

    flock /tmp/layerflow-heavy.lock python benchmarks/smooth_time.py --iters 2000
"""

import argparse
import json
import time
from pathlib import Path

import torch

from layerflow import RunConfig, train
from layerflow.evaluate import evaluate_run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--integrator", default="lie_trotter")
    p.add_argument("--total-time", type=float, default=4.0)
    p.add_argument("--eval-iters", type=int, default=50)
    p.add_argument("--step-jitter", type=int, default=1,
                   help="train with 8·m steps, m uniform in 1..N (FlowConfig.step_jitter)")
    p.add_argument("--embed-scale", type=float, default=1.0,
                   help="X_0 = s·embedding (ModelConfig.embed_scale); √d starts the flow at O(√d)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/layerflow-bench-smooth")
    a = p.parse_args()
    if not DATA.exists():
        print(json.dumps({"benchmark": "smooth_time", "skipped": f"{DATA} not found"}))
        return 0
    torch.set_num_threads(a.threads)
    cfg = RunConfig().replace(
        data=str(DATA), tokenizer="char", n_layer=8, n_head=4, n_embd=128, block_size=64,
        batch_size=12, max_iters=a.iters, lr=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
        weight_decay=0.1, grad_clip=1.0, eval_interval=a.iters, eval_iters=a.eval_iters,
        log_interval=max(a.iters // 10, 1), sample_tokens=0, progress=False,
        integrator=a.integrator, weights="smooth", basis_size=4, time_basis="legendre",
        step_size="T/L", total_time=a.total_time, step_jitter=a.step_jitter,
        embed_scale=a.embed_scale)
    out = Path(a.out) / (f"{a.integrator}-T{a.total_time:g}-j{a.step_jitter}"
                         f"-s{a.embed_scale:g}-{a.iters}")
    t0 = time.perf_counter()
    train(cfg, out)
    train_s = time.perf_counter() - t0
    res = {"benchmark": "smooth_time", "iters": a.iters, "integrator": a.integrator,
           "step_jitter": a.step_jitter, "embed_scale": a.embed_scale,
           "total_time": a.total_time, "train_s": round(train_s, 1)}
    for n in (8, 16, 32, 64, 128):
        res[f"val_{n}"] = evaluate_run(out, steps=n, eval_iters=a.eval_iters)["val_loss"]
    res["val_rk4_8"] = evaluate_run(out, steps=8, integrator="rk4",
                                    eval_iters=a.eval_iters)["val_loss"]
    rec = evaluate_run(out, adaptive="dopri5", rtol=1e-4, atol=1e-5, eval_iters=a.eval_iters)
    res.update(val_dopri5=rec["val_loss"], dopri5_nfe_mean=rec["nfe_mean"], rtol=1e-4, atol=1e-5)
    for n in (16, 32, 64, 128):
        res[f"loss_change_{n}"] = round(res[f"val_{n}"] - res["val_8"], 4)
    res["dopri5_minus_rk4"] = round(res["val_dopri5"] - res["val_rk4_8"], 4)
    # "loses no more than 0.02": a lower loss with more steps is no loss
    res["targets_met"] = {"steps_16_32_lose_at_most_0.02": max(res["loss_change_16"],
                                                                res["loss_change_32"]) <= 0.02,
                          "dopri5_vs_rk4_within_0.01": abs(res["dopri5_minus_rk4"]) <= 0.01}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
