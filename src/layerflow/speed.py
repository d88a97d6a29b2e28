"""Single-machine speed: precision policy, optional `torch.compile`, FLOP accounting and peaks.

Precision (`--precision`):
- `fp32`: everything in float32 (the default on CPU; exact resume holds bit for bit).
- `bf16`: `torch.autocast` to bfloat16 for the matrix products of the linear layers
  (QKV, attention output, MLP, head), while the attention kernel itself
  (`scaled_dot_product_attention`) runs in float32: on this CPU bf16 GEMMs are several times
  faster than fp32 ones, but the bf16 SDPA backward is much slower than the fp32 one (measured,
  see README section "speed"), so the policy is chosen per op. On CUDA, SDPA stays in bf16
  (flash attention is fastest there).
- `auto`: bf16 on CUDA, fp32 on CPU.
Losses are computed in float32 (`FlowLM.forward` upcasts the logits) and the weights and AdamW
moments stay float32 (mixed precision, Micikevicius et al. 2018).

FLOPs per token follow nanoGPT's `estimate_mfu` (Kaplan et al. 2020, appendix / PaLM appendix B):
6·N + 12·L·H·Q·T with N the parameter count (without position embeddings), L layers,
H heads, Q head width, T context length. MFU = achieved FLOP/s ÷ a peak measured in-process.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

PRECISIONS = ("auto", "fp32", "bf16")
ATTN_FP32_ON_CPU = True  # the measured policy; benchmarks/throughput.py --attn-bf16 flips it


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    return precision


def autocast_for(device: str, precision: str):
    """A zero-argument context factory: bf16 autocast, or a no-op for fp32."""
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext
    return lambda: torch.autocast(dev, dtype=torch.bfloat16)


def sdpa(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False):
    """`scaled_dot_product_attention` with the per-op precision policy above: under CPU bf16
    autocast the kernel runs in float32 (output cast back to the input dtype)."""
    if ATTN_FP32_ON_CPU and torch.is_autocast_enabled("cpu") and q.device.type == "cpu":
        dtype = q.dtype
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                               attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=is_causal)
        return y.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal)


@contextlib.contextmanager
def cpu_settings_restored():
    """Restore the intra-op thread count and the oneDNN switch on exit (see `small_ops`)."""
    threads, onednn = torch.get_num_threads(), torch._C._get_mkldnn_enabled()
    try:
        yield threads, onednn
    finally:
        torch.set_num_threads(threads)
        torch._C._set_mkldnn_enabled(onednn)


def small_ops(on: bool, threads: int, onednn: bool) -> None:
    """CPU settings for a forward made of tiny ops (one new token of one sequence): one thread
    (more only add fork/join latency) and no oneDNN (its per-call setup, ≈ 6 µs, is 5× the cost
    of a GELU on 512 numbers; measured in benchmarks/generation.py). `on=False` restores."""
    torch.set_num_threads(1 if on else threads)
    torch._C._set_mkldnn_enabled(onednn and not on)


def maybe_compile(model: torch.nn.Module, enabled: bool):
    """`torch.compile(model)` when enabled (inductor; needs a C++ compiler on CPU)."""
    if not enabled:
        return model
    return torch.compile(model)


def flops_per_token(model, n_layer: int, n_head: int, n_embd: int, block_size: int) -> float:
    """nanoGPT's estimate: 6N + 12·L·H·Q·T (forward + backward, attention scores included)."""
    n = model.num_params() if hasattr(model, "num_params") else sum(
        p.numel() for p in model.parameters())
    return 6.0 * n + 12.0 * n_layer * n_head * (n_embd // n_head) * block_size


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0,
                device: str = "cpu") -> float:
    """FLOP/s of an n×n `torch.matmul` in `dtype`, best of several timed bursts (in-process)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(3):
        torch.matmul(a, b)
    sync()
    best, reps, t_end = 0.0, 4, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        sync()
        dt = time.perf_counter() - t0
        best = max(best, 2.0 * n ** 3 * reps / dt)
        if time.perf_counter() > t_end:
            return best


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
