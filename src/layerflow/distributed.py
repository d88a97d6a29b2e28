"""Data-parallel training with PyTorch's own engine (`torchrun` + DistributedDataParallel).

Launch (one machine, 2 processes; `gloo` on CPU, `nccl` on GPU is chosen automatically):

    torchrun --nproc-per-node 2 -m layerflow train --data input.txt --out runs/ddp

Several machines (run the same command on every node; `--node-rank` is assigned by rendezvous):

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-id myrun --rdzv-endpoint host0.example:29500 -m layerflow train ...

Semantics (so that a run does not depend on the number of processes):
- `batch_size` is the **global** batch of one optimizer step. Every rank draws the same global
  batch from the same data generator and keeps rows `rank::world_size`
  (`TokenData.get_batch`); each rank splits its rows into `grad_accum` micro-batches.
- Gradient: g = (1/B) Σ_b ∇ℓ_b. Each micro-batch loss is a mean over its rows, scaled by
  1/grad_accum; DDP averages over ranks. With equal shares (B divisible by
  world_size·grad_accum) this is exactly the single-process mean, up to float rounding.
- The logged loss is the all-reduced mean of the micro-batch losses; the NaN and stop
  (SIGINT/SIGTERM) decisions are taken on all-reduced values, so every rank takes the same branch
  and no rank waits forever in a collective.
- Rank 0 evaluates, logs and writes checkpoints; the checkpoint holds the unwrapped model, so it
  resumes with any number of processes (including one).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def setup(device: str) -> DistInfo:
    """Join the process group when started by torchrun (env:// rendezvous); otherwise a no-op.

    `device` is the resolved device type ("cpu" or "cuda"); on CUDA each process takes the GPU
    numbered by its LOCAL_RANK."""
    if not launched_by_torchrun():
        return DistInfo(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local, device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()  # no rank tears down gloo while another is still in a collective
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around `model` when there are several ranks, else `model`."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.local_rank] if info.device.startswith("cuda") else None
    return DDP(model, device_ids=ids)


def check_batch(batch_size: int, grad_accum: int, info: DistInfo) -> int:
    """Rows per micro-batch on this rank; every rank and micro-batch gets the same number."""
    parts = grad_accum * info.world_size
    if batch_size % parts:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by grad_accum "
                         f"({grad_accum}) × processes ({info.world_size})")
    return batch_size // parts


def forward_backward(model, x: torch.Tensor, y: torch.Tensor, grad_accum: int,
                     info: DistInfo, autocast=contextlib.nullcontext,
                     stop: bool = False, loss_hook=None) -> tuple[torch.Tensor, bool]:
    """Forward and backward over this rank's rows `x, y`, split into `grad_accum` micro-batches.

    Gradients are accumulated in `.grad` (averaged over ranks by DDP on the last micro-batch).
    `loss_hook(loss) -> loss` is applied before backward (fault-injection tests).
    Returns (global mean loss as a detached 0-d tensor, stop requested on any rank)."""
    xs, ys = x.chunk(grad_accum), y.chunk(grad_accum)
    if grad_accum == 1 and not info.enabled:  # the common case: no extra tensor ops
        with autocast():
            _, loss = model(x, y)
        if loss_hook is not None:
            loss = loss_hook(loss)
        loss.backward()
        return loss.detach(), stop
    total = torch.zeros((), device=x.device)
    for i in range(grad_accum):
        last = i == grad_accum - 1
        sync = model.no_sync if (info.enabled and not last) else contextlib.nullcontext
        with sync():
            with autocast():
                _, loss = model(xs[i], ys[i])
            if loss_hook is not None:
                loss = loss_hook(loss)
            (loss / grad_accum if grad_accum > 1 else loss).backward()
        total += loss.detach()
    total /= grad_accum
    if not info.enabled:
        return total, stop
    packed = torch.stack([total.float(), torch.tensor(float(stop), device=total.device)])
    dist.all_reduce(packed)
    return packed[0] / info.world_size, bool(packed[1].item() > 0)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on some rank (a collective: call it everywhere)."""
    if not info.enabled:
        return flag
    t = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class NullLog:
    """Metrics sink of ranks other than 0."""

    def write(self, rec: dict) -> None:
        pass

    def close(self) -> None:
        pass
