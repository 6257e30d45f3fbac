"""What the accelerators can do: peak dense matmul FLOP/s and memory per device kind.

MFU is only comparable with published numbers when it is against the datasheet peak of the
device the run is on, in the dtype the model computes in; docs/metrics.md lists the sources of
every number here. Kinds are matched on `jax.Device.device_kind` (e.g. "NVIDIA H100 80GB
HBM3", "TPU v5 lite"); a kind not in the table (a CPU, a new card) has no entry, and the
caller measures instead.
"""

from __future__ import annotations

import dataclasses
import re

GiB = 2**30
GB = 10**9


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    name: str  # the name the sources use
    bf16: float  # dense bf16 FLOP/s, no structured sparsity
    # float32 matmuls at XLA's default precision: TF32 tensor cores on NVIDIA (Ampere on),
    # one bf16 pass of the MXU on TPU (the same rate as bf16).
    fp32: float
    memory_bytes: int  # HBM per device (per chip on TPU)


# Ordered: the first pattern that matches the lower-cased device kind wins (so "h100 nvl"
# before "h100", "tpu v5 lite" before "tpu v5").
_TABLE: tuple[tuple[str, DeviceSpec], ...] = (
    (r"nvidia h100 nvl", DeviceSpec("H100 NVL", 835.5e12, 417.5e12, 94 * GB)),
    (r"nvidia h100 pcie.*", DeviceSpec("H100 PCIe", 756e12, 378e12, 80 * GB)),
    (r"nvidia h100.*", DeviceSpec("H100 SXM", 989.4e12, 494.7e12, 80 * GB)),
    (r"nvidia h200 nvl", DeviceSpec("H200 NVL", 835.5e12, 417.5e12, 141 * GB)),
    (r"nvidia h200.*", DeviceSpec("H200 SXM", 989.4e12, 494.7e12, 141 * GB)),
    (r"nvidia a100.*40gb.*", DeviceSpec("A100 40GB", 312e12, 156e12, 40 * GB)),
    (r"nvidia a100.*", DeviceSpec("A100 80GB", 312e12, 156e12, 80 * GB)),
    (r"nvidia l4", DeviceSpec("L4", 121e12, 60e12, 24 * GB)),
    (r"tpu v4", DeviceSpec("TPU v4", 275e12, 275e12, 32 * GiB)),
    (r"tpu v5 ?(lite|e)", DeviceSpec("TPU v5e", 197e12, 197e12, 16 * GiB)),
    (r"tpu v5p?", DeviceSpec("TPU v5p", 459e12, 459e12, 95 * GiB)),
    (r"tpu v6 ?(lite|e)", DeviceSpec("TPU v6e", 918e12, 918e12, 32 * GiB)),
)


def device_spec(device_kind: str) -> DeviceSpec | None:
    """The table's entry for a `jax.Device.device_kind`, or None for a kind it lacks."""
    kind = " ".join(device_kind.lower().split())
    for pattern, spec in _TABLE:
        if re.fullmatch(pattern, kind):
            return spec
    return None


def peak_for_dtype(spec: DeviceSpec, dtype: str) -> float:
    """The peak a model computing in `dtype` can reach: bf16 (and fp16, the same tensor-core
    rate on these devices) or float32."""
    return spec.fp32 if str(dtype) in ("float32", "fp32") else spec.bf16


def device_memory_bytes(device) -> tuple[int, str]:
    """(bytes one device can hold, where that number comes from).

    The runtime's own limit where it reports one (GPUs, TPUs: what XLA's allocator may use),
    else the table's HBM size, else, for CPU devices, the host's memory shared among the
    local devices (virtual CPU devices all live in one process's memory)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # compile-only and CPU devices have none; some raise instead
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "runtime"
    spec = device_spec(device.device_kind)
    if spec is not None:
        return spec.memory_bytes, f"table: {spec.name}"
    import os

    import jax

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n_local = max(1, sum(1 for d in jax.local_devices() if d.platform == device.platform))
    return host // n_local, f"host memory / {n_local} local devices"
