"""The device mesh: axes ('dp', 'fsdp', 'sp', 'tp') built from `config.mesh`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from ringformer.config import mesh_shape

AXES = ("dp", "fsdp", "sp", "tp")


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the 4-axis mesh; one entry of `mesh_cfg` may be -1 to fill the remaining devices.

    `mesh_cfg` is anything indexable by axis name (ConfigDict, dict). Raises ConfigError when
    the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
        # Lets XLA put sp/tp neighbours on the fastest links of a real accelerator topology.
        # (Imported here: `jax.experimental.mesh_utils` is not loaded by `import jax`.)
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # virtual CPU devices or an irregular slice: plain order is fine there
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def parse_mesh_flag(text: str) -> dict[str, int]:
    """Parse `dp=1,fsdp=1,sp=4,tp=1` (missing axes default to 1, one may be -1)."""
    from ringformer.errors import ConfigError

    sizes = {a: 1 for a in AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.lstrip("-").isdigit():
            raise ConfigError(f"bad --mesh entry {part!r}", "write e.g. --mesh dp=1,fsdp=1,sp=4,tp=1")
        sizes[name] = int(value)
    return sizes


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Start JAX's multi-controller runtime when asked; on one process this does nothing.

    With explicit flags it connects to the coordinator; with none, JAX's own auto-detection
    (SLURM, TPU pods) applies when the environment shows a cluster. CPU processes talk over gloo.
    """
    import os

    explicit = coordinator_address is not None or (num_processes or 1) > 1
    cluster = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"))
    if not explicit and not cluster:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
