"""The device mesh: axes ('dp', 'fsdp', 'sp', 'tp') built from `config.mesh`."""

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
