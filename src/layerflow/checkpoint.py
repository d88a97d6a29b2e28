"""Checkpoints: one `safetensors` file per checkpoint, written atomically, loaded without pickle.

Tensors: `model/<name>` (weights), `optim/<i>/<key>` (AdamW moments and step counts),
`rng/<name>` (RNG states as uint8 tensors). Metadata (strings): the resolved config, the
tokenizer, the training state (iteration, schedule, optimizer hyper-parameters) as JSON, and a
SHA-256 digest of all tensor names, dtypes, shapes and bytes, and (format 2) a SHA-256 digest of
the metadata itself, so truncation or a bit flip anywhere in the file is detected on load.
A write goes to a temporary file in the same folder, is fsync'ed, then renamed over the target:
a reader sees the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from . import faults

FORMAT = "layerflow-checkpoint-2"
FORMATS = ("layerflow-checkpoint-1", FORMAT)  # format 1: no metadata digest, no shapes hashed
CKPT_RE = re.compile(r"^ckpt_(\d{7,})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file."""


def _digest(tensors: dict[str, torch.Tensor], shapes: bool = True) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        if shapes:
            h.update(repr(tuple(tensors[name].shape)).encode())
        t = tensors[name].detach().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            faults.write(f, data, path)  # f.write(data), unless a test injects a fault
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # write/fsync errors (ENOSPC) carry no file name
        raise
    fsync_dir(path.parent)


def optimizer_tensors(optimizer) -> tuple[dict, list]:
    sd = optimizer.state_dict()
    tensors = {}
    for i, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"optim/{i}/{key}"] = torch.as_tensor(value).detach().clone()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(optimizer, tensors: dict, groups: list) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, i, key = name.split("/", 2)
            state.setdefault(int(i), {})[key] = value
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(path, model, optimizer, config_dict: dict, state: dict, tokenizer_dict: dict,
                    rng: dict[str, torch.Tensor] | None = None) -> None:
    """Write one checkpoint file atomically."""
    from safetensors.torch import save

    tensors = {f"model/{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    groups = []
    if optimizer is not None:
        opt_t, groups = optimizer_tensors(optimizer)
        tensors.update(opt_t)
    for name, t in (rng or {}).items():
        tensors[f"rng/{name}"] = t.detach().contiguous().clone()
    meta = {
        "format": FORMAT,
        "config": json.dumps(config_dict, sort_keys=True),
        "tokenizer": json.dumps(tokenizer_dict),
        "state": json.dumps({**state, "param_groups": groups}),
        "sha256": _digest(tensors),
    }
    meta["meta_sha256"] = _meta_digest(meta)
    atomic_write_bytes(path, save(tensors, metadata=meta))


class Checkpoint:
    """A loaded checkpoint: `config` (dict), `tokenizer` (dict), `state` (dict), `tensors`."""

    def __init__(self, path, config, tokenizer, state, tensors):
        self.path, self.config, self.tokenizer, self.state = path, config, tokenizer, state
        self.tensors = tensors

    def model_state(self) -> dict:
        return {k[6:]: v for k, v in self.tensors.items() if k.startswith("model/")}

    def rng(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(f"rng/{name}")

    def load_model(self, model) -> None:
        """Load weights, refusing missing/unexpected names or wrong shapes (naming them)."""
        sd, own = self.model_state(), model.state_dict()
        missing, extra = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
        if missing or extra:
            what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
            raise CheckpointError(f"checkpoint {self.path} does not match the model: {what}")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise CheckpointError(
                    f"checkpoint {self.path}: {k} has shape {tuple(v.shape)}, "
                    f"the model expects {tuple(own[k].shape)}")
        model.load_state_dict(sd)

    def restore(self, model, optimizer, data_gen: torch.Generator) -> int:
        """Load weights, optimizer state and both RNG states; return the iteration. Anything
        unusable in a (validly signed but hostile or foreign) file is a CheckpointError."""
        self.load_model(model)
        self.load_optimizer(optimizer)
        it = self.state.get("iter")
        if isinstance(it, bool) or not isinstance(it, int) or not 0 <= it <= 10**12:
            raise CheckpointError(f"checkpoint {self.path}: state.iter must be an iteration "
                                  f"number, got {str(it)[:40]!r}")
        try:
            torch.set_rng_state(self.rng("torch"))
            data_gen.set_state(self.rng("data"))
        except (TypeError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.path}: unusable RNG state: "
                                  f"{str(e).splitlines()[0][:200]}") from None
        return it

    def load_optimizer(self, optimizer) -> None:
        try:
            load_optimizer(optimizer, self.tensors, self.state.get("param_groups", []))
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(
                f"checkpoint {self.path}: optimizer state unusable: {e}") from None


def load_checkpoint(path) -> Checkpoint:
    """Read and verify a checkpoint file; any problem is a CheckpointError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {first}") from None
    if meta.get("format") not in FORMATS:
        raise CheckpointError(
            f"{path} is not a layerflow checkpoint (format {meta.get('format')!r})")
    if meta["format"] != FORMATS[0] and meta.get("meta_sha256") != _meta_digest(meta):
        raise CheckpointError(f"checkpoint {path} is corrupt: metadata fails its SHA-256 check")
    if meta.get("sha256") != _digest(tensors, shapes=meta["format"] != FORMATS[0]):
        raise CheckpointError(f"checkpoint {path} is corrupt: tensor data fails its SHA-256 check")
    try:
        config = json.loads(meta["config"])
        tokenizer = json.loads(meta["tokenizer"])
        state = json.loads(meta["state"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {e}") from None
    for name, value in (("config", config), ("tokenizer", tokenizer), ("state", state)):
        if not isinstance(value, dict):
            raise CheckpointError(f"checkpoint {path} has unreadable metadata: {name} is not "
                                  "a JSON object")
    return Checkpoint(path, config, tokenizer, state, tensors)


def list_checkpoints(run_dir) -> list[Path]:
    """Completed checkpoints in `run_dir/checkpoints`, oldest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_path(run_dir, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt_{iteration:07d}.safetensors"


def prune_checkpoints(run_dir, keep: int) -> None:
    for p in list_checkpoints(run_dir)[:-keep]:
        p.unlink(missing_ok=True)
