from pathlib import Path

import pytest
import torch

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

# Tiny tensors: one intra-op thread is ~10x faster than two on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture
def tiny_corpus(tmp_path):
    """A small English text (about 20 kB) written for the test."""
    words = ("the flow of tokens through layer time is a discretised ordinary differential "
             "equation and each block is one step of an integrator").split()
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        n = int(torch.randint(5, 12, (1,), generator=g))
        idx = torch.randint(len(words), (n,), generator=g).tolist()
        lines.append(" ".join(words[i] for i in idx).capitalize() + ".")
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(lines))
    return p


def tiny_config(**overrides):
    from layerflow import RunConfig

    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=20,
                eval_interval=10, eval_iters=2, log_interval=1, warmup_iters=2,
                sample_tokens=20, progress=False)
    base.update(overrides)
    return RunConfig().replace(**base)
