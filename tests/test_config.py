"""ringformer.config: defaults written once, typed sections, and the rules other modules share.

How each bad value of a whole config is reported is tested with the trainer
(tests/train/test_loop.py, validation); here, the pieces those checks are built from.
"""

import dataclasses
import re

import pytest

from ringformer import config
from ringformer.config import AttentionConfig, ModelConfig, OptimConfig, default_config
from ringformer.errors import ConfigError


def test_default_config_is_the_sections_defaults():
    c = default_config()
    assert set(c) == set(config.SECTIONS)
    for name, cls in config.SECTIONS.items():
        assert dict(c[name]) == cls.defaults(), name
        typed = cls.from_section(c[name], name)
        assert typed == cls(), name  # and every default passes the section's own checks


def test_a_section_with_a_missing_key_is_refused():
    partial = {k: v for k, v in default_config().optim.items() if k != "eps"}
    with pytest.raises(ConfigError, match=re.escape("config key optim.eps is missing")):
        OptimConfig.from_section(partial, "optim")


def test_model_config_is_hashable_and_holds_its_attention():
    c = default_config()
    c.attention.layout, c.model.dim = "striped", 128
    a, b = ModelConfig.from_config(c), ModelConfig.from_config(c)
    assert a == b and hash(a) == hash(b)  # a static jit argument
    assert a.attention == AttentionConfig(layout="striped")
    assert a.with_attention(layout="zigzag").attention.layout == "zigzag"
    assert a.attention.layout == "striped"  # frozen: with_attention makes a new one
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.attention.layout = "zigzag"


@pytest.mark.parametrize("call,message", [
    (lambda: config.check_heads(6, 4), "model.n_heads=6 is not divisible by model.n_kv_heads=4"),
    (lambda: config.check_heads(6, 4, label=""), "n_heads=6 is not divisible by n_kv_heads=4"),
    (lambda: config.check_tp(2, 4, n_heads=4),
     "model.n_kv_heads=2 (and n_heads=4) not divisible by mesh.tp=4"),
    (lambda: config.check_tp(4, 4, n_heads=4, ffn_dim=6), "model.ffn_dim=6 not divisible by mesh.tp=4"),
    (lambda: config.check_batch(6, 4), "data.global_batch_size=6 is not divisible by dp*fsdp=4"),
    (lambda: config.check_batch(4, 2, accum=4),
     "data.global_batch_size=4 is not divisible by dp*fsdp=2 x grad_accum_steps=4"),
    (lambda: config.check_seq(30, 4, label="seq"), "seq=30 is not divisible by mesh.sp=4"),
])
def test_shared_rules_name_the_numbers(call, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        call()


def test_shared_rules_pass_what_fits():
    config.check_heads(8, 2)
    config.check_tp(2, 2, n_heads=8, ffn_dim=6)
    config.check_batch(8, 2, accum=4)
    assert config.check_seq(32, 4) == 8


@pytest.mark.parametrize("changes,message", [
    (dict(n_kv_heads=3), "model.n_heads=8 is not divisible by model.n_kv_heads=3"),
    (dict(dim=24, n_heads=8), "head_dim=3 is odd"),
    (dict(rope_theta=0.0), "model.rope_theta=0.0 must be positive"),
    (dict(mlp_chunk=0), "model.mlp_chunk=0 must be positive"),
    (dict(smear_keys=True, smear_tokens=3), "model.smear_tokens=3 is not 1 or 2"),
    (dict(smear_tokens=2), "model.smear_tokens=2 without model.smear_keys"),
    (dict(logn_base=1), "model.logn_base=1 is not 0 or at least 2"),
    (dict(logn_base=-4096), "model.logn_base=-4096 is not 0 or at least 2"),
])
def test_model_config_runs_the_config_checks(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        dataclasses.replace(ModelConfig(), **changes)


def test_attention_config_runs_the_config_checks():
    with pytest.raises(ConfigError, match=re.escape("attention.kernel='cuda' is not one of xla, pallas")):
        AttentionConfig(kernel="cuda")
    with pytest.raises(ConfigError, match=re.escape("attention.q_chunk=0 must be positive")):
        AttentionConfig(q_chunk=0)


def test_zigzag_needs_two_whole_pieces_per_device():
    c = default_config()
    c.mesh.update(fsdp=1, sp=4)
    c.data.seq_len, c.data.global_batch_size = 36, 1  # 9 tokens a device: no zigzag halves
    c.attention.q_chunk = c.attention.kv_chunk = 9
    c.model.mlp_chunk = c.model.loss_chunk = 9
    with pytest.raises(ConfigError, match=re.escape("does not split into the 8 pieces of the zigzag")):
        config.validate(c, 4)
    c.attention.layout = "contiguous"
    config.validate(c, 4)
