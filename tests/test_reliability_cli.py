"""Reliability (issue 8), point 7: fuzzed command lines never end in a traceback.

For every subcommand the parser has (found at test time, so commands added later are fuzzed
too), hypothesis builds argument lists from the command's own options, valid and hostile values
(absurd numbers, nan, non-numbers, missing/odd paths, unicode) and junk flags. Each run must end
with exit 0, or exit 2 and exactly one line on stderr; never an internal error, a traceback or a
hang. Training is capped (<= 2 steps, tiny evaluation, tiny corpus) so valid runs stay fast."""

import argparse
import os
import re
import signal
import sys

import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerflow.cli import build_parser, main

LIMIT_S = 15
# 30 fixed examples per command in the suite; LAYERFLOW_FUZZ_EXAMPLES=500 explores at random
EXAMPLES = int(os.environ.get("LAYERFLOW_FUZZ_EXAMPLES", "30"))


class Hang(BaseException):
    pass


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = sorted(subparsers())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny trained run, a corpus, a TOML file, and odd paths to hand to the fuzzer."""
    from layerflow import train

    tmp = tmp_path_factory.mktemp("fuzz")
    corpus = tmp / "corpus.txt"
    corpus.write_text("the flow of tokens through layer time is an ode\n" * 60)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train(tiny_config(data=str(corpus), n_layer=1, n_embd=16, max_iters=2, eval_interval=2,
                      sample_tokens=0), tmp / "run")
    torch.set_num_threads(n)
    (tmp / "good.toml").write_text("[model]\nn_layer = 1\nn_embd = 16\n")
    (tmp / "bad.toml").write_text("[model\nn_layer = ")
    (tmp / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp / "empty").mkdir()
    paths = [tmp / "run", corpus, tmp / "good.toml", tmp / "bad.toml", tmp / "binary.bin",
             tmp / "empty", tmp / "missing", tmp / "run" / "checkpoints", "/dev/null", "."]
    return tmp, corpus, [str(p) for p in paths]


def values(paths):
    return st.one_of(
        st.sampled_from(["0", "1", "2", "3", "-1", "0.5", "1e-3", "nan", "inf", "-inf", "1e400",
                         "1000000000", "9" * 40, "", "x", "-", "--", "true", "euler", "rk4",
                         "byte", "char", "bpe", "rope", "dopri5", "a,b", "1,2", "\udcff",
                         "ÿ\u2028é"]),
        st.sampled_from(paths),
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=12),
    )


SMALL = st.sampled_from(["1", "2", "16", "0.5"])  # valid for most options: runs go deep


def argv_for(command: str, paths):
    parser = subparsers()[command]
    flags = sorted({s for a in parser._actions for s in a.option_strings
                    if s not in ("-h", "--help")})
    n_pos = sum(1 for a in parser._actions if not a.option_strings)
    token = st.one_of(
        st.tuples(st.sampled_from(flags or ["--x"]), values(paths)).map(list),
        st.tuples(st.sampled_from(flags or ["--x"]), SMALL).map(list),
        st.sampled_from(flags or ["--x"]).map(lambda f: [f]),
        st.sampled_from(["--bogus", "-z", "--no-such=1", "-h"]).map(lambda f: [f]),
    )
    positional = st.one_of(  # mostly the right number of plausible positionals
        st.lists(st.sampled_from(paths), min_size=n_pos, max_size=n_pos),
        st.lists(st.sampled_from(paths) | values(paths), max_size=n_pos + 1))
    return st.tuples(positional, st.lists(token, max_size=5)).map(
        lambda t: [command, *t[0], *[x for group in t[1] for x in group]])


@pytest.fixture
def capped(world, monkeypatch):
    """Training and sweeps run for at most 2 steps on the tiny corpus; cwd is a temp dir."""
    tmp, corpus, _ = world
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    train_mod = sys.modules["layerflow.train"]
    real_train = train_mod.train

    def small_train(cfg, run_dir, *a, **k):
        tc = cfg.train
        over = dict(max_iters=min(tc.max_iters, 2), eval_iters=1, progress=False,
                    sample_tokens=min(tc.sample_tokens, 2), device="cpu")
        if not cfg.data.data:
            over["data"] = str(corpus)
        if cfg.model.n_layer * cfg.model.n_embd ** 2 > 4 * 128 ** 2:
            over.update(n_layer=1, n_embd=16, n_head=2, head_dim=0, n_kv_head=0)
        try:
            cfg = cfg.replace(**over)
        except ValueError:
            pass  # the real train refuses it, or runs the unchanged (small) config
        return real_train(cfg, run_dir, *a, **k)

    monkeypatch.setattr(train_mod, "train", small_train)
    sweep = sys.modules.get("layerflow.sweep")
    if sweep is None:
        import importlib

        sweep = importlib.import_module("layerflow.sweep")
    if hasattr(sweep, "run_sweep"):
        real_sweep = sweep.run_sweep

        def small_sweep(data, out, depths, lrs, variants, **kw):
            kw.update(iters=min(kw.get("iters", 2), 2), eval_iters=1)
            return real_sweep(data, out, depths[:1], lrs[:1], variants[:1], **kw)

        monkeypatch.setattr(sweep, "run_sweep", small_sweep)


def visible_lines(err: str) -> list[str]:
    """Lines as a terminal shows them, progress bars (redrawn with \r) left out."""
    shown = (line.rsplit("\r", 1)[-1] for line in err.split("\n"))
    return [x for x in shown if x.strip() and not re.search(r"\d+%\|", x)]


def run_cli(argv, capsys):
    def alarm(*_):
        raise Hang(f"no answer within {LIMIT_S} s: {argv!r}")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(LIMIT_S)
    try:
        code = main(argv)
    except SystemExit as e:  # --help prints usage and exits 0
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", COMMANDS)
def test_fuzzed_arguments_exit_0_or_2_with_one_line(world, capped, capsys, command):
    n = torch.get_num_threads()
    torch.set_num_threads(1)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get(
        "LAYERFLOW_FUZZ_EXAMPLES"), suppress_health_check=list(HealthCheck))
    @given(argv=argv_for(command, world[2]))
    def check(argv):
        code, out, err = run_cli(argv, capsys)
        assert "Traceback" not in err + out and "internal error" not in err, (argv, err)
        if code == 1 and command == "train":  # a run that stopped (e.g. diverged): status line
            assert "stopped:" in out, (argv, out, err)
            return
        assert code in (0, 2), (argv, code, err)
        if code == 2:
            assert len(visible_lines(err)) == 1, (argv, err)

    try:
        check()
    finally:
        torch.set_num_threads(n)


HOSTILE = ["-1", "nan", "1e400", "1000000000", "9" * 40, "x"]


def grid(command: str):
    """(option, value) for every numeric option of `command` and every HOSTILE value (string
    options take any text; the random fuzz above covers them)."""
    parser = subparsers()[command]
    numeric = [a.option_strings[-1] for a in parser._actions if a.option_strings and (
        a.type in (int, float) or getattr(a.type, "__qualname__", "").startswith("_number"))]
    return [(o, v) for o in numeric for v in HOSTILE]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "import-hf"])
def test_each_option_with_each_hostile_value(world, capped, capsys, monkeypatch, command):
    """The systematic half of the fuzz: one hostile value at a time, everything else valid."""
    tmp, corpus, _ = world
    if command == "train":  # the config is validated before train() is called: stop there
        monkeypatch.setattr(sys.modules["layerflow.train"], "train", lambda cfg, out, **k: {
            "status": "done", "run_dir": str(out), "iter": 0, "best_val": None})
    if command == "analyze":  # a real report takes seconds; the random fuzz above runs it
        import layerflow.analysis.report as report

        monkeypatch.setattr(report, "analyze_runs", lambda *a, **k: "report.html")
    parser = subparsers()[command]
    n_pos = sum(1 for a in parser._actions if not a.option_strings and a.nargs != 0)
    base = [command, *[str(tmp / "run")] * n_pos]
    if command == "sweep":
        base += ["--data", str(corpus)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    bad = []
    try:
        for opt, value in grid(command):
            nargs = next(a.nargs for a in parser._actions if opt in a.option_strings)
            argv = base + [opt] + [value] * (nargs if isinstance(nargs, int) else 1)
            try:
                code, out, err = run_cli(argv, capsys)
            except Hang as e:
                bad.append((opt, value, "hang", str(e)[:80]))
                continue
            if "internal error" in err or code not in (0, 2) or (
                    code == 2 and len(visible_lines(err)) != 1):
                bad.append((opt, value, code, err.strip()[:160]))
    finally:
        torch.set_num_threads(n)
    assert bad == [], "\n".join(map(repr, bad))


def test_no_command_and_unknown_command(capsys):
    for argv in ([], ["frobnicate"], ["--version-of-nothing"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
