"""Empirical convergence orders of every registered integrator (the numbers the tests assert).

For each integrator: the log–log slope of the error at T = 1 against h on (a) the linear ODE
x' = (A₁ + A₂)x (exact solution by scipy.linalg.expm; A₁x and A₂x are the split terms) and (b) a
frozen random attention+MLP field (float64) against a fine RK4 reference (512 steps), where
(X, V) schemes are compared with the second-order / damped system they discretise
(tests/problems.py). Also the relative reconstruction error of the invertible schemes after 64
steps forward and back (float64 and float32). Prints ONE JSON line.

    python benchmarks/orders.py
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from problems import (  # noqa: E402
    exact_linear,
    frozen_transformer_field,
    linear_field,
    linear_problem,
    reference_solution,
    run,
    slope,
)

from layerflow import INTEGRATORS, get_integrator  # noqa: E402
from layerflow.integrators import BoundField  # noqa: E402
from layerflow.integrators.reversible import reconstruction_error  # noqa: E402

NS = {1: [16, 32, 64, 128], 2: [8, 16, 32, 64], 4: [4, 8, 16, 32]}


def main():
    torch.set_num_threads(1)
    rows, refs = {}, {}
    a1, a2 = linear_problem()
    lin = linear_field(a1, a2)
    x0 = np.random.default_rng(1).normal(size=4)
    module, xt = frozen_transformer_field()
    field = BoundField(module)
    for name in sorted(INTEGRATORS):
        integ = get_integrator(name)
        ns = NS[integ.order]
        exact = exact_linear(integ, a1 + a2, x0, 1.0)
        e_lin = [np.linalg.norm(run(integ, lin, torch.tensor(x0), 1.0, n).numpy() - exact)
                 for n in ns]
        key = (getattr(integ, "dynamics", "first_order"), getattr(integ, "epsilon", 1.0))
        if key not in refs:
            refs[key] = reference_solution(integ, field, xt, 1.0, n=512)
        e_tf = [(run(integ, field, xt, 1.0, n) - refs[key]).norm().item() for n in ns]
        rows[name] = {"declared": integ.order, "linear": round(slope(ns, e_lin), 2),
                      "attn_mlp": round(slope(ns, e_tf), 2)}
        if getattr(integ, "invertible", False):
            for dt, tag in ((torch.float64, "recon_f64"), (torch.float32, "recon_f32")):
                m, x = frozen_transformer_field(std=0.1)
                m = m.to(dt)
                rows[name][tag] = float("%.1e" % reconstruction_error(
                    integ, lambda k, m=m: m, [4.0 / 64] * 64, x.to(dt)))
    print(json.dumps({"benchmark": "orders", "T": 1.0, "integrators": rows}))


if __name__ == "__main__":
    main()
