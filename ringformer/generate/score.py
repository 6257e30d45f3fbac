"""Scoring continuations with the KV cache: one prefill per prompt, then teacher-forced decode.

Passkey retrieval asks, for one prompt and several candidate answers, the log-probability of
every answer token and the greedy (argmax) choice at each answer position. A full forward per
candidate repeats the prompt's work once per candidate; here the prompt is prefilled once,
its cache is copied to one row per candidate, and the answers are fed as decode steps.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ringformer.generate import api, decode
from ringformer.generate import cache as kv_cache
from ringformer.generate.cache import KVCache


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def teacher_forced(cfg, mesh, params, cache: KVCache, logits, answers):
    """(log p [b, n], argmax [b, n]) of answers [b, n] fed after the prompt: cache and logits
    [1 or b, ...] from prefill (one prompt's are repeated to b rows)."""
    b, n = answers.shape
    rep = b // cache.lengths.shape[0]
    grow = lambda x: jnp.repeat(x, rep, axis=1)
    cache = KVCache(grow(cache.k), grow(cache.v), jnp.repeat(cache.lengths, rep), cache.step,
                    cache.spec, *(None if x is None else grow(x) for x in (cache.prev_k,
                                                                       cache.prev_q)))
    logits = jnp.repeat(logits, rep, axis=0)
    # Per-layer weights and cache, once: no layer's slice is copied out per token.
    params = decode.unstack_layers(params, jnp.dtype(cfg.dtype))
    cache = decode.unstack_cache(cache)

    def body(i, st):
        cache, logits, logp, best = st
        lp = jax.nn.log_softmax(logits, axis=-1)
        tok = answers[:, i]
        logp = logp.at[:, i].set(jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0])
        best = best.at[:, i].set(jnp.argmax(lp, axis=-1).astype(jnp.int32))
        cache, logits = decode.decode_step(cfg, params, cache, tok, mesh=mesh)
        return cache, logits, logp, best

    init = (cache, logits, jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.int32))
    _, _, logp, best = lax.fori_loop(0, n, body, init)
    return logp, best


def continuation_scores(gen: api.Generator, rows: Sequence[tuple[np.ndarray, int]]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """For rows (ids, answer_start): log p(ids[j] | ids[:j]) and argmax at answer_start <= j,
    teacher-forced: the passkey evaluator's scorer. Rows sharing a prompt share one prefill."""
    groups: dict[bytes, list[int]] = {}
    for i, (ids, start) in enumerate(rows):
        groups.setdefault(np.asarray(ids[:start], np.int32).tobytes(), []).append(i)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    shards = gen.mesh.shape["dp"] * gen.mesh.shape["fsdp"]
    for members in groups.values():
        prompt = np.asarray(rows[members[0]][0][:rows[members[0]][1]], np.int32)
        answers = [np.asarray(rows[i][0][rows[i][1]:], np.int32) for i in members]
        width = max(len(a) for a in answers)
        gen.check([prompt.tolist()] * shards, width)
        n_rows = -(-len(members) // shards) * shards
        table = np.zeros((n_rows, width), np.int32)
        for r, a in enumerate(answers):
            table[r, :len(a)] = a
        logp, best = _score(gen, prompt, table, shards)
        for r, i in enumerate(members):
            out[i] = (logp[r, :len(answers[r])], best[r, :len(answers[r])])
    return [out[i] for i in range(len(rows))]


def _score(gen: api.Generator, prompt: np.ndarray, table: np.ndarray, shards: int):
    n_sp = gen.mesh.shape["sp"]
    run_cfg, s = api.prefill_config(gen.cfg, len(prompt), n_sp)
    spec = kv_cache.make_spec(s, table.shape[1] + 1, n_sp,
                              decode.attention_options(run_cfg)["layout"])
    tokens = np.zeros((shards, s), np.int32)
    tokens[:, :len(prompt)] = prompt
    cache, logits = decode.prefill(run_cfg, gen.params, tokens, np.full(shards, len(prompt)),
                                   mesh=gen.mesh, spec=spec)
    answers = jax.device_put(table, jax.sharding.NamedSharding(
        gen.mesh, jax.sharding.PartitionSpec(decode.BATCH)))
    logp, best = teacher_forced(run_cfg, gen.mesh, gen.params, cache, logits, answers)
    rep = jax.sharding.NamedSharding(gen.mesh, jax.sharding.PartitionSpec())
    logp, best = (jax.device_put(x, rep) for x in (logp, best))
    return np.asarray(logp.addressable_data(0)), np.asarray(best.addressable_data(0))
