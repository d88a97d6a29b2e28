"""Data parallelism (torchrun + DDP, gloo on CPU) and gradient accumulation give the same
losses as one process with the whole batch, and checkpoints move between process counts."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config

from layerflow import train
from layerflow.train import TrainError, read_metrics

BASE = dict(batch_size=8, max_iters=20, lr_decay_iters=30, eval_interval=10, ckpt_interval=10,
            sample_tokens=0, log_interval=1)


def losses(run_dir):
    return [(r["iter"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def assert_close(a, b, tol=1e-5):
    assert [i for i, _ in a] == [i for i, _ in b]
    worst = max(abs(x - y) for (_, x), (_, y) in zip(a, b))
    assert worst <= tol, worst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(cfg_overrides: dict) -> list[str]:
    out = []
    for k, v in cfg_overrides.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(name if v else "--no-" + k.replace("_", "-"))
        else:
            out += [name, str(v)]
    return out


def torchrun(nproc: int, run_dir, overrides: dict, timeout: float = 300):
    # the defaults of conftest.tiny_config, as command-line flags
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, eval_iters=2, warmup_iters=2,
                progress=False)
    base.update(overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):  # a free port can be taken between probing and binding: retry once
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "layerflow", "train", "--out", str(run_dir)] + flags(base)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode == 0 or "address already in use" not in (r.stdout + r.stderr).lower():
            break
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_process_torchrun_equals_one_process_and_resumes_in_one(tmp_path, tiny_corpus):
    one = tiny_config(data=str(tiny_corpus), **{**BASE, "max_iters": 30})
    train(one, tmp_path / "one")
    ref = losses(tmp_path / "one")
    assert len(ref) == 30

    # 2 processes, each with batch_size/2 = 4 rows of the same global batch of 8
    torchrun(2, tmp_path / "two", {"data": str(tiny_corpus), **BASE})
    two = losses(tmp_path / "two")
    assert len(two) == 20
    assert_close(two, ref[:20])
    evals = [r for r in read_metrics(tmp_path / "two") if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 10, 20]  # rank 0 alone evaluates and logs

    # the 2-process checkpoint (iteration 20) resumes in a single process up to 30
    summary = train(one, tmp_path / "two")
    assert summary["status"] == "done" and summary["iter"] == 30
    assert_close(losses(tmp_path / "two"), ref)


def test_grad_accum_equals_full_batch(tmp_path, tiny_corpus):
    full = tiny_config(data=str(tiny_corpus), **BASE)
    train(full, tmp_path / "full")
    train(full.replace(grad_accum=4), tmp_path / "accum")  # 4 micro-batches of 2 rows
    assert_close(losses(tmp_path / "accum"), losses(tmp_path / "full"))


def test_batch_not_divisible_by_micro_batches_is_an_error(tmp_path, tiny_corpus):
    cfg = tiny_config(data=str(tiny_corpus), batch_size=6, grad_accum=4)
    with pytest.raises(TrainError, match="batch_size"):
        train(cfg, tmp_path / "bad")


def test_stop_at_val_ends_the_run_early(tmp_path, tiny_corpus):
    cfg = tiny_config(data=str(tiny_corpus), max_iters=200, eval_interval=5, stop_at_val=3.0)
    s = train(cfg, tmp_path / "early")
    evals = [r for r in read_metrics(tmp_path / "early") if r["kind"] == "eval"]
    assert s["status"] == "done" and s["reached_val_at"] == s["iter"] < 200
    assert evals[-1]["val_loss"] <= 3.0 < evals[-2]["val_loss"]


def test_prompts_batched_by_length_equal_one_at_a_time():
    from layerflow import RunConfig
    from layerflow.model import build_model
    from layerflow.sampling import generate_prompts

    torch.manual_seed(0)
    model = build_model(RunConfig().replace(vocab_size=20, n_layer=2, n_head=2, n_embd=16,
                                            block_size=32)).eval()
    prompts = [[1, 2, 3], [4], [5, 6, 7], [8, 9]]
    calls = []

    def greedy(idx):
        calls.append(tuple(idx.shape))
        return model.generate(idx, 6, temperature=0)

    out = generate_prompts(greedy, prompts, num_samples=2)
    assert sorted(calls) == [(2, 1), (2, 2), (4, 3)]  # one batch per distinct length
    for p, rows in zip(prompts, out):
        alone = model.generate(torch.tensor([p]), 6, temperature=0)[0].tolist()
        assert rows == [alone, alone]
