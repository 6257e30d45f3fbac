"""optim.py against hand-computed schedules and a numpy AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ringformer.config import OptimConfig, default_config
from ringformer.errors import ConfigError
from ringformer.optim import decay_mask, make_optimizer, make_schedule


def cfg(**kw):
    base = dict(default_config().optim)  # complete: optim.py has no defaults of its own
    base.update(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1,
                clip_norm=0.0)
    base.update(kw)
    return base


@pytest.mark.parametrize("kind,at35,at60", [
    # progress 0.25 and 0.5 through the 100 decay steps; end value 1e-4
    ("cosine", 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)), 5.5e-4),
    ("linear", 1e-3 - 0.9e-3 * 0.25, 5.5e-4),
    ("constant", 1e-3, 1e-3),
])
def test_schedule_key_steps(kind, at35, at60):
    s = make_schedule(cfg(schedule=kind), total_steps=110)
    end = 1e-4 if kind != "constant" else 1e-3
    expected = {0: 0.0, 5: 5e-4, 9: 9e-4, 10: 1e-3, 35: at35, 60: at60, 110: end, 500: end}
    for step, want in expected.items():
        assert float(s(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), (kind, step)


def test_schedule_without_warmup_starts_at_peak_and_traces():
    s = make_schedule(cfg(warmup_steps=0), total_steps=100)
    assert float(s(0)) == pytest.approx(1e-3)
    assert float(jax.jit(s)(jnp.int32(100))) == pytest.approx(1e-4)


def _params():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "embed": jax.random.normal(k[0], (5, 4)),
        "layers": {"attn_norm": 1 + 0.1 * jax.random.normal(k[1], (2, 4)),
                   "wq": jax.random.normal(k[2], (2, 4, 3))},
        "final_norm": 1 + 0.1 * jax.random.normal(k[3], (4,)),
    }


# Written by name, independently of decay_mask's rule.
DECAYED = {"embed": True, "layers/attn_norm": False, "layers/wq": True, "final_norm": False}


def _flat(tree):
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(p.key) for p in path)] = np.asarray(x, np.float64)
    return out


def test_decay_mask_matches_names():
    assert _flat(jax.tree.map(float, decay_mask(_params()))) == {k: float(v) for k, v in DECAYED.items()}


def test_two_adamw_steps_match_numpy():
    c = cfg(warmup_steps=0, schedule="constant", lr=1e-2, eps=1e-6)
    tx = make_optimizer(c, total_steps=10)
    params = _params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    ref_p, m, v = _flat(params), {}, {}
    for t in (1, 2):
        grads = jax.tree.map(lambda x, t=t: jnp.sin(3.0 * t * x) + 0.1 * t, params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for name, g in _flat(grads).items():
            m[name] = c["b1"] * m.get(name, 0) + (1 - c["b1"]) * g
            v[name] = c["b2"] * v.get(name, 0) + (1 - c["b2"]) * g * g
            mhat, vhat = m[name] / (1 - c["b1"] ** t), v[name] / (1 - c["b2"] ** t)
            step = mhat / (np.sqrt(vhat) + c["eps"])
            if DECAYED[name]:
                step = step + c["weight_decay"] * ref_p[name]
            ref_p[name] = ref_p[name] - c["lr"] * step
        got = _flat(params)
        for name in ref_p:
            np.testing.assert_allclose(got[name], ref_p[name], rtol=2e-6, atol=1e-7, err_msg=name)


def test_no_decay_on_norms_with_zero_gradient():
    c = cfg(warmup_steps=0, schedule="constant", lr=0.5, weight_decay=0.2)
    tx = make_optimizer(c, total_steps=10)
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = _flat(optax.apply_updates(params, updates))
    for name, p in _flat(params).items():
        want = p * (1 - 0.5 * 0.2) if DECAYED[name] else p
        np.testing.assert_allclose(new[name], want, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("clip_norm,scale", [(1.0, 0.1), (100.0, 1.0), (0.0, 1.0)])
def test_clipping_scales_the_gradient_adam_sees(clip_norm, scale):
    # grads with global norm exactly 10: 6 and 8 in two leaves
    params = {"a": jnp.zeros((1, 1)), "b": jnp.zeros((1, 1))}
    grads = {"a": jnp.full((1, 1), 6.0), "b": jnp.full((1, 1), 8.0)}
    assert float(optax.global_norm(grads)) == pytest.approx(10.0)
    tx = make_optimizer(cfg(clip_norm=clip_norm), total_steps=10)
    _, state = tx.update(grads, tx.init(params), params)
    mu = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(np.asarray(mu["a"]), 0.1 * 6.0 * scale, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mu["b"]), 0.1 * 8.0 * scale, rtol=1e-6)


def test_first_update_with_warmup_is_zero():
    # schedule(0) == 0: the documented convention for step counting
    tx = make_optimizer(cfg(), total_steps=100)
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


def test_a_partial_config_is_refused_not_filled_in():
    """No fallbacks: a missing key would otherwise get a second default (once 0.0 where the
    config's is 0.1)."""
    partial = {k: v for k, v in cfg().items() if k != "min_lr_ratio"}
    with pytest.raises(ConfigError, match=r"optim\.min_lr_ratio is missing"):
        make_optimizer(partial, total_steps=10)
    typed = OptimConfig.from_section(cfg(), "optim")
    assert float(make_schedule(typed, 110)(500)) == pytest.approx(1e-4)
