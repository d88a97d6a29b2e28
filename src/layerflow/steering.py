"""Constraint energies added to the dynamics at generation time.

A constraint is an energy E_c(X) of the token states. It enters every step of the flow as one more
term of the vector field,

    dX/dt = F(X, t) − λ ∇_X E_c(X),

through `FlowContext.terms` (so every integrator sees it in `field.terms`; splitting schemes apply
it as the last substep). For the energy model the same force joins the descent, i.e. the dynamics
descend E + λE_c. `model.generate(idx, n, constraints=[...])` samples with it.

Built-ins:
* `ConceptBarrier(v, τ)`: E_c = ½ Σ_tokens ReLU(v·x − τ)², ‖v‖ = 1, force −λ ReLU(v·x − τ) v.
  With a splitting integrator (the force is the last substep) and h·λ = 1 that substep is exactly
  the Euclidean projection onto the half-space {v·x ≤ τ}, so after every step v·x ≤ τ up to
  rounding. With λh ∈ (0, 2) and a force evaluated with the rest of the field (Euler), the excess
  obeys e_{k+1} ≤ |1 − hλ| e_k + h·max(v·F(x_k), 0), i.e. it is bounded by h·sup v·F / (hλ) in
  the limit, not zero. `ConceptBarrier.from_texts` estimates v as the normalised difference of the
  mean states (all steps, all tokens) of positive and negative example texts.
* `TokenAvoidance(ids)`: E_c = −log(1 − P(S | x)) = logsumexp(ℓ) − logsumexp(ℓ_{∉S}) on the
  logits ℓ = head(LN_f(x)) of the state at the newest position (logit lens); it is ≈ P(S) when
  P(S) is small and grows without bound as P(S) → 1.
* `WordAvoidance(words, tokenizer)`: TokenAvoidance whose set S is, at every generated token, the
  tokens that would complete a whole-word occurrence of one of the words given the text so far
  (works for char, byte and BPE tokenizers). Its `mask` is also what hard masking at decoding uses
  (`generate_constrained(..., masks=[...])`), the baseline in benchmarks/constraints.py.
"""

from __future__ import annotations

import re

import torch

__all__ = ["Constraint", "ConceptBarrier", "TokenAvoidance", "WordAvoidance", "constraint_terms",
           "generate_constrained", "count_words", "sample_nll"]


class Constraint:
    """An energy E_c(x) -> (B, T) per token, with strength λ; the force is −λ ∇_x Σ E_c."""

    name = "constraint"

    def __init__(self, strength: float = 1.0):
        if not strength > 0:
            raise ValueError(f"constraint strength must be positive, got {strength}")
        self.strength = float(strength)

    def energy(self, x: torch.Tensor, model) -> torch.Tensor:
        raise NotImplementedError

    def grad(self, x: torch.Tensor, model) -> torch.Tensor:
        """∂(Σ E_c)/∂x by autograd (subclasses may write it by hand; tests compare)."""
        create = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            xx = x if x.requires_grad else x.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.energy(xx, model).sum(), xx, create_graph=create)
        return g

    def force(self, x: torch.Tensor, model) -> torch.Tensor:
        return -self.strength * self.grad(x, model)

    def observe(self, tokens: torch.Tensor) -> None:
        """Called by `generate_constrained` with the context (B, T) before each forward."""


class ConceptBarrier(Constraint):
    """E_c = ½ Σ ReLU(v·x − τ)²: keep the states' projection on a concept direction below τ."""

    name = "concept"

    def __init__(self, direction: torch.Tensor, threshold: float, strength: float = 1.0):
        super().__init__(strength)
        v = torch.as_tensor(direction, dtype=torch.float32).flatten()
        if not torch.isfinite(v).all() or v.norm() == 0:
            raise ValueError("concept direction must be finite and non-zero")
        self.v, self.threshold = v / v.norm(), float(threshold)

    def projection(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.v.to(x)

    def energy(self, x, model=None):
        return 0.5 * torch.relu(self.projection(x) - self.threshold).pow(2)

    def grad(self, x, model=None):
        return torch.relu(self.projection(x) - self.threshold).unsqueeze(-1) * self.v.to(x)

    @staticmethod
    def mean_state(model, tokenizer, texts) -> torch.Tensor:
        """Mean of the states X_1..X_L over all steps and tokens of `texts` (windows of
        block_size tokens)."""
        from .hooks import run_with_trajectory

        total, count = None, 0
        for text in texts:
            ids = tokenizer.encode(text)
            for i in range(0, len(ids), model.block_size):
                chunk = ids[i:i + model.block_size]
                if not chunk:
                    continue
                with torch.no_grad():
                    _, traj = run_with_trajectory(model, torch.tensor([chunk]),
                                                  "flow.step.*.state")
                s = torch.stack([v for v in traj.values()]).flatten(0, -2).sum(0)
                total = s if total is None else total + s
                count += len(traj) * len(chunk)
        if not count:
            raise ValueError("concept example texts encode to no tokens")
        return total / count

    @classmethod
    def from_texts(cls, model, tokenizer, pos_texts, neg_texts, threshold: float | None = None,
                   strength: float = 1.0) -> "ConceptBarrier":
        """v = normalised (mean state of pos_texts − mean state of neg_texts); the default τ is
        the midpoint of the two means' projections. `pos_mean`/`neg_mean` keep those."""
        mp = cls.mean_state(model, tokenizer, pos_texts)
        mn = cls.mean_state(model, tokenizer, neg_texts)
        v = mp - mn
        if v.norm() == 0:
            raise ValueError("positive and negative concept texts give the same mean state")
        v = v / v.norm()
        pos_mean, neg_mean = float(mp @ v), float(mn @ v)
        tau = 0.5 * (pos_mean + neg_mean) if threshold is None else threshold
        out = cls(v, tau, strength)
        out.pos_mean, out.neg_mean = pos_mean, neg_mean
        return out


class TokenAvoidance(Constraint):
    """E_c = logsumexp(ℓ) − logsumexp(ℓ_{∉S}) = −log(1 − P(S)), ℓ = head(LN_f(x)), at the newest
    position (`last_only`, the one that predicts the next token) or at every position."""

    name = "avoid"

    def __init__(self, token_ids, vocab_size: int, strength: float = 1.0, last_only: bool = True):
        super().__init__(strength)
        self.vocab_size, self.last_only = int(vocab_size), last_only
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        ids = list(token_ids)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        mask[ids] = True
        self.mask = mask  # (V,) or, after observe, (B, V)

    def energy(self, x, model):
        logits = model.head(model.ln_f(x)).float()
        mask = self.mask.to(logits.device)
        mask = mask.view(-1, 1, mask.shape[-1]) if mask.dim() == 2 else mask
        keep = torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=-1)
        e = torch.logsumexp(logits, dim=-1) - keep
        e = torch.where(torch.isfinite(e), e, torch.zeros_like(e))  # everything banned: no force
        if self.last_only:
            e = torch.cat([torch.zeros_like(e[:, :-1]), e[:, -1:]], dim=1)
        return e


class WordAvoidance(TokenAvoidance):
    """Avoid whole-word occurrences of `words` (case-insensitive): S = the tokens that would
    complete one, given the text so far (a word counts as complete when a non-letter follows)."""

    def __init__(self, words, tokenizer, strength: float = 1.0):
        words = [w.strip() for w in words if w.strip()]
        if not words:
            raise ValueError("no words to avoid")
        super().__init__([], tokenizer.vocab_size, strength, last_only=True)
        self.words, self.tokenizer = words, tokenizer
        alt = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<![^\W\d_])(?:{alt})(?=[\W\d_])", re.IGNORECASE)
        self.pieces = [tokenizer.decode([i]) for i in range(self.vocab_size)]
        self.tail_tokens = max(len(w) for w in words) + 2
        self.single_chars = max(len(p) for p in self.pieces) <= 1
        self.lower_words = [w.lower() for w in words]

    def banned(self, tail: str) -> list[int]:
        """Token ids whose text, appended to `tail`, completes a new occurrence."""
        if self.single_chars and not any(tail.lower().endswith(w) for w in self.lower_words):
            return []  # one character can only complete a word that the tail already spells
        n = len(self.pattern.findall(tail))
        return [i for i, p in enumerate(self.pieces) if len(self.pattern.findall(tail + p)) > n]

    def observe(self, tokens: torch.Tensor) -> None:
        mask = torch.zeros(tokens.shape[0], self.vocab_size, dtype=torch.bool)
        for b, row in enumerate(tokens[:, -self.tail_tokens:].tolist()):
            ids = self.banned(self.tokenizer.decode(row))
            if ids:
                mask[b, ids] = True
        self.mask = mask


def count_words(text: str, words) -> int:
    """Whole-word, case-insensitive occurrences of `words` followed by a non-letter."""
    alt = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return len(re.findall(rf"(?<![^\W\d_])(?:{alt})(?=[\W\d_])", text, re.IGNORECASE))


def constraint_terms(model, constraints) -> list:
    """(name, fn(x, t, ctx)) field terms −λ∇E_c for `FlowContext.terms` (unique names)."""
    out, seen = [], {}
    for c in constraints:
        seen[c.name] = seen.get(c.name, 0) + 1
        name = c.name if seen[c.name] == 1 else f"{c.name}{seen[c.name] - 1}"
        out.append((name, lambda x, t, ctx, c=c: c.force(x, model)))
    return out


@torch.no_grad()
def generate_constrained(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                         top_k: int | None = None, use_cache: bool = True,
                         generator: torch.Generator | None = None, constraints=(),
                         masks=()) -> torch.Tensor:
    """`FlowLM.generate` with constraint energies in the dynamics and/or hard logit masks.

    Same context policy as FlowLM.generate. Before every forward each constraint and mask sees
    the context (`observe`). With the cache, each past token's state is the one computed when it
    was generated (under the constraint of that moment); without it, the whole window is
    recomputed under the current constraint, so for context-dependent constraints
    (WordAvoidance) the two differ; for ConceptBarrier and fixed token sets they agree."""
    from .fields.transformer import KVCache
    from .model import sample_next

    constraints, masks = list(constraints), list(masks)
    tokens, start, cache = idx, 0, None
    if not getattr(getattr(model, "solver", None), "supports_cache", True):
        use_cache = False
    for _ in range(max_new_tokens):
        if tokens.shape[1] - start > model.block_size:
            start = tokens.shape[1] - max(model.block_size // 2, 1)
            cache = None
        for c in constraints + masks:
            c.observe(tokens[:, start:])
        if use_cache:
            fresh = cache is None
            cache = KVCache() if fresh else cache
            inp = tokens[:, start:] if fresh else tokens[:, -1:]
            logits, _ = model(inp, cache=cache, last_only=True, constraints=constraints)
        else:
            logits, _ = model(tokens[:, start:], last_only=True, constraints=constraints)
        logits = logits[:, -1, :]
        for m in masks:
            ban = m.mask.to(logits.device).expand_as(logits)
            ban = ban & ~ban.all(dim=-1, keepdim=True)  # never ban every token
            logits = logits.masked_fill(ban, float("-inf"))
        tokens = torch.cat([tokens, sample_next(logits, temperature, top_k, generator)], dim=1)
    return tokens


@torch.no_grad()
def sample_nll(model, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Mean negative log-likelihood per sample (B,) of tokens[:, prompt_len:] under `model`
    (teacher forcing in windows of block_size that overlap by half, so every scored token sees
    at least block_size/2 tokens of context once the text is longer than a window)."""
    B, T = tokens.shape
    bs, first = model.block_size, max(prompt_len, 1)
    total, s = torch.zeros(B), 0
    while True:
        e = min(T, s + bs)
        logits, _ = model(tokens[:, s:e])
        lp = torch.log_softmax(logits.float(), dim=-1)
        js = torch.arange(max(first, s + 1), e)  # target positions scored by this window
        if len(js):
            total += -lp[:, js - 1 - s].gather(-1, tokens[:, js].unsqueeze(-1)).squeeze(-1).sum(-1)
        first = max(first, e)
        if e >= T:
            break
        s = e - bs // 2
    return total / (T - max(prompt_len, 1))


# ---------------------------------------------------------------------- command line
DEFAULT_AVOID_STRENGTH = 4.0  # chosen on benchmarks/constraints.py (README section energy)


def add_steering_arguments(p) -> None:
    """`layerflow sample` options: --avoid, --concept POS NEG, --strength, --threshold, --mask."""
    g = p.add_argument_group("constraint energies (steering.py)")
    g.add_argument("--avoid", metavar="WORDS", help="comma-separated words to avoid (energy "
                   "−log(1 − P(completing one)) on the states' logits)")
    g.add_argument("--concept", nargs=2, metavar=("POS_FILE", "NEG_FILE"),
                   help="keep states below a concept direction estimated from two text files")
    g.add_argument("--strength", type=float, default=None, help="λ of the constraint forces "
                   f"(default: {DEFAULT_AVOID_STRENGTH} for --avoid, 1/h for --concept)")
    g.add_argument("--threshold", type=float, default=None,
                   help="τ of --concept (default: midpoint of the two texts' mean projections)")
    g.add_argument("--mask", action="store_true",
                   help="--avoid by masking the completing tokens at decoding instead")


def steering_from_args(args, model, tokenizer):
    """(constraints, masks) from the parsed `layerflow sample` arguments; ConfigError if bad."""
    from .config import ConfigError

    constraints, masks = [], []
    lam = args.strength
    if lam is not None and not (lam > 0 and lam < float("inf")):
        raise ConfigError(f"--strength must be a positive number, got {lam}")
    if args.mask and not args.avoid:
        raise ConfigError("--mask needs --avoid WORDS")
    if args.threshold is not None and not args.concept:
        raise ConfigError("--threshold needs --concept POS_FILE NEG_FILE")
    if args.avoid:
        words = [w for w in args.avoid.replace(" ", ",").split(",") if w.strip()]
        if not words:
            raise ConfigError("--avoid needs at least one word")
        c = WordAvoidance(words, tokenizer, lam or DEFAULT_AVOID_STRENGTH)
        (masks if args.mask else constraints).append(c)
    if args.concept:
        texts = []
        for path in args.concept:
            try:
                with open(path, encoding="utf-8") as f:
                    texts.append(f.read())
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read concept file {path}: {e}") from None
        h = float(model.step_sizes()[0])
        try:
            constraints.append(ConceptBarrier.from_texts(model, tokenizer, [texts[0]], [texts[1]],
                                                         args.threshold, lam or 1.0 / h))
        except ValueError as e:
            raise ConfigError(f"--concept: {e}") from None
    return constraints, masks
