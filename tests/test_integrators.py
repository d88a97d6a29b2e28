"""Integrators against mathematics: tableaux, convergence orders, energy, KV cache, CLI."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from problems import (
    TermsField,
    exact_linear,
    frozen_transformer_field,
    linear_field,
    linear_problem,
    reference_solution,
    run,
    slope,
)

from layerflow import INTEGRATORS, KVCache, build_model, get_integrator
from layerflow.integrators import BoundField, ButcherTableau, TableauError
from layerflow.integrators.tableau import RK4

ALL = sorted(INTEGRATORS)


# ------------------------------------------------------------------ tableaux check themselves
def test_tableau_rejects_inconsistent():
    with pytest.raises(TableauError, match="row-sum"):
        ButcherTableau("bad", ((0.0, 0.0), (0.4, 0.0)), (0.5, 0.5), (0.0, 0.5), 1)
    with pytest.raises(TableauError, match="explicit"):
        ButcherTableau("bad", ((0.5, 0.0), (0.0, 0.5)), (0.5, 0.5), (0.5, 0.5), 1)
    with pytest.raises(TableauError, match="Σb"):
        ButcherTableau("bad", ((0.0,),), (0.9,), (0.0,), 1)
    with pytest.raises(TableauError, match="Σbc"):  # Euler-like weights cannot claim order 2
        ButcherTableau("bad", ((0.0, 0.0), (1.0, 0.0)), (1.0, 0.0), (0.0, 1.0), 2)
    with pytest.raises(TableauError, match="ΣbAAc"):  # RK4 with a corrupted a_43
        a = tuple(tuple(r) for r in RK4.a[:3]) + ((0.0, 0.5, 0.5, 0.0),)
        ButcherTableau("bad", a, RK4.b, RK4.c, 4)


# ------------------------------------------------------------------ orders on a linear ODE
def _ns(order):
    return {1: [16, 32, 64, 128], 2: [8, 16, 32, 64], 4: [4, 8, 16, 32]}[order]


@pytest.mark.parametrize("name", ALL)
def test_order_on_linear_ode(name):
    """Empirical order (log–log slope of the error at T vs h) within 0.3 of the declared one."""
    integ = get_integrator(name)
    a1, a2 = linear_problem()
    field = linear_field(a1, a2)
    x0 = np.random.default_rng(1).normal(size=4)
    T = 1.0
    exact = exact_linear(integ, a1 + a2, x0, T)
    ns = _ns(integ.order)
    errs = [np.linalg.norm(run(integ, field, torch.tensor(x0), T, n).numpy() - exact)
            for n in ns]
    assert abs(slope(ns, errs) - integ.order) <= 0.3, (name, errs)


_REFS: dict = {}
EXPECTED = {"euler": 1, "lie_trotter": 1, "macaron": 1, "symplectic_euler": 1, "momentum": 1,
            "heun": 2, "midpoint": 2, "strang": 2, "leapfrog": 2, "verlet": 2, "rk4": 4}


@pytest.mark.parametrize("name", ALL)
def test_order_on_frozen_attention_mlp_field(name):
    """On a frozen random attention+MLP field against a fine RK4 reference."""
    integ = get_integrator(name)
    module, x0 = frozen_transformer_field()
    field = BoundField(module)
    T = 1.0
    key = (getattr(integ, "dynamics", "first_order"), getattr(integ, "epsilon", 1.0))
    if key not in _REFS:  # one fine RK4 reference per ODE
        _REFS[key] = reference_solution(integ, field, x0, T, n=256)
    ref = _REFS[key]
    ns = _ns(integ.order)
    errs = [(run(integ, field, x0, T, n) - ref).norm().item() for n in ns]
    s = slope(ns, errs)
    assert abs(s - integ.order) <= 0.3, (name, s, errs)
    if name in EXPECTED:
        assert integ.order == EXPECTED[name]


def test_strang_is_second_order_for_time_dependent_field():
    """F = A₁x·cos t + A₂x: a non-autonomous split field (checks the τ bookkeeping)."""
    a1, a2 = linear_problem(seed=3)
    m1, m2 = torch.tensor(a1), torch.tensor(a2)
    field = TermsField(lambda x, t: (x @ m1.T) * math.cos(t), lambda x, t: x @ m2.T * (1 + t))
    x0 = torch.ones(4, dtype=torch.float64)
    ref = run(get_integrator("rk4"), field, x0, 1.0, 2048)
    for name in ("strang", "heun", "midpoint"):
        ns = [8, 16, 32, 64]
        errs = [(run(get_integrator(name), field, x0, 1.0, n) - ref).norm().item() for n in ns]
        assert abs(slope(ns, errs) - 2) <= 0.3, (name, errs)


def test_macaron_euler_substeps_are_only_first_order_but_strang_is_second():
    """The h² defect of Euler-substep Macaron is ½A'A + ¼M'M (so it is order 1)."""
    a1, a2 = linear_problem()
    field = linear_field(a1, a2)
    x0 = torch.ones(4, dtype=torch.float64)
    exact = exact_linear(get_integrator("euler"), a1 + a2, x0.numpy(), 1.0)
    e_mac = np.linalg.norm(run(get_integrator("macaron"), field, x0, 1.0, 64).numpy() - exact)
    e_str = np.linalg.norm(run(get_integrator("strang"), field, x0, 1.0, 64).numpy() - exact)
    assert e_str < e_mac / 50


# ------------------------------------------------------------------ energy (harmonic oscillator)
def test_leapfrog_energy_bounded_euler_drifts():
    """x'' = −x for 10⁴ steps: leapfrog's energy error stays O(h²); explicit Euler's grows."""
    h, n = 0.01, 10_000
    x0 = torch.tensor([1.0], dtype=torch.float64)
    osc = TermsField(lambda x, t: -x)
    integ = get_integrator("leapfrog")
    state = (x0, torch.zeros_like(x0))
    errs = []
    for k in range(n):
        state = integ.step(osc, k * h, h, state)
        errs.append(abs(0.5 * (state[0] ** 2 + state[1] ** 2).item() - 0.5))
    assert max(errs) < 1e-4
    assert max(errs[n // 2:]) < 2 * max(errs[: n // 2]) + 1e-12  # no drift

    aug = TermsField(lambda z, t: torch.stack([z[1], -z[0]]))
    euler, z = get_integrator("euler"), torch.tensor([1.0, 0.0], dtype=torch.float64)
    e_mid = None
    for k in range(n):
        z = euler.step(aug, k * h, h, z)
        if k == n // 2 - 1:
            e_mid = 0.5 * (z ** 2).sum().item() - 0.5
    e_end = 0.5 * (z ** 2).sum().item() - 0.5
    assert e_end > 0.5 and e_end > 1.9 * e_mid  # (1 + h²)^n − 1 grows without bound


# ------------------------------------------------------------------ models, cache, CLI
@pytest.mark.parametrize("name", ALL)
def test_every_integrator_cached_generation_equals_uncached(name):
    torch.manual_seed(0)
    model = build_model(tiny_config(integrator=name, vocab_size=37, step_size="T/L")).eval()
    idx = torch.randint(0, 37, (2, 5))
    a = model.generate(idx, 14, temperature=0.0, use_cache=True)
    b = model.generate(idx, 14, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)
    full, _ = model(a[:, :16])
    cache = KVCache()
    part = torch.cat([model(a[:, :9], cache=cache)[0],
                      model(a[:, 9:16], cache=cache)[0]], 1)
    assert (full - part).abs().max().item() < 1e-5


def test_macaron_weights_model_and_cache():
    torch.manual_seed(0)
    cfg = tiny_config(integrator="strang", macaron_weights=True, vocab_size=37)
    model = build_model(cfg).eval()
    plain = build_model(tiny_config(integrator="strang", vocab_size=37))
    assert model.num_params() > plain.num_params()
    idx = torch.randint(0, 37, (2, 5))
    assert torch.equal(model.generate(idx, 10, temperature=0.0),
                       model.generate(idx, 10, temperature=0.0, use_cache=False))
    # with M_b := M_a the separate-weight step equals the shared-weight Strang step
    f = model.fields[0]
    f.mlp_b.load_state_dict(f.mlp.state_dict())
    f.ln_3.load_state_dict(f.ln_2.state_dict())
    x = torch.randn(2, 6, 32)
    shared = TermsField(lambda x, t: f.attn_term(x), lambda x, t: f.mlp_term(x))
    a = get_integrator("strang").step(BoundField(f), 0.0, 0.5, x)
    b = get_integrator("strang").step(shared, 0.0, 0.5, x)
    assert (a - b).abs().max().item() < 1e-6


def test_learned_step_sizes_are_positive_and_trained():
    torch.manual_seed(0)
    model = build_model(tiny_config(vocab_size=37, learn_step_size=True, step_size="T/L",
                                    total_time=2.0))
    hs = torch.stack(model.step_sizes())
    assert torch.allclose(hs, torch.full_like(hs, 1.0))
    idx = torch.randint(0, 37, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.raw_step_size.grad is not None and model.raw_step_size.grad.abs().sum() > 0
    with torch.no_grad():
        model.raw_step_size.fill_(-30.0)
    assert all(h.item() > 0 for h in model.step_sizes())


def test_integrator_from_cli_flags(tiny_corpus, tmp_path, capsys):
    from layerflow.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--data", str(tiny_corpus), "--out", str(out), "--integrator", "strang",
               "--step-size", "T/L", "--total-time", "2", "--n-layer", "2", "--n-embd", "32",
               "--n-head", "2", "--block-size", "16", "--batch-size", "4", "--max-iters", "4",
               "--eval-interval", "4", "--eval-iters", "1", "--sample-tokens", "5",
               "--no-progress"])
    assert rc == 0
    assert main(["info", str(out)]) == 0
    assert "strang, h=1" in capsys.readouterr().out
    assert main(["train", "--integrator", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown integrator 'nope'" in capsys.readouterr().err


def test_unit_step_parities():
    """h = 1: momentum = Momentum ResNet block; heun = ODE Transformer RK2 block; strang on
    F = A + M = half MLP, attention, half MLP with midpoint sub-solves written out."""
    module, x = frozen_transformer_field()
    f = BoundField(module)
    A, M = (lambda y: module.attn_term(y)), (lambda y: module.mlp_term(y))
    v = torch.randn_like(x)
    out = get_integrator("momentum", gamma=0.8).step(f, 0.0, 1.0, (x, v))
    v1 = 0.8 * v + 0.2 * (A(x) + M(x))
    assert torch.allclose(out[1], v1, atol=1e-12) and torch.allclose(out[0], x + v1, atol=1e-12)
    F = lambda y: A(y) + M(y)  # noqa: E731
    k1 = F(x)
    assert torch.allclose(get_integrator("heun").step(f, 0.0, 1.0, x),
                          x + 0.5 * (k1 + F(x + k1)), atol=1e-12)
    y = x + 0.5 * M(x + 0.25 * M(x))
    y = y + A(y + 0.5 * A(y))
    y = y + 0.5 * M(y + 0.25 * M(y))
    assert torch.allclose(get_integrator("strang").step(f, 0.0, 1.0, x), y, atol=1e-12)
