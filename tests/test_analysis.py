"""Analysis instruments on systems whose answer is known (issue 6)."""

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from conftest import tiny_config

from layerflow import INTEGRATORS, ExplicitEuler, Integrator, build_model
from layerflow.analysis import (
    attention_probs,
    capture_attention,
    collect,
    energy_along,
    energy_drift,
    flow_from,
    interaction_energy,
    linear_invariants,
    logit_lens,
    lyapunov_spectrum,
    mean_pairwise_cosine,
    n_clusters,
    rank_one_residual,
    states,
    step_singular_values,
    velocities,
)
from layerflow.analysis.particles import (
    PlainAttention,
    RenormalisedEuler,
    ReplaceStep,
    SphereAttention,
    particle_flow,
)
from layerflow.cli import main

D64 = torch.float64



class Linear(nn.Module):
    """F(X) = X A."""

    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, x, t=None, ctx=None):
        return x @ self.A


class RK4(Integrator):
    """Classical Runge–Kutta (written here so the test does not depend on other issues)."""

    name, order = "rk4_test", 4

    def step(self, f, t, h, x):
        k1 = f(x, t)
        k2 = f(x + h / 2 * k1, t + h / 2)
        k3 = f(x + h / 2 * k2, t + h / 2)
        k4 = f(x + h * k3, t + h)
        return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


# ------------------------------------------------------------------------------- Jacobians
def test_step_singular_values_of_linear_field_equal_those_of_I_plus_hA():
    d, h, n_tok = 5, 0.3, 2
    A = _rand(d, d, seed=1) * 0.7
    model = particle_flow(2, h, d, Linear(A), ExplicitEuler()).double()
    sv = step_singular_values(model, _rand(1, n_tok, d, seed=2), top=3, iters=60)
    # the step map X -> X(I + hA) acts on each of the n_tok rows: every σ appears n_tok times
    ref = np.sort(np.repeat(np.linalg.svd(np.eye(d) + h * A.numpy(), compute_uv=False),
                            n_tok))[::-1][:3]
    assert sv.shape == (2, 3)
    np.testing.assert_allclose(sv, np.stack([ref, ref]), atol=1e-4)


def test_lyapunov_exponents_of_linear_flow_equal_those_of_expm():
    d, h, n = 5, 0.1, 40
    A = _rand(d, d, seed=3) * 0.6
    model = particle_flow(n, h, d, Linear(A), RK4()).double()
    out = lyapunov_spectrum(model, _rand(1, 1, d, seed=4), n_exp=3, sweeps=6)
    T = n * h
    ref = np.log(np.linalg.svd(scipy.linalg.expm(A.numpy() * T), compute_uv=False)) / T
    assert out["time"] == pytest.approx(T)
    np.testing.assert_allclose(out["exponents"], ref[:3], atol=1e-4)
    # the classical one-pass estimate (no sweeps) is visibly biased at this short time
    raw = lyapunov_spectrum(model, _rand(1, 1, d, seed=4), n_exp=3, sweeps=0)["exponents"]
    assert np.abs(raw - ref[:3]).max() > 1e-3


# ------------------------------------------------------------------------------- geometry
def test_particles_on_the_sphere_cluster_and_interaction_energy_is_monotone():
    x0 = _rand(1, 64, 3, seed=0)
    x0 = x0 / x0.norm(dim=-1, keepdim=True)
    model = particle_flow(150, 0.1, 3, SphereAttention(beta=1.0), RenormalisedEuler()).double()
    X = states(flow_from(model, x0))  # (151, 1, 64, 3), T = 15
    cos = mean_pairwise_cosine(X)[:, 0]
    E = interaction_energy(X, beta=1.0)[:, 0].numpy()
    assert cos[0] < 0.2 and cos[-1] > 0.99
    assert n_clusters(X[0, 0]) > 40 and n_clusters(X[-1, 0]) == 1
    assert energy_drift(E)["monotone"] == "nondecreasing"
    assert E[-1] > 1.5 * E[0]
    # the field's energy (−E_β) read through the generic energy interface decreases
    assert energy_drift(energy_along(model, X))["monotone"] == "nonincreasing"


def test_rank_collapse_without_skips_is_doubly_exponential_and_skips_prevent_it():
    d, L, g = 16, 6, torch.Generator().manual_seed(0)
    layers = nn.ModuleList(PlainAttention(d, 1.0, g) for _ in range(L))
    x0 = torch.randn(1, 32, d, generator=g, dtype=D64)
    pure = particle_flow(L, 1.0, d, layers, ReplaceStep()).double()
    skip = particle_flow(L, 1.0, d, layers, ExplicitEuler()).double()
    r_pure = rank_one_residual(states(flow_from(pure, x0)))[:, 0].numpy()
    r_skip = rank_one_residual(states(flow_from(skip, x0)))[:, 0].numpy()
    assert r_pure[0] > 0.9 and r_pure[4] < 1e-12
    # doubly exponential: -log r grows by a factor > 2 per layer (cubic in Dong et al.),
    # so the decrements of log r increase, unlike any geometric (single exponential) decay
    logs = np.log(r_pure[1:4])
    assert logs[2] / logs[1] > 2.0 and logs[1] / logs[0] > 2.0
    assert np.all(np.diff(np.log(r_pure[:5]), 2) < 0)
    assert r_skip.min() > 0.5  # O(1) with skip connections (0.69 after six layers)


def test_attention_probabilities_reproduce_the_module_output():
    for rope in (False, True):
        model = build_model(tiny_config(pos_emb="rope" if rope else "learned"), 50).eval()
        attn = model.fields[0].attn
        x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
        P = attention_probs(attn, x)
        v = attn.c_attn(x).view(2, 7, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
        y = attn.c_proj((P @ v).transpose(1, 2).reshape(2, 7, 32))
        torch.testing.assert_close(y, attn(x), atol=1e-6, rtol=1e-5)
        assert torch.allclose(P.sum(-1), torch.ones(())) and P.triu(1).abs().max() == 0
    calls = capture_attention(model, torch.zeros(1, 5, dtype=torch.long))
    assert len(calls) == model.n_steps and all(len(c) == 1 for c in calls)


# ------------------------------------------------------------------------------- invariants
class Planted(nn.Module):
    """F(X) = tanh(X W) (I − v vᵀ): conserves v·x exactly, moves everything else."""

    def __init__(self, W, v):
        super().__init__()
        self.W, self.P = nn.Parameter(W), nn.Parameter(torch.eye(len(v), dtype=D64) -
                                                       torch.outer(v, v))

    def forward(self, x, t=None, ctx=None):
        return torch.tanh(x @ self.W) @ self.P


def test_planted_linear_invariant_is_recovered():
    d = 8
    v = _rand(d, seed=5)
    v = v / v.norm()
    model = particle_flow(6, 0.3, d, Planted(_rand(d, d, seed=6), v), ExplicitEuler()).double()
    X = states(flow_from(model, _rand(2, 24, d, seed=7)))
    inv = linear_invariants(X, n=3)
    assert abs(float(np.dot(inv["w"][0], v.numpy()))) > 0.99
    assert inv["ratio"][0] < 1e-10 < 1e-3 < inv["ratio"][1]
    assert inv["drift"][0].max() < 1e-6 and inv["drift"][1].max() > 1e-2


class Quadratic(nn.Module):
    """E(x) = ½ Σ xKxᵀ, field −∇E = −xK."""

    def __init__(self, K):
        super().__init__()
        self.K = nn.Parameter(K)

    def forward(self, x, t=None, ctx=None):
        return -x @ self.K

    def energy(self, x):
        return 0.5 * ((x @ self.K) * x).sum()


class Leapfrog(Integrator):
    """Velocity Verlet on (X, V), V_0 = 0."""

    name, order = "leapfrog_test", 2

    def init_state(self, x):
        return (x, torch.zeros_like(x))

    def output(self, s):
        return s[0]

    def step(self, f, t, h, s):
        x, v = s
        v = v + h / 2 * f(x, t)
        x = x + h * v
        return (x, v + h / 2 * f(x, t + h))


class EulerXV(Leapfrog):
    name, order = "euler_xv_test", 1

    def step(self, f, t, h, s):
        x, v = s
        return (x + h * v, v + h * f(x, t))


def test_leapfrog_on_quadratic_hamiltonian_has_bounded_energy_drift():
    d = 4
    Q = torch.linalg.qr(_rand(d, d, seed=8))[0]
    K = Q @ torch.diag(torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=D64)) @ Q.T
    x0 = _rand(1, 3, d, seed=9)
    lf = INTEGRATORS["leapfrog"]() if "leapfrog" in INTEGRATORS else Leapfrog()
    drifts = {}
    for name, integ in (("leapfrog", lf), ("euler", EulerXV())):
        model = particle_flow(400, 0.1, d, Quadratic(K), integ).double()
        tr = flow_from(model, x0)
        X, V = states(tr), velocities(tr)
        assert V is not None and V.shape == X[1:].shape
        drifts[name] = energy_drift(energy_along(model, X, V))
    assert drifts["leapfrog"]["max_rel"] < 0.05
    assert drifts["leapfrog"]["second_half"] < 1.5 * drifts["leapfrog"]["first_half"]
    assert drifts["euler"]["max_rel"] > 10.0  # the same metric sees Euler's secular growth


def test_lyapunov_spectrum_of_a_symplectic_flow_comes_in_plus_minus_pairs():
    """Leapfrog maps are symplectic on (X, V): the exponents pair up as ±λ and sum to zero."""
    K = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=D64)  # eigenvalues 1.9 and 0.1
    lf = INTEGRATORS["leapfrog"]() if "leapfrog" in INTEGRATORS else Leapfrog()
    sym = particle_flow(30, 0.1, 2, Quadratic(K), lf).double()
    lam = lyapunov_spectrum(sym, _rand(1, 1, 2, seed=10), n_exp=4, sweeps=4)["exponents"]
    assert abs(lam.sum()) < 1e-8
    np.testing.assert_allclose(lam[:2], -lam[::-1][:2], atol=1e-5)
    assert lam[0] > 0.1
    # explicit Euler on (X, V) expands volume: det(I + h²K) > 1 per step, so Σλ > 0
    lam2 = lyapunov_spectrum(particle_flow(30, 0.1, 2, Quadratic(K), EulerXV()).double(),
                             _rand(1, 1, 2, seed=10), n_exp=4, sweeps=4)["exponents"]
    h2K = np.linalg.det(np.eye(2) + 0.01 * K.numpy())
    assert lam2.sum() == pytest.approx(30 * np.log(h2K) / 3.0, rel=1e-6)


def test_energy_hook_points_are_read_when_the_field_emits_them():
    from layerflow.analysis import energy_from_trajectory
    from layerflow.hooks import Trajectory

    traj = Trajectory({f"flow.step.{k}.energy": torch.tensor([3.0 - k, 1.0]) for k in range(3)})
    E = energy_from_trajectory(traj)
    np.testing.assert_allclose(E, [4.0, 3.0, 2.0])
    assert energy_drift(E)["monotone"] == "nonincreasing"
    assert energy_from_trajectory(Trajectory({"flow.step.0.state": torch.zeros(1)})) is None


# ------------------------------------------------------------------------------- lens
def test_logit_lens_at_the_last_step_equals_the_model_logits_exactly():
    model = build_model(tiny_config(n_layer=3), 100).eval()
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, traj = collect(model, idx)
    tgt = torch.roll(idx, -1, 1)
    lens = logit_lens(model, states(traj), tgt)
    assert torch.equal(lens["last_logits"], logits)
    assert torch.equal(lens["last_logits"], model(idx)[0])
    assert lens["loss"][-1] == model(idx, tgt)[1].item()
    assert lens["agree"][-1] == 1.0 and len(lens["loss"]) == 4
    assert abs(lens["loss"][0] - math.log(model.vocab_size)) < 1.0  # untrained: near uniform


# ------------------------------------------------------------------------------- CLI, report
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from layerflow import train

    root = tmp_path_factory.mktemp("runs")
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(["the flow of tokens through layer time is an ode"] * 300))
    runs = []
    for name, integ in (("lt", "lie_trotter"), ("eu", "euler")):
        cfg = tiny_config(data=str(corpus), integrator=integ, max_iters=10, sample_tokens=0)
        train(cfg, root / name)
        runs.append(root / name)
    return runs


def test_analyze_cli_writes_report_and_metrics(two_runs, tmp_path):
    out = tmp_path / "rep"
    assert main(["analyze", str(two_runs[0]), "--out", str(out), "--lyapunov", "4",
                 "--jacobian-top", "2", "--sequences", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())[""]
    assert m["lens_exact_at_last_step"] is True
    assert len(m["state_norm"]) == 3 and len(m["lyapunov"]["exponents"]) == 4
    page = (out / "index.html").read_text()
    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert len(imgs) >= 8 and all((out / i).stat().st_size > 1000 for i in imgs)
    assert page.count("<figcaption>") == len(imgs)


def test_analyze_compare_mode_and_bad_input(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["analyze", *map(str, two_runs), "--out", str(out), "--prompt",
                 "the flow of tokens", "--lyapunov", "2", "--jacobian-top", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == {"lt", "eu"} and m["eu"]["integrator"] == "euler"
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    assert main(["analyze", str(two_runs[0]), "--text", str(tmp_path / "missing.txt")]) == 2
    assert main(["analyze", str(two_runs[0]), "--prompt", "x", "--text", "y"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("layerflow") for line in err)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless chromium not installed")
def test_report_renders_in_headless_chromium(two_runs, tmp_path):
    out = tmp_path / "render"
    assert main(["analyze", *map(str, two_runs), "--out", str(out), "--lyapunov", "2",
                 "--jacobian-top", "1", "--sequences", "2"]) == 0
    page = (out / "index.html").read_text()
    probe = ("<script>window.addEventListener('load',()=>{const s=[...document.images].map("
             "i=>i.getAttribute('src')+':'+i.naturalWidth).join(' ');"
             "document.body.setAttribute('data-images',s);});</script>")
    (out / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000", "--allow-file-access-from-files"]
    res = subprocess.run([CHROMIUM, *flags, "--dump-dom", (out / "probe.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r'data-images="([^"]*)"', res.stdout)
    assert found, res.stderr[-2000:]
    widths = dict(item.rsplit(":", 1) for item in found.group(1).split())
    assert len(widths) == len(re.findall(r"<img ", page)) >= 8
    assert all(int(w) > 100 for w in widths.values()), widths
    shot = out / "screenshot.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1100,5000", f"--screenshot={shot}",
                    (out / "index.html").as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
