"""nanoGPT's CPU "baby" Shakespeare-char run, trained by layerflow's own `train()`.

Configuration (nanoGPT `config/train_shakespeare_char.py` with its README's CPU overrides):
char tokenizer, lie_trotter with h=1 (= the pre-norm GPT block), 4 layers, 4 heads, width 128,
block 64, batch 12, 2000 iterations, lr 1e-3, warm-up 100, cosine to 1e-4, AdamW β2=0.99,
weight decay 0.1, clip 1.0, dropout 0, evaluation every 250 steps on 20 batches.

Prints one JSON line: final val loss, wall seconds (the whole `train()` call: data, evaluations,
checkpoints), tokens/s (median of the trainer's own per-interval measurements, i.e. training
steps only, as nanoGPT reports it), peak RSS, and MFU = tokens/s × FLOPs/token ÷ the fp32
1024×1024 `torch.matmul` FLOP/s measured in this process (FLOPs/token as nanoGPT's
`estimate_mfu`: 6N + 12·L·H·Q·T).

Time-to-target mode: `--stop-at-val 1.88 --eval-interval 100` evaluates periodically and stops at
the first evaluation with val loss ≤ 1.88; `time_to_target_s` is then the wall time.

    flock /tmp/layerflow-heavy.lock python benchmarks/shakespeare_char.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def baby_config(args):
    """The nanoGPT baby recipe as a RunConfig; `args` holds this script's options."""
    from layerflow import RunConfig

    return RunConfig().replace(
        data=args.data, tokenizer="char", integrator="lie_trotter", step_size="1", n_layer=4,
        n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=True, batch_size=args.batch_size,
        max_iters=args.iters, lr=args.lr, min_lr=args.min_lr, warmup_iters=args.warmup,
        lr_decay_iters=args.iters, beta2=args.beta2, weight_decay=0.1, grad_clip=1.0,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, log_interval=10,
        sample_tokens=0, progress=False, precision=args.precision, compile=args.compile,
        stop_at_val=args.stop_at_val, seed=args.seed, keep_checkpoints=1,
        ckpt_interval=args.iters,  # one checkpoint at the end: time goes to training
        pos_emb=args.pos_emb, embed_scale=args.embed_scale)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--beta2", type=float, default=0.99, help="AdamW β2")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--stop-at-val", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--pos-emb", default="learned", choices=("learned", "rope"))
    p.add_argument("--embed-scale", type=float, default=1.0, help="X_0 = s·embedding")
    p.add_argument("--out", default="", help="run directory (default: a temporary one)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not Path(args.data).exists():
        print(f"shakespeare_char: data not found: {args.data}", file=sys.stderr)
        return 2

    from layerflow import train
    from layerflow.model import build_model
    from layerflow.speed import flops_per_token, matmul_peak, peak_rss_mib
    from layerflow.train import read_metrics

    cfg = baby_config(args)
    peak32 = matmul_peak(torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.out or Path(tmp) / "run")
        t0 = time.perf_counter()
        summary = train(cfg, run_dir)
        wall = time.perf_counter() - t0
        metrics = read_metrics(run_dir)
        vocab = json.loads((run_dir / "config.json").read_text())["model"]["vocab_size"]
    peak32_after = matmul_peak(torch.float32)
    tps = [r["tok_per_s"] for r in metrics if r["kind"] == "train"][1:]
    evals = [r for r in metrics if r["kind"] == "eval"]
    tok_s = statistics.median(tps)
    model = build_model(cfg.replace(vocab_size=vocab))
    fpt = flops_per_token(model, 4, 4, 128, 64)
    peak = max(peak32, peak32_after)
    out = {
        "benchmark": "shakespeare_char", "iters": summary["iter"],
        "final_val_loss": round(evals[-1]["val_loss"], 4),
        "final_train_loss": round(evals[-1]["train_loss"], 4),
        "wall_s": round(wall, 2), "tok_per_s": round(tok_s), "peak_rss_mib": round(peak_rss_mib()),
        "mfu_fp32": round(tok_s * fpt / peak, 4), "fp32_peak_gflops": round(peak / 1e9, 1),
        "flops_per_token": int(fpt), "params": model.num_params(),
        "precision": args.precision, "compile": args.compile, "lr": args.lr,
        "threads": torch.get_num_threads(),
    }
    if args.stop_at_val:
        out["target_val_loss"] = args.stop_at_val
        out["reached"] = "reached_val_at" in summary
        out["time_to_target_s"] = round(wall, 2) if out["reached"] else None
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
