"""Constraint energies in the dynamics: the concept barrier's guarantee, token/word avoidance,
constrained generation and the `layerflow sample --avoid/--concept` command."""

import pytest
import torch
from conftest import tiny_config

from layerflow import build_model, hooks
from layerflow.cli import main
from layerflow.data import CharTokenizer
from layerflow.steering import (
    ConceptBarrier,
    TokenAvoidance,
    WordAvoidance,
    count_words,
    generate_constrained,
    sample_nll,
)


def tiny(integrator="lie_trotter", **kw):
    torch.manual_seed(0)
    return build_model(tiny_config(integrator=integrator, vocab_size=37, **kw)).eval()


def step_states(model, idx, constraints):
    """X_1..X_L of a constrained forward (the state after every step)."""
    seen = {}
    with torch.no_grad(), hooks(model, {"flow.step.*.state":
                                        lambda v, n: seen.__setitem__(n, v.clone())}):
        model(idx, constraints=constraints)
    return [seen[f"flow.step.{k}.state"] for k in range(model.n_steps)]


def test_concept_barrier_gradient_matches_autograd():
    c = ConceptBarrier(torch.randn(8, dtype=torch.float64), 0.3, strength=2.0)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    auto = super(ConceptBarrier, c).grad(x, None)
    assert (c.grad(x) - auto).abs().max() < 1e-12 and auto.abs().max() > 0.1
    assert (c.force(x, None) + 2.0 * auto).abs().max() < 1e-12


@pytest.mark.parametrize("h", [1.0, 0.5])
def test_concept_barrier_splitting_keeps_every_state_below_threshold(h):
    """Lie–Trotter applies the force −λ ReLU(v·x − τ) v as the last substep; with hλ = 1 that
    substep is the projection onto {v·x ≤ τ}: every token state after every step satisfies
    v·x ≤ τ up to float32 rounding (tolerance 1e-5 · max(1, |τ|))."""
    model = tiny(n_layer=4, step_size=str(h))
    idx = torch.randint(0, 37, (4, 16))
    v = torch.randn(32)
    free = torch.stack(step_states(model, idx, None)) @ (v / v.norm())
    tau = float(free.quantile(0.3))  # 70% of the unconstrained states violate it
    assert (free > tau).float().mean() > 0.6 and free.max() - tau > 0.03
    c = ConceptBarrier(v, tau, strength=1.0 / h)
    proj = torch.stack(step_states(model, idx, [c])) @ c.v
    assert proj.max() <= tau + 1e-5 * max(1.0, abs(tau))
    # the flow itself is steered, not just the last state: logits differ from the free run
    assert (model(idx, constraints=[c])[0] - model(idx)[0]).abs().max() > 1e-3


def test_concept_barrier_euler_excess_obeys_the_stated_bound():
    """Euler (force evaluated with the field at x_k) on the energy model: the excess
    e = ReLU(v·x − τ) obeys e_{k+1} ≤ |1 − hλ|·e_k + h·max(v·F(x_k), 0) at every token and step,
    and λ = 1/h removes the old excess entirely."""
    torch.manual_seed(0)
    model = build_model(tiny_config(model="energy", integrator="euler", vocab_size=37,
                                    n_layer=4, step_size="0.5")).eval()
    idx = torch.randint(0, 37, (3, 16))
    free = torch.stack(step_states(model, idx, None))
    v = free.mean(dim=(0, 1, 2))
    v = v / v.norm() if v.norm() > 0 else torch.ones(32) / 32 ** 0.5
    tau = float((free @ v).quantile(0.5))
    h = 0.5
    for lam in (1.0 / h, 0.5 / h):
        c = ConceptBarrier(v, tau, strength=lam)
        terms = {}

        def keep(val, name, terms=terms):
            terms[name] = val.clone()

        rec = {f"flow.step.*.{p}": keep for p in ("state", "attn", "hopfield")}
        with hooks(model, rec):
            model(idx, constraints=[c])
        x_prev = model.embed(idx)
        for k in range(4):
            field = terms[f"flow.step.{k}.attn"] + terms[f"flow.step.{k}.hopfield"]
            e_prev = torch.relu(x_prev @ c.v - tau)
            e_next = torch.relu(terms[f"flow.step.{k}.state"] @ c.v - tau)
            bound = abs(1 - h * lam) * e_prev + h * torch.relu(field @ c.v)
            assert (e_next <= bound + 1e-5).all()
            x_prev = terms[f"flow.step.{k}.state"]


def test_token_avoidance_lowers_probability_of_the_set():
    model = tiny(n_layer=2)
    idx = torch.randint(0, 37, (8, 12))
    p0 = model(idx)[0][:, -1].softmax(-1)
    banned = p0.mean(0).topk(3).indices.tolist()
    c = TokenAvoidance(banned, 37, strength=20.0)
    p1 = model(idx, constraints=[c])[0][:, -1].softmax(-1)
    assert p1[:, banned].sum(-1).mean() < 0.75 * p0[:, banned].sum(-1).mean()
    # last_only: earlier positions are untouched (causal model, force only at the last one)
    assert (model(idx, constraints=[c])[0][:, :-1] - model(idx)[0][:, :-1]).abs().max() < 1e-6
    with pytest.raises(ValueError):
        TokenAvoidance([40], 37)


def test_word_avoidance_banned_sets():
    tok = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyzTH ,.\n")))
    w = WordAvoidance(["the", "and"], tok)
    ban = {tok.decode([i]) for i in w.banned("see the")}
    assert ban == {" ", ",", ".", "\n"}  # a non-letter would complete the word
    assert w.banned("other") == [] and w.banned("see th") == [] and w.banned("bathe") == []
    assert {tok.decode([i]) for i in w.banned("x THE")} == ban  # case-insensitive
    assert count_words("The then, the. And andy and", ["the", "and"]) == 3


def test_masked_generation_never_completes_the_word():
    tok = CharTokenizer(sorted(set("the an,")))
    torch.manual_seed(0)
    model = build_model(tiny_config(vocab_size=tok.vocab_size, n_layer=1)).eval()
    w = WordAvoidance(["the", "an"], tok)
    idx = torch.tensor([tok.encode("the ")] * 16)
    g = torch.Generator().manual_seed(0)
    free = generate_constrained(model, idx, 40, generator=g)
    g = torch.Generator().manual_seed(0)
    out = generate_constrained(model, idx, 40, generator=g, masks=[w])
    count = lambda t: sum(count_words(tok.decode(r[4:].tolist()), w.words) for r in t)  # noqa
    assert count(free) > 0 and count(out) == 0


def test_constrained_generation_cached_equals_uncached_for_static_constraints():
    model = tiny(n_layer=2)
    idx = torch.randint(0, 37, (2, 3))
    c = ConceptBarrier(torch.randn(32), 0.0, strength=1.0)
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(1)
        outs.append(model.generate(idx, 20, generator=g, use_cache=use_cache, constraints=[c]))
    assert torch.equal(outs[0], outs[1])


def test_sample_nll_matches_cross_entropy():
    model = tiny(n_layer=1)
    toks = torch.randint(0, 37, (3, 14))
    logits, _ = model(toks[:, :-1])
    ce = torch.nn.functional.cross_entropy(logits[:, 4:].transpose(1, 2), toks[:, 5:],
                                           reduction="none").mean(-1)
    assert torch.allclose(sample_nll(model, toks, 5), ce, atol=1e-5)
    long = torch.randint(0, 37, (2, 40))  # longer than block_size 16: overlapping windows
    assert sample_nll(model, long, 1).shape == (2,)


def test_cli_sample_with_constraints(tmp_path, tiny_corpus, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_corpus), "--out", str(out), "--n-layer", "1",
                 "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2",
                 "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
                 "--sample-tokens", "0", "--no-progress"]) == 0
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("the flow of tokens through layer time")
    neg.write_text("each block is one step of an integrator")
    capsys.readouterr()
    for extra in (["--avoid", "the,of"], ["--avoid", "the", "--mask"],
                  ["--concept", str(pos), str(neg), "--strength", "2"]):
        assert main(["sample", str(out), "--prompt", "The", "--tokens", "20", *extra]) == 0
        assert capsys.readouterr().out.startswith("The")
    for bad in (["--concept", str(pos), str(tmp_path / "missing.txt")],
                ["--avoid", "the", "--strength", "-1"], ["--mask"], ["--avoid", ","]):
        assert main(["sample", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err
