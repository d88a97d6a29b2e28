"""Reliability (issue 8), point 4: hostile checkpoints and configs are refused, nothing executes.

The checkpoint format never unpickles (safetensors + JSON metadata); a pickle payload that would
create a marker file proves it: it is refused (or ignored, as a sidecar) and the marker never
appears. Every byte of the file is covered by a SHA-256 digest (tensors and metadata), so
truncations and bit flips anywhere are errors that name the file."""

import json
import math
import pathlib
import pickle
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from layerflow import load_run, train
from layerflow.checkpoint import (
    FORMAT,
    CheckpointError,
    _digest,
    _meta_digest,
    list_checkpoints,
    load_checkpoint,
)
from layerflow.cli import main
from layerflow.config import SECTIONS, ConfigError, RunConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "layerflow"



@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    corpus = tmp / "corpus.txt"
    corpus.write_text("the flow of tokens through layer time\n" * 80)
    cfg = tiny_config(data=str(corpus), n_layer=1, n_embd=16, max_iters=2, eval_interval=2,
                      sample_tokens=0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train(cfg, tmp / "run")
    torch.set_num_threads(n)
    return tmp / "run", corpus


def copy_run(good_run, tmp_path) -> tuple[Path, Path]:
    run, corpus = good_run
    dst = tmp_path / "run"
    (dst / "checkpoints").mkdir(parents=True)
    for p in run.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    src = list_checkpoints(run)[-1]
    (dst / "checkpoints" / src.name).write_bytes(src.read_bytes())
    return dst, corpus


def cli_all(run, corpus, capsys) -> list[tuple[int, str]]:
    """What `sample`, `info` and a resumed `train` say about a run directory."""
    out = []
    for argv in (["sample", str(run), "--tokens", "4"], ["info", str(run)],
                 ["train", "--data", str(corpus), "--out", str(run), "--n-layer", "1",
                  "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
                  "--max-iters", "2", "--eval-iters", "2", "--eval-interval", "2",
                  "--warmup-iters", "2", "--log-interval", "1", "--sample-tokens", "0",
                  "--no-progress"]):
        code = main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err and "internal error" not in err, err
        out.append((code, err))
    return out


# ----------------------------------------------------------------------------- pickles


class Payload:
    """Unpickling this calls Path(marker).touch(): code execution, made visible."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def payloads(marker: Path, tmp: Path) -> dict[str, bytes]:
    raw = pickle.dumps({"model": Payload(marker)})
    torch.save({"model": Payload(marker)}, tmp / "zip.pt")  # torch's zip-of-pickles format
    return {"pickle": raw, "torch.save": (tmp / "zip.pt").read_bytes()}


def test_payload_is_live(tmp_path):
    marker = tmp_path / "pwned"
    for blob in payloads(marker, tmp_path).values():
        if blob[:2] == b"PK":
            torch.load(tmp_path / "zip.pt", weights_only=False)  # what we must never do
        else:
            pickle.loads(blob)
        assert marker.exists()
        marker.unlink()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickle_as_checkpoint_refused_without_executing(good_run, tmp_path, capsys, kind):
    run, corpus = copy_run(good_run, tmp_path)
    marker = tmp_path / "pwned"
    evil = run / "checkpoints" / "ckpt_0000099.safetensors"
    evil.write_bytes(payloads(marker, tmp_path)[kind])
    with pytest.raises(CheckpointError, match=re.escape(str(evil))):
        load_run(run)
    for code, err in cli_all(run, corpus, capsys):
        assert code == 2 and evil.name in err and "corrupt" in err
    assert not marker.exists()


def test_pickle_sidecars_are_ignored_never_loaded(good_run, tmp_path, capsys):
    run, corpus = copy_run(good_run, tmp_path)
    marker = tmp_path / "pwned"
    blob = payloads(marker, tmp_path)["pickle"]
    for name in ("checkpoints/ckpt_0000099.pt", "checkpoints/ckpt_0000002.safetensors.pkl",
                 "optimizer.pt", "training_args.bin", "rng_state.pth", "checkpoints/state.pkl",
                 "data/tokens.pkl"):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_bytes(blob)
    codes = [code for code, _ in cli_all(run, corpus, capsys)]
    assert codes == [0, 0, 0]
    assert not marker.exists()


def test_source_never_unpickles():
    """No loader in the package can execute code from a file."""
    bad = re.compile(r"pickle\.loads?\(|cPickle|dill\.|joblib\.load|allow_pickle\s*=\s*True|"
                     r"yaml\.load\((?![^)]*SafeLoader)|torch\.load\((?![^)]*weights_only\s*=\s*True)"
                     r"|(?<![.\w])eval\(|(?<![.\w])exec\(")
    hits = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if bad.search(line) and not line.lstrip().startswith("#")]
    assert hits == []


# ----------------------------------------------------------------------------- damaged files


def test_truncated_anywhere_is_named(good_run, tmp_path):
    ckpt = list_checkpoints(good_run[0])[-1]
    data = ckpt.read_bytes()
    hdr = int.from_bytes(data[:8], "little") + 8
    target = tmp_path / ckpt.name
    for cut in sorted({0, 1, 7, 8, 9, hdr // 2, hdr - 1, hdr, hdr + 1, (hdr + len(data)) // 2,
                       len(data) - 1}):
        target.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=re.escape(str(target))):
            load_checkpoint(target)


def test_bit_flips_anywhere_are_detected(good_run, tmp_path):
    ckpt = list_checkpoints(good_run[0])[-1]
    data = ckpt.read_bytes()
    hdr = int.from_bytes(data[:8], "little") + 8
    rng = random.Random(8)
    # the size prefix, 600 bytes of the header (names, dtypes, shapes, offsets, config, state,
    # digests) and 150 of the tensor bytes, each with one random bit flipped
    positions = list(range(16)) + rng.sample(range(16, hdr), min(600, hdr - 16)) + rng.sample(
        range(hdr, len(data)), 150)
    target = tmp_path / ckpt.name
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(target)
        assert str(target) in str(e.value), (pos, str(e.value))


def resign(src: Path, dst: Path, tensors=None, config=None, tokenizer=None, state=None):
    """Write a checkpoint with valid digests but altered content (a foreign or hostile file)."""
    ck = load_checkpoint(src)
    tensors = dict(ck.tensors if tensors is None else tensors)
    meta = {"format": FORMAT, "config": json.dumps(ck.config if config is None else config),
            "tokenizer": json.dumps(ck.tokenizer if tokenizer is None else tokenizer),
            "state": json.dumps(ck.state if state is None else state),
            "sha256": _digest(tensors)}
    meta["meta_sha256"] = _meta_digest(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=meta)


def test_wrong_shape_is_named(good_run, tmp_path, capsys):
    run, corpus = copy_run(good_run, tmp_path)
    ckpt = list_checkpoints(run)[-1]
    tensors = load_checkpoint(ckpt).tensors
    name = next(k for k, v in tensors.items() if k.startswith("model/") and v.dim() == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    resign(ckpt, ckpt, tensors=tensors)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(ckpt))}: {name[6:]} has shape"):
        load_run(run)
    for code, err in cli_all(run, corpus, capsys):
        assert code == 2 and ckpt.name in err and name[6:] in err


HOSTILE_META = {
    "absurd n_layer": ({"config": {"model": {"n_layer": 10**9}}}, "n_layer"),
    "huge int": ({"config": {"model": {"n_embd": 10**400}}}, "n_embd"),
    "unknown key": ({"config": {"model": {"n_layers": 2}}}, "n_layers"),
    "wrong type": ({"config": {"train": {"lr": "fast"}}}, "lr"),
    "nan": ({"config": {"model": {"dropout": math.nan}}}, "dropout"),
    "section not a mapping": ({"config": {"flow": [1, 2]}}, "flow"),
    "tokenizer malformed": ({"tokenizer": {"type": "char"}}, "tokenizer"),
    "tokenizer unknown": ({"tokenizer": {"type": "pickle", "data": "gASV"}}, "tokenizer"),
    "state iter": ({"state": {"iter": "2; rm -rf /"}}, "state.iter"),
    "state groups": ({"state": {"iter": 2, "param_groups": "x"}}, "optimizer state"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_META))
def test_signed_but_hostile_metadata_named(good_run, tmp_path, capsys, case):
    run, corpus = copy_run(good_run, tmp_path)
    ckpt = list_checkpoints(run)[-1]
    ck = load_checkpoint(ckpt)
    change, needle = HOSTILE_META[case]
    kw = {}
    for part, value in change.items():
        base = dict(getattr(ck, part))
        if part == "config":
            base = {s: {**base[s], **value.get(s, {})} if isinstance(value.get(s, {}), dict)
                    else value[s] for s in base}
        else:
            base = value if part == "tokenizer" else {**base, **value}
        kw[part] = base
    resign(ckpt, ckpt, **kw)
    results = cli_all(run, corpus, capsys)
    for code, err in results[2:] if case.startswith("state") else results:
        assert code == 2 and ckpt.name in err and needle in err, err


# ----------------------------------------------------------------------------- config JSON

HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([10**9, 10**18, 10**400, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                         max_size=2))
FIELDS = [(sec, f) for sec, cls in SECTIONS.items() for f in cls.__dataclass_fields__]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(FIELDS + [("model", "n_layers"), ("train", "learning_rate")]),
       HOSTILE_VALUES)
def test_config_json_rejects_naming_the_key(where, value):
    sec, key = where
    d = json.loads(json.dumps(RunConfig().to_dict()))
    d[sec][key] = value
    try:
        cfg = RunConfig.from_dict(d)
    except ConfigError as e:
        assert key in str(e), str(e)
        assert len(str(e).splitlines()) == 1 and len(str(e)) < 400
        return
    assert getattr(getattr(cfg, sec), key) == value or str(getattr(getattr(cfg, sec), key)) == \
        str(value)
    RunConfig.from_dict(json.loads(cfg.to_json()))  # what was accepted round-trips


def test_config_rejects_unknown_section_and_non_mapping():
    with pytest.raises(ConfigError, match="'optimizer'"):
        RunConfig.from_dict({"optimizer": {}})
    with pytest.raises(ConfigError, match="mapping"):
        RunConfig.from_dict([1])
