"""Batched prompts for generation.

`FlowLM.generate` takes a rectangular batch (B, T). Several prompts are batched by token length:
prompts of equal length (each repeated `num_samples` times) form one batch and one call, so a
batch needs no padding and every row sees exactly its own prompt — the result of a row is the
same as generating that prompt alone with the same random stream. Outputs come back in the
order of the prompts.
"""

from __future__ import annotations

import torch


def generate_prompts(generate_fn, prompts: list[list[int]], num_samples: int = 1):
    """`generate_fn(idx: LongTensor (B, T)) -> LongTensor (B, T + n)` is called once per distinct
    prompt length. Returns, per prompt, a list of `num_samples` token lists."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt encodes to no tokens")
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    results: list[list[list[int]]] = [[] for _ in prompts]
    for members in by_len.values():
        rows = [prompts[i] for i in members for _ in range(num_samples)]
        out = generate_fn(torch.tensor(rows, dtype=torch.long))
        for r, row in enumerate(out.tolist()):
            results[members[r // num_samples]].append(row)
    return results
