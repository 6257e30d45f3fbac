"""ringformer.limits: numbers that pass the type check but cannot be computed with."""

import re

import pytest

from ringformer import limits
from ringformer.config import check_config, default_config
from ringformer.errors import ConfigError


@pytest.mark.parametrize("key,value,message", [
    # The serious case: lr=inf trained one step into all-NaN parameters and saved them.
    ("optim.lr", float("inf"), "optim.lr=inf is not a finite float32 number"),
    ("optim.lr", float("nan"), "optim.lr=nan is not a finite float32 number"),
    ("optim.lr", 1e39, "optim.lr=1e+39 is not a finite float32 number"),  # inf as a float32
    ("optim.clip_norm", float("inf"), "optim.clip_norm=inf is not a finite"),
    ("model.rope_theta", float("inf"), "model.rope_theta=inf is not a finite"),
    ("model.init_std", float("nan"), "model.init_std=nan is not a finite"),
    ("train.peak_flops", float("-inf"), "train.peak_flops=-inf is not a finite"),
    ("optim.b1", 1.0, "optim.b1=1.0 is outside [0.0, 1.0)"),
    ("optim.b2", -0.5, "optim.b2=-0.5 is outside [0.0, 1.0)"),
    ("optim.min_lr_ratio", 2.0, "optim.min_lr_ratio=2.0 is outside [0.0, 1.0]"),
    ("optim.weight_decay", -0.1, "optim.weight_decay=-0.1 is negative"),
    ("optim.eps", -1e-8, "optim.eps=-1e-08 is negative"),
    ("train.seed", 2**31, f"train.seed={2**31} does not fit a 32-bit integer"),
    ("model.dim", 2**40, f"model.dim={2**40} does not fit a 32-bit integer"),
    ("train.steps", -(2**63), "does not fit a 32-bit integer"),
])
def test_unusable_numbers_are_refused(key, value, message):
    config = default_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(config)


def test_a_step_past_this_machine_is_refused_before_anything_is_built():
    config = default_config()
    assert limits.step_bytes(config) < 2**30
    limits.check_fits(config, memory=2**30)
    config.model.dim = 2**16
    with pytest.raises(ConfigError, match=r"model.dim=65536, .* needs at least \d+\.\d GiB per step, "
                                          r"but this machine has 1\.0 GiB"):
        limits.check_fits(config, memory=2**30)


@pytest.mark.parametrize("smear,smear_tokens", [(False, 1), (True, 1), (True, 2)])
def test_param_count_matches_the_model(smear, smear_tokens):
    import jax

    from ringformer import model
    from ringformer.config import ModelConfig

    config = default_config()
    config.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=259,
                        smear_keys=smear, smear_tokens=smear_tokens)
    cfg = ModelConfig.from_config(config)
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))
    assert limits.param_count(config.model) == sum(x.size for x in jax.tree.leaves(shapes))
