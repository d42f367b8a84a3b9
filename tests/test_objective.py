"""flow.objective: config checks, the bit-identical default, and each loss against a numpy reference."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowjax import errors
from flowjax.flows import losses, objective, paths, timesteps


def _cfg(**overrides) -> ml_collections.ConfigDict:
    """A `flow` section (untyped, so any bad value can be set) with overrides."""
    d = objective.defaults().to_dict()
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def _flow(data_kind='image', **overrides) -> objective.Flow:
    return objective.from_config(_cfg(**overrides), data_kind=data_kind)


def test_defaults_build_the_default_flow():
    assert objective.from_config(objective.defaults(), data_kind='toy2d') == objective.Flow()
    assert objective.from_config(ml_collections.ConfigDict({'t_eps': 1e-3}), data_kind='toy2d') == objective.Flow()
    cfg = objective.defaults()  # typed placeholders take their values
    cfg.huber_c, cfg.lpips_t_min, cfg.u_shape_a = 0.5, 1e-2, 3
    flow = objective.from_config(cfg, data_kind='image')
    assert (flow.huber_c, flow.lpips_t_min, flow.u_shape_a) == (0.5, 1e-2, 3.0)
    assert set(objective.defaults().keys()) == set(objective.FIELDS)


def test_time_error_message_is_exact():
    with pytest.raises(errors.ConfigError) as e:
        _flow(time='foo')
    assert str(e.value) == "flow.time='foo': expected one of uniform, u_shaped, exp10, logit_normal, grid"


BAD = [
    ('t_eps', 0.0), ('t_eps', 0.5), ('t_eps', -1e-3), ('t_eps', True), ('t_eps', 'small'), ('t_eps', float('nan')),
    ('t_eps', None),
    ('time', 'foo'), ('time', 3), ('time', None), ('time', 'Uniform'),
    ('u_shape_a', 0.0), ('u_shape_a', -4.0), ('u_shape_a', True), ('u_shape_a', float('inf')), ('u_shape_a', '4'),
    ('logit_mean', float('nan')), ('logit_mean', '0'), ('logit_mean', None),
    ('logit_std', 0.0), ('logit_std', -1.0), ('logit_std', False),
    ('grid_points', 0), ('grid_points', -3), ('grid_points', 10.0), ('grid_points', True), ('grid_points', '10'),
    ('loss', 'l1'), ('loss', None), ('loss', 'LPIPS'),
    ('huber_c', 0.0), ('huber_c', -1.0), ('huber_c', True), ('huber_c', 'auto'), ('huber_c', float('inf')),
    ('lpips_t_min', 0.0), ('lpips_t_min', 1.5), ('lpips_t_min', -0.1), ('lpips_t_min', True),
    ('normalize', 1), ('normalize', 0), ('normalize', 'yes'), ('normalize', None),
]


@pytest.mark.parametrize('name,value', BAD)
def test_bad_values_name_their_field(name, value):
    with pytest.raises(errors.ConfigError) as e:
        _flow(**{name: value})
    message = str(e.value)
    assert message.startswith(f'flow.{name}={value!r}: ') and '\n' not in message


@pytest.mark.parametrize('loss', ['lpips_huber', 'lpips'])
@pytest.mark.parametrize('data_kind', ['toy2d', 'digits_vectors'])
def test_lpips_needs_images(loss, data_kind):
    with pytest.raises(errors.ConfigError, match=rf"^flow\.loss='{loss}': .*data\.kind='image'") as e:
        _flow(data_kind=data_kind, loss=loss)
    assert '\n' not in str(e.value)
    assert _flow(data_kind='image', loss=loss).uses_lpips


def test_unknown_field_and_field_prefix():
    with pytest.raises(errors.ConfigError, match=r'^flow\.t_min: unknown field'):
        _flow(t_min=0.1)
    with pytest.raises(errors.ConfigError, match=r"^reflow\.flow\.loss='l1': "):
        objective.from_config(_cfg(loss='l1'), data_kind='image', field='reflow.flow')


def test_good_values_are_accepted():
    flow = _flow(t_eps=0.25, time='grid', grid_points=1, loss='lpips_huber', huber_c=1, lpips_t_min=1.0,
                 normalize=True, logit_mean=-2, logit_std=0.5)
    assert flow == objective.Flow(t_eps=0.25, time='grid', grid_points=1, loss='lpips_huber', huber_c=1.0,
                                  lpips_t_min=1.0, normalize=True, logit_mean=-2.0, logit_std=0.5)
    assert isinstance(flow.huber_c, float) and hash(flow) == hash(objective.Flow(**vars(flow)))
    assert not _flow(loss='pseudo_huber').uses_lpips


@pytest.mark.parametrize('time', objective.TIMES)
def test_sample_t(time):
    flow = _flow(time=time)
    t = flow.sample_t(jax.random.key(0), 37)
    assert t.shape == (37,) and t.dtype == jnp.float32
    assert np.all((t >= 0) & (t <= 1))
    np.testing.assert_array_equal(t, flow.sample_t(jax.random.key(0), 37))
    assert not np.array_equal(t, flow.sample_t(jax.random.key(1), 37))
    jitted = jax.jit(lambda rng, flow: flow.sample_t(rng, 37), static_argnums=1)
    np.testing.assert_allclose(jitted(jax.random.key(0), flow), t, rtol=1e-6, atol=1e-7)  # fusion may round differently


def test_sample_t_uniform_is_the_rectified_flow_draw():
    flow = _flow(t_eps=0.02)
    key = jax.random.key(5)
    np.testing.assert_array_equal(flow.sample_t(key, 100), timesteps.uniform(key, 100, eps=0.02))


def _batch(b=4, shape=(2, 3, 2)):
    k = jax.random.split(jax.random.key(11), 4)
    x0, x1, v = (jax.random.normal(key, (b, *shape)) for key in k[:3])
    t = jnp.array([0.05, 0.5, 0.97, 0.999])[:b]
    return x0, x1, v, t, paths.linear(x0, x1, t), paths.linear_velocity(x0, x1)


def _fake_perceptual(x, y):  # (B,) distances, jnp and numpy alike
    return jnp.mean(jnp.abs(x - y).reshape(x.shape[0], -1), axis=1) ** 1.5


def _np_huber(x, y, c=None):
    err = (np.asarray(x, np.float64) - np.asarray(y, np.float64)).reshape(x.shape[0], -1)
    d = err.shape[1]
    c = 0.00054 * d if c is None else c
    return (np.sqrt(np.sum(err ** 2, axis=1) + c * c) - c) / d


def _np_perceptual(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.mean(np.abs(x - y).reshape(x.shape[0], -1), axis=1) ** 1.5


def test_default_is_bit_identical_to_l2():
    x0, x1, v, t, x_t, target = _batch()
    flow = objective.from_config(objective.defaults(), data_kind='toy2d')
    loss, metrics = flow.velocity_loss(v, target, x_t=x_t, t=t, x1=x1)
    assert metrics == {}
    np.testing.assert_array_equal(loss, losses.l2(v, target))
    loss, metrics = flow.sample_loss(v, x1)
    assert metrics == {}
    np.testing.assert_array_equal(loss, losses.l2(v, x1))

    @jax.jit
    def both(v, target, x_t, t, x1):
        return losses.l2(v, target), flow.velocity_loss(v, target, x_t=x_t, t=t, x1=x1)[0]

    expected, got = both(v, target, x_t, t, x1)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize('c', [None, 0.3])
def test_pseudo_huber_matches_numpy(c):
    x0, x1, v, t, x_t, target = _batch()
    flow = _flow(loss='pseudo_huber', huber_c=c)
    loss, metrics = flow.velocity_loss(v, target, x_t=x_t, t=t, x1=x1)
    np.testing.assert_allclose(loss, np.mean(_np_huber(v, target, c)), rtol=1e-5)
    np.testing.assert_allclose(metrics['loss_unweighted'], loss, rtol=1e-6)
    loss, _ = flow.sample_loss(v, x1)
    np.testing.assert_allclose(loss, np.mean(_np_huber(v, x1, c)), rtol=1e-5)


@pytest.mark.parametrize('t_min', [None, 0.1])
def test_lpips_huber_matches_numpy(t_min):
    x0, x1, v, t, x_t, target = _batch()
    flow = _flow(loss='lpips_huber', huber_c=0.2, lpips_t_min=t_min)
    loss, metrics = flow.velocity_loss(v, target, x_t=x_t, t=t, x1=x1, perceptual=_fake_perceptual)
    tn = np.asarray(t, np.float64)
    x1_hat = np.asarray(x_t, np.float64) + (1 - tn)[:, None, None, None] * np.asarray(v, np.float64)
    huber, lp = _np_huber(v, target, 0.2), _np_perceptual(x1_hat, x1)
    per = tn * huber + (lp if t_min is None else lp / np.maximum(1 - tn, t_min))
    np.testing.assert_allclose(loss, np.mean(per), rtol=1e-5)
    np.testing.assert_allclose(metrics['loss_huber'], np.mean(huber), rtol=1e-5)
    np.testing.assert_allclose(metrics['loss_lpips'], np.mean(lp), rtol=1e-5)
    np.testing.assert_allclose(metrics['loss_unweighted'], np.mean(per), rtol=1e-5)

    loss, metrics = flow.sample_loss(x1_hat.astype(np.float32), x1, perceptual=_fake_perceptual)
    np.testing.assert_allclose(loss, np.mean(huber_s := _np_huber(x1_hat, x1, 0.2)) + np.mean(lp), rtol=1e-5)
    np.testing.assert_allclose(metrics['loss_huber'], np.mean(huber_s), rtol=1e-5)


def test_lpips_alone_compares_the_one_step_estimate():
    x0, x1, v, t, x_t, target = _batch()
    flow = _flow(loss='lpips', lpips_t_min=0.1)
    loss, _ = flow.velocity_loss(v, target, x_t=x_t, t=t, x1=x1, perceptual=_fake_perceptual)
    tn = np.asarray(t, np.float64)
    x1_hat = np.asarray(x_t, np.float64) + (1 - tn)[:, None, None, None] * np.asarray(v, np.float64)
    np.testing.assert_allclose(loss, np.mean(_np_perceptual(x1_hat, x1) / np.maximum(1 - tn, 0.1)), rtol=1e-5)
    # The exact velocity recovers x1: zero loss.
    exact, _ = flow.velocity_loss(target, target, x_t=x_t, t=t, x1=x1, perceptual=_fake_perceptual)
    assert float(exact) < 1e-5
    loss, _ = flow.sample_loss(v, x1, perceptual=_fake_perceptual)
    np.testing.assert_allclose(loss, np.mean(_np_perceptual(v, x1)), rtol=1e-5)


@pytest.mark.parametrize('loss', ['lpips_huber', 'lpips'])
def test_lpips_needs_perceptual(loss):
    x0, x1, v, t, x_t, target = _batch()
    flow = _flow(loss=loss)
    with pytest.raises(ValueError, match='perceptual'):
        flow.velocity_loss(v, target, x_t=x_t, t=t, x1=x1)
    with pytest.raises(ValueError, match='perceptual'):
        flow.sample_loss(v, x1)


@pytest.mark.parametrize('loss', ['l2', 'pseudo_huber', 'lpips_huber'])
def test_normalize_value_one_gradient_over_the_loss(loss):
    x0, x1, _, t, x_t, target = _batch()
    flow = _flow(loss=loss, normalize=True)
    w = jnp.array([0.3, -0.7])  # a tiny model: v = w[0] x_t + w[1]

    def model(w):
        return w[0] * x_t + w[1]

    def objective_loss(w):
        return flow.velocity_loss(model(w), target, x_t=x_t, t=t, x1=x1, perceptual=_fake_perceptual)

    def per_example(w):  # the same loss without normalisation, per example
        plain = _flow(loss=loss)
        return jnp.stack([plain.velocity_loss(model(w)[i:i + 1], target[i:i + 1], x_t=x_t[i:i + 1], t=t[i:i + 1],
                                              x1=x1[i:i + 1], perceptual=_fake_perceptual)[0]
                          for i in range(t.shape[0])])

    (value, metrics), grad = jax.value_and_grad(objective_loss, has_aux=True)(w)
    np.testing.assert_allclose(value, 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics['loss_unweighted'], jnp.mean(per_example(w)), rtol=1e-5)
    expected = jnp.mean(jax.jacobian(per_example)(w) / per_example(w)[:, None], axis=0)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)

    value, _ = flow.sample_loss(model(w), x1, perceptual=_fake_perceptual)
    np.testing.assert_allclose(value, 1.0, rtol=1e-6)


def test_flow_is_a_static_jit_argument():
    x0, x1, v, t, x_t, target = _batch()
    step = jax.jit(lambda flow, v: flow.velocity_loss(v, target, x_t=x_t, t=t, x1=x1), static_argnums=0)
    for flow in (objective.Flow(), _flow(loss='pseudo_huber', normalize=True)):
        got, metrics = step(flow, v)
        want, want_metrics = flow.velocity_loss(v, target, x_t=x_t, t=t, x1=x1)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert metrics.keys() == want_metrics.keys()
