"""Generation speed: KV-cached vs uncached sampling of 512 tokens, and batched prompts.

`FlowLM.generate` keeps a window of at most `block_size` tokens; when the window is full it
jumps forward to keep the newest block_size/2 tokens and (cached) rebuilds the cache from them.
So the cached/uncached ratio depends on the block size:
- `block_size ≥ prompt + 512` (here 1024): the cache is never rebuilt; uncached recomputes the
  whole prefix for every token (O(T²) per sequence), cached computes one token (O(T)).
- the baby block size 64: every 32 tokens the cache is refilled from 32 tokens; uncached
  recomputes at most 64 tokens, so the gain is bounded.
Both use the baby width (4 layers, 4 heads, width 128, vocab 65, random weights; speed does not
depend on the values). Sampled tokens are checked equal between the two paths.
Batched: 8 prompts (the same length) generated in one batch vs one after another.
Every time is the best of `--repeats` identical runs (timing on a shared machine is noisy); the
cached and uncached runs alternate, so both see the same phases of the machine.

    flock /tmp/layerflow-heavy.lock python benchmarks/generation.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def build(block_size: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128):
    from layerflow import RunConfig
    from layerflow.model import build_model

    torch.manual_seed(0)
    cfg = RunConfig().replace(vocab_size=65, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                              block_size=block_size)
    return build_model(cfg).eval()


def timed(model, idx, n, use_cache, seed=0, repeats=1):
    """(tokens, best wall seconds of `repeats` identical runs: the least disturbed one)."""
    best = float("inf")
    for _ in range(repeats):
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        out = model.generate(idx, n, temperature=1.0, top_k=None, use_cache=use_cache,
                             generator=g)
        best = min(best, time.perf_counter() - t0)
    return out, best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--blocks", default="1024,64", help="block sizes to measure")
    p.add_argument("--repeats", type=int, default=3, help="runs per path; the best is kept")
    args = p.parse_args(argv)
    if args.tokens <= 0 or args.batch < 0:
        print("generation: --tokens must be positive and --batch >= 0", file=sys.stderr)
        return 2
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    out = {"benchmark": "generation", "tokens": args.tokens, **shape, "repeats": args.repeats,
           "threads": torch.get_num_threads()}
    prompt = torch.tensor([[1, 2, 3, 4]])
    for block in [int(b) for b in args.blocks.split(",")]:
        model = build(block, **shape)
        timed(model, prompt, 8, True)  # warm-up
        t_cached = t_plain = float("inf")
        for _ in range(args.repeats):  # interleaved: both paths see the same machine phases
            a, t = timed(model, prompt, args.tokens, True)
            t_cached = min(t_cached, t)
            b, t = timed(model, prompt, args.tokens, False)
            t_plain = min(t_plain, t)
        out[f"block{block}"] = {"cached_s": round(t_cached, 3), "uncached_s": round(t_plain, 3),
                                "speedup": round(t_plain / t_cached, 1),
                                "cached_tok_per_s": round(args.tokens / t_cached),
                                "identical": bool(torch.equal(a, b))}
    if not args.batch:
        print(json.dumps(out))
        return 0
    model = build(1024, **shape)
    prompts = torch.randint(65, (args.batch, 4), generator=torch.Generator().manual_seed(1))
    _, t_batched = timed(model, prompts, args.tokens, True, repeats=args.repeats)
    t_seq = sum(timed(model, prompts[i:i + 1], args.tokens, True, repeats=args.repeats)[1]
                for i in range(args.batch))
    out["batched"] = {"prompts": args.batch, "batched_s": round(t_batched, 3),
                      "sequential_s": round(t_seq, 3), "speedup": round(t_seq / t_batched, 1),
                      "batched_tok_per_s": round(args.batch * args.tokens / t_batched)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
