"""The training loop: config -> sharded state -> steps, with metrics, evaluation and checkpoints.

`train_and_evaluate(config, workdir)` is the whole job. `make_train_step` builds the pure
`train_step(state, batch) -> (state, metrics)` that is jitted once with donated state and
explicit shardings. Resuming is bitwise exact on CPU: a checkpoint holds the parameters, the
optimizer state, the step, the data iterator's position and the metric window (the steps since
the last log row), and the step function is deterministic given those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from ringformer import limits, model, optim, sharding
from ringformer.config import validate
from ringformer.data import pipeline as data_lib
from ringformer.data.tokenizer import load_tokenizer
from ringformer.errors import UserError, close_all
from ringformer.eval import perplexity as evaluate
from ringformer.mesh import make_mesh
from ringformer.ops import layouts
from ringformer.train import checkpoint as ckpt_lib
from ringformer.train import metrics
from ringformer.train.feed import Prefetcher
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

# Batches packed and placed ahead of the step that takes them; 0 is the synchronous loop
# (each batch made when needed, every step's metrics read at once): the reference the
# tests hold the asynchronous one to, bit for bit.
PREFETCH_DEPTH = 2
# Several processes exchange their stop flags (an allgather, which waits for the device)
# every this many steps and at steps that wait anyway; one process reads its flag each step.
_STOP_EXCHANGE_EVERY = 8


def _microbatches(batch: dict, accum: int) -> dict:
    """[B, S] -> [accum, B/accum, S], taking every accum-th row so each microbatch keeps an
    equal share of every data-parallel shard (no cross-device movement)."""
    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


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
        # A finite loss and gradient can still give a non-finite update (an lr of inf, a
        # moment overflowing): the new state itself must be finite to be kept.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((params, opt_state))
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

    def __init__(self, armed: bool = True):
        self.received: int | None = None
        # Unarmed (reading data, restoring, compiling) there is no step to save: a signal
        # stops at once instead of waiting, unseen, behind a read that may never return.
        self.armed = armed
        self._own = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self._own += 1
        if not self.armed or self._own > 1:
            # A second signal means the first one's save is not coming (the loop is stuck,
            # e.g. in a read): stop as the default SIGINT handler would.
            raise KeyboardInterrupt
        self.received = signum

    def agreed(self) -> bool:
        """Whether this or any other process got a signal (then `received` is set on all).

        The save after the loop is collective, so every process must leave at the same step,
        and a scheduler's SIGTERM reaches the processes at different moments: they compare
        flags at the same steps (a tiny allgather, which waits for the device: `_stop_agreed`
        asks every few steps and at the steps that wait anyway).
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
    validate(config, jax.device_count())
    limits.check_fits(config)  # a size typo must not end as an OOM with a half-made workdir
    lead = jax.process_index() == 0
    created = missing_dirs(workdir)
    workdir = prepare_workdir(workdir)
    # One lock per run: process 0 holds it for all of them (they share the workdir).
    lock = WorkdirLock(workdir) if lead else contextlib.nullcontext()
    with lock, _StopSignal(armed=False) as stop:
        try:
            return _train(config, workdir, stop)
        except BaseException:
            # A first run that failed before writing anything (bad data, tokenizer, ...) must
            # not leave a directory behind that looks like a run; done while the lock is held.
            if lead:
                remove_unused_workdir(created)
            raise


def _train(config: ml_collections.ConfigDict, workdir: Path, stop: _StopSignal) -> dict:
    run = _prepare(config, workdir)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    try:
        state, progress = _restore_or_init(run, checkpointer)
    except BaseException:
        checkpointer.close()  # in-process callers (tests, notebooks) must not leak its threads
        raise
    start = int(state.step)
    if start >= config.train.steps:
        checkpointer.close()
        return _nothing_to_train(run, start)

    step_fn, eval_step = _jit_steps(run, state)
    logger = metrics.MetricsLogger(workdir, enabled=run.lead, resume_step=start)
    # The feed starts first: its head start of a batch or two is not counted as training time.
    feed = Prefetcher(run.train_iter, PREFETCH_DEPTH)
    window = _MetricWindow(run, progress)
    bar = metrics.progress_bar(config.train.steps, initial=start, enabled=run.lead)
    reader = _MetricReader(run, window, logger, bar, start)

    def save(step: int, state: TrainState) -> None:
        # The position after the batches trained on, not after those prefetched.
        checkpointer.save(step, state, config_json=config_json(config),
                          data_state={**feed.consumed_state, **window.saved()})

    step = start
    stop.armed = True  # from here a signal asks for a save at the current step
    try:
        while step < config.train.steps and not _stop_agreed(run, stop, step):
            state = reader.dispatch(step_fn, state, next(feed))
            step += 1
            # Only a step whose state the host needs (eval, save, the last) waits for the
            # device here; the others' metrics are read one step behind, while the next
            # step is already queued.
            needs_state = _needs_state(run, step)
            reader.read(step if needs_state or not PREFETCH_DEPTH else step - 1)
            if run.eval_set and _due(step, config.train.eval_every, config.train.steps):
                reader.last.update(_evaluate(run, eval_step, state.params, step, logger, window))
            if step % config.train.save_every == 0:
                save(step, state)
            bar.update(1)
        reader.read(step)
        # The final step (or the step a stop signal arrived at) is always saved.
        save(step, state)
    finally:
        # Each is closed even if one fails; an error already on its way is the one reported.
        close_all(feed.close, bar.close, checkpointer.wait, checkpointer.close, logger.close)
    if run.lead:
        metrics.plot_metrics(workdir)
    return {**reader.last, "step": step, "stopped_by_signal": stop.received is not None}


@dataclasses.dataclass(frozen=True)
class _Run:
    """What a run is made of, built from its config before anything is compiled."""

    config: ml_collections.ConfigDict
    workdir: Path
    lead: bool  # process 0: the one that writes files
    mesh: Mesh
    model_cfg: model.ModelConfig
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    train_iter: data_lib.TrainIterator
    eval_set: list
    peak: metrics.Peak  # the per-device FLOP/s MFU is against, and where it comes from


def _prepare(config: ml_collections.ConfigDict, workdir: Path) -> _Run:
    cfg_t, cfg_d = config.train, config.data
    tokenizer = load_tokenizer(cfg_d.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(f"tokenizer {cfg_d.tokenizer!r} has {tokenizer.vocab_size} ids but "
                        f"model.vocab_size={config.model.vocab_size}",
                        f"set --config.model.vocab_size={tokenizer.vocab_size} or more")
    mesh = make_mesh(config.mesh)
    model_cfg = model.ModelConfig.from_config(config)
    layout = layouts.effective(model_cfg.attention.layout, sharding.seq_shards(mesh))
    # Data first: bad data is reported before anything is compiled.
    train_iter = data_lib.TrainIterator(cfg_d, tokenizer, mesh, seed=cfg_t.seed, layout=layout)
    eval_set = list(data_lib.eval_batches(cfg_d, tokenizer, mesh, n_batches=cfg_t.eval_batches,
                                          layout=layout)) if cfg_d.eval_files else []
    return _Run(config, workdir, jax.process_index() == 0, mesh, model_cfg,
                optim.make_optimizer(config.optim, cfg_t.steps),
                optim.make_schedule(config.optim, cfg_t.steps), train_iter, eval_set,
                metrics.peak_flops(cfg_t.peak_flops, config.model.dtype))


def _restore_or_init(run: _Run, checkpointer: ckpt_lib.Checkpointer) -> tuple[TrainState, dict]:
    """The state and saved progress (data position, metric window) of the newest valid
    checkpoint, with the data iterator moved there; or a fresh state and no progress."""
    # Checkpoints are judged before the state is built: a damaged or foreign checkpoint
    # is reported without compiling anything.
    latest = checkpointer.latest_valid_step()
    if latest is not None:
        check_compatible(checkpointer.read_json(latest)[1], run.config)
    if latest:
        # Restored straight onto the shardings: no initialised state is built and dropped.
        state, progress, _ = checkpointer.restore(
            latest, abstract_state(run.model_cfg, run.tx, run.mesh))
        run.train_iter.restore(progress)
        if checkpointer.skipped and run.lead:  # the skipped steps were each warned about
            log.warning("resuming from checkpoint step %d", int(state.step))
        return state, progress
    # A step-0 checkpoint (`convert_hf.py import`, or a run stopped before its first step)
    # holds weights but no training: it starts this run like `init_from`, with this config's
    # optimizer, data order and config.json, not the writer's.
    cfg_t = run.config.train
    state = init_state(run.model_cfg, run.tx, run.mesh, cfg_t.seed)
    if latest == 0:  # just verified above: read it without a second checksum pass
        state = init_from(str(run.workdir), run.model_cfg, state, run.tx, verified_step=0)
    elif cfg_t.init_from:
        state = init_from(cfg_t.init_from, run.model_cfg, state, run.tx)
    if run.lead:
        # The workdir's copy also records the peak MFU is measured against; checkpoints keep
        # the config alone (it is read back as one).
        saved = {**config_json(run.config), "throughput": run.peak.as_row()}
        (run.workdir / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    return state, {}


def _nothing_to_train(run: _Run, start: int) -> dict:
    """Leave without a step, a save, a TensorBoard file or a plot. A run at train.steps is a
    finished run started again (e.g. a requeued job), so it is not an error."""
    steps = run.config.train.steps
    how = f"pass --config.train.steps=N with N > {start} to train further"
    if start > steps:
        raise UserError(f"the run in {run.workdir} is already at step {start} > "
                        f"train.steps={steps}", how)
    if run.lead:
        log.warning("the run in %s is already at step %d = train.steps; nothing to do (%s)",
                    run.workdir, start, how)
    return {"step": start, "stopped_by_signal": False}


def jit_train_step(config: ml_collections.ConfigDict, model_cfg: model.ModelConfig,
                   tx: optax.GradientTransformation, mesh: Mesh, state: TrainState):
    """The train step as the loop runs it: jitted once, the state donated and its shardings
    kept. `state` may be abstract (`abstract_state`): the dry run compiles this same one."""
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(
        make_train_step(model_cfg, tx, mesh, grad_accum_steps=config.optim.grad_accum_steps,
                        skip_nonfinite=config.train.skip_nonfinite),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def _jit_steps(run: _Run, state: TrainState):
    """The train step and the eval step."""
    return (jit_train_step(run.config, run.model_cfg, run.tx, run.mesh, state),
            evaluate.make_eval_step(run.model_cfg, run.mesh))


def _due(step: int, every: int, last_step: int) -> bool:
    """Logging and evaluation happen every `every` steps and at the last one."""
    return step % every == 0 or step == last_step


def _needs_state(run: _Run, step: int) -> bool:
    """Whether the host uses the state after `step` (to evaluate or save it): the step's
    state is donated to the next one, so that one must wait until this is done."""
    cfg = run.config.train
    return (step % cfg.save_every == 0 or step == cfg.steps
            or (bool(run.eval_set) and _due(step, cfg.eval_every, cfg.steps)))


def _stop_agreed(run: _Run, stop: _StopSignal, step: int) -> bool:
    """Whether to stop before step `step + 1`. The exchange steps are a function of the
    step alone, so every process exchanges at the same ones and they leave together."""
    if (jax.process_count() > 1 and step % _STOP_EXCHANGE_EVERY
            and not _needs_state(run, step)):
        return False
    return stop.agreed()


class _MetricReader:
    """Each step's metrics stay on the device until the host needs them: a log or eval
    row, a checkpoint (whose metric window must be complete), or the end. Reading them is
    what waits for the device, so the loop reads them a step late where it can."""

    def __init__(self, run: _Run, window: _MetricWindow, logger: metrics.MetricsLogger, bar,
                 start: int):
        self._cfg, self._window, self._logger, self._bar = run.config.train, window, logger, bar
        self._pending: list[tuple[int, dict]] = []
        self._step = start
        self.last: dict[str, Any] = {"step": start}
        self.compile_s: float | None = None

    def dispatch(self, step_fn, state: TrainState, batch: dict) -> TrainState:
        """Queue the next step on the device; returns at once (after compiling, the first time)."""
        t0 = time.perf_counter()
        state, m = step_fn(state, batch)
        if self.compile_s is None:
            # The first call returns once the step is compiled and queued, so its time is
            # compilation: reported on its own, not as slow first steps.
            self.compile_s = time.perf_counter() - t0
            self._window.compiled(self.compile_s)
        self._step += 1
        self._pending.append((self._step, m))
        return state

    def read(self, upto: int) -> None:
        """Read the metrics of the steps up to `upto`, writing the log rows due among them."""
        while self._pending and self._pending[0][0] <= upto:
            step, m = self._pending.pop(0)
            self._window.add(step, jax.device_get(m))
            if _due(step, self._cfg.log_every, self._cfg.steps):
                self.last.update(_log_window(self._window, step, self._logger, self._bar))


class _MetricWindow:
    """The steps since the last log row, averaged into the next row.

    The window travels with the checkpoint (`saved()`): a run resumed between two rows logs
    the same rows as one that never stopped. Throughput counts the steps this process ran
    since the last row (a resumed window's earlier steps ran in another process), over their
    time less the time spent evaluating.
    """

    def __init__(self, run: _Run, progress: dict):
        cfg = run.config
        self.steps: list[dict] = progress.get("log_window", [])
        self.skipped = int(progress.get("skipped_steps", 0))
        self._count_skipped = cfg.train.skip_nonfinite
        self._schedule = run.schedule
        self._tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        self._flops_per_token = metrics.flops_per_token(cfg.model, cfg.data.seq_len)
        self._peak = run.peak.flops
        # The first row of this process says what its MFU is against and how long the
        # step took to compile.
        self._first: dict[str, Any] = run.peak.as_row()
        self._t0, self._timed = time.perf_counter(), 0

    def compiled(self, seconds: float) -> None:
        self._first["compile_s"] = seconds
        self.exclude(seconds)

    def add(self, step: int, m: dict) -> None:
        """Count step `step`'s metrics; a non-finite step stops the run unless it is skipped."""
        self._timed += 1
        if m["finite"]:
            self.steps.append({"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])})
            return
        if not self._count_skipped:
            raise UserError(f"non-finite loss, gradient norm or update at step {step} "
                            f"(loss={m['loss']}, grad_norm={m['grad_norm']})",
                            "lower optim.lr or check the data; the last good checkpoint "
                            "is kept, or set train.skip_nonfinite=True to skip such steps")
        self.skipped += 1

    def exclude(self, seconds: float) -> None:
        self._t0 += seconds

    def row(self, step: int) -> dict:
        """The row of the window that ends at `step`; the next window starts empty."""
        tps = self._tokens_per_step * self._timed / max(time.perf_counter() - self._t0, 1e-9)
        n = max(len(self.steps), 1)
        # A window of skipped steps only has no loss: NaN, which metrics.jsonl writes as null
        # (None itself is not a number the logger accepts).
        mean = lambda k: float(sum(w[k] for w in self.steps) / n) if self.steps else float("nan")
        row = {"loss": mean("loss"), "lr": float(self._schedule(step - 1)),
               "grad_norm": mean("grad_norm"), "tokens_per_sec": tps,
               "mfu": metrics.mfu(tps, self._flops_per_token, jax.device_count(), self._peak)}
        if self._count_skipped:
            row["skipped_steps"] = self.skipped
        row.update(self._first)
        self._first = {}
        self.steps, self._t0, self._timed = [], time.perf_counter(), 0
        return row

    def saved(self) -> dict:
        """What a checkpoint keeps of the window, beside the data position."""
        return {"log_window": self.steps, "skipped_steps": self.skipped}


def _log_window(window: _MetricWindow, step: int, logger: metrics.MetricsLogger, bar) -> dict:
    had_steps = bool(window.steps)
    row = logger.log(step, window.row(step))
    bar.set_postfix(loss=f"{row['loss']:.4f}" if had_steps else "nan",
                    tok_s=f"{row['tokens_per_sec']:,.0f}")
    return row


def _evaluate(run: _Run, eval_step, params, step: int, logger: metrics.MetricsLogger,
              window: _MetricWindow) -> dict:
    t_eval = time.perf_counter()
    ev = evaluate.eval_loss(eval_step, params, run.eval_set)
    row = logger.log(step, {"eval_loss": ev["loss"], "eval_ppl": ev["ppl"]})
    window.exclude(time.perf_counter() - t_eval)  # evaluating is not training throughput
    return row
