"""The optimizer from `config.optim`: warmup + decay schedule, global-norm clipping, AdamW.

Conventions (the trainer and the tests rely on them):

- **Step counting.** optax evaluates the schedule at the number of updates already applied,
  so update `t` (0-based) uses `schedule(t)`. With warmup the very first update therefore
  runs at learning rate 0 (it still fills Adam's moments); `schedule(warmup_steps) == lr`.
- **Weight decay** is decoupled (AdamW, scaled by the learning rate as in PyTorch and optax)
  and applies only to matrices. The mask comes from each leaf's `ndim`: 1-D leaves (norm
  scales, biases) are not decayed. Because the model stacks its layers on a leading axis
  for `lax.scan` (`layers.attn_norm` is `[n_layers, dim]`), a leaf under a `layers` key
  counts one dimension fewer, and any leaf whose key contains "norm" is never decayed.
- **Gradient accumulation is not done here.** `make_optimizer` returns one update per
  train step; `optim.grad_accum_steps` is for the trainer, which splits each global batch
  into that many microbatches and averages their gradients inside one jitted `train_step`
  (a `lax.scan`), then calls `update` once. We chose that over `optax.MultiSteps` because
  it keeps `train_step` pure (one call = one optimizer step, the schedule counts optimizer
  steps, and `opt_state` holds no partial-gradient buffer to checkpoint), and the scan lets
  XLA reuse one microbatch's activation memory for the next.
- **Clipping** (`optim.clip_norm > 0`) scales the whole gradient tree by
  `min(1, clip_norm / global_norm)` before Adam; 0 disables it. The trainer should log the
  global norm before clipping (`optax.global_norm(grads)`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from ringformer.config import SCHEDULES, OptimConfig


def _typed(optim_cfg: Mapping | OptimConfig) -> OptimConfig:
    # Every key is read from the config itself (a missing one is a ConfigError): a fallback
    # here would be a second default, free to disagree with ringformer.config's.
    return optim_cfg if isinstance(optim_cfg, OptimConfig) else OptimConfig.from_section(optim_cfg, "optim")


def make_schedule(optim_cfg: Mapping | OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step count.

    Linear warmup from 0 to `lr` over `warmup_steps`, then, until `total_steps`:
    `cosine` (half a cosine from `lr` down to `lr * min_lr_ratio`), `linear` (a straight line
    to the same end value) or `constant` (`lr`). After `total_steps` the end value is held.
    `optim_cfg`: the complete `config.optim` section (ConfigDict, dict or OptimConfig).
    """
    o = _typed(optim_cfg)
    lr = float(o.lr)
    warmup = int(o.warmup_steps)
    kind = str(o.schedule)
    end = lr * float(o.min_lr_ratio)
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
    decay_steps = max(1, int(total_steps) - warmup)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = lr * t / warmup if warmup > 0 else jnp.asarray(lr, jnp.float32)
        progress = jnp.clip((t - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            after = end + (lr - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        elif kind == "linear":
            after = lr + (end - lr) * progress
        else:
            after = jnp.asarray(lr, jnp.float32)
        return jnp.where(t < warmup, warm, after)

    return schedule


def decay_mask(params):
    """True for leaves that get weight decay: matrices, not norm scales or biases.

    A leaf's own rank is its `ndim` minus one for each `layers` key on its path (the axis
    that stacks per-layer weights for the scan); rank >= 2 and no "norm" in any key decays.
    """
    def decays(path, x) -> bool:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
        rank = jnp.ndim(x) - sum(k == "layers" for k in keys)
        return rank >= 2 and not any("norm" in k.lower() for k in keys)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg: Mapping | OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """`clip_by_global_norm` (if `clip_norm > 0`) followed by AdamW on `make_schedule`.

    Uses `b1`, `b2`, `eps`, `weight_decay` from `optim_cfg`, the complete `config.optim`.
    Moments take the parameters' dtype, so fp32 master weights give fp32 optimizer state.
    No gradient accumulation: see the module docstring (the trainer accumulates).
    """
    o = _typed(optim_cfg)
    clip = float(o.clip_norm)
    parts = []
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(
        learning_rate=make_schedule(o, total_steps),
        b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
        weight_decay=float(o.weight_decay),
        mask=decay_mask,
    ))
    return optax.chain(*parts)
