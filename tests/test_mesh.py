"""make_mesh: axis names and sizes, -1 filling, and errors that name the numbers."""

import jax
import numpy as np
import pytest

from ringformer.config import parse_mesh_flag  # jax-free: scripts parse --mesh before jax
from ringformer.errors import ConfigError
from ringformer.mesh import AXES, make_mesh


def test_axes_and_sizes():
    mesh = make_mesh({"dp": 2, "fsdp": 1, "sp": 2, "tp": 2})
    assert mesh.axis_names == AXES == ("dp", "fsdp", "sp", "tp")
    assert dict(mesh.shape) == {"dp": 2, "fsdp": 1, "sp": 2, "tp": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize("cfg, filled", [
    ({"dp": 1, "fsdp": -1, "sp": 1, "tp": 1}, ("fsdp", 8)),
    ({"dp": 2, "fsdp": 1, "sp": -1, "tp": 2}, ("sp", 2)),
    ({"dp": -1, "fsdp": 2, "sp": 2, "tp": 1}, ("dp", 2)),
])
def test_minus_one_fills_the_remaining_devices(cfg, filled):
    mesh = make_mesh(cfg)
    assert mesh.shape[filled[0]] == filled[1]
    assert np.prod(list(mesh.shape.values())) == jax.device_count()


def test_explicit_device_subset():
    mesh = make_mesh({"dp": 1, "fsdp": 1, "sp": -1, "tp": 1}, devices=jax.devices()[:4])
    assert mesh.shape["sp"] == 4


def test_product_mismatch_names_both_numbers():
    with pytest.raises(ConfigError) as e:
        make_mesh({"dp": 2, "fsdp": 2, "sp": 2, "tp": 2})
    msg = str(e.value)
    assert "16" in msg and "8" in msg, msg
    with pytest.raises(ConfigError) as e:
        make_mesh({"dp": 1, "fsdp": 1, "sp": 2, "tp": 1})
    assert "2 devices" in str(e.value) and "8 are available" in str(e.value)


def test_fill_that_cannot_divide():
    with pytest.raises(ConfigError, match="8 is not divisible by 3"):
        make_mesh({"dp": 3, "fsdp": -1, "sp": 1, "tp": 1})


def test_bad_sizes():
    with pytest.raises(ConfigError, match="-1 in 2 axes"):
        make_mesh({"dp": -1, "fsdp": -1, "sp": 1, "tp": 1})
    with pytest.raises(ConfigError, match="must be positive"):
        make_mesh({"dp": 0, "fsdp": -1, "sp": 1, "tp": 1})


def test_parse_mesh_flag():
    assert parse_mesh_flag("sp=4,tp=2") == {"dp": 1, "fsdp": 1, "sp": 4, "tp": 2}
    assert parse_mesh_flag("dp=1, fsdp=-1") == {"dp": 1, "fsdp": -1, "sp": 1, "tp": 1}
    with pytest.raises(ConfigError, match="pp=2"):
        parse_mesh_flag("pp=2")
