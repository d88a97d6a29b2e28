"""Hugging Face import: logits parity (GPT-2, Llama with GQA/untied head, Mistral), KV cache,
save → load_run round trip, CLI, clear refusals; re-discretisation (rediscretise.py)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from layerflow import KVCache, from_pretrained, load_run  # noqa: E402
from layerflow.cli import main  # noqa: E402
from layerflow.config import ConfigError, RunConfig  # noqa: E402
from layerflow.hf import HFImportError, import_hf  # noqa: E402
from layerflow.rediscretise import next_token_kl, rediscretisation_table, rediscretise  # noqa: E402

V = 89


def gpt2(**kw):
    cfg = dict(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
               initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def llama(cls="Llama", **kw):
    cfg = dict(vocab_size=V, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
               num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=32,
               tie_word_embeddings=False, initializer_range=0.2, rms_norm_eps=1e-5,
               bos_token_id=0, eos_token_id=0, pad_token_id=None)
    cfg.update(kw)
    torch.manual_seed(0)
    config = getattr(transformers, f"{cls}Config")(**cfg)
    return getattr(transformers, f"{cls}ForCausalLM")(config).eval()


MODELS = {
    "gpt2": lambda: gpt2(),
    "gpt2-relu-inner-untied": lambda: gpt2(activation_function="relu", n_inner=40,
                                           tie_word_embeddings=False),
    "llama-gqa-untied": lambda: llama(rope_theta=500000.0),
    "llama-mqa-tied-bias": lambda: llama(num_key_value_heads=1, tie_word_embeddings=True,
                                         attention_bias=True, mlp_bias=True),
    "llama-headdim": lambda: llama(head_dim=16),
    "mistral-window": lambda: llama("Mistral", sliding_window=24, max_position_embeddings=64),
    "llama3-rope": lambda: llama(rope_parameters={
        "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
}


def tokens(n=3, t=20, seed=1):
    return torch.randint(V, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_match_with_and_without_cache(name):
    hf = MODELS[name]()
    model, tok = from_pretrained(hf)
    idx = tokens()
    with torch.no_grad():
        ref = hf(idx).logits
        out, _ = model(idx)
        cache = KVCache()  # prefix, one token, then a chunk
        parts = [model(idx[:, :9], cache=cache)[0], model(idx[:, 9:10], cache=cache)[0],
                 model(idx[:, 10:], cache=cache)[0]]
    assert ref.abs().max() > 0.5  # large enough weights that a wrong convention would show
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(parts, 1), ref, atol=1e-5, rtol=1e-5)
    assert tok.kind == "ids" and tok.vocab_size == V


def test_conventions_matter():
    """The parity test can fail: a wrong RoPE base or the exact (erf) GELU instead of GPT-2's
    tanh approximation moves the logits far beyond the tolerance."""
    from layerflow import build_model

    idx = tokens()
    for hf, change in ((llama(rope_theta=500000.0), dict(rope_theta=10000.0)),
                       (gpt2(), dict(activation="gelu"))):
        model, _ = from_pretrained(hf)
        wrong = build_model(model.run_config.replace(**change)).eval()
        keep = {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
        wrong.load_state_dict(keep, strict=False)  # RoPE frequencies from the wrong θ
        with torch.no_grad():
            assert (wrong(idx)[0] - hf(idx).logits).abs().max() > 1e-4


def test_config_and_head_tying():
    m, _ = from_pretrained(llama())
    c = m.run_config.model
    assert (c.model, c.n_kv_head, c.tie_head, c.norm, c.pos_emb, c.activation) == (
        "llama", 2, False, "rmsnorm", "rope", "silu")
    assert m.lm_head is not None and m.integrator.name == "lie_trotter" and m.step_size == 1.0
    g, _ = from_pretrained(gpt2())
    assert g.lm_head is None and g.run_config.model.activation == "gelu_tanh"
    assert from_pretrained(MODELS["mistral-window"]())[0].block_size == 24
    hf = MODELS["gpt2-relu-inner-untied"]()
    untied = from_pretrained(hf)[0]
    assert untied.lm_head is not None and untied.run_config.model.tie_head is False
    with torch.no_grad():  # copies, not views: editing the source leaves the import unchanged
        before = untied.fields[0].attn.q_proj.weight.clone()
        hf.transformer.h[0].attn.c_attn.weight.add_(1.0)
    assert torch.equal(untied.fields[0].attn.q_proj.weight, before)
    scaled = from_pretrained(MODELS["llama3-rope"]())[0].fields[1].attn.inv_freq
    plain = 1.0 / 50000.0 ** (torch.arange(0, 8, 2) / 8)
    assert (scaled < plain).all()  # llama3 rescaling: the lowest frequencies divided by 8
    torch.testing.assert_close(scaled[-1], plain[-1] / 8)
    with pytest.raises(ConfigError, match="n_kv_head"):
        RunConfig().replace(model="llama", n_head=6, n_kv_head=4)
    with pytest.raises(ConfigError, match="only used by"):
        RunConfig().replace(activation="silu")


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied"])
def test_save_and_load_run_identical(tmp_path, name):
    hf = MODELS[name]()
    import_hf(hf, tmp_path / "run")
    loaded, tok, cfg, ckpt = load_run(tmp_path / "run")
    model, _ = from_pretrained(hf)
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert cfg == model.run_config and ckpt.state["iter"] == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["model"] == cfg.model.model
    a = loaded.generate(idx[:1, :4], 8, temperature=0.0, use_cache=True)
    b = loaded.generate(idx[:1, :4], 8, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


def _tiny_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60])
    tok.train_from_iterator(["the flow of tokens through layer time"] * 20, trainer=trainer)
    tok.save(str(path))
    return tok


def test_cli_import_directory_with_tokenizer(tmp_path, capsys):
    hf = llama()
    hf.save_pretrained(tmp_path / "hf")
    tok = _tiny_tokenizer(tmp_path / "hf" / "tokenizer.json")
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    model, lt, cfg, _ = load_run(tmp_path / "run")
    assert lt.kind == "hf" and cfg.data.tokenizer == "hf"
    text = "the flow of tokens"
    assert lt.encode(text) == tok.encode(text).ids and lt.decode(lt.encode(text)) == text
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2  # exists
    assert "already holds a run" in capsys.readouterr().err


def test_unsupported_architectures(tmp_path, capsys):
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=16))
    with pytest.raises(HFImportError, match="OPTForCausalLM.*GPT2LMHeadModel.*LlamaForCausalLM"):
        from_pretrained(opt)
    with pytest.raises(HFImportError, match="GPT2Model"):
        from_pretrained(transformers.GPT2Model(transformers.GPT2Config(
            vocab_size=V, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
            eos_token_id=0)))
    with pytest.raises(HFImportError, match="RoPE type 'dynamic'.*llama3"):
        from_pretrained(llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                               "rope_theta": 10000.0}))
    opt.save_pretrained(tmp_path / "opt")
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "opt"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "OPTForCausalLM" in err and "LlamaForCausalLM" in err and len(err.splitlines()) == 1
    assert main(["import-hf", str(tmp_path / "missing"), str(tmp_path / "run2")]) == 2
    assert "not a local model directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_rediscretise_shares_weights_and_measures_kl():
    model, _ = from_pretrained(gpt2())
    idx = tokens()
    same = rediscretise(model, "lie_trotter", 1.0)
    half = rediscretise(model, "lie_trotter", 0.5)
    assert (half.n_steps, half.step_size, model.n_steps, model.step_size) == (4, 0.5, 2, 1.0)
    assert half.field_module(0) is half.field_module(1) is model.fields[0]
    assert half.wte.weight is model.wte.weight and model.integrator.name == "lie_trotter"
    with torch.no_grad():
        ref = model(idx)[0]
        assert torch.equal(same(idx)[0], ref)
        kl_half = next_token_kl(ref, half(idx)[0])
        kl_euler = next_token_kl(ref, rediscretise(model, "euler")(idx)[0])
    assert kl_half.min() >= 0 and kl_half.mean() > 1e-6 and kl_euler.mean() > 1e-6
    # KL is KL: zero on itself, and equals a hand computation on a 2-symbol case
    p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    qs = torch.softmax(q, -1)
    hand = 0.5 * torch.log(0.5 / qs[0, 0]) + 0.5 * torch.log(0.5 / qs[0, 1])
    torch.testing.assert_close(next_token_kl(p, q), hand.double().reshape(1))
    with pytest.raises(ValueError, match="steps per weight segment"):
        rediscretise(model, "lie_trotter", 2.0)
    rows = rediscretisation_table(model, idx, [("lie_trotter", 1.0), ("euler", 0.5),
                                               ("no_such", 1.0)])
    assert rows[0]["kl_mean"] == 0.0 and rows[0]["top1_agree"] == 1.0
    assert rows[1]["steps"] == 4 and rows[1]["kl_mean"] > 0 and "error" in rows[2]


def test_refinement_converges_on_a_tied_flow():
    """On a tied (autonomous) flow with small h, halving h twice shrinks the KL to the finest
    Lie–Trotter discretisation (first order: error ∝ h)."""
    from conftest import tiny_config

    from layerflow import build_model

    torch.manual_seed(0)
    cfg = tiny_config(n_layer=4, vocab_size=V)
    flow = build_model(cfg).eval()
    tied = rediscretise(flow, "lie_trotter", 1.0)
    tied.fields, tied.n_steps, tied.step_size = torch.nn.ModuleList([flow.fields[0]]), 4, 0.5
    for p in tied.fields[0].parameters():
        p.data.mul_(8.0)
    idx = tokens(t=12)
    with torch.no_grad():
        fine = rediscretise(tied, None, 1 / 16)(idx)[0]
        kls = [next_token_kl(fine, rediscretise(tied, None, s)(idx)[0]).mean().item()
               for s in (1.0, 0.5, 0.25)]
    assert rediscretise(tied, None, 2.0).n_steps == 2
    assert kls[0] > kls[1] > kls[2] > 0


def test_attention_probs_reproduce_the_attention_output():
    """GQAttention.attention_probs (for analysis): o_proj(P · V) equals the module's output."""
    model, _ = from_pretrained(llama())
    attn = model.fields[0].attn
    x = torch.randn(2, 10, 48, generator=torch.Generator().manual_seed(0))
    P = attn.attention_probs(x)
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 6, 10))
    assert P[0, 0].triu(1).abs().max() == 0
    v = attn.v_proj(x).view(2, 10, 2, 8).transpose(1, 2).repeat_interleave(3, dim=1)
    y = attn.o_proj((P @ v).transpose(1, 2).reshape(2, 10, 48))
    with torch.no_grad():
        torch.testing.assert_close(y, attn(x), atol=1e-5, rtol=1e-5)


def test_cli_rediscretise(tmp_path, capsys):
    import_hf(gpt2(), tmp_path / "run")  # no tokenizer in memory: prompts are token ids
    run = str(tmp_path / "run")
    args = ["rediscretise", run, "--prompt", "1 5 9 2 7 3 8", "--integrators", "lie_trotter,euler",
            "--scales", "1,0.5", "--json"]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["integrator"], r["scale"], r["steps"]) for r in rows] == [
        ("lie_trotter", 1.0, 2), ("lie_trotter", 0.5, 4), ("euler", 1.0, 2), ("euler", 0.5, 4)]
    assert rows[0]["kl_mean"] == 0.0 and rows[0]["loss"] == rows[0]["loss_ref"]
    assert all(r["kl_mean"] > 0 for r in rows[1:])
    for bad in (["--scales", "2"], ["--scales", "x"], ["--integrators", "nope"]):
        assert main(["rediscretise", run, "--prompt", "1 2 3"] + bad) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_rediscretise_refuses_learned_step_sizes_and_imported_tied_weights():
    from conftest import tiny_config

    from layerflow import build_model

    flow = build_model(tiny_config(vocab_size=V, learn_step_size=True))
    with pytest.raises(ValueError, match="learned one step size per step"):
        rediscretise(flow, "euler")
    cfg = from_pretrained(llama())[0].run_config
    with pytest.raises(ConfigError, match="weights must be untied"):
        build_model(cfg.replace(weights="tied"))
