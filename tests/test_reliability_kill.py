"""Reliability (issue 8), points 1 and 3: a trainer killed at any moment loses nothing, SIGTERM
and Ctrl-C save and exit cleanly, and two trainers never share a run directory.

Trainers are real processes forked by tests/trainer_server.py (imports paid once)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from layerflow.checkpoint import CKPT_RE, list_checkpoints, load_checkpoint
from layerflow.cli import main
from layerflow.runlock import LOCK_NAME
from layerflow.train import load_run, read_metrics

ARGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
        "--batch-size", "2", "--eval-interval", "10", "--eval-iters", "1", "--log-interval", "1",
        "--warmup-iters", "2", "--dropout", "0.1", "--sample-tokens", "0", "--no-progress",
        "--keep-checkpoints", "2"]
KEEP = 2



class Server:
    def __init__(self, tmp: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("LAYERFLOW_FAULTS", None)
        self.tmp = tmp
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("trainer_server.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.n = 0

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv, faults: str = "") -> tuple[int, Path]:
        self.n += 1
        log = self.tmp / f"trainer{self.n}.log"
        pid = self.ask(op="start", argv=argv, env={"LAYERFLOW_FAULTS": faults} if faults else {},
                       log=str(log))["pid"]
        return pid, log

    def wait(self, pid: int) -> int:
        return self.ask(op="wait", pid=pid)["code"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    g = random.Random(0)
    words = "the flow of tokens through layer time is one step of an integrator".split()
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(" ".join(g.choice(words) for _ in range(9)) for _ in range(300)))
    server = Server(tmp)
    yield server, corpus, tmp
    server.close()


def train_argv(run, corpus, max_iters, *extra):
    return ["train", "--data", str(corpus), "--out", str(run), "--max-iters", str(max_iters),
            *ARGS, *extra]


def iters(run) -> list[int]:
    return [int(CKPT_RE.match(p.name).group(1)) for p in list_checkpoints(run)]


def temps(run) -> list[Path]:
    return [p for d in (run, run / "checkpoints", run / "data") if d.is_dir()
            for p in d.iterdir() if ".tmp" in p.name]


def model_tensors(run, it):
    t = load_checkpoint(run / "checkpoints" / f"ckpt_{it:07d}.safetensors").tensors
    return {k: v for k, v in t.items() if not k.startswith("rng/")}


def train_losses(run):
    return [(r["iter"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]


def assert_same_run(a, b, it):
    ta, tb = model_tensors(a, it), model_tensors(b, it)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert train_losses(a) == train_losses(b)


def poll_until(cond, seen: set, run, timeout=60.0):
    t0 = time.monotonic()
    while not cond():
        seen.update(iters(run))
        assert time.monotonic() - t0 < timeout, "trainer made no progress"
        time.sleep(0.002)
    seen.update(iters(run))


def test_sigkill_at_ten_random_moments(env):
    server, corpus, tmp = env
    n_iters = 80
    ref, run = tmp / "ref", tmp / "killed"
    pid, log = server.start(train_argv(ref, corpus, n_iters, "--ckpt-interval", "1"))
    assert server.wait(pid) == 0, log.read_text()

    rng = random.Random(8)
    seen: set[int] = set()
    for k in range(10):
        before = max(iters(run), default=0)
        # even rounds: wait for progress (so the run finishes), then kill at a random moment;
        # odd rounds: the trainer stops half-way through writing a checkpoint (round 3: the
        # metrics.jsonl rewrite of a resume) and is killed there
        target = ".metrics.jsonl.tmp" if k == 3 else ".ckpt_"
        faults = (f"hang_write={target.strip('.').split('.tmp')[0]}*" if k % 2
                  else "slow_write=0.02")
        pid, log = server.start(train_argv(run, corpus, n_iters, "--ckpt-interval", "1"),
                                faults=faults)
        if k % 2:
            mine = (lambda t=target, pid=pid: [p for p in temps(run) if p.name.startswith(t)
                                               and p.name.endswith(f".tmp{pid}")])
            poll_until(lambda m=mine: bool(m()), seen, run)
        else:
            poll_until(lambda b=before: max(iters(run), default=0) > b, seen, run)
            time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        assert server.wait(pid) == -signal.SIGKILL, "trainer ended before it was killed"
        if k % 2:  # killed mid-write: its half-written temp file is left behind
            assert mine() and mine()[0].stat().st_size > 0
        assert (run / LOCK_NAME).exists()  # a dead holder's lock stays behind ...
        # (a) the run directory always loads, every checkpoint in it verifies
        model, tok, cfg, ckpt = load_run(run)
        assert ckpt.state["iter"] == max(iters(run))
        for p in list_checkpoints(run):
            load_checkpoint(p)
        # (b) every checkpoint seen complete is still there or superseded by KEEP newer ones
        present = set(iters(run))
        for c in seen:
            assert c in present or sum(p > c for p in present) >= KEEP, (c, present)
        if k:  # ... and is recovered by the next start, as are its temp files
            assert "recovered a stale lock" in log.read_text()

    pid, log = server.start(train_argv(run, corpus, n_iters, "--ckpt-interval", "1"))
    assert server.wait(pid) == 0, log.read_text()
    assert "recovered a stale lock" in log.read_text()
    assert not temps(run) and not (run / LOCK_NAME).exists()
    assert max(iters(run)) == n_iters and len(iters(run)) == KEEP
    # (c) the final weights, optimizer state and logged losses equal the uninterrupted run's
    assert_same_run(run, ref, n_iters)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_and_exit_cleanly(env, sig):
    server, corpus, tmp = env
    ref, run = tmp / f"ref{sig.name}", tmp / f"sig{sig.name}"
    pid, log = server.start(train_argv(ref, corpus, 60))
    assert server.wait(pid) == 0, log.read_text()
    pid, log = server.start(train_argv(run, corpus, 60), faults="slow_write=0.01")
    poll_until(lambda: len(train_losses(run)) >= 13, set(), run)
    os.kill(pid, sig)
    assert server.wait(pid) == 0
    out = log.read_text()
    assert f"interrupted ({sig.name}) at iteration" in out and "Traceback" not in out
    stopped = int(out.split("at iteration ")[1].split(";")[0])
    assert stopped >= 13 and stopped in iters(run)  # a checkpoint written on the signal
    assert not temps(run) and not (run / LOCK_NAME).exists()
    pid, log = server.start(train_argv(run, corpus, 60))
    assert server.wait(pid) == 0, log.read_text()
    assert "recovered" not in log.read_text()
    assert_same_run(run, ref, 60)


def test_second_trainer_refused_then_stale_lock_recovered(env, capsys):
    server, corpus, tmp = env
    run = tmp / "shared"
    pid, log = server.start(train_argv(run, corpus, 400, "--ckpt-interval", "1"),
                            faults="slow_write=0.01")
    poll_until(lambda: bool(iters(run)), set(), run)
    lock = json.loads((run / LOCK_NAME).read_text())
    assert lock["pid"] == pid and lock["host"]
    code = main(train_argv(run, corpus, 400))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "in use by another training" in err and f"pid {pid}" in err
    os.kill(pid, signal.SIGKILL)
    assert server.wait(pid) == -signal.SIGKILL
    done = max(iters(run))
    code = main(train_argv(run, corpus, done + 3))
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"recovered a stale lock in {run} left by pid {pid}" in err
    assert max(iters(run)) == done + 3 and not (run / LOCK_NAME).exists()
