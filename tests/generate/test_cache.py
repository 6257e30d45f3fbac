"""The KV cache's layout: which slot holds what, where it lives, and what each device stores."""

import jax
import numpy as np
import pytest

from ringformer import model
from ringformer.generate import api, decode
from ringformer.generate import cache as kv_cache
from ringformer.mesh import make_mesh
from ringformer.ops import layouts


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_slot_tables(layout):
    spec = kv_cache.make_spec(32, 13, 4, layout)
    assert spec.decode_len == 12 and spec.length == 44 and spec.local_len == 11
    index, is_decode = kv_cache.slot_tables(spec)
    assert sorted(index[~is_decode]) == list(range(32))
    # Device s holds ring block s of the prompt as the layout laid it out...
    per_device = index.reshape(4, 11)[:, :8]
    np.testing.assert_array_equal(per_device.reshape(-1), layouts.permutation(layout, 32, 4))
    # ...then decode tokens i = s, s + 4, s + 8: new tokens are spread round-robin.
    for i in range(12):
        owner, slot = spec.decode_slot(i)
        assert is_decode[owner * 11 + slot] and index[owner * 11 + slot] == i
    valid = np.asarray(kv_cache.valid_slots(index, is_decode, np.array([5, 32]), 2))
    assert valid.sum(axis=1).tolist() == [5 + 3, 32 + 3]


@pytest.fixture(scope="module")
def tiny():
    cfg = model.ModelConfig(vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=64, dtype="float32")
    return cfg, model.init_params(cfg, jax.random.key(0))


def _prefill(tiny, sp):
    cfg, params = tiny
    mesh = make_mesh({"dp": 1, "fsdp": 1, "sp": sp, "tp": 1}, devices=jax.devices()[:sp])
    placed = decode.place_params(cfg, params, mesh)
    run_cfg, s = api.prefill_config(cfg, 64, sp)
    spec = kv_cache.make_spec(s, 33, sp, "zigzag")
    inputs = decode.prefill_inputs(np.ones((2, s), np.int32), np.array([10, 64]), spec, mesh)
    compiled = decode.prefill_jit.lower(run_cfg, spec, mesh, placed, *inputs).compile()
    cache, _ = compiled(placed, *inputs)
    return compiled.memory_analysis(), cache


def test_device_holds_its_share_of_the_cache(tiny):
    """Per device, the compiled prefill's outputs shrink by exactly 1 - 1/sp of the cache:
    each device stores its own slice and nothing of anyone else's."""
    one, cache1 = _prefill(tiny, 1)
    four, cache4 = _prefill(tiny, 4)
    total = kv_cache.cache_bytes(cache4)
    assert total == kv_cache.cache_bytes(cache1)
    assert one.output_size_in_bytes - four.output_size_in_bytes == total - total // 4
    for shard in cache4.k.addressable_shards:
        assert shard.data.nbytes == cache4.k.nbytes // 4
    # The same keys, in each device's slot order: the prefill part of device s is block s.
    idx4, dec4 = kv_cache.slot_tables(cache4.spec)
    k1, k4 = np.asarray(cache1.k), np.asarray(cache4.k)  # sp=1: prompt slot j is position j
    np.testing.assert_allclose(k4[:, :, ~dec4], k1[:, :, idx4[~dec4]],
                               rtol=1e-5, atol=1e-6)
