"""Tests for flowjax.flows.solvers (run on 8 fake CPU devices, see conftest)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flowjax.flows import solvers

MU, S = 2.0, 0.5  # Target N(MU, S^2); source N(0, 1); independent coupling.


def _mean_var(t):
    return t * MU, (1 - t) ** 2 + t ** 2 * S ** 2


def gaussian_velocity(x, t):
    """Exact marginal velocity E[x1 - x0 | x_t = x] of the Gaussian flow.

    (x_t, x1 - x0) is jointly Gaussian, so E[x1 - x0 | x_t] = MU +
    Cov/Var (x - m) with Cov(x_t, x1 - x0) = t S^2 - (1 - t).
    """
    t = _per_example(t, x)
    m, var = _mean_var(t)
    cov = t * S ** 2 - (1 - t)
    return MU + cov / var * (x - m)


def gaussian_exact(x, t0, t1):
    """The flow map: the velocity is affine, so x stays m + sd * z."""
    m0, v0 = _mean_var(t0)
    m1, v1 = _mean_var(t1)
    return m1 + np.sqrt(v1 / v0) * (np.asarray(x, np.float64) - m0)


def _per_example(t, x):
    assert t.shape == x.shape[:1] and t.dtype == jnp.float32, (t, x.shape)
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


def mlp_velocity(params, x, t):
    """A small nonlinear 2-D velocity field."""
    w1, b1, w2 = params
    h = jnp.tanh(jnp.concatenate([x, t[:, None]], axis=-1) @ w1 + b1)
    return h @ w2


def mlp_params(seed):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (3, 16)), jax.random.normal(k2, (16,)),
            0.5 * jax.random.normal(k3, (16, 2)))


def counted(velocity):
    """Wraps a velocity; returns it and a list whose [0] counts real calls."""
    calls = [0]

    def bump(_):
        calls[0] += 1
        return np.float32(0)

    def wrapped(x, t):
        zero = io_callback(bump, jax.ShapeDtypeStruct((), jnp.float32), t[0],
                           ordered=True)
        return velocity(x, t) + zero

    return wrapped, calls


X0 = np.linspace(-2.5, 2.5, 16, dtype=np.float32)[:, None]


def decay_velocity(x, t):
    return 3.0 * _per_example(t, x) - 2.0 * x


def decay_exact(x, t0, t1):
    """x(t) = 1.5 t - 0.75 + C exp(-2 t)."""
    p = lambda t: 1.5 * t - 0.75
    x = np.asarray(x, np.float64)
    return p(t1) + (x - p(t0)) * np.exp(-2.0 * (t1 - t0))


FLOWS = {'gaussian': (gaussian_velocity, gaussian_exact),
         'decay': (decay_velocity, decay_exact)}


def _err(sampler, flow='gaussian'):
    velocity, exact = FLOWS[flow]
    x1, _ = jax.jit(lambda x: solvers.sample(velocity, x, sampler))(X0)
    return np.max(np.abs(np.asarray(x1) - exact(X0, 1e-3, 1.0)))


# Midpoint is superconvergent (~8x per halving) on the Gaussian flow, so its
# exact second order is checked on the generic linear `decay` flow instead.
@pytest.mark.parametrize('name,flow,lo,hi', [
    ('euler', 'gaussian', 1.7, 2.4), ('heun', 'gaussian', 3.4, 4.8),
    ('midpoint', 'gaussian', 3.4, 8.8), ('midpoint', 'decay', 3.4, 4.8)])
def test_convergence_order(name, flow, lo, hi):
    errs = [_err(solvers.Sampler(name, n), flow) for n in (16, 32, 64)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(lo <= r <= hi for r in ratios), (errs, ratios)


def test_flow_is_curved():
    assert _err(solvers.Sampler('euler', 1)) > 0.1


@pytest.mark.parametrize('t0,t1', [(1e-3, 1.0), (1.0, 1e-3)])
def test_rk45_exact_and_nfe(t0, t1):
    velocity, calls = counted(gaussian_velocity)
    sampler = solvers.parse_sampler('rk45')
    run = jax.jit(lambda x: solvers.solve(velocity, x, sampler, t0=t0, t1=t1))
    x, nfe = run(X0)
    np.testing.assert_allclose(x, gaussian_exact(X0, t0, t1), atol=2e-4)
    assert nfe.dtype == jnp.int32 and int(nfe) == calls[0] > 7


def test_rk45_nfe_with_rejected_first_steps():
    # Stiff-ish linear flow: the fixed 0.01 first step is rejected at 1e-7 tol.
    velocity, calls = counted(lambda x, t: -300.0 * (x - jnp.sin(t)[:, None]))
    sampler = solvers.Sampler('rk45', rtol=1e-7, atol=1e-7)

    @jax.jit
    def run(x):
        sol = solvers._rk45_solution(velocity, x, sampler, 0.0, 1.0)
        return solvers.solve(velocity, x, sampler, t0=0.0, t1=1.0)[1], sol.stats

    nfe, stats = run(X0)
    calls[0] //= 2  # Both solves ran the same steps.
    assert int(stats['num_rejected_steps']) > 0
    assert int(nfe) == 6 * int(stats['num_steps']) + 1 == calls[0]


def test_rk45_max_steps_gives_nan():
    sampler = solvers.Sampler('rk45', max_steps=3)
    x1, _ = jax.jit(lambda x: solvers.sample(gaussian_velocity, x, sampler))(X0)
    assert np.all(np.isnan(x1))


@pytest.mark.parametrize('spec', ['rk45', 'heun@200'])
def test_invert_then_sample_roundtrip(spec):
    sampler = solvers.parse_sampler(spec, rtol=1e-7, atol=1e-7)
    run_fwd = solvers.make_sampler(mlp_velocity, sampler)
    run_inv = solvers.make_sampler(mlp_velocity, sampler, inverse=True)
    params = mlp_params(0)
    x1 = jax.random.normal(jax.random.key(1), (32, 2))
    x0, _ = run_inv(params, x1)
    back, _ = run_fwd(params, x0)
    assert float(jnp.max(jnp.abs(x0 - x1))) > 0.1
    assert float(jnp.max(jnp.abs(back - x1))) < 1e-3


@pytest.mark.parametrize('name,per_step', [('euler', 1), ('heun', 2),
                                           ('midpoint', 2)])
def test_fixed_step_nfe(name, per_step):
    velocity, calls = counted(gaussian_velocity)
    _, nfe = jax.jit(lambda x: solvers.sample(
        velocity, x, solvers.Sampler(name, 5)))(X0)
    assert nfe.dtype == jnp.int32 and int(nfe) == per_step * 5 == calls[0]


def test_trajectory():
    xs, vs = solvers.trajectory(gaussian_velocity, X0, steps=8, t0=1e-3, t1=1.0)
    assert xs.shape == (9, *X0.shape) and vs.shape == (8, *X0.shape)
    np.testing.assert_array_equal(xs[0], X0)
    euler, _ = solvers.sample(gaussian_velocity, X0,
                              solvers.Sampler('euler', 8))
    np.testing.assert_allclose(xs[-1], euler, atol=1e-6)
    dt = np.diff(np.linspace(1e-3, 1.0, 9, dtype=np.float32))
    np.testing.assert_allclose(np.diff(xs, axis=0), dt[:, None, None] * vs,
                               atol=1e-6)


def image_velocity(x, t):
    t = t[:, None, None, None]
    return jnp.tanh(x.mean(axis=(1, 2, 3), keepdims=True) - x) * (1 + t) - x


@pytest.mark.parametrize('spec', ['heun@8', 'rk45'])
@pytest.mark.parametrize('shape', [(16, 2), (16, 4, 4, 3)])
def test_sharded_matches_unsharded(spec, shape):
    velocity = (image_velocity if len(shape) == 4
                else lambda x, t: mlp_velocity(mlp_params(0), x, t))
    sampler = solvers.parse_sampler(spec)
    x = jax.random.normal(jax.random.key(2), shape)
    mesh = Mesh(np.array(jax.devices()), ('data',))
    sharding = NamedSharding(mesh, P('data'))
    run = jax.jit(lambda x: solvers.sample(velocity, x, sampler))
    ref, ref_nfe = run(x)
    out, nfe = run(jax.device_put(x, sharding))
    assert len(jax.devices()) == 8
    assert out.sharding.is_equivalent_to(sharding, out.ndim)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert int(nfe) == int(ref_nfe)


@pytest.mark.parametrize('spec,key,steps', [
    ('euler@8', 'euler@8', 8), ('heun@4', 'heun@4', 4),
    ('midpoint@2', 'midpoint@2', 2), ('rk45', 'rk45', None),
    ('dopri5', 'rk45', None), (' Euler@1 ', 'euler@1', 1)])
def test_parse_sampler_good(spec, key, steps):
    sampler = solvers.parse_sampler(spec, rtol=1e-3)
    assert (sampler.key, sampler.steps, sampler.rtol) == (key, steps, 1e-3)


@pytest.mark.parametrize('spec,needle', [
    ('eulr@4', "unknown solver 'eulr' "
               '(expected one of euler, heun, midpoint, rk45)'),
    ('euler@0', 'steps must be an integer >= 1'),
    ('euler@-3', 'steps must be an integer >= 1'),
    ('heun@2.5', 'steps must be an integer >= 1'),
    ('midpoint@', 'steps must be an integer >= 1'),
    ('euler', "fixed-step solvers need '@N' steps"),
    ('rk45@8', 'adaptive rk45 takes no step count'),
    ('dopri5@x', 'adaptive rk45 takes no step count'),
    ('', "unknown solver ''"),
    ('euler\n@4', 'unknown solver'),
])
def test_parse_sampler_bad(spec, needle):
    with pytest.raises(ValueError) as info:
        solvers.parse_sampler(spec)
    message = str(info.value)
    assert '\n' not in message and needle in message
    assert message.startswith(f'sampler {spec!r}: ')


def test_sampler_validates_and_keys():
    with pytest.raises(ValueError, match='steps must be an integer'):
        solvers.Sampler('heun', 0)
    with pytest.raises(ValueError, match='takes no step count'):
        solvers.Sampler('rk45', 4)
    assert solvers.SOLVERS == ('euler', 'heun', 'midpoint', 'rk45')


def test_make_sampler_params_are_arguments():
    traces = [0]

    def apply(params, x, t):
        traces[0] += 1
        return mlp_velocity(params, x, t)

    run = solvers.make_sampler(apply, solvers.parse_sampler('euler@4'))
    x = jax.random.normal(jax.random.key(3), (8, 2))
    out_a, nfe = run(mlp_params(0), x)
    out_b, _ = run(mlp_params(1), x)
    assert traces[0] == 1 and int(nfe) == 4
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-2
