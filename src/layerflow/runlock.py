"""One trainer per run directory, and recovery from a trainer that was killed.

`RunLock` is the file `run_dir/.lock` holding JSON {pid, host, since, start_ticks}. It is taken
with `fcntl.flock(LOCK_EX | LOCK_NB)`, which the kernel releases when the holder dies, even by
SIGKILL: a lock file whose flock nobody holds is stale and is taken over (the old holder is
reported). Where flock is unavailable (no `fcntl`, or a filesystem answering ENOLCK/EOPNOTSUPP)
the lock is created with O_CREAT|O_EXCL and a lock file is stale when its pid is not alive on
this host (a zombie, or a live pid with another start time, counts as dead: pid reuse).

`clean_stale_temps` removes what a killed writer leaves behind: temp files `*.tmp<pid>` of the
atomic writers and the `.write-test-<pid>` probe, only for pids that are not alive.

`run_locked` wraps `train(cfg, run_dir, ...)`: on rank 0 only (torch.distributed rank, else the
RANK environment variable, else 0) it takes the lock, cleans stale temp files, turns SIGTERM
outside the training loop into a clean KeyboardInterrupt, and turns an OSError (full disk,
read-only output) into a one-line TrainError naming the file and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".lock"
TEMP_RE = re.compile(r"(?:\.tmp|^\.write-test-)(\d+)$")
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLockError(RuntimeError):
    """The run directory is in use by another trainer."""


def _train_error(message: str) -> Exception:
    from .train import TrainError  # lazy: train imports this module

    return TrainError(message)


def _proc_start_ticks(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text.rsplit(")", 1)[1].split()
    return -1 if rest[0] in ("Z", "X") else int(rest[19])


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process `pid` on this host is running (and, if given, started at `start_ticks`)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    ticks = _proc_start_ticks(pid)
    if ticks == -1:  # zombie: dead, not yet reaped
        return False
    return not (start_ticks is not None and ticks is not None and ticks != start_ticks)


def _describe(info: dict) -> str:
    since = info.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else ""
    return f"pid {info.get('pid')} on host {info.get('host')}{when}"


def _read_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """Exclusive lock on a run directory (see the module docstring). Use as a context manager."""

    def __init__(self, run_dir, use_flock: bool | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.use_flock = fcntl is not None if use_flock is None else use_flock
        self.fd: int | None = None
        self.recovered: dict | None = None  # info of a stale lock that was taken over
        self.held = False

    def _info(self) -> bytes:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "start_ticks": _proc_start_ticks(os.getpid())}
        return json.dumps(info).encode()

    def _busy(self, info: dict) -> RunLockError:
        hint = ("wait for it to finish or use another --out" if info.get("host") in
                (None, socket.gethostname()) else
                f"if that process is gone, delete {self.path}")
        return RunLockError(f"run directory {self.run_dir} is in use by another training "
                            f"({_describe(info)}); {hint}")

    def acquire(self) -> "RunLock":
        for _ in range(20):
            if self.use_flock:
                done = self._try_flock()
                if done is None:  # filesystem without flock: fall back
                    self.use_flock = False
                    continue
            else:
                done = self._try_exclusive()
            if done:
                self.held = True
                return self
            time.sleep(0.01)  # lost a race with another starter or a releasing holder
        raise RunLockError(f"could not lock {self.path}: it keeps changing")

    def _try_flock(self) -> bool | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(self.path)
            os.close(fd)
            raise self._busy(info) from None
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_FLOCK:
                return None
            raise
        try:  # the holder may have unlinked the file between our open and flock
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        old = os.read(fd, 1 << 16)
        if old.strip():
            self.recovered = _read_info(self.path) or {"pid": "?", "host": "?"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._info(), 0)
        os.fsync(fd)
        self.fd = fd
        return True

    def _try_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read_info(self.path)
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return False
            if not info:
                if age < 10:  # being written right now
                    return False
            elif info.get("host") != socket.gethostname() or pid_alive(
                    int(info.get("pid", -1)), info.get("start_ticks")):
                raise self._busy(info) from None
            self.recovered = info or {"pid": "?", "host": "?"}
            self.path.unlink(missing_ok=True)
            return False
        os.write(fd, self._info())
        os.fsync(fd)
        os.close(fd)
        return True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            self.path.unlink(missing_ok=True)  # while still holding the flock
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_stale_temps(run_dir) -> list[Path]:
    """Remove temp files of dead writers in run_dir, run_dir/checkpoints and run_dir/data."""
    removed = []
    run_dir = Path(run_dir)
    for d in (run_dir, run_dir / "checkpoints", run_dir / "data"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            m = TEMP_RE.search(p.name)
            if m and p.is_file() and not pid_alive(int(m.group(1))):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def current_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While active (main thread, default handler only), SIGTERM raises KeyboardInterrupt, so
    `finally` blocks run (lock released, temp files removed) instead of the process vanishing.
    The training loop installs its own handler (checkpoint, then return) on top of this one."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_failure_message(run_dir: Path, e: OSError) -> str:
    from .checkpoint import CKPT_RE, list_checkpoints

    what = e.filename or "a file"
    ckpts = list_checkpoints(run_dir)
    name = Path(str(e.filename or "")).name.lstrip(".")
    during = " a checkpoint" if CKPT_RE.match(name.split(".tmp")[0]) else ""
    last = (f"the last good checkpoint is {ckpts[-1]} (intact); free space and run the same "
            "command to resume from it" if ckpts else "no checkpoint was written yet")
    return (f"cannot write{during} {what}: {e.strerror or e}; training stopped, {last}")


def run_locked(fn):
    """Decorator for `train(cfg, run_dir, ...)`; see the module docstring."""

    @functools.wraps(fn)
    def wrapper(cfg, run_dir, *args, **kwargs):
        if current_rank() != 0:
            return fn(cfg, run_dir, *args, **kwargs)
        path = Path(run_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _train_error(f"output directory {path} is not writable: "
                               f"{e.strerror or e}") from None
        lock = RunLock(path)
        try:
            lock.acquire()
        except RunLockError as e:
            raise _train_error(str(e)) from None
        except OSError as e:
            raise _train_error(f"output directory {path} is not writable: "
                               f"{e.strerror or e}") from None
        try:
            if lock.recovered:
                print(f"layerflow: recovered a stale lock in {path} left by "
                      f"{_describe(lock.recovered)}, which is no longer running", file=sys.stderr,
                      flush=True)
            clean_stale_temps(path)
            with sigterm_as_interrupt():
                return fn(cfg, run_dir, *args, **kwargs)
        except OSError as e:
            raise _train_error(write_failure_message(path, e)) from None
        finally:
            lock.release()

    return wrapper
