"""How ODE-like is a GPT-2? Re-discretise an imported model and measure the next-token KL.

A small GPT-2 (`transformers.GPT2LMHeadModel`, character-level, 4 layers, width 128, context 64)
is taken (a) randomly initialised and (b) after a short training run with plain PyTorch/AdamW on
tinyshakespeare. Each is imported with `layerflow.from_pretrained` (Lie–Trotter, h = 1: the exact
model) and re-discretised with every registered integrator at step scale s ∈ {1, 1/2, 1/4} (each
layer's weights integrated over its unit of layer-time with 1/s steps of size s). Reported per
scheme on 16 held-out windows: mean/max KL(original ‖ re-discretised) of the next-token
distribution (nats), top-1 agreement and the cross-entropy loss.

    flock /tmp/layerflow-heavy.lock python benchmarks/rediscretise.py [--steps 400] [--markdown]
        [--save DIR]    # DIR: the trained GPT-2 as a local HF model directory

Prints one JSON line (and, with --markdown, the README table on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SCALES = (1.0, 0.5, 0.25)


def batches(ids: torch.Tensor, block: int, batch: int, g: torch.Generator):
    ix = torch.randint(len(ids) - block - 1, (batch,), generator=g)
    x = torch.stack([ids[i:i + block] for i in ix.tolist()])
    y = torch.stack([ids[i + 1:i + 1 + block] for i in ix.tolist()])
    return x, y


@torch.no_grad()
def hf_loss(model, ids, block, n=8, batch=32, seed=123):
    g = torch.Generator().manual_seed(seed)
    model.eval()
    losses = []
    for _ in range(n):
        x, y = batches(ids, block, batch, g)
        logits = model(x).logits
        losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                        y.reshape(-1)).item())
    return sum(losses) / len(losses)


def train_gpt2(model, train_ids, block, steps, batch=32, lr=1e-3, warmup=30, seed=0):
    """AdamW (β = 0.9, 0.99; wd 0.1 on matrices), linear warm-up, cosine decay, clip 1."""
    g = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))
    model.train()
    for it in range(steps):
        f = (it + 1) / warmup if it < warmup else \
            0.1 + 0.45 * (1 + math.cos(math.pi * (it - warmup) / max(steps - warmup, 1)))
        for grp in opt.param_groups:
            grp["lr"] = lr * f
        x, y = batches(train_ids, block, batch, g)
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                 y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return model


def save_hf(model, chars, out: str) -> None:
    """The model (safetensors + config.json) and a character-level `tokenizer.json`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.utils import logging

    logging.disable_progress_bar()
    model.save_pretrained(out)
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(Path(out) / "tokenizer.json"))


def table(results: dict) -> str:
    names = sorted({r["integrator"] for rows in results.values() for r in rows})
    head = "| integrator | " + " | ".join(
        f"{m} KL s={s:g}" for m in results for s in SCALES) + " |"
    lines = [head, "|" + "---|" * (1 + len(results) * len(SCALES))]
    for name in names:
        cells = []
        for rows in results.values():
            for s in SCALES:
                r = next((r for r in rows if r["integrator"] == name and r["scale"] == s), None)
                cells.append("error" if r is None or "error" in r else f"{r['kl_mean']:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--save", metavar="DIR", help="also save the trained GPT-2 and a character "
                    "tokenizer.json there (a local HF model directory for `layerflow import-hf`)")
    args = ap.parse_args(argv)
    if not DATA.exists():
        print(json.dumps({"benchmark": "rediscretise", "skipped": f"{DATA} not found"}))
        return 0
    torch.set_num_threads(2)
    from transformers import GPT2Config, GPT2LMHeadModel

    from layerflow import INTEGRATORS, from_pretrained
    from layerflow.rediscretise import rediscretisation_table

    text = DATA.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_val = len(ids) // 10
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]
    block = 64
    cfg = GPT2Config(vocab_size=len(chars), n_positions=block, n_embd=128, n_layer=4, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)
    g = torch.Generator().manual_seed(7)
    x_eval, y_eval = batches(val_ids, block, 16, g)
    schemes = [(name, s) for name in sorted(INTEGRATORS) for s in SCALES]

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(cfg).eval()
    val_before = hf_loss(hf, val_ids, block)
    results, info = {}, {}
    model, _ = from_pretrained(hf)
    results["random"] = rediscretisation_table(model, x_eval, schemes, y_eval)
    t0 = time.perf_counter()
    train_gpt2(hf, train_ids, block, args.steps, batch=args.batch)
    seconds = time.perf_counter() - t0
    info = {"steps": args.steps, "batch": args.batch, "seconds": round(seconds, 1),
            "val_loss_before": round(val_before, 4), "val_loss_after":
            round(hf_loss(hf, val_ids, block), 4)}
    if args.save:
        save_hf(hf, chars, args.save)
    model, _ = from_pretrained(hf)
    results["trained"] = rediscretisation_table(model, x_eval, schemes, y_eval)
    for rows in results.values():
        for r in rows:
            for k in ("kl_mean", "kl_max", "top1_agree", "loss", "loss_ref"):
                if k in r:
                    r[k] = float(f"{r[k]:.4g}")
    out = {"benchmark": "rediscretise", "model": "GPT2LMHeadModel char L=4 d=128 H=4 T=64",
           "eval_tokens": int(x_eval.numel()), "train": info, "results": results}
    print(json.dumps(out))
    if args.markdown:
        print(table(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
