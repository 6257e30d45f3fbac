"""Generation end to end: check, prefill, then one jitted `lax.while_loop` of decode steps.

`Generator` places the weights once (decode sharding) and keeps the compiled programs, so
repeated calls with the same batch size and cache shape compile nothing; `generate` is the
one-call form. Prompts are token ids (the caller adds BOS, see `tool.encode_prompt`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from ringformer import model, sharding
from ringformer.errors import ConfigError
from ringformer.generate import cache as kv_cache
from ringformer.generate import decode
from ringformer.generate.sampling import Sampling, sample
from ringformer.mesh import make_mesh
from ringformer.ops import layouts

PAD = 0
GREEDY = Sampling()
# Host callback per step: (step, tokens [b], -1 for finished rows) -> stop now [b] bool.
OnTokens = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class Result:
    """Generated ids per prompt (EOS and anything after it left out) and the timings."""

    tokens: list[np.ndarray]
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens: int  # prompt tokens over all rows
    decode_tokens: int  # tokens produced by decode steps over all rows (the first comes from prefill)
    compile_seconds: float = 0.0


def prefill_config(cfg: model.ModelConfig, n_tokens: int, n_sp: int) -> tuple[model.ModelConfig, int]:
    """(config to prefill with, padded prompt length) for prompts of up to n_tokens.

    The length is bucketed (within 1/8 above n_tokens) so nearby prompt lengths share one
    compiled program, then rounded up so the layout's pieces and the attention chunks divide
    it (chunks shrink to fit a short prompt rather than pad it far out). Ring attention,
    exact; with one sp device it is blockwise attention.
    """
    q = 1 << max(0, n_tokens.bit_length() - 4)
    n_tokens = -(-n_tokens // q) * q
    a = cfg.attention
    lay = layouts.effective(a.layout, n_sp)
    pieces = layouts.pieces(lay, n_sp)
    piece = -(-n_tokens // pieces)
    cq, ck = min(a.q_chunk, piece), min(a.kv_chunk, piece)
    piece = -(-piece // math.lcm(cq, ck)) * math.lcm(cq, ck)
    run = dataclasses.replace(cfg.with_attention(impl="ring", layout=lay, q_chunk=cq, kv_chunk=ck),
                              remat="none")
    return run, piece * pieces


def check_positions(cfg: model.ModelConfig, longest: int, max_new_tokens: int,
                    allow_longer: bool = False) -> None:
    """A prompt plus its new tokens past the positions the model was built for is an error
    unless asked for: without rope scaling the model has never seen such distances."""
    need = longest + max_new_tokens
    if cfg.max_position > 0 and need > cfg.max_position and cfg.rope_scaling == "none" \
            and not allow_longer:
        raise ConfigError(f"a prompt of {longest} tokens plus max_new_tokens {max_new_tokens} "
                          f"reaches position {need}, past the {cfg.max_position} positions the "
                          "model supports (max_position)",
                          "shorten the prompt or --max_new_tokens, or pass "
                          "--allow_longer_context to generate past it anyway")


def _loop_state(sampling, eos_id, on_tokens, logits, out_len, seed):
    key = jax.random.key(seed)
    tok = sample(logits, key, 0, sampling)
    done = jnp.zeros(tok.shape, bool) if eos_id is None else tok == eos_id
    if on_tokens is not None:
        done = done | _callback(on_tokens, jnp.int32(0), tok)
    out = jnp.full((tok.shape[0], out_len), -1, jnp.int32).at[:, 0].set(tok)
    return key, (jnp.int32(1), tok, out, done)


def _callback(on_tokens: OnTokens, step, tokens):
    shape = jax.ShapeDtypeStruct(tokens.shape, jnp.bool_)
    cb = lambda i, t: np.asarray(on_tokens(np.asarray(i), np.asarray(t)), bool)
    return jax.experimental.io_callback(cb, shape, step, tokens, ordered=True)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "max_new", "sampling", "eos_id",
                                             "on_tokens"))
def decode_loop(cfg: model.ModelConfig, mesh: Mesh, max_new: int, sampling: Sampling,
                eos_id: int | None, on_tokens: OnTokens | None, params, cache, logits, seed):
    """Sample up to max_new tokens per row from prefill's logits [b, vocab]: [b, max_new] ids,
    -1 after a row finished (EOS, or `on_tokens` said stop). One while_loop; stops early when
    every row has finished. `seed` is traced (no compile per seed); `sampling.seed` is unused."""
    key, state = _loop_state(sampling, eos_id, on_tokens, logits, max_new, seed)
    # Per-layer weights and cache, once: no layer's slice is copied out per token.
    params = decode.unstack_layers(params, jnp.dtype(cfg.dtype))
    cache = decode.unstack_cache(cache)

    def cond(st):
        i, _, _, _, done = st
        return (i < max_new) & ~jnp.all(done)

    def body(st):
        i, cache, tok, out, done = st
        cache, logits = decode.decode_step(cfg, params, cache, jnp.maximum(tok, 0), mesh=mesh)
        new = jnp.where(done, -1, sample(logits, key, i, sampling))
        out = lax.dynamic_update_index_in_dim(out, new, i, axis=1)
        if eos_id is not None:
            done = done | (new == eos_id)
        if on_tokens is not None:
            done = done | _callback(on_tokens, i, new)
        return i + 1, cache, new, out, done

    i, tok, out, done = state
    out = lax.while_loop(cond, body, (i, cache, tok, out, done))[3]
    return lax.with_sharding_constraint(out, sharding.replicated(mesh))  # every process reads it


class Generator:
    """A model placed on a mesh for generation. mesh None: one device."""

    def __init__(self, cfg: model.ModelConfig, params: dict, *, mesh: Mesh | None = None,
                 allow_longer: bool = False):
        if mesh is None:
            mesh = make_mesh({"dp": 1, "fsdp": 1, "sp": 1, "tp": 1}, devices=jax.devices()[:1])
        tp = mesh.shape["tp"]
        if cfg.n_kv_heads % tp:
            raise ConfigError(f"mesh tp={tp} does not divide the model's n_kv_heads="
                              f"{cfg.n_kv_heads}, so the KV cache cannot be split over tp",
                              "use a tp in --mesh that divides it")
        self.cfg, self.mesh, self.allow_longer = cfg, mesh, allow_longer
        self.params = decode.place_params(cfg, params, mesh)
        self._programs: dict = {}

    def check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens {max_new_tokens} must be at least 1",
                              "pass e.g. --max_new_tokens 64")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("a prompt is empty", "give every prompt at least one token")
        rows = self.mesh.shape["dp"] * self.mesh.shape["fsdp"]
        if len(prompts) % rows:
            raise ConfigError(f"{len(prompts)} prompts cannot be split over dp*fsdp={rows} devices",
                              f"give a multiple of {rows} prompts, or use dp=fsdp=1 in --mesh")
        if max(max(p) for p in prompts) >= self.cfg.vocab_size or min(min(p) for p in prompts) < 0:
            raise ConfigError("a prompt holds token ids outside the model's vocabulary "
                              f"[0, {self.cfg.vocab_size})", "use the model's own tokenizer")
        check_positions(self.cfg, max(len(p) for p in prompts), max_new_tokens, self.allow_longer)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: Sampling = GREEDY, eos_id: int | None = None,
                 on_tokens: OnTokens | None = None) -> Result:
        """New token ids for each prompt (ids, BOS included when wanted), up to max_new_tokens
        each, stopping a row at `eos_id` (left out of the result) or when `on_tokens` says."""
        self.check(prompts, max_new_tokens)
        lengths = np.array([len(p) for p in prompts], np.int32)
        n_sp = sharding.seq_shards(self.mesh)
        run_cfg, s = prefill_config(self.cfg, int(lengths.max()), n_sp)
        spec = kv_cache.make_spec(s, max_new_tokens, n_sp,
                                  decode.attention_options(run_cfg)["layout"])
        tokens = np.full((len(prompts), s), PAD, np.int32)
        for r, p in enumerate(prompts):
            tokens[r, :len(p)] = p
        t0 = time.perf_counter()
        inputs = decode.prefill_inputs(tokens, lengths, spec, self.mesh)
        run_prefill = self._compiled(decode.prefill_jit, (run_cfg, spec, self.mesh), self.params,
                                     *inputs)
        # One program per kind of sampling: the seed is an argument, and greedy is greedy.
        static = GREEDY if sampling.greedy else dataclasses.replace(sampling, seed=0)
        loop_static = (run_cfg, self.mesh, max_new_tokens, static, eos_id, on_tokens)
        seed = jax.device_put(np.int32(sampling.seed), sharding.replicated(self.mesh))
        abstract = run_prefill.out_info  # shapes and shardings of (cache, logits)
        run_loop = self._compiled(decode_loop, loop_static, self.params, *abstract, seed)
        t1 = time.perf_counter()
        cache, logits = run_prefill(self.params, *inputs)
        logits.block_until_ready()
        t2 = time.perf_counter()
        out = np.asarray(run_loop(self.params, cache, logits, seed).addressable_data(0))
        t3 = time.perf_counter()
        kept = [row[:_first(row, eos_id)] for row in out]
        steps = int((out >= 0).sum(axis=1).max()) - 1
        return Result(kept, t2 - t1, t3 - t2, int(lengths.sum()), steps * len(prompts), t1 - t0)

    def _compiled(self, fn, static: tuple, *args):
        """fn compiled for these static arguments and argument shapes, once per Generator:
        compiling apart from running keeps compile time out of the measured speeds."""
        shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args))
        key = (fn, static, shapes)
        if key not in self._programs:
            self._programs[key] = fn.lower(*static, *args).compile()
        return self._programs[key]


def _first(row: np.ndarray, eos_id: int | None) -> int:
    """Index of the first -1 or EOS in row (its length if none)."""
    stop = (row < 0) if eos_id is None else (row < 0) | (row == eos_id)
    return int(np.argmax(stop)) if stop.any() else len(row)


def generate(cfg: model.ModelConfig, params: dict, prompts: Sequence[Sequence[int]], *,
             mesh: Mesh | None = None, max_new_tokens: int, sampling: Sampling = GREEDY,
             eos_id: int | None = None) -> list[np.ndarray]:
    """New token ids per prompt (lists of ids, any lengths, one batch); see `Generator`."""
    return Generator(cfg, params, mesh=mesh).generate(
        prompts, max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id).tokens
