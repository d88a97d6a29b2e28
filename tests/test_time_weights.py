"""Weights in time (untied / tied / smooth), re-discretisation, adaptive solves, eval CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from layerflow import build_model, get_integrator
from layerflow.fields.galerkin import time_basis
from layerflow.integrators.continuous import set_steps


def smooth_model(integrator="lie_trotter", basis="legendre", **kw):
    torch.manual_seed(0)
    cfg = tiny_config(integrator=integrator, vocab_size=37, weights="smooth", n_layer=4,
                      step_size="T/L", total_time=2.0, time_basis=basis, basis_size=3, **kw)
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # make the weights really vary in t
        for name, p in model.named_parameters():
            if name.endswith("coeff"):
                p[1:].normal_(0.0, 0.02)
    return model


def test_time_basis():
    s = torch.linspace(0, 1, 2001, dtype=torch.float64)
    phi = torch.stack([time_basis("legendre", 4, x) for x in s])  # (N, 4)
    gram = (phi.T @ phi) / len(s)  # ∫₀¹ P_i(2s−1) P_j(2s−1) ds = δ_ij / (2i+1)
    assert torch.allclose(gram, torch.diag(1 / torch.tensor([1.0, 3, 5, 7], dtype=gram.dtype)),
                          atol=2e-3)
    f = time_basis("fourier", 3, torch.tensor(0.25, dtype=torch.float64))
    assert torch.allclose(f, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), atol=1e-12)


def test_smooth_parameter_counts_and_tied():
    cfg = dict(vocab_size=37, n_layer=4)
    untied = build_model(tiny_config(**cfg)).num_params()
    tied = build_model(tiny_config(weights="tied", **cfg))
    smooth = build_model(tiny_config(weights="smooth", basis_size=3, **cfg))
    assert len(tied.fields) == 1 and tied.n_steps == 4
    assert tied.num_params() < smooth.num_params() < untied


@pytest.mark.parametrize("integrator,order", [("lie_trotter", 1), ("heun", 2), ("rk4", 4)])
def test_smooth_model_converges_with_more_steps(integrator, order):
    """Outputs at L, 2L, 4L, 8L steps (L = 8): successive differences shrink by ≈ 2^order."""
    model = smooth_model(integrator)
    idx = torch.randint(0, 37, (1, 12))
    outs = []
    for n in (8, 16, 32, 64):
        set_steps(model, n)
        outs.append(model(idx)[0])
    d = [(outs[i] - outs[i + 1]).norm().item() for i in range(3)]
    rates = np.log2([d[0] / d[1], d[1] / d[2]])
    assert np.all(np.abs(rates - order) < 0.35), (d, rates)
    assert abs(model.step_size * model.n_steps - 2.0) < 1e-12


def test_set_steps_refuses_untied_and_learned_steps():
    with pytest.raises(ValueError, match="untied"):
        set_steps(build_model(tiny_config(vocab_size=37)), 8)
    with pytest.raises(ValueError, match="learned"):
        set_steps(build_model(tiny_config(vocab_size=37, weights="tied",
                                          learn_step_size=True)), 8)


def test_adaptive_dopri5_agrees_with_fine_rk4_and_counts_nfe():
    model = smooth_model("rk4")
    idx = torch.randint(0, 37, (1, 8))
    set_steps(model, 64)
    ref = model(idx)[0]
    from layerflow.integrators.adaptive import AdaptiveSolver

    model.solver = AdaptiveSolver("dopri5", rtol=1e-7, atol=1e-9)
    out = model(idx)[0]
    assert (out - ref).abs().max().item() < 1e-5
    tight_nfe = model.solver.nfe
    assert tight_nfe >= 12  # at least two accepted dopri5 steps (6 evaluations each)
    loose = AdaptiveSolver("dopri5", rtol=1e-3, atol=1e-4)
    model.solver = loose
    assert (model(idx)[0] - ref).abs().max().item() < 1e-2
    assert 6 <= loose.nfe < tight_nfe


def test_adaptive_adjoint_gradients_match_odeint():
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(0)
        cfg = tiny_config(vocab_size=37, weights="tied", step_size="T/L", adaptive="dopri5",
                          rtol=1e-7, atol=1e-8, adjoint=adjoint, block_size=8)
        model = build_model(cfg).double()
        idx = torch.randint(0, 37, (1, 8))
        _, loss = model(idx, idx)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() < 1e-4


def test_adaptive_generation_falls_back_to_no_cache():
    from layerflow import KVCache

    torch.manual_seed(0)
    model = build_model(tiny_config(vocab_size=37, weights="smooth", adaptive="dopri5")).eval()
    idx = torch.randint(0, 37, (1, 4))
    a = model.generate(idx, 3, temperature=0.0, use_cache=True)
    b = model.generate(idx, 3, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cache"):
        model(idx, cache=KVCache())


def test_second_order_adaptive_matches_leapfrog():
    model = smooth_model("leapfrog")
    idx = torch.randint(0, 37, (1, 8))
    set_steps(model, 128)
    ref = model(idx)[0]
    from layerflow.integrators.adaptive import AdaptiveSolver

    model.solver = AdaptiveSolver("dopri5", rtol=1e-7, atol=1e-9)
    assert (model(idx)[0] - ref).abs().max().item() < 1e-3
    assert get_integrator("leapfrog").order == 2


def test_eval_and_sample_steps_cli(tiny_corpus, tmp_path, capsys):
    from layerflow.cli import main

    out = tmp_path / "run"
    common = ["--data", str(tiny_corpus), "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
              "--block-size", "16", "--batch-size", "4", "--max-iters", "3",
              "--eval-interval", "3", "--eval-iters", "1", "--sample-tokens", "0",
              "--no-progress"]
    assert main(["train", "--out", str(out), "--weights", "smooth", "--step-size", "T/L",
                 *common]) == 0
    capsys.readouterr()
    losses = {}
    for steps in ("2", "8"):
        assert main(["eval", str(out), "--steps", steps, "--eval-iters", "2"]) == 0
        rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert rec["steps"] == int(steps) and abs(rec["h"] * rec["steps"] - 1.0) < 1e-12
        losses[steps] = rec["val_loss"]
    assert abs(losses["2"] - losses["8"]) < 0.5
    assert main(["eval", str(out), "--adaptive", "dopri5", "--eval-iters", "1"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["nfe_mean"] > 0
    assert main(["sample", str(out), "--steps", "6", "--tokens", "5"]) == 0
    untied = tmp_path / "untied"
    assert main(["train", "--out", str(untied), *common]) == 0
    capsys.readouterr()
    assert main(["eval", str(untied), "--steps", "4"]) == 2
    assert "untied" in capsys.readouterr().err


def test_step_jitter_trains_on_several_grids_and_evaluates_on_one():
    from layerflow import RunConfig
    from layerflow.config import ConfigError

    torch.manual_seed(0)
    model = build_model(tiny_config(vocab_size=37, weights="tied", step_jitter=3))
    f = model.fields[0]
    calls = []
    orig = f.attn_term
    f.attn_term = lambda *a, **k: calls.append(1) or orig(*a, **k)
    idx = torch.randint(0, 37, (1, 8))
    seen = set()
    for _ in range(12):
        calls.clear()
        model(idx, idx)
        seen.add(len(calls))
    assert seen == {2, 4, 6}  # L = 2 steps times m ∈ {1, 2, 3}
    model.eval()
    calls.clear()
    with torch.no_grad():
        model(idx)
    assert len(calls) == 2
    with pytest.raises(ConfigError, match="step_jitter"):
        RunConfig().replace(step_jitter=2)


def test_embed_scale_multiplies_the_initial_state_and_is_validated():
    """X_0 = s·(E[tok] + P[pos]): the flow of a scaled model starts at s times the embedding."""
    from layerflow.config import ConfigError

    idx = torch.randint(0, 37, (2, 9))
    torch.manual_seed(0)
    plain = build_model(tiny_config(vocab_size=37))
    torch.manual_seed(0)
    scaled = build_model(tiny_config(vocab_size=37, embed_scale=8.0))
    scaled.load_state_dict(plain.state_dict())
    assert torch.allclose(scaled.embed(idx), 8.0 * plain.embed(idx), atol=1e-6)
    assert not torch.allclose(scaled(idx)[0], plain(idx)[0], atol=1e-3)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="embed_scale"):
            tiny_config(embed_scale=bad)
