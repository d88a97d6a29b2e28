"""Activation memory vs depth: stored activations (lie_trotter, leapfrog) vs reversible leapfrog.

For depth L in 8, 16, 32, 64 (baby width 128, 4 heads, block 64, batch 12, char vocab 65,
h = T/L with T = 4, untied weights), each configuration runs in its own process and reports:
- saved_bytes: bytes autograd saves for backward in one training forward, counted with
  torch.autograd.graph.saved_tensors_hooks (weights excluded; optimizer state is never saved);
- rss_delta: peak RSS during 5 training steps minus RSS before the first step (the model and the
  AdamW state are allocated before the baseline, so this is mostly activations);
- step_s: median wall time of 5 training steps (forward + backward + AdamW; noisy on a shared
  machine);
and, per depth, a timing child that alternates stored-activation and reversible training steps of
the same leapfrog model (one intra-op thread, 5 rounds) and reports the median CPU-time ratio
(robust to other load on the machine) and the wall-time ratio.
Prints ONE JSON line with all rows and the targets: reversible saved bytes at L=64 ≤ 1.25× L=8,
and reversible step time ≤ 2× leapfrog with stored activations.

    flock /tmp/layerflow-heavy.lock python benchmarks/memory_depth.py
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from layerflow import RunConfig, build_model

MODES = {"lie_trotter": ("lie_trotter", False), "leapfrog": ("leapfrog", False),
         "leapfrog_reversible": ("leapfrog", True)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def make(integrator: str, rev: bool, depth: int):
    cfg = RunConfig().replace(n_layer=depth, n_head=4, n_embd=128, block_size=64, vocab_size=65,
                              integrator=integrator, reversible=rev, step_size="T/L",
                              total_time=4.0)
    torch.manual_seed(0)
    return build_model(cfg).train()


def timing_child(depth: int, rounds: int = 5) -> dict:
    """Alternate stored / reversible steps of one leapfrog model; median CPU and wall ratios."""
    torch.set_num_threads(1)
    model = make("leapfrog", True, depth)
    solver = model.solver
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, 65, (12, 64), generator=torch.Generator().manual_seed(0))
    cpu = {"stored": [], "reversible": []}
    wall = {"stored": [], "reversible": []}
    for r in range(rounds + 1):
        for mode in ("stored", "reversible"):
            model.solver = solver if mode == "reversible" else None
            c0, w0 = time.process_time(), time.perf_counter()
            _, loss = model(idx, idx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:  # round 0 is warm-up
                cpu[mode].append(time.process_time() - c0)
                wall[mode].append(time.perf_counter() - w0)
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in (("cpu", cpu), ("wall", wall))}
    return {"depth": depth, "stored_cpu_s": round(med["cpu"]["stored"], 3),
            "reversible_cpu_s": round(med["cpu"]["reversible"], 3),
            "cpu_ratio": round(med["cpu"]["reversible"] / med["cpu"]["stored"], 3),
            "wall_ratio": round(med["wall"]["reversible"] / med["wall"]["stored"], 3)}


def child(mode: str, depth: int) -> dict:
    torch.set_num_threads(1)
    integrator, rev = MODES[mode]
    model = make(integrator, rev, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 65, (12, 64), generator=g) for _ in range(6)]
    for p in model.parameters():  # allocate the AdamW state before the baseline
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    params = {p.data_ptr() for p in model.parameters()}
    saved = [0]

    def pack(t):
        if t.data_ptr() not in params:
            saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(batches[0], batches[0])
    loss.backward()
    opt.zero_grad(set_to_none=True)
    del loss
    base = rss_bytes()
    times = []
    for idx in batches[1:]:
        t0 = time.perf_counter()
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "depth": depth, "saved_bytes": saved[0],
            "rss_delta": max(peak - base, 0), "peak_rss": peak,
            "step_s": round(statistics.median(times), 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depths", default="8,16,32,64")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--child", nargs=2, metavar=("MODE", "DEPTH"))
    p.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args()
    if a.child:
        mode, depth = a.child[0], int(a.child[1])
        print(json.dumps(timing_child(depth) if mode == "timing" else child(mode, depth)))
        return 0
    rows, timing = [], []
    for mode in a.modes.split(","):
        for d in (int(x) for x in a.depths.split(",")):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(d)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    if a.timing:
        for d in (int(x) for x in a.depths.split(",")):
            out = subprocess.run([sys.executable, __file__, "--child", "timing", str(d)],
                                 capture_output=True, text=True, check=True).stdout
            timing.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(timing[-1]), file=sys.stderr)
    by = {(r["mode"], r["depth"]): r for r in rows}
    depths = sorted({r["depth"] for r in rows})
    lo, hi = depths[0], depths[-1]
    res = {"benchmark": "memory_depth", "width": 128, "block": 64, "batch": 12, "threads": 1,
           "rows": rows, "timing": timing}
    if ("leapfrog_reversible", lo) in by and ("leapfrog_reversible", hi) in by:
        rev_lo, rev_hi = by[("leapfrog_reversible", lo)], by[("leapfrog_reversible", hi)]
        res["reversible_saved_ratio_%d_vs_%d" % (hi, lo)] = round(
            rev_hi["saved_bytes"] / rev_lo["saved_bytes"], 3)
        res["reversible_rss_delta_ratio"] = round(
            rev_hi["rss_delta"] / max(rev_lo["rss_delta"], 1), 3)
        if ("leapfrog", hi) in by:
            res["stored_saved_ratio_%d_vs_%d" % (hi, lo)] = round(
                by[("leapfrog", hi)]["saved_bytes"] / by[("leapfrog", lo)]["saved_bytes"], 3)
    if timing:
        res["reversible_step_cpu_ratio"] = {t["depth"]: t["cpu_ratio"] for t in timing}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
