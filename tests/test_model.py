"""FlowLM against plain transformer code written here, and its invariances."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from layerflow import KVCache, build_model


def model_for(integrator="lie_trotter", **kw):
    torch.manual_seed(0)
    cfg = tiny_config(integrator=integrator, vocab_size=37, **kw)
    return build_model(cfg).eval()


def plain_attention(blk, x):
    """Causal multi-head attention written out: softmax(QKᵀ/√d + mask) V."""
    B, T, C = x.shape
    nh = blk.attn.n_head
    q, k, v = (x @ blk.attn.c_attn.weight.T + blk.attn.c_attn.bias).split(C, dim=2)
    q, k, v = (z.view(B, T, nh, C // nh).transpose(1, 2) for z in (q, k, v))
    att = q @ k.transpose(-2, -1) / (C // nh) ** 0.5
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    return y @ blk.attn.c_proj.weight.T + blk.attn.c_proj.bias


def plain_mlp(blk, x):
    h = F.gelu(x @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias)
    return h @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias


def plain_forward(model, idx, parallel=False):
    x = model.wte(idx) + model.wpe(torch.arange(idx.shape[1]))
    for blk in model.fields:
        if parallel:  # GPT-J parallel block
            x = x + plain_attention(blk, blk.ln_1(x)) + plain_mlp(blk, blk.ln_2(x))
        else:  # pre-norm GPT block
            x = x + plain_attention(blk, blk.ln_1(x))
            x = x + plain_mlp(blk, blk.ln_2(x))
    return model.ln_f(x) @ model.wte.weight.T


@pytest.mark.parametrize("integrator,parallel", [("lie_trotter", False), ("euler", True)])
def test_matches_plain_gpt_block(integrator, parallel):
    model = model_for(integrator)
    idx = torch.randint(0, 37, (3, 16))
    logits, _ = model(idx)
    ref = plain_forward(model, idx, parallel)
    assert (logits - ref).abs().max().item() < 1e-6


def test_lie_trotter_differs_from_euler():
    a, b = model_for("lie_trotter"), model_for("euler")
    idx = torch.randint(0, 37, (2, 16))
    assert (a(idx)[0] - b(idx)[0]).abs().max() > 1e-4


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("integrator", ["lie_trotter", "euler"])
def test_causal(integrator, pos_emb):
    model = model_for(integrator, pos_emb=pos_emb)
    idx = torch.randint(0, 37, (2, 16))
    base, _ = model(idx)
    for j in (1, 7, 15):
        pert = idx.clone()
        pert[:, j] = (pert[:, j] + 5) % 37
        out, _ = model(pert)
        assert torch.equal(out[:, :j], base[:, :j]) or (out[:, :j] - base[:, :j]).abs().max() < 1e-6
        assert (out[:, j:] - base[:, j:]).abs().max() > 1e-6


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_kv_cache_logits_match_full_forward(pos_emb):
    model = model_for(pos_emb=pos_emb)
    idx = torch.randint(0, 37, (2, 16))
    full, _ = model(idx)
    cache = KVCache()
    parts = [model(idx[:, :5], cache=cache)[0]]
    parts += [model(idx[:, i:i + 1], cache=cache)[0] for i in range(5, 9)]
    parts.append(model(idx[:, 9:], cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])  # 1: decode steps on one thread, no oneDNN
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_generate_cached_equals_uncached(temperature, pos_emb, batch):
    """Past block_size (16) the context window moves; both paths follow the same policy."""
    model = model_for(pos_emb=pos_emb)
    prompt = torch.randint(0, 37, (batch, 3))
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        outs.append(model.generate(prompt, 40, temperature=temperature, top_k=10,
                                   use_cache=use_cache, generator=g))
    assert outs[0].shape == (batch, 43)
    assert torch.equal(outs[0], outs[1])


def test_generate_restores_threads_and_onednn(monkeypatch):
    """The decode settings (speed.small_ops) never outlive `generate`, even when it fails."""
    import layerflow.model as lm

    model = model_for()
    before = torch.get_num_threads(), torch._C._get_mkldnn_enabled()
    model.generate(torch.tensor([[1, 2]]), 5)
    assert (torch.get_num_threads(), torch._C._get_mkldnn_enabled()) == before
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:  # inside a decode step's settings
            raise RuntimeError("boom")
        return torch.zeros(1, 1, dtype=torch.long)

    monkeypatch.setattr(lm, "sample_next", failing)
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(torch.tensor([[1, 2]]), 5)
    assert (torch.get_num_threads(), torch._C._get_mkldnn_enabled()) == before


def test_loss_is_cross_entropy():
    model = model_for()
    idx, tgt = torch.randint(0, 37, (2, 16)), torch.randint(0, 37, (2, 16))
    logits, loss = model(idx, tgt)
    assert abs(loss.item() - F.cross_entropy(logits.reshape(-1, 37), tgt.reshape(-1)).item()) < 1e-6


def test_rope_rotates_pairs_by_position_angle():
    """apply_rope = rotation of (x_i, x_{i+D/2}) by p·10000^(−2i/D); scores depend on p − m only."""
    from layerflow.fields.transformer import apply_rope, rope_tables

    D, T = 8, 11
    x = torch.randn(2, 3, T, D, dtype=torch.float64)
    rc, rs = rope_tables(D, 0, T, "cpu", torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, D, 2, dtype=torch.float64) / D)
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    torch.testing.assert_close(apply_rope(x, rc, rs), want)
    late = rope_tables(D, 5, 4, "cpu", torch.float64)  # an offset slice of the same tables
    torch.testing.assert_close(late[0], rc[5:9])
    torch.testing.assert_close(late[1], rs[5:9])
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    r = lambda v, p: apply_rope(v, *rope_tables(D, p, 1, "cpu", torch.float64))[0]  # noqa: E731
    torch.testing.assert_close(r(q, 7) @ r(k, 3), r(q, 4) @ r(k, 0))


def test_sample_next_draws_from_the_softmax_and_respects_top_k():
    """Inverse-CDF sampling: frequencies match softmax(logits/T); masked tokens never appear."""
    from layerflow.model import sample_next

    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 0.7, None, g).view(-1)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    want = torch.softmax(logits[0].double() / 0.7, -1)
    assert (freq - want).abs().max() < 0.01  # ~4 standard errors at n = 20000
    top2 = sample_next(logits, 1.0, 2, g).view(-1)
    assert set(top2.tolist()) == {0, 3}
    assert draws.dtype == torch.int64 and draws.shape == (20000,)
    inf = float("inf")
    for bad in ([[-inf, -inf, -inf]], [[0.0, inf, 0.0]], [[0.0, float("nan"), 1.0]]):
        with pytest.raises(RuntimeError, match="nan or inf"):  # never an out-of-range id
            sample_next(torch.tensor(bad), 1.0, None, g)
