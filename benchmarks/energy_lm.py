"""Causal Energy Transformer LM vs the lie_trotter (pre-norm GPT) baseline on tinyshakespeare.

Both use the nanoGPT "baby" Shakespeare recipe (char tokens, width 128, 4 heads, block 64,
batch 12, lr 1e-3 → 1e-4 cosine, warmup 100, AdamW β2 .99, wd .1, clip 1) for `--iters`
iterations. The baseline has 4 layers; the energy model has one shared block descended for
`--steps` steps with step size `--alpha`, and as many Hopfield memories as makes its parameter
count equal to the baseline's. Reports: both val losses; the energy of every descent step (mean
per token, PNG); the fraction of (step, token) pairs whose conditional energy went down with the
context held fixed (what each token descends) and with the context moving as well (what nothing
guarantees). Prints ONE JSON line.

    flock /tmp/layerflow-heavy.lock python benchmarks/energy_lm.py --iters 2000
"""

import argparse
import json
import time
from pathlib import Path

import torch

from layerflow import RunConfig, build_model, load_run, train
from layerflow.data import prepare_data, split_tokens
from layerflow.energy_lm import conditional_energy_steps
from layerflow.train import read_metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def run(cfg, out: Path) -> dict:
    t0 = time.perf_counter()
    summary = train(cfg, out)
    evals = [r for r in read_metrics(out) if r.get("kind") == "eval"]
    trains = [r for r in read_metrics(out) if r.get("kind") == "train"]
    return {"status": summary["status"], "val_loss": round(evals[-1]["val_loss"], 4),
            "train_loss": round(evals[-1]["train_loss"], 4), "seconds": round(
                time.perf_counter() - t0, 1), "tok_per_s": round(sum(
                    r["tok_per_s"] for r in trains[-5:]) / max(len(trains[-5:]), 1))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--steps", type=int, default=4, help="descent steps of the energy model")
    p.add_argument("--alpha", type=float, default=1.0, help="descent step size α")
    p.add_argument("--width", type=int, default=128, help="n_embd of both models")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/layerflow-bench/energy_lm")
    p.add_argument("--figure", default="", help="also copy the energy curve PNG here")
    a = p.parse_args()
    if not DATA.exists():
        print(json.dumps({"benchmark": "energy_lm", "skipped": f"{DATA} not found"}))
        return 0
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    base = RunConfig().replace(data=str(DATA), max_iters=a.iters, eval_interval=a.iters,
                               n_embd=a.width, warmup_iters=a.warmup,
                               eval_iters=50, sample_tokens=200, progress=False,
                               log_interval=max(a.iters // 20, 1))
    vocab = 65  # tinyshakespeare characters
    p_base = build_model(base.replace(vocab_size=vocab)).num_params()
    probe = base.replace(model="energy", integrator="euler", n_layer=a.steps,
                         step_size=str(a.alpha), n_memories=1, vocab_size=vocab)
    per_mem = probe.model.n_embd
    n_mem = round((p_base - build_model(probe).num_params()) / per_mem) + 1
    ecfg = probe.replace(n_memories=n_mem, vocab_size=0)
    p_energy = build_model(ecfg.replace(vocab_size=vocab)).num_params()

    res_base = run(base.replace(integrator="lie_trotter"), out / "lie_trotter")
    res_energy = run(ecfg, out / "energy")

    # energy along the descent, on validation windows
    model, tok, cfg, _ = load_run(out / "energy")
    _, ids = prepare_data(cfg.data, out / "energy", tok)
    data = split_tokens(ids, cfg.data.val_fraction, cfg.model.block_size)
    x, _ = data.get_batch("val", 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        steps = conditional_energy_steps(model.block, model.energy_trajectory(x))
        curve = steps["energy"].mean(dim=(1, 2)).tolist()
        trained_steps = model.n_steps
        model.n_steps = 4 * trained_steps  # keep descending past the trained depth
        long = conditional_energy_steps(model.block, model.energy_trajectory(x))
        model.n_steps = trained_steps
    long_curve = long["energy"].mean(dim=(1, 2)).tolist()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(long_curve)), long_curve, "o-", ms=3, color="0.6",
            label=f"run on to {len(long_curve) - 1} steps")
    ax.plot(range(len(curve)), curve, "o-", color="C0", label="trained depth")
    ax.set_xlabel("descent step k")
    ax.set_ylabel("mean conditional energy E_C(x^k)")
    ax.set_title("causal energy LM, tinyshakespeare val")
    ax.legend()
    fig.tight_layout()
    png = out / "energy_curve.png"
    fig.savefig(png, dpi=120)
    if a.figure:
        Path(a.figure).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(a.figure, dpi=120)

    def frac(t):
        return round(float((t < 0).float().mean()), 4)

    print(json.dumps({
        "benchmark": "energy_lm", "iters": a.iters, "recipe": f"baby but width {a.width}, "
        f"warmup {a.warmup} (4 heads, block 64, batch 12, lr 1e-3, cosine to 1e-4, wd .1, clip 1)",
        "baseline": {"integrator": "lie_trotter", "layers": 4, "params": p_base, **res_base},
        "energy": {"descent_steps": a.steps, "alpha": a.alpha, "memories": n_mem,
                   "params": p_energy, **res_energy,
                   "energy_curve": [round(v, 3) for v in curve],
                   "energy_curve_4x_steps": [round(v, 3) for v in long_curve],
                   "frac_down_fixed_context": frac(steps["fixed"]),
                   "frac_down_moving_context": frac(steps["moving"]),
                   "frac_down_fixed_context_4x_steps": frac(long["fixed"]),
                   "frac_down_moving_context_4x_steps": frac(long["moving"]),
                   "tokens_measured": int(x.numel())},
        "png": str(png),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
