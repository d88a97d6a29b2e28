"""Import Hugging Face `transformers` causal LMs (GPT-2 and Llama families) as `FlowLM`s.

A pre-norm transformer with residual connections is a Lie–Trotter flow with h = 1:
X_{k+1} = X_k + A_k(X_k) followed by X_{k+1} += M_k(X_{k+1}), one untied field per layer. The
conversion maps weights one-to-one (GPT-2's `Conv1D` stores Wᵀ, so its matrices are transposed;
its fused Q/K/V is split), so the imported model computes the same logits, and every integrator,
hook and analysis of layerflow then applies to it (`rediscretise.py` swaps the integrator).

    model, tokenizer = layerflow.from_pretrained("path/to/hf_model_dir")   # or a model object
    layerflow import-hf path/to/hf_model_dir runs/gpt2        # a run directory (load_run)

`transformers` is only needed here (`pip install layerflow[hf]`); a saved run loads without it.
Nothing is downloaded: a path must be a local directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, RunConfig

# HF class -> layerflow family. Mistral is Llama with a sliding window, honoured exactly by
# capping block_size at the window.
SUPPORTED = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
}
ACT_NAMES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
             "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


class HFImportError(ConfigError):
    """A model cannot be imported; the message names the class or setting and what is
    supported. A ConfigError, so the CLI prints one line and exits 2."""


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise HFImportError("importing Hugging Face models needs the optional dependency "
                            "transformers: pip install 'layerflow[hf]'") from None
    return transformers


def _unsupported(what: str) -> HFImportError:
    return HFImportError(f"cannot import {what}: layerflow imports "
                         f"{', '.join(SUPPORTED)} (GPT-2 and Llama-family causal LMs)")


def _activation(name: str, cls: str) -> str:
    if name not in ACT_NAMES:
        raise HFImportError(f"cannot import {cls}: activation {name!r} is not supported "
                            f"(supported: {', '.join(ACT_NAMES)})")
    return ACT_NAMES[name]


ROPE_TYPES = ("default", "linear", "llama3")  # static frequencies, no attention rescaling


def _rope_theta(c, cls: str) -> float:
    """RoPE base θ. Frequencies of the static RoPE types are copied exactly (see convert);
    length-dependent ones (dynamic, longrope) and rescaled attention (yarn) are refused. Handles
    the transformers 5 `rope_parameters` dict and the 4.x `rope_theta` / `rope_scaling`."""
    params = getattr(c, "rope_parameters", None) or {}
    scaling = getattr(c, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise HFImportError(f"cannot import {cls}: RoPE type {kind!r} is not supported "
                            f"(supported: {', '.join(ROPE_TYPES)})")
    theta = params.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    return float(theta)


def config_from_hf(hf_config, cls: str) -> RunConfig:
    """The layerflow RunConfig (family, sizes, norms, RoPE, head tying) of an HF model config."""
    family = SUPPORTED.get(cls)
    if family is None:
        raise _unsupported(cls)
    c = hf_config
    tie = bool(getattr(c, "tie_word_embeddings", True))
    if family == "gpt2":
        if not getattr(c, "scale_attn_weights", True) or getattr(
                c, "scale_attn_by_inverse_layer_idx", False):
            raise HFImportError(f"cannot import {cls}: only the standard 1/sqrt(head_dim) "
                                "attention scaling is supported")
        if getattr(c, "add_cross_attention", False):
            raise HFImportError(f"cannot import {cls} with cross-attention (decoder-only only)")
        model = dict(model="gpt2", n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                     block_size=c.n_positions, mlp_hidden=c.n_inner or 4 * c.n_embd,
                     activation=_activation(c.activation_function, cls), bias=True,
                     pos_emb="learned", norm="layernorm", norm_eps=c.layer_norm_epsilon)
    else:
        if bool(getattr(c, "attention_bias", False)) != bool(getattr(c, "mlp_bias", False)):
            raise HFImportError(f"cannot import {cls}: attention_bias and mlp_bias differ "
                                "(supported: both on or both off)")
        block = c.max_position_embeddings
        window = getattr(c, "sliding_window", None)
        if window and getattr(c, "use_sliding_window", True):
            block = min(block, int(window))  # within the window the model is exact
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        model = dict(model="llama", n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                     n_kv_head=c.num_key_value_heads or c.num_attention_heads,
                     head_dim=0 if head_dim * c.num_attention_heads == c.hidden_size
                     else head_dim,
                     n_embd=c.hidden_size, block_size=block, mlp_hidden=c.intermediate_size,
                     activation=_activation(c.hidden_act, cls),
                     bias=bool(getattr(c, "mlp_bias", False)),
                     pos_emb="rope", norm="rmsnorm", norm_eps=c.rms_norm_eps,
                     rope_theta=_rope_theta(c, cls))
    model.update(vocab_size=c.vocab_size, tie_head=tie, dropout=0.0)
    try:
        return RunConfig().replace(**model, integrator="lie_trotter", step_size="1",
                                   tokenizer="hf")
    except ConfigError as e:
        raise HFImportError(f"cannot import {cls}: {e}") from None


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(torch.float32)


def state_dict_from_hf(hf_model, family: str, tie_head: bool) -> dict[str, torch.Tensor]:
    """Map HF parameter names to FlowLM names (float32); GPT-2 Conv1D weights are transposed."""
    sd = {k: _t(v) for k, v in hf_model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if family == "gpt2":
        p = "transformer."
        out["wte.weight"], out["wpe.weight"] = sd[p + "wte.weight"], sd[p + "wpe.weight"]
        for i in range(hf_model.config.n_layer):
            h, f = f"{p}h.{i}.", f"fields.{i}."
            for ln in ("ln_1", "ln_2"):
                out[f + ln + ".weight"], out[f + ln + ".bias"] = (sd[h + ln + ".weight"],
                                                                  sd[h + ln + ".bias"])
            w, b = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]  # (d, 3d): x @ W
            for name, wi, bi in zip("qkv", w.chunk(3, dim=1), b.chunk(3)):
                out[f"{f}attn.{name}_proj.weight"], out[f"{f}attn.{name}_proj.bias"] = wi.T, bi
            out[f + "attn.o_proj.weight"] = sd[h + "attn.c_proj.weight"].T
            out[f + "attn.o_proj.bias"] = sd[h + "attn.c_proj.bias"]
            for name in ("c_fc", "c_proj"):
                out[f"{f}mlp.{name}.weight"] = sd[f"{h}mlp.{name}.weight"].T
                out[f"{f}mlp.{name}.bias"] = sd[f"{h}mlp.{name}.bias"]
        out["ln_f.weight"], out["ln_f.bias"] = sd[p + "ln_f.weight"], sd[p + "ln_f.bias"]
    else:
        p = "model."
        out["wte.weight"] = sd[p + "embed_tokens.weight"]
        for i in range(hf_model.config.num_hidden_layers):
            h, f = f"{p}layers.{i}.", f"fields.{i}."
            out[f + "ln_1.weight"] = sd[h + "input_layernorm.weight"]
            out[f + "ln_2.weight"] = sd[h + "post_attention_layernorm.weight"]
            for k, v in sd.items():
                if k.startswith(h + "self_attn."):
                    out[f + "attn." + k[len(h + "self_attn."):]] = v
                elif k.startswith(h + "mlp."):
                    out[f + "mlp." + k[len(h + "mlp."):]] = v
        out["ln_f.weight"] = sd[p + "norm.weight"]
        rot = hf_model.model.rotary_emb
        if float(getattr(rot, "attention_scaling", 1.0)) != 1.0:
            raise HFImportError(f"cannot import {type(hf_model).__name__}: its RoPE rescales "
                                "attention (supported: default, linear, llama3)")
        for i in range(hf_model.config.num_hidden_layers):
            out[f"fields.{i}.attn.inv_freq"] = _t(rot.inv_freq)
    if not tie_head:
        out["lm_head.weight"] = sd["lm_head.weight"]
    # own contiguous copies: the FlowLM must never alias (or train) the source's storage
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def _head_is_tied(hf_model) -> bool:
    a = hf_model.get_input_embeddings().weight
    b = hf_model.get_output_embeddings().weight
    return a.data_ptr() == b.data_ptr() or (a.shape == b.shape and torch.equal(a, b))


def convert(hf_model):
    """(FlowLM in eval mode, RunConfig) computing the same logits as `hf_model`."""
    from .model import build_model

    cls = type(hf_model).__name__
    if cls not in SUPPORTED:
        raise _unsupported(cls)
    cfg = config_from_hf(hf_model.config, cls)
    tied = _head_is_tied(hf_model)
    if tied != cfg.model.tie_head:
        cfg = cfg.replace(tie_head=tied)
    sd = state_dict_from_hf(hf_model, cfg.model.model, cfg.model.tie_head)
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise HFImportError(f"cannot import {cls}: its weights do not match ({what})")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # e.g. a non-persistent
        model = build_model(cfg)                                         # buffer: build for real
        model.load_state_dict(sd)
    return model.eval(), cfg


def _tokenizer(source, tokenizer, vocab_size: int):
    """A layerflow tokenizer: from `tokenizer` (a transformers fast tokenizer, a `tokenizers`
    Tokenizer or a tokenizer.json path), else the source directory's tokenizer, else ids."""
    from tokenizers import Tokenizer

    from .data import HFTokenizer, IdTokenizer

    if tokenizer is None and isinstance(source, (str, Path)):
        path = Path(source)
        if (path / "tokenizer.json").is_file():
            tokenizer = path / "tokenizer.json"
        else:  # e.g. GPT-2's vocab.json + merges.txt: let transformers build the fast one
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except Exception:
                tokenizer = None
    if tokenizer is None:
        return IdTokenizer(vocab_size)
    if isinstance(tokenizer, (str, Path)):
        return HFTokenizer(Tokenizer.from_file(str(tokenizer)))
    if isinstance(tokenizer, Tokenizer):
        return HFTokenizer(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise HFImportError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer "
                            "(layerflow carries over tokenizer.json)")
    return HFTokenizer(Tokenizer.from_str(backend.to_str()))


def load_hf_model(source):
    """An HF model object from a local directory (never downloads). Unsupported architectures
    are refused from config.json, before any weights are read."""
    transformers = _require_transformers()
    path = Path(source)
    if not path.is_dir():
        raise HFImportError(f"{source} is not a local model directory (nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise HFImportError(f"{source} has no config.json: not a Hugging Face model directory")
    try:
        arch = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise HFImportError(f"{source}/config.json is unreadable: {e}") from None
    cls = arch[0] if arch else "a model without 'architectures' in config.json"
    if cls not in SUPPORTED:
        raise _unsupported(cls)
    log = transformers.utils.logging
    bar = log.is_progress_bar_enabled()
    log.disable_progress_bar()  # keep stderr to one line per message
    try:
        return getattr(transformers, cls).from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HFImportError(f"cannot load {cls} from {source}: {first}") from None
    finally:
        if bar:
            log.enable_progress_bar()


def from_pretrained(path_or_model, tokenizer=None):
    """(FlowLM, tokenizer) from a local HF model directory or an in-memory HF model object.

    The FlowLM uses `LieTrotter` with h = 1 and one field per layer, float32, eval mode; its
    logits equal the source model's. `tokenizer` overrides the one found in the directory."""
    if isinstance(path_or_model, (str, Path)):
        hf_model = load_hf_model(path_or_model)
    else:
        _require_transformers()
        hf_model = path_or_model
        if not hasattr(hf_model, "config") or not isinstance(hf_model, torch.nn.Module):
            raise _unsupported(type(hf_model).__name__)
    model, cfg = convert(hf_model)
    tok = _tokenizer(path_or_model, tokenizer, cfg.model.vocab_size)
    model.run_config = cfg.replace(tokenizer=tok.kind)  # rebuilds it: build_model(run_config)
    return model, tok


def save_run(model, tokenizer, cfg: RunConfig, run_dir, source: str = "") -> Path:
    """Write `model` as a layerflow run directory (config.json, tokenizer.json, one checkpoint
    at iteration 0) that `load_run` reads back."""
    from .checkpoint import atomic_write_bytes, checkpoint_path, list_checkpoints, save_checkpoint

    run_dir = Path(run_dir)
    if list_checkpoints(run_dir):
        raise HFImportError(f"{run_dir} already holds a run; choose a new output directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.json", cfg.to_json().encode())
    atomic_write_bytes(run_dir / "tokenizer.json", json.dumps(tokenizer.to_dict()).encode())
    path = checkpoint_path(run_dir, 0)
    state = {"iter": 0, "best_val": None, "imported_from": str(source)}
    save_checkpoint(path, model, None, cfg.to_dict(), state, tokenizer.to_dict())
    return path


def import_hf(source, run_dir, tokenizer=None) -> Path:
    """`layerflow import-hf`: convert and save as a run; returns the checkpoint path."""
    model, tok = from_pretrained(source, tokenizer)
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    return save_run(model, tok, model.run_config, run_dir, name)
