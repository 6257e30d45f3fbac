"""The logical-axis rules: specs, fitting to odd shapes, sequence chunking that stays local."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ringformer import model, sharding
from ringformer.mesh import make_mesh


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"dp": 1, "fsdp": 2, "sp": 2, "tp": 2})


def test_rules_table():
    assert sharding.logical_to_spec(("batch", "length", "embed")) == P(("dp", "fsdp"), "sp", None)
    # Parameters shard "embed" over fsdp and sp (ZeRO-3); activations keep it whole.
    fsdp_sp = ("fsdp", "sp")
    assert sharding.logical_to_spec(("embed", "mlp"), params=True) == P(fsdp_sp, "tp")
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), params=True) == P(
        None, fsdp_sp, "tp", None)
    assert sharding.logical_to_spec(("vocab", "embed"), params=True) == P("tp", fsdp_sp)


def test_fitted_spec_replicates_what_does_not_divide(mesh):
    # vocab 259 (the byte tokenizer) does not split over tp=2: it stays whole, embed still splits
    assert sharding.fitted_spec(("vocab", "embed"), (259, 64), mesh) == P(None, ("fsdp", "sp"))
    assert sharding.fitted_spec(("vocab", "embed"), (256, 64), mesh) == P("tp", ("fsdp", "sp"))
    # 6 does not split 4 ways over fsdp x sp, but does over fsdp alone
    assert sharding.fitted_spec(("vocab", "embed"), (256, 6), mesh) == P("tp", "fsdp")


def test_param_shardings_follow_model_axes(mesh):
    cfg = model.ModelConfig(vocab_size=259, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=96)
    abstract = jax.eval_shape(model.init_params, cfg, jax.random.key(0))
    sh = sharding.param_shardings(abstract, model.param_logical_axes(cfg), mesh)
    fsdp_sp = ("fsdp", "sp")
    assert sh["layers"]["wq"].spec == P(None, fsdp_sp, "tp", None)
    assert sh["layers"]["w_down"].spec == P(None, "tp", fsdp_sp)
    assert sh["embed"].spec == P(None, fsdp_sp)
    assert sh["lm_head"].spec == P(fsdp_sp, None)
    assert sh["final_norm"].spec == P(None)


def test_batch_sharding(mesh):
    x = jax.device_put(np.zeros((4, 64), np.int32), sharding.batch_sharding(mesh))
    assert x.sharding.shard_shape(x.shape) == (2, 32)


def test_constrain_without_mesh_is_identity():
    x = jnp.ones((2, 8, 4))
    assert sharding.constrain(x, ("batch", "length", "embed"), None) is x


@pytest.mark.parametrize("seq, chunk, sp, n", [(64, 8, 1, 8), (64, 8, 4, 2), (64, 64, 4, 1),
                                               (64, 24, 1, 8), (10, 4, 1, 5)])
def test_num_seq_chunks(seq, chunk, sp, n):
    mesh = make_mesh({"dp": 1, "fsdp": -1, "sp": sp, "tp": 1}) if sp > 1 else None
    assert sharding.num_seq_chunks(seq, chunk, mesh) == n


def test_split_merge_round_trip_and_strides():
    x = jnp.arange(2 * 12 * 3).reshape(2, 12, 3)
    chunks = sharding.split_seq_chunks(x, 4)
    assert chunks.shape == (4, 2, 3, 3)
    # chunk j holds tokens j, j + 4, j + 8: every chunk spans the whole sequence
    np.testing.assert_array_equal(chunks[1, 0, :, 0], x[0, [1, 5, 9], 0])
    np.testing.assert_array_equal(sharding.merge_seq_chunks(chunks), x)


def test_chunks_stay_on_their_sequence_shard(mesh):
    """Splitting a seq-sharded array needs no communication: each chunk stays sharded on sp."""
    x = jax.device_put(jnp.arange(4 * 64, dtype=jnp.float32).reshape(4, 64),
                       jax.sharding.NamedSharding(mesh, P(("dp", "fsdp"), "sp")))
    chunks = jax.jit(lambda x: sharding.split_seq_chunks(x, 4))(x)
    assert chunks.sharding.shard_shape(chunks.shape) == (4, 2, 8)
    hlo = jax.jit(lambda x: sharding.split_seq_chunks(x, 4)).lower(x).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo and "collective-permute" not in hlo
