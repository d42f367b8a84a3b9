"""Losses and the distillation objective on closed-form velocities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax.flows import losses
from flowjax.flows import objective
from flowjax.methods import distill, rf
from flowjax.methods.training import Context


def test_pseudo_huber_limits():
    target = jnp.zeros((2, 4, 4, 3))
    d = 48
    c = 0.00054 * d
    small = jnp.full((2, 4, 4, 3), 1e-4)
    # Quadratic for small errors: ~ ||e||^2 / (2 c d).
    np.testing.assert_allclose(losses.per_example_pseudo_huber(small, target),
                               (1e-8 * d) / (2 * c * d), rtol=1e-3)
    big = jnp.full((2, 4, 4, 3), 10.0)
    # Linear (a norm) for large errors: ~ (||e|| - c) / d.
    np.testing.assert_allclose(losses.per_example_pseudo_huber(big, target), (10 * np.sqrt(d) - c) / d, rtol=1e-4)
    np.testing.assert_allclose(losses.per_example_pseudo_huber(big, target, c=1.0),
                               (np.sqrt(100 * d + 1) - 1) / d, rtol=1e-6)


def test_l2_is_mean_squared_error():
    pred, target = jnp.arange(8.0).reshape(2, 4), jnp.zeros((2, 4))
    np.testing.assert_allclose(losses.per_example_l2(pred, target), [14 / 4, 126 / 4])
    assert float(losses.l2(pred, target)) == pytest.approx(17.5)


def test_normalized_is_one_with_gradient_over_the_loss():
    w = jnp.array([0.5, -2.0, 3.0])
    x = jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])

    def per_example(w):
        return jnp.sum(jnp.square(x * w), axis=1) + jnp.array([0.0, 1.0])

    np.testing.assert_array_equal(losses.normalized(per_example(w)), [1.0, 1.0])
    grads = jax.jacobian(lambda w: losses.normalized(per_example(w)))(w)
    expected = jax.jacobian(per_example)(w) / per_example(w)[:, None]
    np.testing.assert_allclose(grads, expected, rtol=1e-6)


def test_normalized_guards_zero():
    value, grad = jax.value_and_grad(lambda x: jnp.sum(losses.normalized(jnp.square(x))))(jnp.array([0.0, 2.0]))
    np.testing.assert_array_equal(grad, [0.0, 1.0])  # d(x^2)/dx / x^2 = 2 / x
    assert float(value) == 1.0  # 0 / 1e-12 + 4 / 4
    tiny = losses.normalized(jnp.array([1e-13]))
    np.testing.assert_allclose(tiny, 0.1, rtol=1e-5)  # divided by the 1e-12 floor


def _ctx(apply, options=None, loss='l2'):
    return Context(apply=apply, source=lambda key, shape: jax.random.normal(key, shape),
                   flow=objective.Flow(loss=loss), options=options)


@pytest.mark.parametrize('k', [1, 4])
@pytest.mark.parametrize('distance', ['l2', 'pseudo_huber'])
def test_distill_loss_is_zero_for_the_coupling_velocity(k, distance):
    x0 = jax.random.normal(jax.random.key(0), (16, 2))
    x1 = x0 + jnp.array([3.0, -1.0])

    def apply(params, x, t, rng=None, label=None):  # the straight coupling's velocity: a constant shift
        return jnp.broadcast_to(params['shift'], x.shape)

    batch = {'x0': x0, 'x1': x1}
    exact, _ = distill.loss_fn({'shift': jnp.array([3.0, -1.0])}, batch, jax.random.key(1),
                               _ctx(apply, distill.Options(k=k), distance))
    wrong, _ = distill.loss_fn({'shift': jnp.array([2.0, -1.0])}, batch, jax.random.key(1),
                               _ctx(apply, distill.Options(k=k), distance))
    assert float(exact) < 1e-6 and float(wrong) > 1e-3


def test_one_step_distill_starts_from_noise_at_eps():
    seen = {}

    def apply(params, x, t, rng=None, label=None):
        seen['x'], seen['t'] = x, t
        return jnp.zeros_like(x)

    x0 = jax.random.normal(jax.random.key(0), (8, 2))
    loss, _ = distill.loss_fn({}, {'x0': x0, 'x1': x0 + 1.0}, jax.random.key(1), _ctx(apply, distill.Options(k=1)))
    np.testing.assert_array_equal(seen['x'], x0)
    np.testing.assert_allclose(seen['t'], 1e-3)
    assert float(loss) == pytest.approx(1.0)


def test_rf_loss_uses_stored_pairs_when_given():
    x0 = jax.random.normal(jax.random.key(0), (32, 2))
    x1 = 2.0 * x0 + 1.0

    def apply(params, x, t, rng=None, label=None):  # exact velocity of this deterministic coupling
        t = t[:, None]
        x0_hat = (x - t) / (1.0 + t)  # x_t = (1 - t) x0 + t (2 x0 + 1)
        return x0_hat + 1.0

    loss, _ = rf.loss_fn({}, {'x0': x0, 'x1': x1}, jax.random.key(2), _ctx(apply))
    assert float(loss) < 1e-10
