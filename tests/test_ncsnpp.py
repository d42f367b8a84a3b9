"""NCSN++ (DDPM++) velocity network: reference parameter counts and a tiny model on CPU."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowjax import models
from flowjax.models import ncsnpp

# Tiny enough for XLA on CPU; init_scale 1 so the zero-init output layers do not hide the checks.
TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), init_scale=1.0, dropout=0.5)


def _key(seed: int) -> jax.Array:
    # RBG keys: XLA on CPU compiles threefry-based inits of a whole U-Net very slowly (~30 s).
    return jax.random.key(seed, impl='rbg')


def _num_params(module: ncsnpp.NCSNpp, shape: tuple[int, ...] = (1, 32, 32, 3)) -> int:
    shapes = jax.eval_shape(module.init, _key(0), jnp.zeros(shape), jnp.zeros(shape[:1]))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def _inputs(shape=(2, 8, 8, 3)):
    kx, kt = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, shape), jax.random.uniform(kt, shape[:1])


@pytest.mark.parametrize('config, target', [
    (dict(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4), 61.80e6),  # rectified-flow CIFAR DDPM++
    (dict(nf=128, ch_mult=(1, 2, 2), num_res_blocks=2), 27.9e6),  # SlimFlow students
    (dict(nf=96, ch_mult=(1, 2, 2), num_res_blocks=2), 15.7e6),
    (dict(nf=64, ch_mult=(1, 2, 2), num_res_blocks=2), 7.0e6),
    (dict(nf=64, ch_mult=(1, 1, 2), num_res_blocks=1), 3.4e6),
])
def test_parameter_counts_match_the_reference(config, target):
    n = _num_params(ncsnpp.NCSNpp(attn_resolutions=(16,), **config))
    # 1%, or half a unit of the published 0.1M rounding where that is larger (3.4M: the count is 3.437M).
    assert abs(n - target) <= max(0.01 * target, 0.05e6), n


@pytest.fixture(scope='module')
def tiny():
    """A tiny model, its params (real init) and a jitted apply, shared by the tests below."""
    module = ncsnpp.NCSNpp(**TINY)
    x, t = _inputs()
    params = jax.jit(module.init)(_key(0), x, t)
    return module, params, jax.jit(module.apply, static_argnames='train')


def test_tiny_forward_shape_dtype_and_time_dependence(tiny):
    _, params, apply = tiny
    x, t = _inputs()
    out = apply(params, x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    assert float(jnp.abs(out - apply(params, x, t * 0.5)).max()) > 1e-4


def test_single_channel_16x16_shapes():
    module = ncsnpp.NCSNpp(**TINY)
    x, t = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
    params = jax.eval_shape(module.init, _key(0), x, t)
    out = jax.eval_shape(module.apply, params, x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_dropout_only_in_train_mode_with_an_rng(tiny):
    _, params, apply = tiny
    x, t = _inputs()
    ref = apply(params, x, t)
    np.testing.assert_array_equal(ref, apply(params, x, t, rngs={'dropout': _key(3)}))
    a = apply(params, x, t, train=True, rngs={'dropout': _key(3)})
    b = apply(params, x, t, train=True, rngs={'dropout': _key(4)})
    assert float(jnp.abs(a - ref).max()) > 1e-4 and float(jnp.abs(a - b).max()) > 1e-4


def test_l2_gradient_is_finite_and_nonzero(tiny):
    module, params, _ = tiny
    x, t = _inputs()
    grads = jax.jit(jax.grad(lambda p, x, t: jnp.mean((module.apply(p, x, t) - x) ** 2)))(params, x, t)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(jnp.sum(g ** 2)) for g in leaves) > 0
    assert float(jnp.abs(grads['params']['conv_in']['kernel']).max()) > 0


def test_bfloat16_compute_keeps_float32_params_and_output(tiny):
    _, params, apply = tiny
    x, t = _inputs()
    bf16 = ncsnpp.NCSNpp(**TINY, dtype='bfloat16')
    shapes = jax.eval_shape(bf16.init, _key(0), x, t)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
    ref = apply(params, x, t)
    out = jax.jit(bf16.apply)(params, x, t)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) <= 0.05 * float(jnp.abs(ref).max()) + 1e-2


def test_class_conditional_labels_change_the_output(tiny):
    _, params, _ = tiny
    module = ncsnpp.NCSNpp(**TINY, num_classes=10)
    x, t = _inputs()
    # The conditional model is the tiny one plus a label table; add it instead of a second (slow) init.
    embed = {'embedding': jax.random.normal(jax.random.key(5), (10, 4 * TINY['nf']))}
    params = {'params': {**params['params'], 'label_embed': embed}}
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(module.init, _key(0), x, t, jnp.array([0, 1])))
    apply = jax.jit(module.apply)
    a = apply(params, x, t, jnp.array([0, 1]))
    b = apply(params, x, t, jnp.array([2, 3]))
    assert float(jnp.abs(a - b).max()) > 1e-4
    with pytest.raises(ValueError, match='labels'):
        jax.eval_shape(module.apply, params, x, t)


def test_fourier_embedding_and_unsupported_options():
    x, t = _inputs()
    module = ncsnpp.NCSNpp(**TINY, embedding_type='fourier')
    params = jax.eval_shape(module.init, _key(0), x, t)
    assert params['params']['GaussianFourierProjection_0']['W'].shape == (16,)
    assert params['params']['temb_0']['kernel'].shape == (32, 64)
    assert jax.eval_shape(module.apply, params, x, t).shape == x.shape
    with pytest.raises(ValueError, match='fir'):
        jax.eval_shape(ncsnpp.NCSNpp(**TINY, fir=True).init, _key(0), x, t)


def test_build_from_config():
    config = ml_collections.ConfigDict({'name': 'ncsnpp', **TINY})
    module = models.build(config)
    assert isinstance(module, ncsnpp.NCSNpp) and module.nf == 16 and module.dropout == 0.5
    x, t = _inputs()
    params = jax.eval_shape(module.init, _key(0), x, t)
    assert jax.eval_shape(models.apply_fn(module), params, x, t).shape == x.shape
