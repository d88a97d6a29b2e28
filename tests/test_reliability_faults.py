"""Reliability (issue 8), points 2, 3 and 6: a full disk, lock files, non-finite steps."""

import errno
import json
import os
import socket
import subprocess
import sys
import uuid

import pytest
import torch
from conftest import tiny_config

from layerflow import train
from layerflow.checkpoint import (
    atomic_write_bytes,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
)
from layerflow.cli import main
from layerflow.runlock import LOCK_NAME, RunLock, RunLockError, clean_stale_temps, pid_alive
from layerflow.train import read_metrics

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
        "--batch-size", "2", "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1",
        "--sample-tokens", "0", "--no-progress", "--warmup-iters", "1"]



def cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(run):
    return {p.name: p.read_bytes() for p in list_checkpoints(run)}


def leftovers(run):
    return [p for d in (run, run / "checkpoints", run / "data") if d.is_dir()
            for p in d.iterdir() if ".tmp" in p.name or p.name == LOCK_NAME]


def weights(run, it):
    t = load_checkpoint(checkpoint_path(run, it)).tensors
    return {k: v for k, v in t.items() if k.startswith("model/")}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- 2. full disk


def check_disk_full_then_resume(tmp_path, run, corpus, capsys, make_full, make_free):
    args = ["train", "--data", str(corpus), "--out", str(run), *TINY]
    assert cli(capsys, *args, "--max-iters", "2")[0] == 0
    good = snapshot(run)
    assert list(good) == ["ckpt_0000002.safetensors"]
    make_full()
    code, out, err = cli(capsys, *args, "--max-iters", "4")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "Traceback" not in err
    assert "cannot write a checkpoint" in err and "ckpt_0000004.safetensors" in err
    assert "the last good checkpoint is" in err and "ckpt_0000002.safetensors (intact)" in err
    assert snapshot(run) == good  # the previous checkpoint is byte-for-byte intact ...
    load_checkpoint(run / "checkpoints" / "ckpt_0000002.safetensors")  # ... and loads
    assert leftovers(run) == []  # no half-written temp file, the lock is released
    make_free()
    code, out, err = cli(capsys, *args, "--max-iters", "4")
    assert code == 0, err
    ref = tmp_path / "ref"  # nothing was silently dropped: the resumed run is the full run
    assert cli(capsys, "train", "--data", str(corpus), "--out", str(ref), *TINY,
               "--max-iters", "4")[0] == 0
    for k, v in weights(ref, 4).items():
        assert torch.equal(v, weights(run, 4)[k]), k


def test_enospc_patched_writer(tmp_path, tiny_corpus, capsys, monkeypatch):
    check_disk_full_then_resume(
        tmp_path, tmp_path / "run", tiny_corpus, capsys,
        lambda: monkeypatch.setenv("LAYERFLOW_FAULTS", "enospc=ckpt_*"),
        lambda: monkeypatch.delenv("LAYERFLOW_FAULTS"))


def test_enospc_real_tmpfs(tmp_path, tiny_corpus, capsys):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    filler = mnt / "filler"
    try:
        def fill():  # leave less room than one checkpoint needs
            ckpt = next((mnt / "run" / "checkpoints").iterdir()).stat().st_size
            st = os.statvfs(mnt)
            free = st.f_bavail * st.f_frsize
            filler.write_bytes(b"\0" * max(free - ckpt // 2, 0))
        check_disk_full_then_resume(tmp_path, mnt / "run", tiny_corpus, capsys, fill,
                                    filler.unlink)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_unwritable_output_is_one_line(tmp_path, tiny_corpus, capsys, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(sys.modules["layerflow.train"].MetricsLog, "write", refuse)
    code, _, err = cli(capsys, "train", "--data", str(tiny_corpus), "--out",
                       str(tmp_path / "run"), *TINY, "--max-iters", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "Permission denied" in err and "no checkpoint was written yet" in err
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_atomic_write_names_the_file_on_enospc(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    monkeypatch.setenv("LAYERFLOW_FAULTS", "enospc=x.bin")
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, b"new" * 1000)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


# ----------------------------------------------------------------------------- 3. locks


def test_lock_refuses_second_holder_and_releases(tmp_path):
    with RunLock(tmp_path) as a:
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(RunLockError, match=f"in use by another training \\(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
        assert a.recovered is None
    assert not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(Exception, match="in use by another training"):
        with RunLock(tmp_path):
            train(tiny_config(), tmp_path)


@pytest.mark.parametrize("use_flock", [True, False])
def test_stale_lock_of_dead_process_is_recovered(tmp_path, use_flock):
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    lock = RunLock(tmp_path, use_flock=use_flock).acquire()
    assert lock.recovered["pid"] == pid
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_pid_fallback_live_zombie_and_foreign_host(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        lock = tmp_path / LOCK_NAME
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(RunLockError, match=f"pid {sleeper.pid}.*wait for it"):
            RunLock(tmp_path, use_flock=False).acquire()
        lock.write_text(json.dumps({"pid": 1, "host": "elsewhere-" + uuid.uuid4().hex}))
        with pytest.raises(RunLockError, match="if that process is gone, delete"):
            RunLock(tmp_path, use_flock=False).acquire()
        zombie.send_signal(9)
        while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            pass
        assert not pid_alive(zombie.pid)  # a killed, unreaped process is dead
        lock.write_text(json.dumps({"pid": zombie.pid, "host": socket.gethostname()}))
        assert RunLock(tmp_path, use_flock=False).acquire().recovered["pid"] == zombie.pid
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()


def test_stale_temp_files_removed_only_for_dead_writers(tmp_path):
    dead = dead_pid()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "data").mkdir()
    stale = [tmp_path / "checkpoints" / f".ckpt_0000004.safetensors.tmp{dead}",
             tmp_path / "data" / f"tokens.bin.tmp{dead}", tmp_path / f".write-test-{dead}",
             tmp_path / f".metrics.jsonl.tmp{dead}"]
    live = [tmp_path / "checkpoints" / f".ckpt_0000006.safetensors.tmp{os.getpid()}",
            tmp_path / "checkpoints" / "ckpt_0000002.safetensors", tmp_path / "notes.tmp"]
    for p in stale + live:
        p.write_bytes(b"x")
    assert sorted(clean_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in live) and not any(p.exists() for p in stale)


# ----------------------------------------------------------------------------- 6. NaN / Inf


@pytest.mark.parametrize("fault,what", [("nan_loss", "loss is nan"), ("inf_loss", "loss is inf"),
                                        ("nan_grad", "gradient norm is nan"),
                                        ("inf_grad", "gradient norm is inf")])
@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_non_finite_step_stops_and_keeps_checkpoint(tmp_path, tiny_corpus, monkeypatch,
                                                    fault, what, clip):
    cfg = tiny_config(data=str(tiny_corpus), max_iters=8, ckpt_interval=2, grad_clip=clip,
                      sample_tokens=0)
    run = tmp_path / "run"
    monkeypatch.setenv("LAYERFLOW_FAULTS", f"{fault}=5")
    saved = {}
    real = torch.optim.AdamW.step

    def spy(self, *a, **k):  # record that no update is applied at the bad step
        saved["steps"] = saved.get("steps", 0) + 1
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    summary = train(cfg, run)
    status = summary["status"]
    assert status.startswith(f"stopped: non-finite {what}") and "at iteration 5" in status
    assert "the last good checkpoint ckpt_0000004.safetensors is kept" in status
    assert summary["iter"] == 5 and saved["steps"] == 5
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_0000002.safetensors",
                                                       "ckpt_0000004.safetensors"]
    errors = [r for r in read_metrics(run) if r["kind"] == "error"]
    assert len(errors) == 1 and errors[0]["iter"] == 5
    for v in weights(run, 4).values():
        assert torch.isfinite(v).all()
    assert not (run / LOCK_NAME).exists()


def test_cli_reports_the_step(tmp_path, tiny_corpus, capsys, monkeypatch):
    monkeypatch.setenv("LAYERFLOW_FAULTS", "nan_grad=3")
    code, out, err = cli(capsys, "train", "--data", str(tiny_corpus), "--out",
                         str(tmp_path / "r"), *TINY, "--max-iters", "6")
    assert code == 1 and "Traceback" not in err
    assert "stopped: non-finite gradient norm is nan" in out and "at iteration 3" in out
    assert "ckpt_0000002.safetensors is kept" in out


def test_skip_policy_drops_bad_updates_only(tmp_path, tiny_corpus, monkeypatch):
    cfg = tiny_config(data=str(tiny_corpus), max_iters=8, sample_tokens=0, nan_policy="skip")
    monkeypatch.setenv("LAYERFLOW_FAULTS", "nan_grad=3,inf_loss=5")
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "done" and summary["iter"] == 8
    recs = read_metrics(tmp_path / "run")
    assert [(r["iter"], r["message"].split(" is ")[0]) for r in recs if r["kind"] == "skip"] == \
        [(3, "non-finite gradient norm"), (5, "non-finite loss")]
    assert sorted(r["iter"] for r in recs if r["kind"] == "train") == [0, 1, 2, 4, 6, 7]
    for v in weights(tmp_path / "run", 8).values():
        assert torch.isfinite(v).all()


def test_skip_policy_gives_up_after_ten_bad_steps_in_a_row(tmp_path, tiny_corpus, monkeypatch):
    cfg = tiny_config(data=str(tiny_corpus), max_iters=30, sample_tokens=0, nan_policy="skip")
    monkeypatch.setenv("LAYERFLOW_FAULTS", "nan_loss=" + "+".join(str(i) for i in range(4, 30)))
    summary = train(cfg, tmp_path / "run")
    assert summary["status"].startswith("stopped: non-finite loss is nan at iteration 14")
    assert "(11 bad steps in a row)" in summary["status"]
    assert "ckpt_0000010.safetensors is kept" in summary["status"]
    assert len([r for r in read_metrics(tmp_path / "run") if r["kind"] == "skip"]) == 10


def test_nan_policy_is_validated_and_resumable():
    from layerflow.config import RESUMABLE_KEYS, ConfigError

    with pytest.raises(ConfigError, match="nan_policy"):
        tiny_config(nan_policy="ignore")
    assert "nan_policy" in RESUMABLE_KEYS


@pytest.mark.parametrize("modern", [True, False])
def test_guard_checks_gradients_not_only_the_loss(monkeypatch, modern):
    from layerflow.faults import StepGuard

    if not modern:  # torch < 2.6 has no get_total_norm
        monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    m = torch.nn.Linear(2, 2)
    m(torch.ones(1, 2)).sum().backward()
    g = StepGuard()
    assert g.check(0, torch.tensor(1.0), m, 0.0) is None
    m.weight.grad[0, 0] = float("inf")
    assert g.check(1, torch.tensor(1.0), m, 0.0) == \
        "non-finite gradient norm is inf (loss 1.0000) at iteration 1"
    assert not g.skip()  # policy stop
