"""Training throughput of layerflow's own `train()`: tokens/s, MFU, peak RSS.

For each (configuration, variant) a fresh subprocess runs `train()` for a few iterations on
tinyshakespeare (char tokenizer; the embedded corpus when the file is absent) and reports the
median of the trainer's own tokens/s measurements (first interval dropped as warm-up), peak RSS
of that process, and MFU against the fp32 and the bf16 1024×1024 `torch.matmul` peak measured in
that same process. FLOPs/token as nanoGPT's `estimate_mfu`: 6N + 12·L·H·Q·T.

Configurations: `baby` (nanoGPT CPU Shakespeare: 4 layers, 4 heads, width 128, block 64,
batch 12) and `wide` (6 layers, 6 heads, width 384, block 256, batch 12).
Variants: `fp32`; `bf16` (autocast linears, attention kernel in fp32 — the library's policy);
`bf16-attn` (attention in bf16 too, to show why the policy exists); `fp32-compile`, `bf16-compile`
(`torch.compile`).

    flock /tmp/layerflow-heavy.lock python benchmarks/throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
CONFIGS = {
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "wide": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=12),
}
VARIANTS = ("fp32", "bf16", "bf16-attn", "fp32-compile", "bf16-compile")


def run_one(config: str, variant: str, iters: int, log_interval: int, device: str) -> dict:
    import torch

    from layerflow import RunConfig, speed, train
    from layerflow.model import build_model
    from layerflow.train import read_metrics, resolve_device

    device = resolve_device(device)
    if variant == "bf16-attn":
        speed.ATTN_FP32_ON_CPU = False
    precision = "bf16" if variant.startswith("bf16") else "fp32"
    c = CONFIGS[config]
    cfg = RunConfig().replace(
        data=str(DATA) if DATA.exists() else "", tokenizer="char", max_iters=iters,
        eval_interval=iters, eval_iters=1, log_interval=log_interval, sample_tokens=0,
        progress=False, precision=precision, compile=variant.endswith("compile"),
        keep_checkpoints=1, device=device, **c)
    peak32 = speed.matmul_peak(torch.float32, device=device)
    peak16 = speed.matmul_peak(torch.bfloat16, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run")
        metrics = read_metrics(Path(tmp) / "run")
        vocab = json.loads((Path(tmp) / "run" / "config.json").read_text())["model"]["vocab_size"]
    tps = statistics.median([r["tok_per_s"] for r in metrics if r["kind"] == "train"][1:])
    model = build_model(cfg.replace(vocab_size=vocab))
    fpt = speed.flops_per_token(model, c["n_layer"], c["n_head"], c["n_embd"], c["block_size"])
    return {"config": config, "variant": variant, "device": device, "tok_per_s": round(tps),
            "ms_per_iter": round(1000 * c["batch_size"] * c["block_size"] / tps, 1),
            "mfu_fp32": round(tps * fpt / peak32, 4), "mfu_bf16": round(tps * fpt / peak16, 4),
            "fp32_peak_gflops": round(peak32 / 1e9, 1), "bf16_peak_gflops": round(peak16 / 1e9, 1),
            "peak_rss_mib": round(speed.peak_rss_mib()), "params": model.num_params(),
            "flops_per_token": int(fpt), "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="baby,wide")
    p.add_argument("--variants", default="fp32,bf16,bf16-attn")
    p.add_argument("--baby-iters", type=int, default=160)
    p.add_argument("--wide-iters", type=int, default=16)
    p.add_argument("--wide-log-interval", type=int, default=4)
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--one", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    iters = {"baby": (args.baby_iters, 20), "wide": (args.wide_iters, args.wide_log_interval)}
    if args.one:
        config, variant = args.one
        print(json.dumps(run_one(config, variant, *iters[config], args.device)))
        return 0
    configs, variants = args.configs.split(","), args.variants.split(",")
    for name in configs + variants:
        if name not in CONFIGS and name not in VARIANTS:
            print(f"throughput: unknown config or variant {name!r}", file=sys.stderr)
            return 2
    results = []
    for config in configs:
        for variant in variants:
            cmd = [sys.executable, __file__, "--one", config, variant, "--device", args.device,
                   "--baby-iters", str(args.baby_iters), "--wide-iters", str(args.wide_iters),
                   "--wide-log-interval", str(args.wide_log_interval)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if r.returncode != 0:
                results.append({"config": config, "variant": variant,
                                "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
                continue
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "throughput", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
