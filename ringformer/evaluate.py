"""Evaluation: the loss the trainer reports, and (see long_eval) perplexity on long documents.

The trainer's `eval_loss` and the evaluation tool share `make_eval_step`, so a number printed
during training means the same as one printed by `scripts/eval.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax

from ringformer import model


def make_eval_step(model_cfg: model.ModelConfig, mesh) -> Callable:
    """jit(params, batch) -> (summed token NLL, token count) over one global batch."""
    return jax.jit(lambda params, batch: model.loss_fn(model_cfg, params, batch, mesh=mesh))


def eval_loss(eval_step: Callable, params, batches: Iterable[dict]) -> dict:
    """Token-weighted mean NLL over `batches`, its perplexity and the number of tokens."""
    total, count = 0.0, 0.0
    for batch in batches:
        loss_sum, n = jax.device_get(eval_step(params, batch))
        total, count = total + float(loss_sum), count + float(n)
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(count)}
