"""The training loop: config -> sharded state -> steps, with metrics, evaluation and checkpoints.

`train_and_evaluate(config, workdir)` is the whole job. `make_train_step` builds the pure
`train_step(state, batch) -> (state, metrics)` that is jitted once with donated state and
explicit shardings. Resuming is bitwise exact on CPU: a checkpoint holds the parameters, the
optimizer state, the step and the data iterator's position, and the step function is
deterministic given those.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ringformer import model, optim, sharding
from ringformer.config import validate
from ringformer.data import pipeline as data_lib
from ringformer.data.tokenizer import load_tokenizer
from ringformer.errors import UserError
from ringformer.eval import perplexity as evaluate
from ringformer.mesh import make_mesh
from ringformer.train import checkpoint as ckpt_lib
from ringformer.train import metrics
from ringformer.train.state import (
    TrainState,
    abstract_state,
    check_compatible,
    config_json,
    init_from,
    init_state,
)
from ringformer.train.workdir import (
    WorkdirLock,
    missing_dirs,
    prepare_workdir,
    remove_unused_workdir,
)

log = logging.getLogger(__name__)


def _microbatches(batch: dict, accum: int) -> dict:
    """[B, S] -> [accum, B/accum, S], taking every accum-th row so each microbatch keeps an
    equal share of every data-parallel shard (no cross-device movement)."""
    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(model_cfg: model.ModelConfig, tx: optax.GradientTransformation, mesh,
                    *, grad_accum_steps: int = 1, skip_nonfinite: bool = False):
    """The pure step. Gradients are of the token-summed loss over all microbatches, divided by
    the total token count, so accumulation changes memory, not the result."""
    grad_fn = jax.value_and_grad(
        lambda p, mb: model.loss_fn(model_cfg, p, mb, mesh=mesh), has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def micro(carry, mb):
            grads, loss_sum, n_tokens = carry
            (l_sum, n), g = grad_fn(state.params, mb)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + l_sum, n_tokens + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        if grad_accum_steps == 1:
            (grads, loss_sum, n_tokens), _ = micro(init, batch)
        else:
            (grads, loss_sum, n_tokens), _ = jax.lax.scan(
                micro, init, _microbatches(batch, grad_accum_steps))
        denom = jnp.maximum(n_tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite update is never applied: either the step is skipped (opt-in) or the
        # host stops the run, and in both cases the state stays the last good one.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(
            step=state.step + jnp.where(finite | skip_nonfinite, 1, 0).astype(state.step.dtype),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state))
        return new_state, {"loss": loss, "grad_norm": grad_norm, "tokens": n_tokens,
                           "finite": finite}

    return train_step


class _StopSignal:
    """SIGTERM/SIGINT ask for a checkpoint at the current step and a clean exit (preemption)."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def agreed(self) -> bool:
        """Whether this or any other process got a signal (then `received` is set on all).

        The save after the loop is collective, so every process must leave at the same step,
        and a scheduler's SIGTERM reaches the processes at different moments: they compare
        flags each step (a tiny allgather; the step already waits for its metrics).
        """
        mine = self.received is not None
        if jax.process_count() == 1:
            return mine
        import numpy as np
        from jax.experimental import multihost_utils

        # Decide on the exchanged flags only: a signal that lands while they are exchanged
        # is this process's news alone, and acting on it now would leave the peers stepping
        # on while this one saves (a collective mismatch: both hang). It counts next step.
        agreed = bool(np.max(multihost_utils.process_allgather(np.int32(mine))))
        if agreed and self.received is None:
            self.received = 0  # a peer's signal
        return agreed

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train `config` in `workdir`, resuming from its latest checkpoint; returns the last metrics."""
    mesh_sizes = validate(config, jax.device_count())
    lead = jax.process_index() == 0
    created = missing_dirs(workdir)
    workdir = prepare_workdir(workdir)
    # One lock per run: process 0 holds it for all of them (they share the workdir).
    lock = WorkdirLock(workdir) if lead else contextlib.nullcontext()
    with lock, _StopSignal() as stop:
        try:
            return _train(config, workdir, mesh_sizes, stop)
        except BaseException:
            # A first run that failed before writing anything (bad data, tokenizer, ...) must
            # not leave a directory behind that looks like a run; done while the lock is held.
            if lead:
                remove_unused_workdir(created)
            raise


def _train(config, workdir: Path, mesh_sizes: dict, stop: _StopSignal) -> dict:
    cfg_t, cfg_d = config.train, config.data
    lead = jax.process_index() == 0
    tokenizer = load_tokenizer(cfg_d.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(f"tokenizer {cfg_d.tokenizer!r} has {tokenizer.vocab_size} ids but "
                        f"model.vocab_size={config.model.vocab_size}",
                        f"set --config.model.vocab_size={tokenizer.vocab_size} or more")
    mesh = make_mesh(config.mesh)
    model_cfg = model.ModelConfig.from_config(config)
    layout = config.attention.layout if config.attention.impl == "ring" else "contiguous"
    # Data first: bad data is reported before anything is compiled.
    train_iter = data_lib.TrainIterator(cfg_d, tokenizer, mesh, seed=cfg_t.seed, layout=layout)
    eval_set = list(data_lib.eval_batches(cfg_d, tokenizer, mesh, n_batches=cfg_t.eval_batches,
                                          layout=layout)) if cfg_d.eval_files else []

    tx = optim.make_optimizer(config.optim, cfg_t.steps)
    schedule = optim.make_schedule(config.optim, cfg_t.steps)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=cfg_t.keep_checkpoints)
    start = 0
    progress: dict = {}
    try:
        # Checkpoints are judged before the state is built: a damaged or foreign checkpoint
        # is reported without compiling anything.
        latest = checkpointer.latest_valid_step()
        if latest is not None:
            check_compatible(checkpointer.read_json(latest)[1], config)
        if latest:
            # Restored straight onto the shardings: no initialised state is built and dropped.
            state, data_state, _ = checkpointer.restore(
                latest, abstract_state(model_cfg, tx, mesh))
            train_iter.restore(data_state)
            progress = data_state
            start = int(state.step)
            if checkpointer.skipped and lead:  # the skipped steps were each warned about
                log.warning("resuming from checkpoint step %d", start)
        else:
            # A step-0 checkpoint (`convert_hf.py import`, or a run stopped before its first
            # step) holds weights but no training: it starts this run like `init_from`, with
            # this config's optimizer, data order and config.json, not the writer's.
            state = init_state(model_cfg, tx, mesh, cfg_t.seed)
            if latest == 0:  # just verified above: read it without a second checksum pass
                state = init_from(str(workdir), model_cfg, state, tx, verified_step=0)
            elif cfg_t.init_from:
                state = init_from(cfg_t.init_from, model_cfg, state, tx)
            if lead:
                (workdir / "config.json").write_text(json.dumps(config_json(config), indent=2)
                                                     + "\n")
    except BaseException:
        checkpointer.close()  # in-process callers (tests, notebooks) must not leak its threads
        raise
    if start >= cfg_t.steps:
        # Nothing to train: leave without a step, a save, a TensorBoard file or a plot. Equal
        # is a finished run started again (e.g. a requeued job), so it is not an error.
        checkpointer.close()
        how = f"pass --config.train.steps=N with N > {start} to train further"
        if start > cfg_t.steps:
            raise UserError(f"the run in {workdir} is already at step {start} > "
                            f"train.steps={cfg_t.steps}", how)
        if lead:
            log.warning("the run in %s is already at step %d = train.steps; nothing to do (%s)",
                        workdir, start, how)
        return {"step": start, "stopped_by_signal": False}

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_shardings = sharding.batch_sharding(mesh)
    step_fn = jax.jit(
        make_train_step(model_cfg, tx, mesh, grad_accum_steps=config.optim.grad_accum_steps,
                        skip_nonfinite=cfg_t.skip_nonfinite),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    eval_step = evaluate.make_eval_step(model_cfg, mesh)

    logger = metrics.MetricsLogger(workdir, enabled=lead, resume_step=start)
    peak = cfg_t.peak_flops or metrics.measure_peak_flops()
    tokens_per_step = cfg_d.global_batch_size * cfg_d.seq_len
    flops_per_token = metrics.flops_per_token(config.model, cfg_d.seq_len)

    # The steps since the last log row travel with the checkpoint: a run resumed between two
    # rows logs the same rows as one that never stopped.
    window: list[dict] = progress.get("log_window", [])
    skipped = int(progress.get("skipped_steps", 0))

    def save(step: int) -> None:
        checkpointer.save(step, state, config_json=config_json(config),
                          data_state={**train_iter.state(), "log_window": window,
                                      "skipped_steps": skipped})

    # Test-only fault injection (tests/test_reliability.py), read here and nowhere else: a NaN
    # loss mask at this step gives the real step function a non-finite loss and gradients.
    nan_at_step = int(os.environ.get("RINGFORMER_TEST_NAN_AT_STEP") or 0)
    last: dict[str, Any] = {"step": start}
    bar = metrics.progress_bar(cfg_t.steps, initial=start, enabled=lead)
    # Throughput counts the steps this process ran since the last row (a resumed window's
    # earlier steps ran in another process), over their time.
    t_window, timed = time.perf_counter(), 0
    step = start
    try:
        while step < cfg_t.steps:
            if stop.agreed():
                break
            batch = next(train_iter)
            if step + 1 == nan_at_step:
                batch = {**batch, "loss_mask": batch["loss_mask"] * jnp.nan}
            state, m = step_fn(state, batch)
            m = jax.device_get(m)
            step += 1
            timed += 1
            if not m["finite"]:
                if not cfg_t.skip_nonfinite:
                    raise UserError(f"non-finite loss or gradient norm at step {step} "
                                    f"(loss={m['loss']}, grad_norm={m['grad_norm']})",
                                    "lower optim.lr or check the data; the last good checkpoint "
                                    "is kept, or set train.skip_nonfinite=True to skip such steps")
                skipped += 1
            else:
                window.append({"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])})
            if step % cfg_t.log_every == 0 or step == cfg_t.steps:
                elapsed = time.perf_counter() - t_window
                n_steps = max(len(window), 1)
                tps = tokens_per_step * timed / max(elapsed, 1e-9)
                # A window of skipped steps only has no loss: NaN, which metrics.jsonl writes
                # as null (None itself is not a number the logger accepts).
                row = {"loss": float(sum(w["loss"] for w in window) / n_steps) if window
                       else float("nan"),
                       "lr": float(schedule(step - 1)),
                       "grad_norm": float(sum(w["grad_norm"] for w in window) / n_steps)
                       if window else float("nan"),
                       "tokens_per_sec": tps,
                       "mfu": metrics.mfu(tps, flops_per_token, jax.device_count(), peak)}
                if cfg_t.skip_nonfinite:
                    row["skipped_steps"] = skipped
                row = logger.log(step, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}" if window else "nan",
                                tok_s=f"{tps:,.0f}")
                last.update(row)
                window, t_window, timed = [], time.perf_counter(), 0
            if eval_set and (step % cfg_t.eval_every == 0 or step == cfg_t.steps):
                t_eval = time.perf_counter()
                ev = evaluate.eval_loss(eval_step, state.params, eval_set)
                row = logger.log(step, {"eval_loss": ev["loss"], "eval_ppl": ev["ppl"]})
                last.update(row)
                t_window += time.perf_counter() - t_eval  # evaluating is not training throughput
            if step % cfg_t.save_every == 0:
                save(step)
            bar.update(1)
        # The final step (or the step a stop signal arrived at) is always saved.
        save(step)
    finally:
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        logger.close()
    if lead:
        metrics.plot_metrics(workdir)
    last["step"] = step
    last["stopped_by_signal"] = stop.received is not None
    return last


