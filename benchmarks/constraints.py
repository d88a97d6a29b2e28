"""Constraint energies at generation vs masking at decoding, on a Shakespeare char model.

Generates `--samples` samples of `--tokens` tokens (prompt "\\n", temperature 1, no top-k, one
seeded generator, so all methods start from the same random stream) with
  * none:   the model as trained,
  * mask:   the tokens that would complete a whole-word occurrence of a word set to −inf at
            decoding (the simple alternative; the same token sets the energy uses),
  * energy: `WordAvoidance` in the dynamics, force −λ∇E_c with E_c = −log(1 − P(S)), for each λ,
and reports per method the rate of the words (occurrences per 1000 generated words, and the share
of samples containing one) and the perplexity of the samples under the unconstrained model.
Target: rate reduced ≥ 90% at perplexity cost ≤ 10%. If `--run` holds no checkpoint, a
lie_trotter model (width 128, 4 layers, block 64, batch 12, lr 1e-3, `--iters` iterations) is
trained there first. Prints ONE JSON line.

    flock /tmp/layerflow-heavy.lock python benchmarks/constraints.py
"""

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch

from layerflow import RunConfig, load_run, train
from layerflow.checkpoint import list_checkpoints
from layerflow.steering import (
    ConceptBarrier,
    WordAvoidance,
    count_words,
    generate_constrained,
    sample_nll,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def evaluate(model, tok, out: torch.Tensor, words) -> dict:
    texts = [tok.decode(r[1:].tolist()) for r in out]
    occ = [count_words(t, words) for t in texts]
    n_words = sum(len(re.findall(r"[^\W\d_]+", t)) for t in texts)
    nll = float(sample_nll(model, out, 1).mean())
    return {"per_1000_words": round(1000 * sum(occ) / max(n_words, 1), 3),
            "occurrences": sum(occ), "samples_with": round(sum(o > 0 for o in occ) / len(occ), 4),
            "ppl": round(math.exp(nll), 4), "words": n_words}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="/tmp/layerflow-bench/constraints/model")
    p.add_argument("--iters", type=int, default=800)
    p.add_argument("--words", default="the,and")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--strengths", default="1,4,16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concept-words", default="king,queen,crown,royal,majesty,throne,prince",
                   help="concept row: lines with these words are the positive examples, other "
                        "lines the negative ones; the rate of these words is measured")
    a = p.parse_args()
    if not DATA.exists():
        print(json.dumps({"benchmark": "constraints", "skipped": f"{DATA} not found"}))
        return 0
    torch.set_num_threads(a.threads)
    run = Path(a.run)
    trained_here = not list_checkpoints(run)
    if trained_here:
        cfg = RunConfig().replace(data=str(DATA), max_iters=a.iters, eval_interval=a.iters,
                                  eval_iters=50, sample_tokens=0, progress=False,
                                  log_interval=max(a.iters // 20, 1))
        train(cfg, run)
    model, tok, cfg, ckpt = load_run(run)
    words = [w for w in a.words.split(",") if w]
    idx = torch.tensor([tok.encode("\n")] * a.samples)
    methods = [("none", [], []), ("mask", [], [WordAvoidance(words, tok)])]
    for lam in (float(x) for x in a.strengths.split(",")):
        methods.append((f"energy_{lam:g}", [WordAvoidance(words, tok, lam)], []))
    results = {}
    for name, cons, masks in methods:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(a.seed)
        out = generate_constrained(model, idx, a.tokens, 1.0, None, True, g, cons, masks)
        results[name] = {**evaluate(model, tok, out, words),
                         "seconds": round(time.perf_counter() - t0, 1)}
        if name != "none":
            base = results["none"]
            r = results[name]
            r["rate_reduction"] = round(1 - r["per_1000_words"] / base["per_1000_words"], 4)
            r["ppl_cost"] = round(r["ppl"] / base["ppl"] - 1, 4)
            r["meets_target"] = r["rate_reduction"] >= 0.9 and r["ppl_cost"] <= 0.10
    concept = {}
    if a.concept_words:
        cw = [w for w in a.concept_words.split(",") if w]
        lines = [ln for ln in DATA.read_text().splitlines() if ln.strip()]
        pos = [ln for ln in lines if count_words(ln + " ", cw)][:400]
        neg = [ln for ln in lines if not count_words(ln + " ", cw)][:400]
        h = float(model.step_sizes()[0])
        barrier = ConceptBarrier.from_texts(model, tok, ["\n".join(pos)], ["\n".join(neg)],
                                            strength=1.0 / h)
        for name, cons in (("none", []), ("barrier", [barrier])):
            g = torch.Generator().manual_seed(a.seed)
            out = generate_constrained(model, idx, a.tokens, 1.0, None, True, g, cons)
            concept[name] = evaluate(model, tok, out, cw)
        r, base = concept["barrier"], concept["none"]
        r["rate_reduction"] = (round(1 - r["per_1000_words"] / base["per_1000_words"], 4)
                               if base["per_1000_words"] else None)
        r["ppl_cost"] = round(r["ppl"] / base["ppl"] - 1, 4)
        concept.update({"words": cw, "examples": [len(pos), len(neg)],
                        "tau": round(barrier.threshold, 4),
                        "pos_mean": round(barrier.pos_mean, 4),
                        "neg_mean": round(barrier.neg_mean, 4), "strength": 1.0 / h})
    evals = [r for r in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in r]
    print(json.dumps({
        "benchmark": "constraints", "words": words, "samples": a.samples, "tokens": a.tokens,
        "model": {"run": str(run), "iter": ckpt.state.get("iter"),
                  "val_loss": round(json.loads(evals[-1])["val_loss"], 4) if evals else None,
                  "integrator": cfg.flow.integrator, "layers": cfg.model.n_layer,
                  "width": cfg.model.n_embd},
        "sampling": "temperature 1, no top-k, KV cache", "results": results,
        "concept_barrier": concept,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
