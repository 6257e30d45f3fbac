"""Values that pass the type check but that nothing can use, refused before anything is built.

`check_values(config)` (called by `config.check_structure`): every float must be finite as a
float32 (the model and the optimizer compute in float32 or narrower, so 1e39 is inf there),
every integer must fit an int32 (jax's default integer: a seed or a size past it fails deep in
jax with a traceback), and the optimizer's coefficients must lie where the update is defined.
`check_fits(config)`: the parameters, optimizer moments and gradients (a lower bound of
what a step holds) must fit this machine's memory; a typo such as `model.dim=10000000`
otherwise ends as an out-of-memory traceback after the workdir was made. No jax: this runs
before jax is imported.
"""

from __future__ import annotations

import math
import os

from ringformer.errors import ConfigError

FLOAT32_MAX = 3.4028234663852886e38
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# (section, key): (lowest, highest, closed at the top): where each coefficient keeps the
# update defined; 1.0 itself is refused for the betas (Adam divides by 1 - b**t).
_RANGES = {("optim", "b1"): (0.0, 1.0, False), ("optim", "b2"): (0.0, 1.0, False),
           ("optim", "min_lr_ratio"): (0.0, 1.0, True)}
_NON_NEGATIVE = (("optim", "weight_decay"), ("optim", "eps"), ("model", "init_std"),
                 ("train", "peak_flops"))
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _need(cond: bool, what: str, fix: str) -> None:
    if not cond:
        raise ConfigError(what, fix)


def check_values(config) -> None:
    """Every number of `config` is one the run can compute with (see the module doc)."""
    for section, keys in config.items():
        for key, value in keys.items():
            name = f"{section}.{key}"
            if isinstance(value, float):
                _need(math.isfinite(value) and abs(value) <= FLOAT32_MAX,
                      f"{name}={value} is not a finite float32 number",
                      f"set --config.{name} to a finite value")
            elif isinstance(value, int) and not isinstance(value, bool):
                _need(INT32_MIN <= value <= INT32_MAX, f"{name}={value} does not fit a 32-bit integer",
                      f"set --config.{name} to a value between {INT32_MIN} and {INT32_MAX}")
    for (section, key), (lo, hi, closed) in _RANGES.items():
        v = config[section][key]
        _need(lo <= v and (v <= hi if closed else v < hi), f"{section}.{key}={v} is outside "
              f"[{lo}, {hi}{']' if closed else ')'}", f"set --config.{section}.{key}, e.g. the default")
    for section, key in _NON_NEGATIVE:
        v = config[section][key]
        _need(v >= 0, f"{section}.{key}={v} is negative", f"set --config.{section}.{key} to 0 or more")


def param_count(m) -> int:
    """Parameters of the model section `m` (embeddings, attention, MLP, norms, head)."""
    head_dim = m.dim // max(m.n_heads, 1)
    attn = 2 * m.dim * m.dim + 2 * m.dim * m.n_kv_heads * head_dim
    layer = attn + 3 * m.dim * m.ffn_dim + 2 * m.dim
    if getattr(m, "smear_keys", False) and getattr(m, "smear_tokens", 1) == 1:
        layer += m.n_kv_heads  # one mixing weight per kv head
    elif getattr(m, "smear_keys", False):  # per-channel taps: keys 3, queries 2
        layer += (m.n_kv_heads * 3 + m.n_heads * 2) * head_dim
    return m.vocab_size * m.dim * (1 if m.tie_embeddings else 2) + m.n_layers * layer + m.dim


def step_bytes(config) -> int:
    """A lower bound of what one training step holds: parameters, two optimizer moments and
    gradients in the parameter dtype, the batch's tokens, and each layer's saved input."""
    m, d = config.model, config.data
    state = 4 * param_count(m) * _BYTES.get(m.param_dtype, 4)
    tokens = d.global_batch_size * d.seq_len
    return state + tokens * (8 + m.n_layers * m.dim * _BYTES.get(m.dtype, 4))


def machine_memory() -> int | None:
    """Physical memory of this machine in bytes (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(config, memory: int | None = None) -> None:
    """Refuse a model and batch whose step cannot fit `memory` (default: this machine's)."""
    memory = machine_memory() if memory is None else memory
    need = step_bytes(config)
    _need(memory is None or need <= memory,
          f"model.dim={config.model.dim}, n_layers={config.model.n_layers}, vocab_size="
          f"{config.model.vocab_size}, ffn_dim={config.model.ffn_dim} with data.seq_len="
          f"{config.data.seq_len} x global_batch_size={config.data.global_batch_size} needs at "
          f"least {need / 2**30:.1f} GiB per step, but this machine has {(memory or 0) / 2**30:.1f} GiB",
          "check the sizes for a typo, or use a smaller model, batch or seq_len"
          " (--dry_run reports the memory of a config)")
