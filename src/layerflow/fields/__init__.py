"""Vector fields F(X, t) of the flow."""

from .transformer import MLP, CausalSelfAttention, KVCache, TransformerField

__all__ = ["MLP", "CausalSelfAttention", "KVCache", "TransformerField"]
