"""Typed, frozen, validated configuration. One `RunConfig` = model + flow + data + train.

Every field is validated in `__post_init__`, so a config that exists is a config that is valid.
`RunConfig.to_dict()` is what is written to `config.json` and into every checkpoint;
`RunConfig.from_dict()` rejects unknown keys, wrong types and absurd values, naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from .validate import (  # noqa: F401  (re-exported: ConfigError, LIMITS, MAX_PARAMS)
    LIMITS,
    MAX_PARAMS,
    ConfigError,
    _check_limits,
    _choice,
    _finite,
    _h,
    _non_negative,
    _positive,
    _short,
)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the vector field and the embedding/unembedding around the flow."""

    model: str = field(default="flow", metadata=_h("model family: flow (attention+MLP field) | "
                                                                "gpt2 | llama (imported) | "
                                                                "energy (Energy Transformer)"))
    vocab_size: int = field(default=0, metadata=_h("vocabulary size; 0 = from the tokenizer"))
    n_layer: int = field(default=4, metadata=_h("number of integrator steps L (layers)"))
    n_head: int = field(default=4, metadata=_h("attention heads"))
    n_embd: int = field(default=128, metadata=_h("width d of the token state"))
    block_size: int = field(default=64, metadata=_h("context length in tokens"))
    mlp_ratio: int = field(default=4, metadata=_h("MLP hidden width / n_embd"))
    dropout: float = field(default=0.0, metadata=_h("dropout on the field's outputs"))
    bias: bool = field(default=True, metadata=_h("biases in linear layers and norms"))
    pos_emb: str = field(default="learned", metadata=_h("positions: learned | rope"))
    norm: str = field(default="layernorm", metadata=_h("normalisation: layernorm | rmsnorm"))
    # Imported architectures (model = gpt2 | llama; see hf.py). 0 = derived default.
    n_kv_head: int = field(default=0, metadata=_h("key/value heads (grouped-query); 0 = n_head"))
    head_dim: int = field(default=0, metadata=_h("attention head width; 0 = n_embd/n_head"))
    mlp_hidden: int = field(default=0, metadata=_h("MLP hidden width; 0 = mlp_ratio*n_embd"))
    activation: str = field(default="gelu", metadata=_h("MLP activation: gelu | gelu_tanh | "
                                                          "relu | silu (gated for llama)"))
    norm_eps: float = field(default=0.0, metadata=_h("norm epsilon; 0 = 1e-5 LN, 1e-6 RMS"))
    rope_theta: float = field(default=10000.0, metadata=_h("RoPE base frequency"))
    tie_head: bool = field(default=True, metadata=_h("unembedding tied to the embedding"))
    embed_scale: float = field(default=1.0, metadata=_h(
        "X_0 = s·(E[tok] + P[pos]); e.g. √d (Vaswani et al. 2017) so the flow starts at O(√d)"))
    # stability (issue 4): certified non-expansive field, see fields/lipschitz.py
    vector_field: str = field(default="transformer", metadata=_h(
        "vector field: transformer | nonexpansive (L2 attention + gradient MLP steps)"))
    expansive_every: int = field(default=0, metadata=_h(
        "nonexpansive: every k-th step's MLP is expansive (+h·Wᵀσ(Wx+b)); 0 = never"))
    # energy model (issue 5, energy_lm.py): n_layer = descent steps of one shared block
    n_memories: int = field(default=0, metadata=_h("energy: Hopfield memories; 0 = 4*n_embd"))
    hopfield: str = field(default="relu", metadata=_h("energy: Hopfield memory relu | softmax"))
    energy_beta: float = field(default=0.0, metadata=_h(
        "energy: attention inverse temperature beta; 0 = 1/sqrt(head dim)"))

    def __post_init__(self):
        _check_limits(self)
        _choice("model", self.model, MODEL_FAMILIES)
        _check_imported_fields(self)
        _non_negative("vocab_size", self.vocab_size)
        for name in ("n_layer", "n_head", "n_embd", "block_size", "mlp_ratio", "embed_scale"):
            _positive(name, getattr(self, name))
        if not self.head_dim and self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.pos_emb == "rope" and (self.head_dim or self.n_embd // self.n_head) % 2:
            raise ConfigError("pos_emb rope needs an even head dimension n_embd/n_head")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        _choice("pos_emb", self.pos_emb, ("learned", "rope"))
        _choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _choice("vector_field", self.vector_field, ("transformer", "nonexpansive"))
        if isinstance(self.expansive_every, bool) or not isinstance(self.expansive_every, int) \
                or self.expansive_every < 0:
            raise ConfigError(f"expansive_every must be a non-negative integer, "
                              f"got {self.expansive_every!r}")
        _check_energy_fields(self)


MODEL_FAMILIES = {"flow", "gpt2", "llama", "energy"}


def _check_energy_fields(m: "ModelConfig") -> None:
    """Validate the energy-model fields (issue 5, energy_lm.py)."""
    if isinstance(m.n_memories, bool) or not isinstance(m.n_memories, int) or m.n_memories < 0:
        raise ConfigError(f"n_memories must be a non-negative integer, got {m.n_memories!r}")
    _choice("hopfield", m.hopfield, ("relu", "softmax"))
    _non_negative("energy_beta", m.energy_beta)
    if m.model == "energy" and m.pos_emb != "learned":
        raise ConfigError("model energy supports only pos_emb learned")


IMPORTED_FAMILIES = {"gpt2", "llama"}  # built by fields/pretrained.py (see hf.py)


def _check_imported_fields(m: "ModelConfig") -> None:
    """Validate the fields used by imported architectures (gpt2: LayerNorm + GELU MLP; llama:
    RMSNorm + gated MLP + grouped-query attention); the flow family uses none of them."""
    for name in ("n_kv_head", "head_dim", "mlp_hidden"):
        v = getattr(m, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
    _choice("activation", m.activation, ("gelu", "gelu_tanh", "relu", "silu"))
    _non_negative("norm_eps", m.norm_eps)
    _positive("rope_theta", m.rope_theta)
    if m.model not in IMPORTED_FAMILIES:
        for name, default in (("n_kv_head", 0), ("head_dim", 0), ("mlp_hidden", 0),
                              ("activation", "gelu"), ("norm_eps", 0.0), ("rope_theta", 10000.0)):
            if getattr(m, name) != default:
                raise ConfigError(f"{name} is only used by the model families "
                                  f"{', '.join(sorted(IMPORTED_FAMILIES))}, not {m.model!r}")
        return
    if m.n_kv_head and m.n_head % m.n_kv_head:
        raise ConfigError(f"n_head ({m.n_head}) must be a multiple of n_kv_head ({m.n_kv_head})")


@dataclass(frozen=True)
class FlowConfig:
    """How the state is integrated over layer-time t in [0, T]."""

    integrator: str = field(default="lie_trotter", metadata=_h("integrator name (see registry)"))
    step_size: str = field(
        default="1", metadata=_h("h: a number, or 'T/L' (total_time / n_layer), or 'c/L'")
    )
    total_time: float = field(default=1.0, metadata=_h("total layer-time T used by 'T/L'"))
    # integrators (issue 3): step sizes, weights in time, reversible and adaptive solves
    learn_step_size: bool = field(default=False, metadata=_h(
        "learn a positive step size per step (h_k = softplus(θ_k), initialised at step_size)"))
    momentum: float = field(default=0.9, metadata=_h("γ of the momentum integrator, in (0, 1)"))
    weights: str = field(default="untied", metadata=_h(
        "weights in time: untied (a set per step) | tied (one set) | smooth (basis in t)"))
    time_basis: str = field(default="legendre", metadata=_h("basis for smooth: legendre | fourier"))
    basis_size: int = field(default=4, metadata=_h("basis functions per weight for smooth"))
    macaron_weights: bool = field(default=False, metadata=_h(
        "separate MLP weights for the two half steps (strang/macaron: F = A + (M_a + M_b)/2)"))
    reversible: bool = field(default=False, metadata=_h(
        "recompute states in backward (leapfrog, verlet, symplectic_euler, momentum): O(1) "
        "activation memory in depth"))
    adaptive: str = field(default="", metadata=_h(
        "adaptive torchdiffeq solver for tied/smooth weights, e.g. dopri5; '' = fixed steps"))
    rtol: float = field(default=1e-3, metadata=_h("relative tolerance of the adaptive solver"))
    atol: float = field(default=1e-4, metadata=_h("absolute tolerance of the adaptive solver"))
    adjoint: bool = field(default=False, metadata=_h("adaptive: backprop by odeint_adjoint"))
    step_jitter: int = field(default=1, metadata=_h(
        "tied/smooth training: integrate with L·m steps, m uniform in 1..step_jitter; 1 = off"))
    depth_param: str = field(default="standard", metadata=_h(
        "depth parametrisation: standard (h = step_size) | ode (h = T/L) | sqrt (h = T/sqrt(L)) "
        "| rezero | post_norm | deepnorm (see depth_params.py)"))

    def __post_init__(self):
        from .integrators import INTEGRATORS

        _check_limits(self)
        _choice("integrator", self.integrator, INTEGRATORS)
        _positive("total_time", self.total_time)
        _check_flow_fields(self)
        _choice("depth_param", self.depth_param,
                ("standard", "ode", "sqrt", "rezero", "post_norm", "deepnorm"))
        if self.depth_param in ("ode", "sqrt") and str(self.step_size).strip() not in ("1", "1.0"):
            raise ConfigError(f"depth_param {self.depth_param} sets the step size itself; leave "
                              f"step_size at 1 (got {self.step_size!r})")
        self.resolve_step_size(1)  # validates the expression

    def resolve_step_size(self, n_steps: int) -> float:
        """The step size h for a flow of `n_steps` steps."""
        text = str(self.step_size).strip().replace(" ", "")
        try:
            if text.endswith("/L"):
                num = text[:-2]
                value = (self.total_time if num == "T" else float(num)) / n_steps
            else:
                value = float(text)
        except ValueError:
            raise ConfigError(
                f"step_size must be a number, 'T/L' or 'c/L', got {self.step_size!r}"
            ) from None
        _positive("step_size", value)
        if self.depth_param in ("ode", "sqrt"):  # issue 4: depth_params.py
            value = self.total_time / (n_steps if self.depth_param == "ode" else math.sqrt(n_steps))
        return value


def _check_flow_fields(f: "FlowConfig") -> None:
    """Validate the integrator options (issue 3)."""
    from .integrators import INTEGRATORS

    if not 0 < f.momentum < 1:
        raise ConfigError(f"momentum must be in (0, 1), got {f.momentum!r}")
    _choice("weights", f.weights, ("untied", "tied", "smooth"))
    _choice("time_basis", f.time_basis, ("legendre", "fourier"))
    if isinstance(f.basis_size, bool) or not isinstance(f.basis_size, int) or f.basis_size < 1:
        raise ConfigError(f"basis_size must be a positive integer, got {f.basis_size!r}")
    if f.reversible and not getattr(INTEGRATORS[f.integrator], "invertible", False):
        inv = sorted(n for n, c in INTEGRATORS.items() if getattr(c, "invertible", False))
        raise ConfigError(f"reversible needs an invertible integrator ({', '.join(inv)}), "
                          f"got {f.integrator!r}")
    _positive("rtol", f.rtol)
    _positive("atol", f.atol)
    if isinstance(f.step_jitter, bool) or not isinstance(f.step_jitter, int) or f.step_jitter < 1:
        raise ConfigError(f"step_jitter must be a positive integer, got {f.step_jitter!r}")
    if f.step_jitter > 1 and f.weights == "untied":
        raise ConfigError("step_jitter needs weights tied or smooth")
    if f.adaptive:
        _choice("adaptive", f.adaptive, ADAPTIVE_METHODS)
        if f.weights == "untied":
            raise ConfigError("adaptive needs weights tied or smooth (untied weights are "
                              "piecewise constant in t)")
        if f.learn_step_size or f.reversible:
            raise ConfigError("adaptive cannot be combined with learn_step_size or reversible")


ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    data: str = field(default="", metadata=_h("text file or folder of .txt files; '' = embedded"))
    tokenizer: str = field(default="char", metadata=_h("tokenizer: char | byte | bpe"))
    bpe_vocab_size: int = field(default=1024, metadata=_h("vocabulary size for bpe"))
    val_fraction: float = field(default=0.1, metadata=_h("fraction of tokens held out (tail)"))

    def __post_init__(self):
        from .data import TOKENIZERS

        _check_limits(self)
        _choice("tokenizer", self.tokenizer, TOKENIZERS)
        if not isinstance(self.bpe_vocab_size, int) or self.bpe_vocab_size < 260:
            raise ConfigError(
                f"bpe_vocab_size must be an integer >= 260, got {self.bpe_vocab_size!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    max_iters: int = field(default=2000, metadata=_h("optimizer steps"))
    batch_size: int = field(default=12, metadata=_h("sequences per step"))
    lr: float = field(default=1e-3, metadata=_h("peak learning rate"))
    min_lr: float = field(default=1e-4, metadata=_h("learning rate at the end of cosine decay"))
    warmup_iters: int = field(default=100, metadata=_h("linear warm-up steps"))
    lr_decay_iters: int = field(default=0, metadata=_h("cosine decay length; 0 = max_iters"))
    weight_decay: float = field(default=0.1, metadata=_h("decoupled weight decay (matrices)"))
    beta1: float = field(default=0.9, metadata=_h("AdamW beta1"))
    beta2: float = field(default=0.99, metadata=_h("AdamW beta2"))
    grad_clip: float = field(default=1.0, metadata=_h("gradient-norm clip; 0 = off"))
    eval_interval: int = field(default=250, metadata=_h("steps between evaluations"))
    eval_iters: int = field(default=50, metadata=_h("batches per evaluation"))
    log_interval: int = field(default=10, metadata=_h("steps between metric lines"))
    ckpt_interval: int = field(default=0, metadata=_h("steps between checkpoints; 0 = eval"))
    keep_checkpoints: int = field(default=3, metadata=_h("how many recent checkpoints to keep"))
    seed: int = field(default=1337, metadata=_h("random seed"))
    device: str = field(default="cpu", metadata=_h("cpu | cuda | auto"))
    sample_tokens: int = field(default=300, metadata=_h("tokens sampled at the end; 0 = none"))
    progress: bool = field(default=True, metadata=_h("show a progress bar"))
    nan_policy: str = field(default="stop", metadata=_h(
        "non-finite loss or gradient: stop (keep the last good checkpoint) | skip the update "
        "(stops after 10 bad steps in a row)"))
    diag_interval: int = field(default=0, metadata=_h(
        "steps between gradient/signal diagnostics in metrics.jsonl (kind=diag); 0 = off"))
    # speed and scale (issue 7; see speed.py and distributed.py)
    grad_accum: int = field(default=1, metadata=_h(
        "micro-batches per optimizer step (batch_size is the global batch, split over "
        "processes × grad_accum)"))
    precision: str = field(default="auto", metadata=_h(
        "fp32 | bf16 (autocast matmuls, fp32 attention on CPU) | auto (bf16 on CUDA, fp32 on CPU)"))
    compile: bool = field(default=False, metadata=_h("torch.compile the model (inductor)"))
    stop_at_val: float = field(default=0.0, metadata=_h(
        "stop when an evaluation reaches val loss <= this (time-to-target); 0 = off"))

    def __post_init__(self):
        _check_limits(self)
        _choice("nan_policy", self.nan_policy, ("stop", "skip"))
        for name in ("max_iters", "batch_size", "eval_interval", "eval_iters", "log_interval",
                     "keep_checkpoints"):
            _positive(name, getattr(self, name))
        for name in ("lr", "min_lr"):
            _positive(name, getattr(self, name))
        for name in ("warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip",
                     "ckpt_interval", "sample_tokens", "seed"):
            _non_negative(name, getattr(self, name))
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        _choice("device", self.device, ("cpu", "cuda", "auto"))
        _positive("grad_accum", self.grad_accum)
        _choice("precision", self.precision, ("auto", "fp32", "bf16"))
        _non_negative("stop_at_val", self.stop_at_val)
        if isinstance(self.diag_interval, bool) or not isinstance(self.diag_interval, int) \
                or self.diag_interval < 0:
            raise ConfigError(f"diag_interval must be a non-negative integer, "
                              f"got {self.diag_interval!r}")


# Training keys that may change when a run is resumed (they do not change the math of a step).
RESUMABLE_KEYS = {
    "max_iters", "eval_interval", "log_interval", "ckpt_interval", "sample_tokens", "device",
    "progress", "keep_checkpoints", "eval_iters", "diag_interval", "nan_policy",
}
RESUMABLE_KEYS |= {"grad_accum", "precision", "compile", "stop_at_val"}  # issue 7: same math

SECTIONS = {"model": ModelConfig, "flow": FlowConfig, "data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError("config must be a mapping of sections")
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config section {sorted(unknown)[0]!r}")
        return cls(**{name: section_from_dict(SECTIONS[name], d.get(name, {}), name)
                      for name in SECTIONS})

    def replace(self, **overrides) -> "RunConfig":
        """Flat overrides by field name, e.g. replace(n_layer=8, lr=3e-4)."""
        return apply_overrides(self, overrides)

    def mismatch(self, other: "RunConfig") -> str | None:
        """Name of the first key that differs in a way that forbids resuming, else None."""
        a, b = self.to_dict(), other.to_dict()
        for sec in SECTIONS:
            for key in a[sec]:
                if sec == "train" and key in RESUMABLE_KEYS:
                    continue
                if a[sec][key] != b[sec].get(key):
                    return f"{sec}.{key} ({b[sec].get(key)!r} in checkpoint, {a[sec][key]!r} now)"
        return None


def _coerce(cls, name: str, key: str, value: Any, ftype: Any) -> Any:
    ftype = ftype if isinstance(ftype, str) else ftype.__name__
    where = f"{name}.{key}"
    if ftype == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_short(value)}")
    elif ftype == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_short(value)}")
    elif ftype == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                isinstance(value, float) or abs(value) < 10**300):
            raise ConfigError(f"{where} must be a number, got {_short(value)}")
        value = float(value)
    elif ftype == "str":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_short(value)}")
    return value


def section_from_dict(cls, d: Any, name: str):
    if not isinstance(d, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    known = {f.name: f for f in fields(cls)}
    for key in d:
        if key not in known:
            raise ConfigError(f"unknown config key {name}.{key}")
    kwargs = {k: _coerce(cls, name, k, v, known[k].type) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def field_owner() -> dict[str, str]:
    """Flat field name -> section name (names are unique across sections)."""
    return {f.name: sec for sec, cls in SECTIONS.items() for f in fields(cls)}


def apply_overrides(cfg: RunConfig, overrides: dict) -> RunConfig:
    owner = field_owner()
    d = cfg.to_dict()
    for key, value in overrides.items():
        if key not in owner:
            raise ConfigError(f"unknown config key {key!r}")
        d[owner[key]][key] = value
    return RunConfig.from_dict(d)


def load_toml(path: str) -> RunConfig:
    """A TOML file with optional [model] [flow] [data] [train] tables."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:  # a directory, no permission, ...
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return RunConfig.from_dict(d)
