"""Validation primitives shared by the config dataclasses: each raises `ConfigError` naming the
key, and `_check_limits` refuses absurd sizes before anything is allocated."""

from __future__ import annotations

import math
from dataclasses import fields


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key."""


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (e.g. 10**400)
        return False


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and _finite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {_short(value)}")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and _finite(value) and value >= 0):
        raise ConfigError(f"{name} must be a non-negative number, got {_short(value)}")


def _short(value) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 80 else text[:77] + "..."


# Upper bounds no real run reaches (issue 8): a hostile or mistyped config is refused, naming the
# key, instead of making the loader allocate terabytes. Integer fields not listed: at most 10**12.
LIMITS = {"vocab_size": 2**24, "n_layer": 10_000, "n_head": 4096, "n_embd": 2**17,
          "block_size": 2**20, "mlp_ratio": 256, "n_kv_head": 4096, "head_dim": 2**14,
          "mlp_hidden": 2**20, "bpe_vocab_size": 2**20, "batch_size": 2**20, "eval_iters": 10**6,
          "sample_tokens": 10**7, "seed": 2**32 - 1, "basis_size": 1024}
MAX_PARAMS = 10**11


def _check_limits(section) -> None:
    for f in fields(section):
        v = getattr(section, f.name)
        if isinstance(v, bool) or not isinstance(v, int):
            continue
        cap = LIMITS.get(f.name, 10**12)
        if v > cap:
            raise ConfigError(f"{f.name} = {_short(v)} is absurdly large (at most {cap:,})")
    if all(isinstance(getattr(section, k, None), int) and
           not isinstance(getattr(section, k), bool) for k in ("n_layer", "n_embd", "mlp_ratio")):
        d = section.n_embd
        est = section.n_layer * (4 + 2 * section.mlp_ratio) * d * d
        if est > MAX_PARAMS:
            raise ConfigError(f"n_layer = {section.n_layer} with n_embd = {d} means about "
                              f"{est:.1e} parameters, absurdly many (at most {MAX_PARAMS:.0e})")


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(
            f"unknown {name} {_short(value)}; choose one of: {', '.join(sorted(choices))}")


def _h(text: str) -> dict:
    return {"help": text}
