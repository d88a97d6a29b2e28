"""Energy Transformer: monotone energy descent, hand-written gradients = autograd, Hopfield
retrieval, and the causal energy language model (causality, cache, CLI)."""

from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_config

from layerflow import KVCache, build_model, run_with_trajectory
from layerflow.cli import main
from layerflow.energy_lm import EnergyLM, conditional_energy_steps
from layerflow.fields.energy import EnergyLayerNorm, EnergyTransformer, descend
from layerflow.fields.hopfield import HopfieldMLP


@contextmanager
def one_thread():
    """Tiny tensors run fastest (and least disturbed by other jobs) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def block64(causal=False, std=0.3, hopfield="relu", **kw):
    torch.manual_seed(1)
    blk = EnergyTransformer(12, 2, 6, 24, causal=causal, hopfield=hopfield, attn_init_std=std,
                            mem_init_std=std, **kw).double()
    with torch.no_grad():  # move γ and δ off their initial values
        blk.norm.raw_gamma.fill_(0.3)
        blk.norm.delta.normal_(0, 0.5)
    return blk


# ---------------------------------------------------------------------- monotone descent
def test_tutorial_configuration_energy_decreases_every_step_and_is_bounded():
    """Token dim 12, 2 heads of dim 6, 24 memories, 100 random tokens, 3000 steps of α = 0.5
    (the Energy Transformer tutorial, Hoover et al.): E(X_{k+1}) < E(X_k) at every one of the
    3000 steps (float64), and E stays above the analytic lower bound."""
    torch.manual_seed(0)
    blk = EnergyTransformer(12, 2, 6, 24).double()  # reference init: W ~ N(0, .002), ξ ~ N(0, .02)
    x = torch.randn(1, 100, 12, dtype=torch.float64)
    with one_thread(), torch.no_grad():
        _, energies = descend(blk, x, 3000, 0.5)
    e = torch.tensor(energies, dtype=torch.float64)
    d = e[1:] - e[:-1]
    assert len(d) == 3000
    assert (d < 0).all(), f"energy rose at steps {torch.nonzero(d >= 0).flatten()[:5].tolist()}"
    assert e.min() >= blk.lower_bound(100)
    assert e[-1] < e[0] - 1.0  # it really moved


def test_energy_descent_with_larger_weights_and_softmax_memory():
    """A stronger random block (weights N(0, 0.3)) with a small step still descends monotonically,
    also with the log-sum-exp memory."""
    for kind in ("relu", "softmax"):
        blk = block64(hopfield=kind)
        x = torch.randn(2, 20, 12, dtype=torch.float64)
        with one_thread(), torch.no_grad():
            _, e = descend(blk, x, 100, 0.05)
        e = torch.tensor(e)
        assert ((e[1:] - e[:-1]) < 0).all() and e.min() >= blk.lower_bound(20) * 2


# ---------------------------------------------------------------------- gradients
def test_energy_layernorm_is_gradient_of_convex_lagrangian():
    ln = EnergyLayerNorm(7).double()
    with torch.no_grad():
        ln.raw_gamma.fill_(-0.4)
        ln.delta.normal_()
    x = (torch.randn(5, 7, dtype=torch.float64) * 3).requires_grad_()
    (g,) = torch.autograd.grad(ln.lagrangian(x).sum(), x)
    assert torch.allclose(g, ln(x), atol=1e-12, rtol=0)
    ref = torch.nn.functional.layer_norm(x, (7,), eps=ln.eps) * ln.gamma + ln.delta
    assert torch.allclose(ln(x), ref, atol=1e-12)
    hess = torch.autograd.functional.hessian(lambda v: ln.lagrangian(v), x[0].detach())
    assert torch.linalg.eigvalsh(hess).min() > -1e-10  # convex


@pytest.mark.parametrize("causal", [False, True])
def test_attention_gradient_matches_autograd(causal):
    blk = block64(causal)
    g = blk.norm(torch.randn(3, 9, 12, dtype=torch.float64))
    a, b = blk.attn.grad(g), blk.attn.autograd_grad(g)
    assert (a - b).abs().max() < 1e-12 and a.abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["relu", "softmax"])
def test_hopfield_gradient_matches_autograd(kind):
    hop = HopfieldMLP(12, 24, kind, beta=2.0, init_std=0.5).double()
    g = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(hop.energy(g), g)
    assert (hop.grad(g) - ref).abs().max() < 1e-12 and ref.abs().max() > 1e-2


def test_bidirectional_field_is_minus_energy_gradient():
    blk = block64()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    g = blk.norm(x).detach().requires_grad_()
    e = blk.attn.energy(g) + blk.hopfield.energy(g)
    (ref,) = torch.autograd.grad(e, g)
    assert (blk(x) + ref).abs().max() < 1e-12


def test_causal_field_is_each_tokens_own_conditional_gradient():
    """Row C of the causal field = −∂E_C/∂g_C with the context held fixed, computed token by
    token; E_C does not depend on g_B for B ≠ C through the differentiated path."""
    blk = block64(causal=True)
    x = torch.randn(1, 6, 12, dtype=torch.float64)
    g = blk.norm(x).detach()
    field = blk(x)
    for c in range(6):
        own = g.clone().requires_grad_()
        e_c = blk.attn.token_energies(own, g)[0, c] + blk.hopfield.token_energies(own)[0, c]
        (d,) = torch.autograd.grad(e_c, own)
        assert (field[0, c] + d[0, c]).abs().max() < 1e-12
        assert d[0, torch.arange(6) != c].abs().max() == 0


def test_autograd_path_trains_like_the_analytic_path():
    """Gradients of a loss after 3 descent steps wrt the weights: the hand-written field and the
    autograd field (create_graph=True, a double backward) agree — descent is trainable end to
    end either way."""
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    grads = []
    for analytic in (True, False):
        blk = block64(causal=True, analytic=analytic)
        y, _ = descend(blk, x, 3, 0.2, record=False)
        y.pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in blk.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < 1e-10 and grads[0].abs().max() > 1e-3


# ---------------------------------------------------------------------- Hopfield retrieval
def test_hopfield_retrieves_stored_patterns_in_one_update():
    """Ramsauer et al. 2021 (Thm. 4): for well-separated patterns and large β one update
    ξᵀ softmax(β ξ q) lands on the stored pattern (error < 1e-3); a small β averages instead."""
    torch.manual_seed(0)
    hop = HopfieldMLP(64, 16, "softmax", beta=1.0).double()
    with torch.no_grad():
        hop.xi.copy_(torch.randn(16, 64, dtype=torch.float64))  # separation ≈ 64 − 3·8
    q = hop.xi.detach() + 0.3 * torch.randn(16, 64, dtype=torch.float64)
    err = (hop.retrieve(q) - hop.xi).norm(dim=-1)
    assert err.max() < 1e-3
    assert (hop.retrieve(q, beta=1e-3) - hop.xi).norm(dim=-1).min() > 1.0


# ---------------------------------------------------------------------- the causal LM
def energy_lm(**kw):
    torch.manual_seed(0)
    kw = {"step_size": "0.5", **kw}
    cfg = tiny_config(model="energy", integrator="euler", vocab_size=37, n_layer=3, **kw)
    return build_model(cfg).eval()


def test_build_model_dispatches_energy_and_validates():
    m = energy_lm()
    assert isinstance(m, EnergyLM) and m.n_steps == 3 and len(m.fields) == 1
    assert m.block.hopfield.xi.shape == (128, 32)  # n_memories 0 → 4·n_embd
    from layerflow.config import ConfigError

    with pytest.raises(ConfigError, match="hopfield"):
        tiny_config(model="energy", hopfield="tanh")
    with pytest.raises(ConfigError, match="pos_emb"):
        tiny_config(model="energy", pos_emb="rope")


def test_energy_lm_is_causal_and_cached_equals_uncached():
    m = energy_lm()
    idx = torch.randint(0, 37, (2, 16))
    a, _ = m(idx)
    idx2 = idx.clone()
    idx2[:, 9:] = (idx2[:, 9:] + 5) % 37
    b, _ = m(idx2)
    assert (a[:, :9] - b[:, :9]).abs().max() == 0 and (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3
    cache = KVCache()
    parts = [m(idx[:, :7], cache=cache)[0]] + [m(idx[:, i:i + 1], cache=cache)[0]
                                               for i in range(7, 16)]
    assert (torch.cat(parts, 1) - a).abs().max() < 1e-5
    g = [torch.Generator().manual_seed(3) for _ in range(2)]
    with one_thread():
        out = [m.generate(idx[:, :2], 40, generator=g[i], use_cache=u)
               for i, u in enumerate((True, False))]
    assert torch.equal(out[0], out[1])


def test_energy_hooks_and_per_token_conditional_descent():
    """Energies are emitted at every step; with a small α every token's conditional energy at
    fixed context goes down at every step (float64)."""
    m = energy_lm(step_size="0.05").double()
    idx = torch.randint(0, 37, (2, 16))
    _, traj = run_with_trajectory(m, idx, "*energy")
    assert set(traj) == {"embed.energy"} | {f"flow.step.{k}.energy" for k in range(3)}
    assert traj["flow.step.2.energy"].shape == (2, 16)
    states = m.energy_trajectory(idx)
    steps = conditional_energy_steps(m.block, states)
    assert torch.allclose(steps["energy"][-1], traj["flow.step.2.energy"])
    assert (steps["fixed"] < 0).all()


def test_cli_trains_energy_model(tmp_path, tiny_corpus, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "energy", "--integrator", "euler", "--data",
                 str(tiny_corpus), "--out", str(out), "--n-layer", "2", "--n-head", "2",
                 "--n-embd", "16", "--n-memories", "32", "--block-size", "8", "--batch-size",
                 "2", "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
                 "--sample-tokens", "5", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert main(["info", str(out)]) == 0
    assert "energy" in capsys.readouterr().out
    assert main(["train", "--model", "energy", "--hopfield", "nope", "--out",
                 str(tmp_path / "x")]) == 2
