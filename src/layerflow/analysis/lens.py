"""The logit lens over layer-time (nostalgebraist 2020; Belrose et al. 2023, "tuned lens").

Every intermediate state X_k is decoded as if the flow stopped there:

    logits_k = head(Norm_f(X_k))

with the model's own final norm *recomputed* on X_k (never the cached `final` point) and the
tied head. At k = L this is, operation for operation, what `model.forward` does, so the lens's
last-step logits equal the model's logits exactly. We report, per step, the cross-entropy
against the next tokens and the top-1 agreement with the model's final prediction.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def decode(model, x: torch.Tensor) -> torch.Tensor:
    """logits = head(Norm_f(x)) — the model's own last two operations."""
    return model.head(model.ln_f(x))


@torch.no_grad()
def logit_lens(model, X: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """X: (L+1, B, T, d) states; targets: (B, T) next-token ids or None.

    Returns {"loss": (L+1,) nats/token or None, "agree": (L+1,) fraction of positions whose
    top-1 token equals the final step's top-1, "acc": (L+1,) top-1 accuracy vs targets or None,
    "last_logits": logits of the last step}."""
    final = decode(model, X[-1])
    top_final = final.argmax(-1)
    loss, agree, acc = [], [], []
    for k in range(X.shape[0]):
        logits = final if k == X.shape[0] - 1 else decode(model, X[k])
        top = logits.argmax(-1)
        agree.append((top == top_final).double().mean().item())
        if targets is not None:
            flat = logits.reshape(-1, logits.size(-1)).float()
            loss.append(F.cross_entropy(flat, targets.reshape(-1)).item())
            acc.append((top == targets).double().mean().item())
    return {"loss": np.array(loss) if targets is not None else None, "agree": np.array(agree),
            "acc": np.array(acc) if targets is not None else None, "last_logits": final}
