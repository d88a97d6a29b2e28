"""The command line: one end-to-end run, and every bad input ends with exit 2 and one line."""

import subprocess
import sys

import pytest

from layerflow.cli import main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
        "--batch-size", "2", "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
        "--sample-tokens", "5", "--no-progress"]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_end_to_end_train_sample_info(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "layerflow", "train", "--data", str(tiny_corpus),
                        "--out", str(out), *TINY], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "done" in r.stdout
    r = subprocess.run([sys.executable, "-m", "layerflow", "sample", str(out), "--prompt", "The",
                        "--tokens", "12"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("The") and len(r.stdout.strip()) >= 15
    r = subprocess.run([sys.executable, "-m", "layerflow", "info", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "lie_trotter" in r.stdout


def test_toml_config_with_overrides(tmp_path, tiny_corpus, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('[flow]\nintegrator = "euler"\n[model]\nn_layer = 1\nn_head = 2\n')
    out = tmp_path / "run"
    code, _, err = run(["train", "--config", str(toml), "--data", str(tiny_corpus), "--out",
                        str(out), *TINY[2:]], capsys)
    assert code == 0, err
    import json
    saved = json.loads((out / "config.json").read_text())
    assert saved["flow"]["integrator"] == "euler" and saved["model"]["n_embd"] == 16


def bad_cases(tmp_path, tiny_corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)) * 20)
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    afile = tmp_path / "afile"
    afile.write_text("x")
    badtoml = tmp_path / "bad.toml"
    badtoml.write_text("[model]\nn_layers = 3\n")
    d = str(tiny_corpus)
    return {
        "missing data": (["--data", str(tmp_path / "nope.txt")], "not found"),
        "empty data": (["--data", str(empty)], "empty"),
        "binary data": (["--data", str(binary)], "binary"),
        "short corpus": (["--data", str(short)], "corpus too short"),
        "unknown integrator": (["--data", d, "--integrator", "rk17"], "unknown integrator"),
        "unknown tokenizer": (["--data", d, "--tokenizer", "words"], "tokenizer"),
        "zero layers": (["--data", d, "--n-layer", "0"], "n_layer"),
        "negative lr": (["--data", d, "--lr", "-1"], "lr"),
        "nan lr": (["--data", d, "--lr", "nan"], "lr"),
        "not a number": (["--data", d, "--batch-size", "two"], "invalid integer"),
        "indivisible heads": (["--data", d, "--n-embd", "30", "--n-head", "4"], "divisible"),
        "bad step size": (["--data", d, "--step-size", "fast"], "step_size"),
        "unwritable out": (["--data", d, "--out", str(afile / "run")], "not writable"),
        "unknown toml key": (["--config", str(badtoml)], "n_layers"),
    }


CASES = ["missing data", "empty data", "binary data", "short corpus", "unknown integrator",
         "unknown tokenizer", "zero layers", "negative lr", "nan lr", "not a number",
         "indivisible heads", "bad step size", "unwritable out", "unknown toml key"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exit_2_one_line(case, tmp_path, tiny_corpus, capsys):
    argv, needle = bad_cases(tmp_path, tiny_corpus)[case]
    if "--out" not in argv:
        argv = argv + ["--out", str(tmp_path / "run")]
    code, out, err = run(["train", *TINY[:-1], *argv, "--no-progress"], capsys)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_mismatched_config_keeps_checkpoint(tmp_path, tiny_corpus, capsys):
    out = tmp_path / "run"
    assert run(["train", "--data", str(tiny_corpus), "--out", str(out), *TINY], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    code, _, err = run(["train", "--data", str(tiny_corpus), "--out", str(out), *TINY,
                        "--n-embd", "32"], capsys)
    assert code == 2 and "another config" in err and "n_embd" in err
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "garbage"])
def test_corrupt_checkpoint_named(tmp_path, tiny_corpus, capsys, damage):
    out = tmp_path / "run"
    assert run(["train", "--data", str(tiny_corpus), "--out", str(out), *TINY], capsys)[0] == 0
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    data = bytearray(ckpt.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "bitflip":
        data[-100] ^= 0x10
    else:
        data = bytearray(b"\x00" * 64)
    ckpt.write_bytes(bytes(data))
    for argv in (["sample", str(out)], ["info", str(out)],
                 ["train", "--data", str(tiny_corpus), "--out", str(out), *TINY]):
        code, _, err = run(argv, capsys)
        assert code == 2 and ckpt.name in err and "corrupt" in err, err


def test_sample_bad_arguments(tmp_path, capsys):
    code, _, err = run(["sample", str(tmp_path / "missing")], capsys)
    assert code == 2 and "not found" in err
    code, _, err = run(["sample"], capsys)
    assert code == 2 and "run_dir" in err
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2 and "invalid choice" in err
