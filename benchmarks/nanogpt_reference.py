"""A from-scratch replica of nanoGPT's CPU "baby" Shakespeare-char run, as a same-machine baseline.

Written for layerflow's benchmarks (no nanoGPT code is shipped): the model of nanoGPT's
`model.py` (pre-norm GPT: fused c_attn, `scaled_dot_product_attention(is_causal=True)`, GELU MLP,
LayerNorm with bias, tied lm_head, N(0, 0.02) init with c_proj scaled by 1/√(2L)) and the loop of
its `train.py` with `config/train_shakespeare_char.py` and the README's CPU overrides
(`--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`):
fp32, AdamW(β=(0.9, 0.99), wd 0.1 on matrices), lr 1e-3 with 100 warm-up steps and cosine decay to
1e-4, clip 1.0, evaluation of both splits every 250 steps on 20 batches, `loss.item()` every step,
a `torch.save` checkpoint whenever val improves, 90/10 character split, batches drawn with
`torch.randint` from the uint16 token array. `python benchmarks/time_to_target.py` runs it.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, d: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def run(text: str, max_iters: int = 2000, seed: int = 1337) -> dict:
    """Train the baby recipe; returns wall seconds (the whole loop) and the last val loss."""
    torch.manual_seed(seed)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    splits = {"train": ids[:n], "val": ids[n:]}
    block, batch, lr0, min_lr, warmup = 64, 12, 1e-3, 1e-4, 100

    def get_batch(split):
        data = splits[split]
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i:i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(it):
        if it < warmup:
            return lr0 * (it + 1) / (warmup + 1)
        if it > max_iters:
            return min_lr
        ratio = (it - warmup) / (max_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr0 - min_lr)

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {}
        for split in ("train", "val"):
            out[split] = torch.tensor([model(*get_batch(split)).item() for _ in range(20)]).mean()
        model.train()
        return {k: float(v) for k, v in out.items()}

    model = GPT(len(chars), block, 4, 4, 128)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr0, betas=(0.9, 0.99))
    best, last, it = math.inf, {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        x, y = get_batch("train")
        while True:
            for g in opt.param_groups:
                g["lr"] = get_lr(it)
            if it % 250 == 0:
                last = estimate_loss()
                if last["val"] < best and it > 0:
                    best = last["val"]
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()},
                               os.path.join(tmp, "ckpt.pt"))
            loss = model(x, y)
            x, y = get_batch("train")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()  # nanoGPT logs every step with the CPU override log_interval=1
            it += 1
            if it > max_iters:
                break
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "val_loss": last["val"], "train_loss": last["train"],
            "tok_per_s": (max_iters + 1) * batch * block / wall}
