"""The train state: its shape and shardings, how it is born (fresh, or from another run's or
a Hugging Face model's parameters), and how a saved run is restored onto any mesh.

Evaluation, conversion and the benchmarks use this module without the training loop.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ringformer import model, optim, sharding
from ringformer.errors import CheckpointError
from ringformer.mesh import make_mesh
from ringformer.train import checkpoint as ckpt_lib
from ringformer.train.workdir import require_checkpoints


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: the number of optimizer steps taken
    params: Any
    opt_state: Any


def state_shardings(model_cfg: model.ModelConfig, tx, mesh, abstract_params) -> TrainState:
    """Shardings of the whole train state: parameters from the rules table, optimizer moments
    like the parameter they belong to, scalars (step, counts) replicated."""
    params = sharding.param_shardings(abstract_params, model.param_logical_axes(model_cfg), mesh)
    rep = sharding.replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params),
                                params, transform_non_params=lambda _: rep)
    return TrainState(rep, params, opt)


def abstract_state(model_cfg: model.ModelConfig, tx, mesh) -> TrainState:
    """Shapes, dtypes and shardings of the train state, with nothing allocated: the target a
    checkpoint is restored onto (on any mesh)."""
    params = jax.eval_shape(functools.partial(model.init_params, model_cfg), jax.random.PRNGKey(0))
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, state_shardings(model_cfg, tx, mesh, params))


def init_state(model_cfg: model.ModelConfig, tx, mesh, seed: int) -> TrainState:
    """The state is born sharded: shapes from eval_shape, shardings from the rules table."""
    rng = jax.random.PRNGKey(seed)
    init = functools.partial(model.init_params, model_cfg)
    shardings = state_shardings(model_cfg, tx, mesh, jax.eval_shape(init, rng))
    params = jax.jit(init, out_shardings=shardings.params)(rng)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step, params, opt_state)


def init_from(source: str, model_cfg: model.ModelConfig, state: TrainState, tx, *,
               verified_step: int | None = None) -> TrainState:
    """Start from another run's or a Hugging Face model's parameters, with a fresh optimizer.

    Only the parameters are taken: a context-extension stage changes RoPE theta, context and
    mesh, so everything else comes from this run's config. `verified_step`: a step of the
    run `source` whose checksums the caller has just verified (its newest valid one).
    """
    path = Path(source)
    if (path / "checkpoints").is_dir():
        params = restore_run(path, step=verified_step,
                             verify_checksums=verified_step is None)[1].params
    elif (path / "config.json").is_file():
        from ringformer.hf import mapping as hf
        params = hf.load_llama(str(path))[1]
    else:
        raise CheckpointError(f"train.init_from={source!r} is neither a ringformer workdir nor a "
                              "Hugging Face model directory",
                              "point it at a workdir with checkpoints/ or a dir with config.json")
    same_tree = jax.tree.structure(params) == jax.tree.structure(state.params)
    if not same_tree or [tuple(p.shape) for p in jax.tree.leaves(params)] != [
            x.shape for x in jax.tree.leaves(state.params)]:
        raise CheckpointError(f"train.init_from={source!r} holds parameters of another shape "
                              "than this config's model",
                              "match model.dim/n_layers/n_heads/n_kv_heads/ffn_dim/vocab_size to it")
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    params = jax.tree.map(lambda x, p, s: jax.device_put(jnp.asarray(p, x.dtype), s),
                          state.params, params, shardings)
    opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda x: x.sharding,
                                                            state.opt_state))(params)
    return TrainState(state.step, params, opt_state)


def config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def check_compatible(saved: dict, config: ml_collections.ConfigDict) -> None:
    mine = config_json(config)["model"]
    theirs = saved.get("model", {})
    diff = sorted(k for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                              "tie_embeddings") if theirs.get(k) != mine.get(k))
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {theirs.get(k)} vs config {mine.get(k)}"
                           for k in diff)
        raise CheckpointError(f"the checkpoint in the workdir was written by another model ({detail})",
                              "use the original config or a fresh --workdir")


def restore_run(workdir: str | Path, mesh_cfg=None, *, step: int | None = None,
                verify_checksums: bool = True) -> tuple[ml_collections.ConfigDict, TrainState]:
    """Load a run's config and train state from `workdir` (newest valid step, or `step`).

    `mesh_cfg` (dp/fsdp/sp/tp, -1 fills) places the state on another mesh than the one it was
    trained on, e.g. more sequence parallelism for long-context evaluation.
    """
    require_checkpoints(workdir, "point --workdir at a run that saved a checkpoint")
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=1 << 30, verify_checksums=verify_checksums)
    try:
        step = checkpointer.latest_valid_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {Path(workdir) / 'checkpoints'}",
                                  "train first, or point --workdir at a run that saved one")
        config = ml_collections.ConfigDict(checkpointer.read_json(step)[1])
        if mesh_cfg is not None:
            config.mesh.update(dict(mesh_cfg))
        mesh = make_mesh(config.mesh)
        model_cfg = model.ModelConfig.from_config(config)
        tx = optim.make_optimizer(config.optim, config.train.steps)
        target = abstract_state(model_cfg, tx, mesh)
        state, _, _ = checkpointer.restore(step, target)
    finally:
        checkpointer.close()
    return config, state
