"""`layerflow train | sample | info` — arguments generated from the config dataclasses.

One path: CLI flags → (TOML file →) RunConfig → train(cfg, run_dir). Bad input ends with one line
on stderr and exit code 2; an unexpected failure with one line and exit code 1
(set LAYERFLOW_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields

from .config import SECTIONS, ConfigError, RunConfig, load_toml


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage)
        raise UsageError(f"{self.prog}: {message}")


def _number(kind):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid {'integer' if kind is int else 'number'}: {text!r}") from None
    return parse


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One --flag per config field (names are unique across sections)."""
    for sec, cls in SECTIONS.items():
        g = p.add_argument_group(f"{sec} options")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not MISSING else None
            help_ = f"{f.metadata.get('help', '')} (default: {default!r})"
            ftype = f.type if isinstance(f.type, str) else f.type.__name__
            if ftype == "bool":
                g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_)
            else:
                conv = {"int": _number(int), "float": _number(float)}.get(ftype, str)
                g.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=help_)


def config_from_args(args) -> RunConfig:
    cfg = load_toml(args.config) if getattr(args, "config", None) else RunConfig()
    names = {f.name for cls in SECTIONS.values() for f in fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return cfg.replace(**overrides) if overrides else cfg


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="layerflow", description="Transformer language models as dynamical systems.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train (or resume) a flow language model")
    t.add_argument("--config", help="TOML file with [model] [flow] [data] [train] tables")
    t.add_argument("--out", default="runs/layerflow",
                   help="run directory (default: runs/layerflow)")
    add_config_arguments(t)

    s = sub.add_parser("sample", help="generate text from a trained run")
    s.add_argument("run_dir")
    s.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for several prompts, generated in batches "
                        "(default: a newline)")
    s.add_argument("--tokens", type=_number(int), default=200)
    s.add_argument("--temperature", type=_number(float), default=0.8)
    s.add_argument("--top-k", type=_number(int), default=200)
    s.add_argument("--seed", type=_number(int), default=0)
    s.add_argument("--num-samples", type=_number(int), default=1)
    s.add_argument("--no-cache", action="store_true", help="recompute the context every token")
    from .evaluate import add_eval_parser, add_steps_argument  # issue 3: --steps, eval

    add_steps_argument(s)
    from .steering import add_steering_arguments  # issue 5: --avoid, --concept, --strength

    add_steering_arguments(s)

    i = sub.add_parser("info", help="describe a run: config, size, progress")
    i.add_argument("run_dir")

    from .analysis.command import add_analyze_parser  # issue 6

    add_analyze_parser(sub)
    add_eval_parser(sub)

    from .sweep import add_sweep_parser  # issue 4

    add_sweep_parser(sub)

    h = sub.add_parser("import-hf", help="import a local Hugging Face GPT-2/Llama model as a run")
    h.add_argument("path", help="local model directory (config.json + weights; no download)")
    h.add_argument("out_run_dir", help="new run directory to write")
    from .rediscretise import add_rediscretise_parser  # issue 9

    add_rediscretise_parser(sub)
    return p


def cmd_train(args) -> int:
    from .train import train

    cfg = config_from_args(args)
    summary = train(cfg, args.out)
    if summary.get("rank", 0) != 0:  # torchrun: rank 0 reports for everyone (issue 7)
        return 0 if summary["status"] == "done" else 1
    best = summary["best_val"]
    best = "n/a" if best is None else f"{best:.4f}"
    print(f"{summary['status']}: {summary['run_dir']} (iteration {summary['iter']}, "
          f"best val loss {best})")
    sample = os.path.join(args.out, "samples.txt")
    if summary["status"] == "done" and os.path.exists(sample):
        print("--- sample ---")
        print(open(sample, encoding="utf-8", errors="replace").read())
    return 0 if summary["status"] == "done" or summary["status"].startswith("interrupted") else 1


def cmd_sample(args) -> int:
    import torch

    from .train import load_run

    if not 0 < args.tokens <= 1_000_000:
        raise ConfigError("--tokens must be in 1..1000000")
    if not 0 <= args.temperature < float("inf"):  # also refuses nan
        raise ConfigError("--temperature must be a non-negative number")
    if args.top_k < 0 or not 0 < args.num_samples <= 4096:
        raise ConfigError("--top-k must be >= 0 and --num-samples in 1..4096")
    if not 0 <= args.seed < 2**63:
        raise ConfigError("--seed must be in 0..2**63-1")
    model, tok, cfg, _ = load_run(args.run_dir)
    from .evaluate import apply_steps

    apply_steps(model, args.steps)  # issue 3: re-discretise tied/smooth models in depth-time
    prompts = [tok.encode(p) for p in (args.prompt or ["\n"])]
    if not all(prompts):
        raise ConfigError("--prompt encodes to no tokens")
    g = torch.Generator().manual_seed(args.seed)
    from .sampling import generate_prompts  # issue 7: several prompts, batched by length
    from .steering import generate_constrained, steering_from_args

    constraints, masks = steering_from_args(args, model, tok)

    def generate(idx):
        if constraints or masks:
            return generate_constrained(model, idx, args.tokens, args.temperature,
                                        args.top_k or None, not args.no_cache, g, constraints,
                                        masks)
        return model.generate(idx, args.tokens, args.temperature, args.top_k or None,
                              use_cache=not args.no_cache, generator=g)

    for rows in generate_prompts(generate, prompts, args.num_samples):
        for row in rows:
            print(tok.decode(row))
            if args.num_samples > 1 or len(prompts) > 1:
                print("-" * 40)
    return 0


def cmd_info(args) -> int:
    from .train import load_run, read_metrics

    model, tok, cfg, ckpt = load_run(args.run_dir)
    m, f = cfg.model, cfg.flow
    evals = [r for r in read_metrics(args.run_dir) if r.get("kind") == "eval"]
    print(f"run           {args.run_dir}")
    print(f"checkpoint    {ckpt.path.name} (iteration {ckpt.state.get('iter')})")
    print(f"model         {m.model}: L={m.n_layer} d={m.n_embd} heads={m.n_head} "
          f"block={m.block_size} pos={m.pos_emb} norm={m.norm}")
    print(f"flow          {f.integrator}, h={model.step_size:g}, steps={model.n_steps}")
    print(f"tokenizer     {tok.kind}, vocab {tok.vocab_size}")
    print(f"parameters    {model.num_params():,}")
    cert = model.lipschitz_bound()  # issue 4: certificate of the flow map (constraints.py)
    if cert is None:
        from .constraints import why_no_certificate

        print(f"lipschitz     none: {why_no_certificate(model)}")
    else:
        print(f"lipschitz     {cert.summary()}")
    if evals:
        print(f"last eval     iter {evals[-1]['iter']}: train {evals[-1]['train_loss']:.4f} "
              f"val {evals[-1]['val_loss']:.4f}")
    return 0


def cmd_import_hf(args) -> int:
    from .hf import import_hf

    path = import_hf(args.path, args.out_run_dir)
    print(f"imported {args.path} -> {path}")
    return 0


def cmd_sweep(args) -> int:
    from .sweep import cmd_sweep as run

    return run(args)


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "info": cmd_info, "sweep": cmd_sweep}
COMMANDS["import-hf"] = cmd_import_hf  # issue 9


def cmd_rediscretise(args) -> int:
    from .rediscretise import cmd_rediscretise as run

    return run(args)


COMMANDS["rediscretise"] = cmd_rediscretise  # issue 9


def cmd_analyze(args) -> int:
    from .analysis.command import cmd_analyze as run

    return run(args)


COMMANDS["analyze"] = cmd_analyze  # issue 6


def cmd_eval(args) -> int:
    from .evaluate import cmd_eval as run

    return run(args)


COMMANDS["eval"] = cmd_eval  # issue 3


def one_line(text: str) -> str:
    """The message on one printable line: user input echoed in it (a newline, U+2028, an
    undecodable byte as a surrogate) is shown escaped (issue 8)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import TrainError

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(one_line(str(e)), file=sys.stderr)
        return 2
    except (ConfigError, DataError, CheckpointError, TrainError) as e:
        print(one_line(f"layerflow: error: {e}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerflow: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback unless asked for
        if os.environ.get("LAYERFLOW_DEBUG"):
            raise
        print(f"layerflow: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
