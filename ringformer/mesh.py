"""The device mesh: axes ('dp', 'fsdp', 'sp', 'tp') built from `config.mesh`.

Device order (docs/multihost.md): the axes are laid out with the last varying fastest, tp,
then sp, then fsdp, then dp, over the devices taken host by host (process index, then device
id). The innermost axes therefore fill one host's devices first: with 8 devices per host,
tp·sp <= 8 keeps the ring and the tensor-parallel all-reduces on the host's fast links and
only fsdp and dp cross hosts; a larger tp·sp makes the sp ring cross hosts. On a TPU slice
the chips' torus decides instead (JAX's `create_device_mesh`), which also puts the last axes
on the nearest chips.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

# parse_mesh_flag lives with the config (no jax import), so scripts parse --mesh before jax.
from ringformer.config import MESH_AXES, mesh_shape
from ringformer.config import parse_mesh_flag as parse_mesh_flag

AXES = MESH_AXES


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the 4-axis mesh; one entry of `mesh_cfg` may be -1 to fill the remaining devices.

    `mesh_cfg` is anything indexable by axis name (ConfigDict, dict). Raises ConfigError when
    the sizes do not multiply to the device count. Devices are laid out by `device_grid`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    return Mesh(device_grid(devices, tuple(sizes[a] for a in AXES)), AXES)


def host_order(devices: Sequence) -> list:
    """Devices host by host: by process index, then id (the order that keeps a host's devices
    adjacent, whatever order the caller listed them in)."""
    return sorted(devices, key=lambda d: (getattr(d, "process_index", 0), d.id))


def device_grid(devices: Sequence, shape: tuple[int, ...]) -> np.ndarray:
    """`devices` as an array of `shape` ((dp, fsdp, sp, tp) sizes), last axis fastest.

    GPUs and CPUs go in `host_order`; that is the whole placement rule, so which axes cross
    hosts follows from the sizes alone (`crossing_axes`). TPUs follow the physical torus.
    """
    if getattr(devices[0], "platform", "") == "tpu":
        try:
            # Not loaded by `import jax`; imported only where it decides something.
            from jax.experimental import mesh_utils

            return mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            pass  # an irregular slice (a subset of chips): host order is the sane fallback
    return np.asarray(host_order(devices), dtype=object).reshape(shape)


def crossing_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes along which neighbouring devices belong to different processes (hosts):
    their collectives go over the slower inter-host network."""
    procs = np.vectorize(lambda d: getattr(d, "process_index", 0), otypes=[int])(mesh.devices)
    return tuple(a for i, a in enumerate(mesh.axis_names)
                 if (procs != np.take(procs, [0], axis=i)).any())
