"""Does the ring's communication run under its compute? Read it off the compiled program.

The paper's claim that the ring adds no overhead rests on each step's key/value transfer
overlapping that step's compute. In XLA that means every collective-permute is split into an
asynchronous start/done pair with compute (fusions, loops, GEMM custom calls) scheduled between
the two. `permute_overlap` reads that from a compiled module's scheduled HLO text;
`ring_overlap` compiles ring attention's gradient and reports it.

The program can be compiled for GPUs this machine does not have: `gpu_devices` builds
compile-only devices from a target description (`ringformer/gpu_targets/<name>.txtpb`) through
the CUDA PJRT plugin, so the GPU schedule can be checked on a CPU-only host.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ringformer.attention import attention_in_layout
from ringformer.errors import UserError
from ringformer.mesh import make_mesh

GPU_TARGETS = Path(__file__).resolve().parents[1] / "gpu_targets"  # ringformer/gpu_targets/

# Ops that do real work on the device; anything else between a start and its done (tuples,
# bitcasts, parameters) does not hide a transfer, and neither does a compute op whose result is
# under 4 KiB (a loop counter's increment, an iota of indices).
_COMPUTE_OPS = {"fusion", "while", "custom-call", "call", "conditional", "dot", "convolution"}
_MIN_COMPUTE_BYTES = 4096
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<type>.*?)\b(?P<op>[a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8}


def _array_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        total += _BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def permute_overlap(hlo_text: str) -> dict:
    """Every collective-permute of a scheduled HLO module, and what runs while it is in flight.

    Returns {"async_permute_pairs", "sync_permutes", "pairs_with_compute_between", "permutes"};
    each of "permutes" is {"computation", "pass" (forward|backward), "async", "bytes",
    "compute_between"}: the names of the compute ops scheduled between start and done (none for
    a synchronous permute). The pass comes from JAX's op names: the backward is traced under `transpose(`.
    """
    rows, computation, open_starts = [], "", {}
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and "{" in line:  # a computation's header
            words = line.split()
            computation = words[1 if words[0] == "ENTRY" else 0].lstrip("%")
            open_starts = {}
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        op = m["op"]
        if op in ("collective-permute", "collective-permute-start"):
            row = {"computation": computation,
                   "pass": "backward" if "transpose(" in line else "forward",
                   "async": op.endswith("-start"), "compute_between": []}
            # A start's type is (operands, results[, contexts]); count the operands once.
            row["bytes"] = _array_bytes(m["type"]) // (2 if row["async"] else 1)
            rows.append(row)
            if row["async"]:
                open_starts[m["name"]] = row
        elif op == "collective-permute-done":
            started = re.search(r"collective-permute-done\(%([\w.\-]+)\)", line)
            open_starts.pop(started[1] if started else "", None)
        elif op in _COMPUTE_OPS and _array_bytes(m["type"]) >= _MIN_COMPUTE_BYTES:
            for row in open_starts.values():
                row["compute_between"].append(m["name"])
    pairs = [r for r in rows if r["async"]]
    return {"async_permute_pairs": len(pairs), "sync_permutes": len(rows) - len(pairs),
            "pairs_with_compute_between": sum(1 for r in pairs if r["compute_between"]),
            "permutes": rows}


def gpu_targets() -> list[str]:
    return sorted(p.stem for p in GPU_TARGETS.glob("*.txtpb"))


def _target_path(target: str) -> Path:
    path = GPU_TARGETS / f"{target}.txtpb"
    if not path.exists():
        raise UserError(f"unknown GPU target {target!r}", f"use one of {', '.join(gpu_targets())}")
    return path


def gpu_memory_bytes(target: str) -> int:
    """The card's memory as its target description gives it."""
    found = re.search(r"device_memory_size:\s*(\d+)", _target_path(target).read_text())
    return int(found[1])


def gpu_devices(target: str, n: int) -> list:
    """`n` compile-only devices of GPU `target`, one host; needs the CUDA PJRT plugin, not a GPU."""
    path = _target_path(target)
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{n}",
                                            target_config=path.read_text())
    except NotImplementedError as e:
        raise UserError("compiling for a GPU target needs JAX's CUDA plugin, which is not installed",
                        f"pip install 'jax-cuda12-plugin[with-cuda]=={jax.__version__}'") from e
    return list(topo.devices)


def ring_overlap(devices: list, *, seq: int = 4096, heads: int = 8, head_dim: int = 64,
                 dtype=jnp.float32, layout: str = "zigzag", chunk: int = 512,
                 pipeline_grads: bool | None = None, kernel: str = "xla") -> dict:
    """Compile the gradient of causal ring attention over `devices` (one ring of all of them)
    and report its collective-permutes. `seq` is the global length; nothing is executed.
    The inputs are taken as already in `layout`, as the model passes them."""
    mesh = make_mesh({"dp": 1, "fsdp": 1, "sp": len(devices), "tp": 1}, devices)
    spec = jax.ShapeDtypeStruct((1, seq, heads, head_dim), dtype,
                                sharding=NamedSharding(mesh, PartitionSpec(None, "sp")))

    def loss(q, k, v):
        out = attention_in_layout(q, k, v, mesh=mesh, impl="ring", layout=layout, q_chunk=chunk,
                                  kv_chunk=chunk, pipeline_grads=pipeline_grads, kernel=kernel)
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile().as_text()
    report = permute_overlap(text)
    for p in ("forward", "backward"):
        mine = [r for r in report["permutes"] if r["pass"] == p]
        report[p] = {"permutes": len(mine), "overlapped": sum(1 for r in mine if r["compute_between"]),
                     "bytes": [r["bytes"] for r in mine]}
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "sp": len(devices), "seq": seq, "dtype": jnp.dtype(dtype).name,
            "pipeline_grads": pipeline_grads, "kernel": kernel, **report}
