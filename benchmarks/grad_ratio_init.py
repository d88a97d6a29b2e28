"""State-gradient ratio ‖∂loss/∂X_0‖/‖∂loss/∂X_L‖ at initialisation, per depth variant.

Tiny width (16, 2 heads, block 16, batch 2, vocab 37, random tokens) so depth 64 is cheap.
Prints ONE JSON line: {variant: ratio} per depth. The acceptance test asserts [0.1, 10] at depth
64 for ode, sqrt, nonexpansive and leapfrog (tests/test_stability.py).

    python benchmarks/grad_ratio_init.py
"""

import json
import sys
import time

import torch

from layerflow import RunConfig, build_model
from layerflow.diagnostics import state_gradient_norms
from layerflow.sweep import VARIANTS


def main():
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = {}
    for depth in (4, 16, 64):
        row = {}
        for v, kw in VARIANTS.items():
            torch.manual_seed(0)
            cfg = RunConfig().replace(n_layer=depth, n_embd=16, n_head=2, block_size=16,
                                      vocab_size=37, **kw)
            model = build_model(cfg)
            g = torch.Generator().manual_seed(0)
            idx = torch.randint(0, 37, (2, 16), generator=g)
            tgt = torch.randint(0, 37, (2, 16), generator=g)
            row[v] = round(state_gradient_norms(model, idx, tgt)["grad_ratio"], 4)
        out[str(depth)] = row
    print(json.dumps({"benchmark": "grad_ratio_init", "width": 16, "ratio": out,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
