"""Training: plain functions around one loop.

A run directory holds `config.json`, `tokenizer.json`, `metrics.jsonl`, `checkpoints/`,
`loss.png` and `samples.txt`. Resuming loads the newest checkpoint (weights, AdamW moments, both
RNG states, iteration) and continues so that the losses equal those of an uninterrupted run.
Ctrl-C / SIGTERM finish the current step, write a checkpoint and return cleanly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from . import distributed as ddp
from . import faults
from .checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .config import RunConfig
from .data import DataError, prepare_data, split_tokens, tokenizer_from_dict
from .diagnostics import Diagnostics
from .model import FlowLM, build_model
from .runlock import run_locked
from .speed import autocast_for, maybe_compile


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why."""


def lr_at(it: int, tc) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` over `lr_decay_iters`."""
    decay = tc.lr_decay_iters or tc.max_iters
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / (tc.warmup_iters + 1)
    if it >= decay:
        return tc.min_lr
    ratio = (it - tc.warmup_iters) / max(decay - tc.warmup_iters, 1)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.lr - tc.min_lr)


def make_optimizer(model: torch.nn.Module, tc, device: str) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices (dim ≥ 2) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("device cuda requested but CUDA is not available")
    return name


#: tokens per evaluation forward (estimate_loss stacks batches up to this size)
EVAL_TOKENS = 16384


@torch.no_grad()
def estimate_loss(model, data, tc, it: int, device: str, splits=("train", "val")) -> dict:
    """Mean loss over `eval_iters` batches per split, from a generator seeded by (seed, it), so
    evaluation never perturbs the training RNG streams. Batches of equal size are stacked into
    forwards of ≈ EVAL_TOKENS tokens (the mean of equal-size batch means is unchanged; fewer,
    larger matrix products run faster)."""
    was = model.training
    model.eval()
    out = {}
    for split in splits:
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + it)
        batches = [data.get_batch(split, tc.batch_size, g) for _ in range(tc.eval_iters)]
        per = max(1, EVAL_TOKENS // batches[0][0].numel())  # eval_iters ≥ 1 (config)
        total = 0.0
        for i in range(0, len(batches), per):
            chunk = batches[i:i + per]
            x = torch.cat([b[0] for b in chunk]).to(device)
            y = torch.cat([b[1] for b in chunk]).to(device)
            total += model(x, y)[1].item() * len(chunk)
        out[split] = total / len(batches)
    model.train(was)
    return out


@contextmanager
def stop_requests():
    """SIGINT/SIGTERM set a flag instead of killing mid-step; restored on exit."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"output directory {run_dir} is not writable: {e.strerror or e}") from None


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_iter: int | None):
        self.path = path
        if resume_iter is not None and path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                it = rec.get("iter", 0)
                if it < resume_iter or (rec.get("kind") == "eval" and it <= resume_iter):
                    keep.append(line)
            atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())
        elif resume_iter is None:
            path.write_text("")
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def read_metrics(run_dir) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


@run_locked  # runlock.py: lock run_dir (rank 0), clean stale temp files, OSError -> TrainError
def train(cfg: RunConfig, run_dir, on_step=None) -> dict:
    """Train (or resume) the run in `run_dir`. `on_step(it, loss)` is called after each step
    (tests use it to interrupt). Returns a summary dict."""
    run_dir = Path(run_dir)
    check_writable(run_dir)
    tc = cfg.train
    device = resolve_device(tc.device)
    dinfo = ddp.setup(device)  # torchrun: join the process group (issue 7); else a no-op
    device = dinfo.device
    try:
        ddp.check_batch(tc.batch_size, tc.grad_accum, dinfo)
    except ValueError as e:
        raise TrainError(str(e)) from None
    ckpts = list_checkpoints(run_dir)
    ckpt = load_checkpoint(ckpts[-1]) if ckpts else None
    tokenizer = None
    if ckpt is not None:
        try:
            saved = RunConfig.from_dict(ckpt.config)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {ckpt.path} has an invalid config: {e}") from None
        bad = cfg.replace(vocab_size=saved.model.vocab_size).mismatch(saved)
        if bad:
            raise TrainError(f"run directory {run_dir} holds a checkpoint from another config: "
                             f"{bad}; use a new --out directory")
        try:
            tokenizer = tokenizer_from_dict(ckpt.tokenizer)
        except DataError as e:
            raise CheckpointError(
                f"checkpoint {ckpt.path} has an unusable tokenizer: {e}") from None
    tokenizer, ids = prepare_data(cfg.data, run_dir, tokenizer)
    data = split_tokens(ids, cfg.data.val_fraction, cfg.model.block_size)
    cfg = cfg.replace(vocab_size=tokenizer.vocab_size)

    torch.manual_seed(tc.seed)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, tc, device)
    data_gen = torch.Generator().manual_seed(tc.seed)
    start = 0
    if ckpt is not None:  # weights, AdamW moments, RNG states; CheckpointError if unusable
        start = ckpt.restore(model, optimizer, data_gen)
    if dinfo.is_main:
        atomic_write_bytes(run_dir / "config.json", cfg.to_json().encode())
        atomic_write_bytes(run_dir / "tokenizer.json", json.dumps(tokenizer.to_dict()).encode())
    autocast = autocast_for(device, tc.precision)
    fmodel = maybe_compile(ddp.wrap(model, dinfo), tc.compile)  # what the train step calls

    def save(it: int):
        if not dinfo.is_main:
            return
        state = {"iter": it, "best_val": best_val}
        rng = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
        save_checkpoint(checkpoint_path(run_dir, it), model, optimizer, cfg.to_dict(), state,
                        tokenizer.to_dict(), rng)
        prune_checkpoints(run_dir, tc.keep_checkpoints)

    best_val = ckpt.state.get("best_val") if ckpt else None
    log = (MetricsLog(run_dir / "metrics.jsonl", start if ckpt else None) if dinfo.is_main
           else ddp.NullLog())
    stop_all, reached = False, None
    ckpt_every = tc.ckpt_interval or tc.eval_interval
    tokens_per_step = tc.batch_size * cfg.model.block_size
    status, it, last_loss = "done", start, None
    bar = _progress(tc if dinfo.is_main else tc.__class__(**{**vars(tc), "progress": False}),
                    start)
    t_last, it_last = time.perf_counter(), start
    diag = Diagnostics(model, tc.diag_interval) if tc.diag_interval else None  # diagnostics.py
    guard = faults.StepGuard(tc.nan_policy)
    model.train()
    try:
        with stop_requests() as stop:
            while True:
                if it % tc.eval_interval == 0 or it == tc.max_iters:
                    if not (ckpt is not None and it == start) and dinfo.is_main:
                        with autocast():
                            losses = estimate_loss(model, data, tc, it, device)
                        best_val = min(best_val or math.inf, losses["val"])
                        log.write({"kind": "eval", "iter": it, "train_loss": losses["train"],
                                   "val_loss": losses["val"]})
                        bar.set_postfix_str(f"val {losses['val']:.4f}", refresh=False)
                    if tc.stop_at_val and it > start and ddp.any_rank(
                            dinfo.is_main and best_val is not None
                            and best_val <= tc.stop_at_val, dinfo):
                        save(it)
                        reached = it  # time-to-target: stop_at_val reached
                        break
                if it > start and (it % ckpt_every == 0 or it == tc.max_iters):
                    save(it)
                if it >= tc.max_iters:
                    break
                if stop_all if dinfo.enabled else stop["signal"]:
                    save(it)
                    status = (f"interrupted ({stop['signal'] or 'on another rank'}) at iteration "
                              f"{it}; "
                              "resume with the same command")
                    break
                lr = lr_at(it, tc)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                x, y = data.get_batch("train", tc.batch_size, data_gen, dinfo.rank,
                                      dinfo.world_size)
                with diag.forward(it) if diag else nullcontext():
                    # micro-batches, backward, all-reduced loss and stop flag (distributed.py);
                    # faults.inject_loss is a test hook (LAYERFLOW_FAULTS), else a no-op
                    loss, stop_all = ddp.forward_backward(
                        fmodel, x.to(device), y.to(device), tc.grad_accum, dinfo, autocast,
                        bool(stop["signal"]), lambda v, it=it: faults.inject_loss(it, v))
                faults.inject_grads(it, model)
                fault = guard.check(it, loss, model, tc.grad_clip)  # clips; loss + grad norm
                if fault is not None and not guard.skip():
                    status = guard.stop_message(fault, run_dir)
                    log.write({"kind": "error", "iter": it, "message": status})
                    break
                if fault is not None:  # nan_policy = skip: drop this update (faults.py)
                    log.write({"kind": "skip", "iter": it, "message": fault})
                    optimizer.zero_grad(set_to_none=True)
                    if diag is not None:
                        diag.probe = None
                    it += 1
                    bar.update(1)
                    continue
                if diag and (msg := diag.before_step(it)):
                    status = msg
                    log.write({"kind": "error", "iter": it, "message": status})
                    break
                optimizer.step()
                if diag and (rec := diag.after_step(it)):
                    log.write(rec)
                optimizer.zero_grad(set_to_none=True)
                last_loss = loss.item()
                if on_step is not None:
                    on_step(it, last_loss)
                it += 1
                bar.update(1)
                if it % tc.log_interval == 0 or it == tc.max_iters:
                    now = time.perf_counter()
                    tps = tokens_per_step * (it - it_last) / max(now - t_last, 1e-9)
                    t_last, it_last = now, it
                    log.write({"kind": "train", "iter": it - 1, "loss": last_loss, "lr": lr,
                               "tok_per_s": tps})
                    bar.set_postfix_str(f"loss {last_loss:.4f} {tps:,.0f} tok/s", refresh=False)
    finally:
        bar.close()
        log.close()
    summary = {"status": status, "iter": it, "loss": last_loss, "best_val": best_val,
               "run_dir": str(run_dir)}
    if reached is not None:
        summary["reached_val_at"] = reached
    if dinfo.enabled:
        summary["rank"] = dinfo.rank
    if status == "done" and dinfo.is_main:
        finish_run(run_dir, model, tokenizer, tc, device)
    ddp.teardown(dinfo)
    return summary


def _progress(tc, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=tc.max_iters, initial=start, disable=not tc.progress, unit="it",
                dynamic_ncols=True, desc="train")


def finish_run(run_dir: Path, model, tokenizer, tc, device: str) -> None:
    """Loss plot and a sample, written into the run directory."""
    from .plots import plot_losses

    plot_losses(read_metrics(run_dir), run_dir / "loss.png")
    if tc.sample_tokens:
        model.eval()
        g = torch.Generator().manual_seed(tc.seed)
        prompt = torch.tensor([tokenizer.encode("\n")[:1] or [0]], device=device)
        out = model.generate(prompt, tc.sample_tokens, temperature=0.8, top_k=200, generator=g)
        text = tokenizer.decode(out[0].tolist())
        atomic_write_bytes(run_dir / "samples.txt", text.encode("utf-8", errors="replace"))


def load_run(run_dir, device: str = "cpu"):
    """(model, tokenizer, config, checkpoint) from the newest checkpoint of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrainError(f"run directory not found: {run_dir}")
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise TrainError(f"no checkpoint in {run_dir}/checkpoints")
    ckpt = load_checkpoint(ckpts[-1])
    try:
        cfg = RunConfig.from_dict(ckpt.config)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {ckpt.path} has an invalid config: {e}") from None
    try:
        tokenizer = tokenizer_from_dict(ckpt.tokenizer)
    except (DataError, KeyError, Exception) as e:
        raise CheckpointError(f"checkpoint {ckpt.path} has an unusable tokenizer: {e}") from None
    model: FlowLM = build_model(cfg)
    ckpt.load_model(model)
    model.to(device).eval()
    return model, tokenizer, cfg, ckpt
