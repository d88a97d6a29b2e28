"""`layerflow analyze RUN_DIR [RUN_B] [--text FILE | --prompt TEXT] [--out DIR]`."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError


def add_analyze_parser(sub) -> None:
    a = sub.add_parser("analyze", help="measure the flow of one run (or compare two) and write "
                                       "an HTML report")
    a.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="one run, or two runs to compare on the same axes")
    src = a.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="FILE", help="text file to run the model on")
    src.add_argument("--prompt", help="text to run the model on")
    a.add_argument("--out", help="report directory (default: RUN_DIR/report)")
    a.add_argument("--sequences", type=int, default=8,
                   help="number of text windows (block_size tokens each) to average over")
    a.add_argument("--jacobian-top", type=int, default=6,
                   help="singular values per step map (power iteration)")
    a.add_argument("--lyapunov", type=int, default=16, help="Lyapunov exponents to compute")
    a.add_argument("--seed", type=int, default=0)


def cmd_analyze(args) -> int:
    from .report import analyze_runs

    if len(args.run_dirs) > 2:
        raise ConfigError("analyze takes one run directory, or two to compare")
    if min(args.sequences, args.jacobian_top, args.lyapunov) < 1:
        raise ConfigError("--sequences, --jacobian-top and --lyapunov must be positive")
    if not 0 <= args.seed < 2**63:  # issue 8: torch overflows on larger seeds
        raise ConfigError("--seed must be in 0..2**63-1")
    text = args.prompt
    if args.text is not None:
        p = Path(args.text)
        if not p.is_file():
            raise ConfigError(f"--text: no such file: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"--text: {p} is not UTF-8 text") from None
    path = analyze_runs(args.run_dirs, text=text, out=args.out, n_seq=args.sequences,
                        jac_top=args.jacobian_top, n_exp=args.lyapunov, seed=args.seed)
    print(f"report: {path}")
    return 0
