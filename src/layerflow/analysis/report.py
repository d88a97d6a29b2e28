"""`layerflow analyze`: every metric of one or two runs → PNGs, `metrics.json` and an HTML page.

    measure(model, idx, targets)   -> dict of arrays (pure; the model is only run, never edited)
    analyze_runs([run_a, run_b?])  -> writes OUT/index.html, OUT/*.png, OUT/metrics.json

Text: `--text FILE`, `--prompt STR`, or by default a few windows of the run's own held-out tokens
(the tail `val_fraction` of its cached token file). Two runs share every axis (comparison mode);
their x-axis is the step k, or the depth fraction k/L when their numbers of steps differ.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from . import plots
from .geometry import entropy_per_head, geometry_curves
from .invariants import energy_along, energy_drift, energy_from_trajectory, linear_invariants
from .jacobian import lyapunov_spectrum, step_singular_values
from .lens import logit_lens
from .trajectory import (
    collect,
    increment_norms,
    layer_times,
    pca_paths,
    state_norms,
    states,
    velocities,
)


@torch.no_grad()
def measure(model, idx: torch.Tensor, targets: torch.Tensor | None = None, *, jac_top: int = 6,
            jac_iters: int = 20, n_exp: int = 16, sweeps: int = 2, n_inv: int = 4,
            seed: int = 0) -> dict:
    """All metrics over layer-time for token ids idx (B, T); Jacobians use the first sequence."""
    was = model.training
    model.eval()
    logits, traj = collect(model, idx)
    X, V = states(traj), velocities(traj)
    lens = logit_lens(model, X, targets)
    E = energy_along(model, X, V)
    if E is None:
        E = energy_from_trajectory(traj)
    m = {
        "n_steps": int(model.n_steps), "layer_times": layer_times(model),
        "integrator": getattr(model.integrator, "name", type(model.integrator).__name__),
        "step_sizes": np.asarray(model.step_sizes(), dtype=float),
        "state_norm": state_norms(X), "increment": increment_norms(X, model.step_sizes()),
        "lens": {k: v for k, v in lens.items() if k != "last_logits" and v is not None},
        "lens_exact_at_last_step": bool(torch.equal(lens["last_logits"], logits)),
        "geometry": geometry_curves(X),
        "attention_entropy": entropy_per_head(model, idx),
        "jacobian_sv": step_singular_values(model, X[0, :1], top=jac_top, iters=jac_iters,
                                            seed=seed),
        "lyapunov": lyapunov_spectrum(model, X[0, :1], n_exp=n_exp, sweeps=sweeps, seed=seed),
        "invariants": linear_invariants(X, n=n_inv),
        "energy": E, "energy_drift": energy_drift(E) if E is not None else None,
        "pca": pca_paths(X),
    }
    if V is not None:
        m["velocity_norm"] = state_norms(V)
    model.train(was)
    return m


# ---------------------------------------------------------------------------- inputs
def run_tokens(run_dir: Path, cfg, tok, text: str | None, n_seq: int, seq_len: int):
    """(idx, targets) from `text` (or the run's held-out tokens when None)."""
    if text is not None:
        ids = tok.encode(text)
        if len(ids) < 2:
            raise ConfigError("the analysis text must encode to at least 2 tokens")
        ids = np.asarray(ids[: (seq_len + 1) * n_seq])
    else:
        meta_p, bin_p = run_dir / "data" / "tokens.json", run_dir / "data" / "tokens.bin"
        if not (meta_p.exists() and bin_p.exists()):
            raise ConfigError(f"{run_dir} has no cached tokens (data/tokens.bin); "
                              "pass --text FILE or --prompt TEXT")
        meta = json.loads(meta_p.read_text())
        all_ids = np.memmap(bin_p, dtype=meta["dtype"], mode="r", shape=(meta["n"],))
        start = int(len(all_ids) * (1 - cfg.data.val_fraction))
        ids = np.asarray(all_ids[start:])
    n = min(n_seq, max(1, (len(ids) - 1) // seq_len))
    L = min(seq_len, len(ids) - 1)
    starts = np.linspace(0, len(ids) - L - 1, n).astype(int) if n > 1 else [0]
    rows = [ids[s:s + L + 1].astype(np.int64) for s in starts]
    t = torch.tensor(np.stack(rows))
    return t[:, :-1], t[:, 1:]


# ---------------------------------------------------------------------------- figures
CAPTIONS = {
    "loss": "Training loss per iteration (thin) and held-out loss (squares): lower is better; "
            "a gap between them is over-fitting.",
    "norms": "Left: mean token-state norm ‖X_k‖ over layer-time (growth = the residual stream "
             "accumulates). Right: relative increment ‖X_{k+1}−X_k‖/‖X_k‖ — how far each step "
             "moves the state; small values mean a smooth flow.",
    "lens": "Logit lens: each state X_k decoded by the final norm and head. Left: next-token "
            "loss (falls as the flow refines its prediction; the last point is the model's loss). "
            "Right: fraction of positions whose top-1 already equals the final top-1.",
    "geometry": "Token geometry per step. Cosine → 1 and clusters → 1 mean the tokens collapse "
                "together; rank-one residual → 0 and effective rank → 1 mean rank collapse. "
                "Flat curves mean the flow keeps tokens distinct.",
    "entropy": "Attention entropy per step (rows) and head (columns), in nats: low = the head "
               "attends to a few tokens, high (≈ log of the context) = it averages broadly.",
    "spectra": "Left: largest singular values of each step map's Jacobian (>1 stretches "
               "perturbations, <1 contracts). Right: finite-time Lyapunov exponents of the "
               "whole flow; positive λ_i = directions where small input changes grow.",
    "invariants": "Left: best linear invariants w, ratio of variance along the flow to variance "
                  "across tokens (0 = exactly conserved). Right: drift of w·x_k from its "
                  "starting value relative to its spread over tokens (flat near 0 = conserved).",
    "energy": "Energy (or Hamiltonian for (X, V) schemes) of the state at each step: an energy "
              "model should decrease monotonically; a symplectic scheme keeps H nearly constant.",
    "pca": "A few tokens' states projected on the top-2 principal components of all states: "
           "open circle = embedding, filled = final state; long straight paths = steady drift, "
           "loops = oscillation.",
}


def _x(m, common):
    k = np.arange(m["n_steps"] + 1)
    return k if common else k / m["n_steps"]


def make_figures(runs: list[tuple[str, dict, list[dict]]]) -> list[tuple[str, object]]:
    """[(name, Figure)] for runs [(label, metrics, training records)]."""
    common = len({m["n_steps"] for _, m, _ in runs}) == 1
    xl = "step k" if common else "depth fraction k/L"
    figs = []
    if any(rec for _, _, rec in runs):
        figs.append(("loss", plots.loss_curves([(lbl, rec) for lbl, _, rec in runs])))

    def ser(get, offset=0):
        return [(lbl, _x(m, common)[offset:offset + len(get(m))], get(m)) for lbl, m, _ in runs]

    figs.append(("norms", plots.panels([
        {"title": "state norm", "ylabel": "mean ‖x_k‖", "xlabel": xl,
         "series": ser(lambda m: m["state_norm"])},
        {"title": "relative increment per step", "ylabel": "‖ΔX_k‖/‖X_k‖", "xlabel": xl,
         "series": ser(lambda m: m["increment"]["rel"]), "logy": True}])))
    if all("loss" in m["lens"] for _, m, _ in runs):
        figs.append(("lens", plots.panels([
            {"title": "logit-lens loss", "ylabel": "nats/token", "xlabel": xl,
             "series": ser(lambda m: m["lens"]["loss"])},
            {"title": "top-1 agreement with final step", "ylabel": "fraction", "xlabel": xl,
             "series": ser(lambda m: m["lens"]["agree"])}])))
    g = lambda key: ser(lambda m: m["geometry"][key])  # noqa: E731
    figs.append(("geometry", plots.panels([
        {"title": "mean pairwise cosine", "ylabel": "cos", "xlabel": xl, "series": g("cosine")},
        {"title": "clusters (cos > 0.99)", "ylabel": "count", "xlabel": xl,
         "series": g("clusters")},
        {"title": "rank-one residual ‖X−1x̄ᵀ‖/‖X‖", "ylabel": "residual", "xlabel": xl,
         "series": g("rank_residual"), "logy": True},
        {"title": "effective rank", "ylabel": "exp(entropy of σ)", "xlabel": xl,
         "series": g("effective_rank")}])))
    ent = [(lbl, m["attention_entropy"]) for lbl, m, _ in runs
           if m["attention_entropy"] is not None]
    if ent:
        figs.append(("entropy", plots.heatmaps(ent, "attention entropy", "head", "step k",
                                               "nats")))
    figs.append(("spectra", plots.spectra([(lbl, m["jacobian_sv"],
                                            m["lyapunov"]["exponents"]) for lbl, m, _ in runs])))
    inv = plots.panels([
        {"title": "invariants: time/token variance", "ylabel": "ratio μ", "xlabel": "invariant i",
         "series": [(lbl, np.arange(1, len(m["invariants"]["ratio"]) + 1),
                     m["invariants"]["ratio"]) for lbl, m, _ in runs], "logy": True},
        {"title": "drift of the best invariant", "ylabel": "|w·(x_k−x_0)| / std", "xlabel": xl,
         "series": ser(lambda m: m["invariants"]["drift"][0])}])
    figs.append(("invariants", inv))
    en = [(lbl, _x(m, common), m["energy"]) for lbl, m, _ in runs if m["energy"] is not None]
    if en:
        figs.append(("energy", plots.panels([{"title": "energy along the flow", "ylabel": "E",
                                              "xlabel": xl, "series": en}], ncols=1)))
    figs.append(("pca", plots.pca_paths([(lbl, m["pca"], m.get("token_names", []))
                                         for lbl, m, _ in runs])))
    return figs


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def summary(m: dict) -> dict:
    s = {"integrator": m["integrator"], "steps": m["n_steps"],
         "final |X|": m["state_norm"][-1], "final cosine": m["geometry"]["cosine"][-1],
         "final rank residual": m["geometry"]["rank_residual"][-1],
         "max σ_1": float(np.max(m["jacobian_sv"][:, 0])), "λ_1": m["lyapunov"]["exponents"][0],
         "best invariant μ": m["invariants"]["ratio"][0]}
    if "loss" in m["lens"]:
        s["loss"] = m["lens"]["loss"][-1]
    if m["energy_drift"]:
        s["energy drift"] = m["energy_drift"]["max_rel"]
    return s


def write_report(runs: list[tuple[str, dict, list[dict]]], out_dir, title: str) -> Path:
    """PNGs + metrics.json + index.html (each figure with its one-line caption)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for name, fig in make_figures(runs):
        plots.save(fig, out / f"{name}.png")
        items.append(name)
    (out / "metrics.json").write_text(json.dumps(
        {lbl: _jsonable(m) for lbl, m, _ in runs}, indent=1))
    sums = [(lbl, summary(m)) for lbl, m, _ in runs]
    keys = list(dict.fromkeys(k for _, s in sums for k in s))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    rows = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(
        f"<td>{fmt(s.get(k, ''))}</td>" for _, s in sums) + "</tr>" for k in keys)
    head = "".join(f"<th>{html.escape(lbl)}</th>" for lbl, _ in sums)
    figs = "".join(f'<figure><img src="{n}.png" alt="{n}"><figcaption>{html.escape(CAPTIONS[n])}'
                   f"</figcaption></figure>" for n in items)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{color:#444;font-size:0.95em}}</style>
</head><body><h1>{html.escape(title)}</h1>
<table><tr><th></th>{head}</tr>{rows}</table>{figs}
<p>All numbers: <a href="metrics.json">metrics.json</a>.</p></body></html>"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def analyze_runs(run_dirs, text: str | None = None, out=None, n_seq: int = 8,
                 jac_top: int = 6, n_exp: int = 16, seed: int = 0) -> Path:
    """Load each run's newest checkpoint, measure it on the same text, write the report."""
    from ..train import load_run, read_metrics

    runs = []
    for rd in run_dirs:
        rd = Path(rd)
        model, tok, cfg, _ = load_run(rd)
        idx, tgt = run_tokens(rd, cfg, tok, text, n_seq, model.block_size)
        m = measure(model, idx, tgt, jac_top=jac_top, n_exp=n_exp, seed=seed)
        m["token_names"] = [repr(tok.decode([int(idx[0, j])])) for j in m["pca"]["tokens"]]
        runs.append((rd.name if len(run_dirs) > 1 else "", m, read_metrics(rd)))
    if len(run_dirs) > 1 and runs[0][0] == runs[1][0]:
        runs = [(str(Path(rd)), m, r) for rd, (_, m, r) in zip(run_dirs, runs)]
    out = Path(out) if out else Path(run_dirs[0]) / "report"
    title = "layerflow analysis: " + " vs ".join(str(r) for r in run_dirs)
    return write_report(runs, out, title)
