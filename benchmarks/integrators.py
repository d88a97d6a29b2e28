"""Every integrator on tinyshakespeare at the nanoGPT "baby" budget, equal parameter count.

Recipe: char tokens, 4 steps (layers) of one TransformerField each (untied), 4 heads, width 128,
block 64, batch 12, `--iters` iterations (2000 = full budget), lr 1e-3, warmup 100, cosine to
1e-4, AdamW β2 0.99, weight decay 0.1, clip 1.0, dropout 0, h = 1. Every integrator uses the same
fields, so the parameter count is identical; what changes is how often and where F is evaluated.
Prints ONE JSON line per integrator: final val loss (`--eval-iters` batches), wall seconds
(training + evaluations), tokens/s (training tokens / wall), and activation memory = bytes that
autograd saves for backward in one training forward (counted with saved_tensors_hooks; weights
and optimizer state excluded).

    flock /tmp/layerflow-heavy.lock python benchmarks/integrators.py --iters 2000
"""

import argparse
import json
import time
from pathlib import Path

import torch

from layerflow import INTEGRATORS, RunConfig, build_model, train
from layerflow.train import read_metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def baby_config(integrator: str, iters: int, eval_iters: int, **extra) -> RunConfig:
    return RunConfig().replace(
        data=str(DATA), tokenizer="char", n_layer=4, n_head=4, n_embd=128, block_size=64,
        batch_size=12, max_iters=iters, lr=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
        weight_decay=0.1, grad_clip=1.0, dropout=0.0, eval_interval=iters,
        eval_iters=eval_iters, log_interval=max(iters // 10, 1), sample_tokens=0,
        progress=False, integrator=integrator, **extra)


def saved_activation_bytes(cfg: RunConfig, vocab: int) -> int:
    """Bytes autograd saves for backward in one training forward of a (B, T) batch."""
    torch.manual_seed(0)
    model = build_model(cfg.replace(vocab_size=vocab)).train()
    idx = torch.randint(0, vocab, (cfg.train.batch_size, cfg.model.block_size))
    params = {p.data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t):
        if t.data_ptr() not in params:  # weights excluded
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx)
    loss.backward()
    return total[0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--eval-iters", type=int, default=100)
    p.add_argument("--integrators", default=",".join(sorted(INTEGRATORS)))
    p.add_argument("--out", default="/tmp/layerflow-bench-integrators")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if not DATA.exists():
        print(json.dumps({"benchmark": "integrators", "skipped": f"{DATA} not found"}))
        return 0
    torch.set_num_threads(a.threads)
    for name in a.integrators.split(","):
        cfg = baby_config(name, a.iters, a.eval_iters)
        out = Path(a.out) / f"{name}-{a.iters}"
        t0 = time.perf_counter()
        summary = train(cfg, out)
        wall = time.perf_counter() - t0
        evals = [r for r in read_metrics(out) if r.get("kind") == "eval"]
        model_params = build_model(cfg.replace(vocab_size=65)).num_params()
        print(json.dumps({
            "benchmark": "integrators", "integrator": name, "order": INTEGRATORS[name].order,
            "iters": a.iters, "status": summary["status"],
            "val_loss": round(evals[-1]["val_loss"], 4),
            "train_loss": round(evals[-1]["train_loss"], 4),
            "wall_s": round(wall, 1),
            "tokens_per_s": round(a.iters * 12 * 64 / wall),
            "activation_bytes": saved_activation_bytes(cfg, 65),
            "params": model_params, "threads": a.threads,
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
