"""Training loop: exact resume, Ctrl-C, run directory contents."""

import json
import os
import signal

import torch
from conftest import tiny_config

from layerflow import load_run, train
from layerflow.train import lr_at, read_metrics


def losses(run_dir):
    return [(r["iter"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_corpus):
    cfg = tiny_config(data=str(tiny_corpus), max_iters=30, dropout=0.1)
    full = train(cfg, tmp_path / "full")
    assert full["status"] == "done"

    def interrupt(it, loss):
        if it == 12:  # Ctrl-C arrives during step 12
            os.kill(os.getpid(), signal.SIGINT)

    part = train(cfg, tmp_path / "resumed", on_step=interrupt)
    assert part["status"].startswith("interrupted (SIGINT)")
    assert part["iter"] == 13
    resumed = train(cfg, tmp_path / "resumed")
    assert resumed["status"] == "done"
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
    assert len(losses(tmp_path / "full")) == 30
    a, *_ = load_run(tmp_path / "full")
    b, *_ = load_run(tmp_path / "resumed")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_run_directory_contents(tmp_path, tiny_corpus):
    run = tmp_path / "run"
    train(tiny_config(data=str(tiny_corpus)), run)
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "samples.txt"):
        assert (run / name).exists(), name
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] > 0
    assert list((run / "checkpoints").glob("ckpt_*.safetensors"))
    evals = [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_schedule_warmup_then_cosine():
    tc = tiny_config(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110).train
    assert lr_at(0, tc) < lr_at(9, tc) <= 1e-3
    assert abs(lr_at(10, tc) - 1e-3) < 1e-12
    assert abs(lr_at(60, tc) - 5.5e-4) < 1e-9
    assert abs(lr_at(110, tc) - 1e-4) < 1e-12
