"""Will this config train on this hardware? Compile its step and read the answer off XLA.

`dry_run(config)` builds the training step exactly as `train_and_evaluate` does (same
jitted function, same shardings, same mesh) on abstract arrays and compiles it, without a
step, a data file or a workdir. Memory per device comes from `compiled.memory_analysis()`,
the same numbers XLA's allocator will need; with `target="h100"` the step is compiled for
compile-only GPU devices (`tools.hlo_overlap.gpu_devices`), so a laptop can answer for a
cluster it does not have.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ringformer import model, optim, sharding
from ringformer.config import validate
from ringformer.data.packing import FIELDS
from ringformer.errors import ConfigError
from ringformer.mesh import make_mesh, mesh_shape
from ringformer.train import hardware, metrics
from ringformer.train.loop import jit_train_step
from ringformer.train.state import abstract_state

GiB = 2**30


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch as the data pipeline places it: [batch, seq] on the batch sharding."""
    shape = (int(config.data.global_batch_size), int(config.data.seq_len))
    bsh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=bsh) for k in FIELDS}


def _bytes_per_device(tree) -> int:
    """Bytes of one device's shards of an abstract, sharded tree (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def _devices(config: ml_collections.ConfigDict, target: str | None, n_devices: int | None):
    if target is None:
        return jax.devices()
    from ringformer.tools import hlo_overlap

    hlo_overlap.gpu_memory_bytes(target)  # an unknown target is refused before anything else
    if n_devices is None:
        sizes = [int(config.mesh[a]) for a in ("dp", "fsdp", "sp", "tp")]
        if -1 in sizes:
            raise ConfigError("with --target the mesh's -1 has no device count to fill",
                              "pass --devices N (the number of GPUs to compile for)")
        n_devices = math.prod(sizes)
    mesh_shape(config.mesh, n_devices)  # the mesh must fit the count before a slow compile
    return hlo_overlap.gpu_devices(target, n_devices)


def dry_run(config: ml_collections.ConfigDict, *, target: str | None = None,
            n_devices: int | None = None, device_memory_bytes: int | None = None) -> dict:
    """Compile `config`'s training step and report its memory and FLOPs per device.

    `target`: a compile-only GPU (`ringformer/gpu_targets/<name>.txtpb`) instead of this
    machine's devices, `n_devices` of them (default: the mesh's product). The budget is
    `device_memory_bytes` if given, else the device's (see `hardware.device_memory_bytes`).
    """
    devices = _devices(config, target, n_devices)
    validate(config, len(devices))
    mesh = make_mesh(config.mesh, devices)
    model_cfg = model.ModelConfig.from_config(config)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    state = abstract_state(model_cfg, tx, mesh)

    t0 = time.perf_counter()
    compiled = jit_train_step(config, model_cfg, tx, mesh, state).lower(
        state, abstract_batch(config, mesh)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if device_memory_bytes is not None:
        budget, budget_source = int(device_memory_bytes), "given"
    elif target is not None:
        from ringformer.tools import hlo_overlap
        budget, budget_source = hlo_overlap.gpu_memory_bytes(target), f"target: {target}"
    else:
        budget, budget_source = hardware.device_memory_bytes(devices[0])
    return _report(config, mesh, state, mem, budget, budget_source, compile_s,
                   devices[0].device_kind)


def step_bytes(mem) -> int:
    """Bytes one device holds while the step runs: its inputs, its temporaries, and the
    outputs that do not reuse a donated input (the metrics)."""
    outputs = max(int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes), 0)
    return int(mem.argument_size_in_bytes) + int(mem.temp_size_in_bytes) + outputs


def _report(config, mesh, state, mem, budget: int, budget_source: str, compile_s: float,
            device_kind: str) -> dict[str, Any]:
    total = step_bytes(mem)
    tokens = int(config.data.global_batch_size) * int(config.data.seq_len)
    flops = metrics.flops_per_token(config.model, int(config.data.seq_len)) * tokens
    return {
        "fits": total <= budget,
        "bytes_per_device": total,
        "device_memory_bytes": budget,
        "device_memory_source": budget_source,
        "spare_bytes": budget - total,
        "param_bytes": _bytes_per_device(state.params),
        "optimizer_bytes": _bytes_per_device(state.opt_state),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "flops_per_step": flops,
        "flops_per_step_per_device": flops / mesh.size,
        "tokens_per_step": tokens,
        "device_kind": device_kind,
        "n_devices": int(mesh.size),
        "mesh": {a: int(n) for a, n in mesh.shape.items()},
        "compile_s": round(compile_s, 2),
    }


def _size(n: float) -> str:
    if abs(n) >= GiB / 10:
        return f"{n / GiB:,.2f} GiB"
    return f"{n / 2**20:,.1f} MiB" if abs(n) >= 2**20 / 10 else f"{n / 1024:,.1f} KiB"


def format_report(r: dict) -> str:
    """The dry run as a few lines for people."""
    mesh = " ".join(f"{a}={n}" for a, n in r["mesh"].items())
    share = r["bytes_per_device"] / max(r["device_memory_bytes"], 1)
    verdict = (f"fits: {share:.0%} of device memory, {_size(r['spare_bytes'])} to spare"
               if r["fits"] else
               f"does not fit: {_size(-r['spare_bytes'])} more than the device has ({share:.0%})")
    other = r["argument_bytes"] - r["param_bytes"] - r["optimizer_bytes"]
    return "\n".join([
        f"compiled the training step for {r['n_devices']} x {r['device_kind']} "
        f"(mesh {mesh}) in {r['compile_s']:.1f} s; per device:",
        f"  parameters           {_size(r['param_bytes']):>14}",
        f"  optimizer state      {_size(r['optimizer_bytes']):>14}",
        f"  batch and step       {_size(other):>14}",
        f"  activations (temp)   {_size(r['temp_bytes']):>14}",
        f"  total                {_size(r['bytes_per_device']):>14} of "
        f"{_size(r['device_memory_bytes'])} ({r['device_memory_source']})",
        f"model FLOPs per step   {r['flops_per_step']:.3e} ({r['flops_per_step_per_device']:.3e} "
        f"per device, {r['tokens_per_step']:,} tokens)",
        f"verdict: {verdict}",
    ])

