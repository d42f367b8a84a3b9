"""Classifier-free guidance: the null label of model.label_dropout, guidance scales on every kind, and
the NFE counting the extra network calls (docs/methods.md, Guidance)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental import io_callback

from flowjax import errors, models
from flowjax.flows import diffusion, solvers
from flowjax.models import kinds

NET = {'name': 'ncsnpp', 'nf': 8, 'ch_mult': (1,), 'num_res_blocks': 1, 'attn_resolutions': (), 'dropout': 0.0,
       'num_classes': 3, 'label_dropout': 0.5}
LABELS = jnp.array([0, 1, 2, 1], jnp.int32)


def _x(seed=0, shape=(4, 8, 8, 1)):
    return jax.random.normal(jax.random.key(seed), shape)


def _with(**fields):
    return ml_collections.ConfigDict({**NET, **fields})


def _init(kind, seed):
    """Random params with every leaf perturbed (a fresh NCSN++ gives zeros: its last layer starts at 0)."""
    params = kind.init(jax.random.key(seed), (8, 8, 1))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return tree.unflatten([p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.fixture(scope='module')
def field():
    """A class-conditional velocity field with a null label and its (random) params."""
    kind = kinds.VelocityField.from_model_config(NET)
    return kind, _init(kind, 1)


def test_label_dropout_adds_the_null_label_and_drops_labels_in_training(field):
    kind, params = field
    assert kind.null_label == 3 and params['params']['label_embed']['embedding'].shape == (4, 32)
    assert kinds.VelocityField.from_model_config(_with(label_dropout=0.0)).null_label is None
    x, t = _x(2, (64, 8, 8, 1)), jnp.full((64,), 0.4)
    y = jnp.arange(64, dtype=jnp.int32) % 3
    cond = kind.apply(params, x, t, label=y)
    null = kind.apply(params, x, t, label=jnp.full_like(y, 3))
    trained = kind.apply(params, x, t, jax.random.key(5), label=y)  # train mode: each label dropped w.p. 0.5
    as_null = np.all(np.isclose(trained, null, atol=1e-6), axis=(1, 2, 3))
    as_cond = np.all(np.isclose(trained, cond, atol=1e-6), axis=(1, 2, 3))
    assert np.all(as_null ^ as_cond) and 16 <= as_null.sum() <= 48


@pytest.mark.parametrize('fields, needle', [
    ({'label_dropout': 1.0}, 'model.label_dropout=1.0: expected a probability in [0, 1)'),
    ({'label_dropout': -0.1}, 'model.label_dropout=-0.1'),
    ({'label_dropout': 0.1, 'num_classes': 0}, 'needs a class-conditional model'),
])
def test_label_dropout_bad_values(fields, needle):
    with pytest.raises(errors.ConfigError, match=needle.replace('[', r'\[').replace(')', r'\)')):
        models.build(_with(**fields))


def test_scales_one_and_zero_are_the_conditional_and_unconditional_models(field):
    kind, params = field
    x, t = _x(), jnp.full((4,), 0.3)
    assert kinds.guided(kind, 1.0, 'f') is kind
    cond = kind.velocity(params, LABELS)(x, t)
    null = kind.apply(params, x, t, label=jnp.full((4,), 3, jnp.int32))
    np.testing.assert_array_equal(kinds.guided(kind, 0.0, 'f').velocity(params, LABELS)(x, t), null)
    np.testing.assert_array_equal(cond, kind.apply(params, x, t, label=LABELS))
    two = kinds.guided(kind, 2.0, 'f').velocity(params, LABELS)(x, t)
    np.testing.assert_allclose(two, null + 2.0 * (cond - null), rtol=1e-6, atol=1e-6)
    sampler = solvers.parse_sampler('euler@3')
    for scale, calls in ((1.0, 1), (0.0, 1), (2.5, 2)):
        _, nfe = kinds.guided(kind, scale, 'f').sample(params, x, sampler, eps=1e-3, label=LABELS)
        assert int(nfe) == 3 * calls


def _counted_conditional():
    """An analytic class-conditional velocity counting its real calls: v = label - x (null label 3: -x)."""
    calls = [0]

    def bump(_):
        calls[0] += 1
        return np.float32(0)

    def apply(params, x, t, dropout_rng=None, label=None):
        zero = io_callback(bump, jax.ShapeDtypeStruct((), jnp.float32), t[0], ordered=True)
        target = jnp.where(label == 3, 0.0, label.astype(jnp.float32) + 1.0)
        return target[:, None] * params - x + zero

    return kinds.VelocityFunction(apply, num_classes=3, null_label=3), calls


@pytest.mark.parametrize('spec, per_solve', [('euler@4', 4), ('midpoint@3', 6), ('heun@2', 4)])
def test_nfe_counts_the_extra_calls(spec, per_solve):
    kind, calls = _counted_conditional()
    x, label = jnp.ones((4, 2)), LABELS
    for scale, factor in ((1.0, 1), (0.0, 1), (3.0, 2)):
        calls[0] = 0
        out, nfe = kinds.guided(kind, scale, 'f').reconstruct(jnp.float32(1.0), x, solvers.parse_sampler(spec),
                                                             eps=1e-3, label=label)
        jax.block_until_ready(out)
        assert int(nfe) == calls[0] == 2 * per_solve * factor


def test_refused_without_a_null_label(field):
    kind, _ = field
    plain = kinds.VelocityField.from_model_config(_with(label_dropout=0.0))
    with pytest.raises(errors.UserError, match=r"eval.guidance=2: model 'x' \(kind 'velocity'\) has no null label"):
        kinds.guided(plain, 2, 'eval.guidance', "model 'x'")
    unconditional = kinds.VelocityField.from_model_config(_with(label_dropout=0.0, num_classes=0))
    with pytest.raises(errors.UserError, match='is not class-conditional'):
        kinds.guided(unconditional, 0.5, 'f')
    for bad in (-1.0, float('inf'), float('nan'), 'two', True):
        with pytest.raises(errors.ConfigError, match='expected a guidance scale'):
            kinds.guided(kind, bad, 'f')


@pytest.mark.parametrize('make', ['ddpm', 'caf', 'piecewise'])
def test_every_kind_guides(make):
    """Each kind samples with fireflow@2; its guided samples differ from its conditional ones, equal its null
    label's at scale 0, and count twice the calls at scale 2."""
    if make == 'ddpm':
        kind = kinds.Diffusion.from_model_config(NET, schedule='linear', timesteps=100)
    elif make == 'caf':
        kind = kinds.ConstantAcceleration.from_model_config(NET, channels=1)
    else:
        kind = kinds.Piecewise.from_model_config(NET, windows=2, parameterization='ddim_eps',
                                                 process=diffusion.VP('linear', 100))
    params = _init(kind, 3)
    x, sampler = _x(4), solvers.parse_sampler('fireflow@2')  # FireFlow, too, on every kind
    plain, nfe = kind.sample(params, x, sampler, eps=1e-3, label=LABELS)
    # N + 1 calls; CAF's v0 one more; PeRFlow's two windows each start their own cache
    assert int(nfe) == {'ddpm': 3, 'caf': 4, 'piecewise': 4}[make]
    guided, nfe_guided = kinds.guided(kind, 2.0, 'f').sample(params, x, sampler, eps=1e-3, label=LABELS)
    assert int(nfe_guided) == 2 * int(nfe) and not np.allclose(plain, guided)
    zero, _ = kinds.guided(kind, 0.0, 'f').sample(params, x, sampler, eps=1e-3, label=LABELS)
    null, _ = kind.sample(params, x, sampler, eps=1e-3, label=jnp.full((4,), 3, jnp.int32))
    np.testing.assert_array_equal(zero, null)
