"""Constant acceleration flow (docs/methods.md, CAF): the caf@N update, the caf kind against analytic
flows and the paper's sampler, the two training stages' losses, `widen`, a toy run on 1 and 8 devices
and resumed, and a CAF export as a teacher.

Bad command-line input for CAF is in test_bad_input.py (rows under `# CAF`).
"""

import copy
import dataclasses
import hashlib
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowjax import checkpoint, configs, errors, generate, sharding, train
from flowjax.data import couplings
from flowjax.flows import objective, solvers
from flowjax.methods import caf, rf, table, training
from flowjax.models import kinds

MLP = {'name': 'mlp', 'features': (16, 16), 'time_dim': 16, 'dropout': 0.0}


def _normal(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _randomized(params, seed: int, scale: float = 0.5):
    """Every leaf replaced by N(0, scale^2) draws: the zero-initialised output layer would make v = a = 0."""
    rng = np.random.default_rng(seed)  # on the host: a jax draw per leaf shape would compile one each
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32), params)


def _networks(kind, seed: int):
    """Random CAF networks, both moving x; the time input damped: the sinusoidal embedding of 1000 t
    spins fast, so a time one float32 ulp off (the solver's grid against i / N) would move the output."""
    params = _randomized(jax.eval_shape(lambda key: kind.init(key, (2,)), jax.random.key(0)), seed)
    for net in params.values():
        net['params']['time_in']['kernel'] = 0.01 * net['params']['time_in']['kernel']
    return params


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ------------------------------------------------------------- the caf@N solver (docs/methods.md, CAF)


def _constant_field(v0, a) -> solvers.Accelerated:
    """dx/dt = v0 + t a with a constant a: x(t1) = x(t0) + v0 (t1 - t0) + a (t1^2 - t0^2) / 2."""
    return solvers.Accelerated(v0, lambda x, t: jnp.broadcast_to(a, x.shape))


@pytest.mark.parametrize('n', [1, 2, 3, 7])
def test_caf_update_is_exact_under_constant_acceleration_both_ways(n):
    x0, v0, a = _normal(0, (5, 2)), _normal(1, (5, 2)), _normal(2, (5, 2))
    field, sampler = _constant_field(v0, a), solvers.parse_sampler(f'caf@{n}')
    x1, nfe = solvers.solve(field, x0, sampler, t0=0.0, t1=1.0)
    _close(x1, x0 + v0 + a / 2)
    assert int(nfe) == n == sampler.solver.nfe
    back, nfe = solvers.solve(field, x1, sampler, t0=1.0, t1=0.0)  # inversion: negative steps, a at each start
    _close(back, x0)
    assert int(nfe) == n

    # Per-example windows, forward and backward in one batch.
    t0 = jnp.array([0.0, 0.2, 1.0, 0.9, 0.5])
    t1 = jnp.array([1.0, 0.7, 0.0, 0.3, 0.5])
    x, _ = solvers.solve(field, x0, sampler, t0=t0, t1=t1)
    _close(x, x0 + v0 * (t1 - t0)[:, None] + a * ((t1 ** 2 - t0 ** 2) / 2)[:, None])


@pytest.mark.parametrize('n', [1, 4, 16, 64])
def test_euler_on_the_accelerated_field_converges_as_a_over_2n(n):
    """Euler sums dt (v0 + t_i a) over t_i = i/N: x0 + v0 + a (N - 1) / (2N), an error of exactly a / (2N)."""
    x0, v0, a = _normal(0, (5, 2)), _normal(1, (5, 2)), _normal(2, (5, 2))
    x1, nfe = solvers.solve(_constant_field(v0, a), x0, solvers.parse_sampler(f'euler@{n}'), t0=0.0, t1=1.0)
    _close(x1 - (x0 + v0 + a / 2), -a / (2 * n))
    assert int(nfe) == n


def test_caf_update_refuses_a_plain_velocity():
    x = jnp.ones((3, 2))
    with pytest.raises(ValueError) as e:
        solvers.solve(lambda x, t: x, x, solvers.parse_sampler('caf@2'), t0=0.0, t1=1.0)
    message = str(e.value)
    assert '\n' not in message and "sampler 'caf@N' steps a constant-acceleration model (kind 'caf')" in message
    assert 'euler, heun, midpoint or rk45' in message


def test_which_kinds_take_which_samplers():
    velocity = kinds.VelocityFunction(lambda params, x, t, dropout_rng=None, label=None: x)
    model = kinds.ConstantAcceleration.from_model_config(MLP, channels=2)
    for spec, on_velocity, on_caf in (('caf@2', False, True), ('euler@3', True, True), ('rk45', True, True),
                                      ('heun@2:edm', True, False), ('caf@4:edm=3', False, False)):
        sampler = solvers.parse_sampler(spec)
        assert (velocity.supports(sampler), model.supports(sampler)) == (on_velocity, on_caf), spec


# ----------------------------------------------------- the caf kind on an analytic flow (docs/methods.md, CAF)


@dataclasses.dataclass(frozen=True)
class AffineCAF(kinds.ConstantAcceleration):
    """The exact CAF model of the affine coupling x1 = M x0 + b (params['velocity'] = {'M', 'b'}): v0 =
    h (x1 - x0), computable from x0 at t = 0 or from x1 at t = 1, and a = 2 (x1 - x0) - 2 v0 = 2 v0 (1/h - 1)."""

    def initial_velocity(self, params, x, t, *, dropout_rng=None, label=None):
        m, b = params['M'], params['b']
        from_x0 = x @ m.T + b - x  # x is x0: x1 - x0
        from_x1 = x - jnp.linalg.solve(m, (x - b).T).T  # x is x1: x1 - M^-1 (x1 - b)
        return self.h * jnp.where((t < 0.5)[:, None], from_x0, from_x1)

    def acceleration(self, params, x, t, v0, *, dropout_rng=None, label=None):
        return 2.0 * v0 * (1.0 / self.h - 1.0)


@pytest.fixture(scope='module')
def affine():
    """(kind, params, x0, x1) of an invertible affine coupling, h = 1.5."""
    m = jnp.array([[1.5, 0.4], [-0.3, 0.8]])
    b = jnp.array([0.5, -1.0])
    x0 = _normal(3, (6, 2))
    return AffineCAF('{}', 2, h=1.5), {'velocity': {'M': m, 'b': b}, 'acceleration': {}}, x0, x0 @ m.T + b


@pytest.mark.parametrize('n', [1, 2, 5])
def test_analytic_caf_samples_inverts_and_reconstructs_exactly(affine, n):
    kind, params, x0, x1 = affine
    sampler = solvers.parse_sampler(f'caf@{n}')
    x, nfe = kind.sample(params, x0, sampler, eps=0.3)  # eps unused: CAF starts at t = 0
    _close(x, x1)
    assert int(nfe) == n + 1  # N acceleration calls and v0
    z, nfe = kind.invert(params, x1, sampler, eps=0.3)
    _close(z, x0)
    assert int(nfe) == n + 1
    again, nfe = kind.reconstruct(params, x1, sampler, eps=0.3)
    _close(again, x1)
    assert int(nfe) == 2 * n + 1  # v0 of the data once, both solves
    assert kind.start(0.3) == 0.0


def test_analytic_caf_with_other_solvers(affine):
    """Heun integrates dx/dt = v0 + t a exactly (the field is linear in t); Euler's path ends a / (2N) short."""
    kind, params, x0, x1 = affine
    x, nfe = kind.sample(params, x0, solvers.parse_sampler('heun@3'), eps=1e-3)
    _close(x, x1)
    assert int(nfe) == 2 * 3 + 1
    v0 = kind.initial_velocity(params['velocity'], x0, jnp.zeros(6))
    a = kind.acceleration(params['acceleration'], x0, jnp.zeros(6), v0)
    xs, vs = kind.path(params, x0, 4, eps=1e-3)
    assert xs.shape == (5, 6, 2) and vs.shape == (4, 6, 2)
    _close(xs[0], x0)
    _close(xs[-1], x1 - a / 8)
    _close(vs, v0 + jnp.arange(4.0)[:, None, None] / 4 * a)


# The paper's sampler and inversion, written out with one network call per line (docs/methods.md, CAF).
def _paper_sample(kind, params, x, v, n):
    """x <- x + v/N + ((2i + 1) / (2N)) a(x, i/N, v) / N for i = 0..N-1."""
    for i in range(n):
        slot = v if kind.ivc else jnp.zeros_like(v)
        a = kind.apply(params['acceleration'], jnp.concatenate([x, slot], -1), jnp.full((x.shape[0],), i / n))
        x = x + v / n + (2 * i + 1) / (2 * n) * a / n
    return x


def _paper_invert(kind, params, z, v, n):
    """z <- z - v/N - (t_{i+1} - 1/(2N)) a(z, t_{i+1}, v) / N for t_{i+1} = 1, (N-1)/N, .., 1/N."""
    for i in reversed(range(n)):
        t = (i + 1) / n
        a = kind.apply(params['acceleration'], jnp.concatenate([z, v], -1), jnp.full((z.shape[0],), t))
        z = z - v / n - (t - 1 / (2 * n)) * a / n
    return z


def _v_hat(kind, params, x, t):
    return kind.apply(params['velocity'], jnp.concatenate([x, jnp.zeros_like(x)], -1), jnp.full((x.shape[0],), t))


@pytest.mark.parametrize('ivc', [True, False])
def test_caf_kind_is_the_papers_sampler_and_inversion(ivc):
    kind = kinds.ConstantAcceleration.from_model_config(MLP, channels=2, h=1.5, ivc=ivc)
    params = _networks(kind, 0)
    x0, x1 = _normal(4, (8, 2)), _normal(5, (8, 2))
    n, sampler = 3, solvers.parse_sampler('caf@3')  # N = 1 is in the analytic tests above
    x, nfe = kind.sample(params, x0, sampler, eps=1e-3)
    expected = _paper_sample(kind, params, x0, _v_hat(kind, params, x0, 0.0), n)
    assert float(jnp.abs(expected - x0).max()) > 0.1  # the networks move the samples
    _close(x, expected)
    assert int(nfe) == n + 1
    if ivc:  # inversion and reconstruction with v_hat = v(x1, 1)
        v = _v_hat(kind, params, x1, 1.0)
        z, nfe = kind.invert(params, x1, sampler, eps=1e-3)
        _close(z, _paper_invert(kind, params, x1, v, n))
        assert int(nfe) == n + 1
        again, nfe = kind.reconstruct(params, x1, sampler, eps=1e-3)
        _close(again, _paper_sample(kind, params, _paper_invert(kind, params, x1, v, n), v, n))
        assert int(nfe) == 2 * n + 1


# ------------------------------------------------------------ the two stages' losses (docs/methods.md, CAF)


@dataclasses.dataclass(frozen=True)
class _FixedTimes(objective.Flow):
    """The objective with given training times, so a loss can be written out by hand."""

    times: tuple = ()

    def sample_t(self, rng, n):
        return jnp.asarray(self.times, jnp.float32)


def _context(kind, flow, teacher_params=None):
    return training.Context(apply=kind.apply, source=lambda key, shape: jax.random.normal(key, shape), flow=flow,
                            options=caf.Options(kind=kind, velocity_steps=1, acceleration_steps=1),
                            teacher_params=teacher_params,
                            perceptual=lambda _, x, y: jnp.sum(jnp.abs(x - y), axis=-1))  # stands in for LPIPS


def _huber(pred, target):
    d = pred.shape[-1]
    c = 0.00054 * d
    return (jnp.sqrt(jnp.sum((pred - target) ** 2, -1) + c * c) - c) / d


@pytest.mark.parametrize('ivc', [True, False])
@pytest.mark.parametrize('loss', ['l2', 'lpips_huber'])
def test_stage_losses_are_the_formulas(loss, ivc):
    kind = kinds.ConstantAcceleration.from_model_config(MLP, channels=2, h=1.5, ivc=ivc)
    both = _networks(kind, 2)
    t = jnp.array([0.0, 0.25, 0.5, 0.8, 1.0, 0.1])
    x0, x1 = _normal(6, (6, 2)), _normal(7, (6, 2))
    batch, rng = {'x0': x0, 'x1': x1}, jax.random.key(9)
    flow = _FixedTimes(loss=loss, times=tuple(float(s) for s in t))
    distance = lambda pred, target, x1_hat: (  # noqa: E731
        jnp.mean((pred - target) ** 2) if loss == 'l2'
        else jnp.mean(_huber(pred, target) + jnp.sum(jnp.abs(x1_hat - x1), -1)))
    tt = t[:, None]

    # Velocity stage: x_t on the path with v0 = h (x1 - x0), target h (x1 - x0), x1_hat = x_t + (1 - t) v / h.
    target = 1.5 * (x1 - x0)
    x_t = (1 - tt ** 2) * x0 + tt ** 2 * x1 + target * (tt - tt ** 2)
    v = kind.apply(both['velocity'], jnp.concatenate([x_t, jnp.zeros_like(x_t)], -1), t)
    got, _ = caf.velocity_loss_fn(both['velocity'], batch, rng, _context(kind, flow))
    _close(got, distance(v, target, x_t + (1 - tt) * v / 1.5), 1e-6)

    # Acceleration stage: v_hat = v(x0, 0) of the frozen velocity network, x_t on the path with v0 = v_hat,
    # target 2 (x1 - x0) - 2 v_hat, x1_hat = x_t + (1 - t) v_hat + (1 - t)(1 + t) / 2 a.
    v_hat = _v_hat(kind, both, x0, 0.0)
    x_t = (1 - tt ** 2) * x0 + tt ** 2 * x1 + v_hat * (tt - tt ** 2)
    slot = v_hat if ivc else jnp.zeros_like(v_hat)
    a = kind.apply(both['acceleration'], jnp.concatenate([x_t, slot], -1), t)
    x1_hat = x_t + (1 - tt) * v_hat + (1 - tt) * (1 + tt) / 2 * a
    got, _ = caf.acceleration_loss_fn(both['acceleration'], batch, rng, _context(kind, flow, both['velocity']))
    _close(got, distance(a, 2 * (x1 - x0) - 2 * v_hat, x1_hat), 1e-6)
    _close(x1_hat[-2], x1[-2])  # at t = 1 the estimate is x_t = x1 itself


def _widened_matches_the_export(model: dict, shape: tuple, key) -> None:
    velocity = kinds.VelocityField.from_model_config(model)
    given = _randomized(jax.eval_shape(lambda k: velocity.init(k, shape), key), 3, scale=0.2)
    kind = kinds.ConstantAcceleration.from_model_config(model, channels=shape[-1])
    fresh = jax.eval_shape(lambda k: kind.network_init(k, shape), key)
    widened = caf.widen(given, fresh)
    assert jax.tree.map(lambda w: w.shape, widened) == jax.tree.map(lambda f: f.shape, fresh)
    x, t = _normal(8, (2, *shape)), jnp.array([0.0, 0.6])
    both = jax.jit(lambda x, t: (velocity.apply(given, x, t), kind.initial_velocity(widened, x, t)))  # one compile
    expected, got = both(x, t)
    assert float(jnp.abs(expected).max()) > 1e-3
    _close(got, expected, 1e-6)


def test_widen_starts_the_velocity_network_as_the_export():
    _widened_matches_the_export(MLP, (2,), jax.random.key(0))
    # A tiny NCSN++ on 8x8x3 images (RBG keys: threefry inits of a U-Net compile slowly on CPU).
    tiny = {'name': 'ncsnpp', 'nf': 8, 'ch_mult': (1,), 'num_res_blocks': 1, 'attn_resolutions': (), 'dropout': 0.0,
            'init_scale': 1.0}
    _widened_matches_the_export(tiny, (8, 8, 3), jax.random.key(0, impl='rbg'))


def test_widen_refuses_another_architecture():
    other = kinds.VelocityField.from_model_config({**MLP, 'features': (8,)})
    given = jax.eval_shape(lambda k: other.init(k, (2,)), jax.random.key(0))
    kind = kinds.ConstantAcceleration.from_model_config(MLP, channels=2)
    fresh = jax.eval_shape(lambda k: kind.network_init(k, (2,)), jax.random.key(0))
    with pytest.raises(errors.ConfigError) as e:
        caf.widen(given, fresh)
    assert str(e.value) == ("caf.init: its parameters do not match the CAF network's (only in the export: none; "
                            "only in the network: ['params']['dense_1']['bias'], ['params']['dense_1']['kernel'], "
                            "['params']['time_1']['bias'])")


@pytest.mark.parametrize('field, value, message', [
    ('caf.h', 0.0, "caf.h=0.0: must be a number > 0"),
    ('caf.h', -1.5, "caf.h=-1.5: must be a number > 0"),
    ('caf.h', float('inf'), "caf.h=inf: must be a number > 0"),
    ('caf.h', True, "caf.h=True: must be a number > 0"),
    ('caf.ivc', 1, "caf.ivc=1: must be True or False"),
    ('caf.velocity_steps', 0, "caf.velocity_steps=0: must be an integer in [1, train.steps) (train.steps=8"),
    ('caf.velocity_steps', 8, "caf.velocity_steps=8: must be an integer in [1, train.steps)"),
    ('caf.velocity_steps', True, "caf.velocity_steps=True: must be an integer"),
    ('train.steps', 1, "train.steps=1: CAF trains two networks one after the other, it needs at least 2 steps"),
])
def test_check_refuses_bad_caf_fields_in_one_line(field, value, message):
    config = _toy_config(None, None)
    section, name = field.split('.')
    config[section] = ml_collections.ConfigDict({**config[section].to_dict(), name: value})  # untyped, as code sets it
    with pytest.raises(errors.ConfigError) as e:
        caf.check(config)
    assert str(e.value).startswith(message) and '\n' not in str(e.value), str(e.value)


# ----------------------------------------------------------- a toy run: devices, resumption, a teacher


def _toy_config(store, teacher) -> ml_collections.ConfigDict:
    """method caf at the runlocal toy sizes, 8 steps (4 per network), no evaluation."""
    c = configs.shrink_toy2d_for_local(table.config('caf'))
    c.train.update(steps=8, warmup_steps=2, log_every=4, checkpoint_every=100)  # saves: at the end, on SIGTERM
    c.eval.samplers = ()
    c.flow.time = 'grid'
    c.caf.couplings = store and str(store)
    c.caf.init = teacher and str(teacher)
    return c


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """A random velocity teacher of the toy model, its euler@4 couplings, and the uninterrupted CAF run on
    8 devices (started from the teacher, on the couplings): (root, config, params of its export)."""
    root = tmp_path_factory.mktemp('caf')
    config = _toy_config(root / 'couplings', root / 'teacher')
    teacher = kinds.from_config(config)
    params = _randomized(jax.eval_shape(lambda k: teacher.init(k, (2,)), jax.random.key(0)), 4, scale=0.3)
    checkpoint.export(root / 'teacher', params, train.export_meta(table.config('rf'), teacher, (2,), 1))
    store = table.config('generate')
    store.generate.update(teacher=str(root / 'teacher'), num_pairs=256, shard_size=256, batch_size=64,
                          sampler='euler@4')
    generate.generate_couplings(store, root / 'couplings')
    assert jax.device_count() == 8
    caf.run(config, str(root / 'run'))
    return root, config, checkpoint.load_export(root / 'run')[0]


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_toy_run_exports_a_caf_model(toy):
    root, config, params = toy
    _, meta = checkpoint.load_export(root / 'run')
    assert meta['kind'] == 'caf' and meta['step'] == 8 and meta['h'] == 1.5 and meta['ivc'] is True
    assert kinds.from_meta(meta) == caf.kind_of(config)
    for stage, steps in (('velocity', 4), ('acceleration', 4)):
        _, stage_meta = checkpoint.load_export(root / 'run' / stage)
        assert (stage_meta['kind'], stage_meta['step']) == (f'caf.{stage}', steps)
        _leaves_equal(checkpoint.load_export(root / 'run' / stage)[0], params[stage])
    # The acceleration network, started as the velocity EMA, trained away from it.
    assert any(float(np.abs(a - v).max()) > 1e-4
               for a, v in zip(jax.tree.leaves(params['acceleration']), jax.tree.leaves(params['velocity'])))


def test_one_device_gives_the_eight_device_export(toy, tmp_path, monkeypatch):
    root, config, params = toy
    every = sharding.data_mesh
    monkeypatch.setattr(sharding, 'data_mesh', lambda devices=None: every(devices or jax.devices()[:1]))
    caf.run(config, str(tmp_path))
    one, _ = checkpoint.load_export(tmp_path)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the gradient all-reduce sums in another order


def _snapshot(root) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest()
            for d, _, files in os.walk(root) for f in files}


def test_a_run_stopped_in_the_acceleration_stage_resumes_to_the_same_export(toy, tmp_path, monkeypatch):
    """The rerun finds the velocity stage done (its last checkpoint, its export) and resumes the
    acceleration stage from the step SIGTERM saved: bit for bit the uninterrupted run's export."""
    root, config, params = toy
    make_batches, made = couplings.make_batches, []

    def preempted_batches(*args, **kwargs):  # SIGTERM as the acceleration stage's second batch is read
        batches = make_batches(*args, **kwargs)
        made.append(batches)
        if len(made) == 1:  # the velocity stage's
            return batches

        def read(step):
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return batches(step)

        return read

    monkeypatch.setattr(couplings, 'make_batches', preempted_batches)
    with pytest.raises(errors.Preempted):
        caf.run(config, str(tmp_path))
    monkeypatch.undo()
    assert checkpoint.is_exported(tmp_path / 'velocity') and not checkpoint.is_exported(tmp_path / 'acceleration')
    stopped = checkpoint.Checkpoints(tmp_path / 'acceleration', config).latest_step()
    assert 1 <= stopped <= 4 and not checkpoint.is_exported(tmp_path)
    caf.run(config, str(tmp_path))
    _leaves_equal(checkpoint.load_export(tmp_path)[0], params)


def test_a_completed_rerun_changes_nothing(toy):
    root, config, _ = toy
    before = _snapshot(root / 'run')
    caf.run(config, str(root / 'run'))
    assert _snapshot(root / 'run') == before


def test_a_rerun_with_another_velocity_budget_is_refused(toy):
    # train.steps may grow on resume; with caf.velocity_steps at its default (half) the velocity network would
    # then train on while the acceleration stage continues from a checkpoint made against the old one.
    root, config, _ = toy
    longer = copy.deepcopy(config)
    longer.train.steps = 16
    before = _snapshot(root / 'run')
    with pytest.raises(errors.ConfigError) as e:
        caf.run(longer, str(root / 'run'))
    assert str(e.value).startswith('caf.velocity_steps: this run gives the velocity network 8 steps, but the '
                                   'acceleration stage') and 'caf.velocity_steps=4' in str(e.value), str(e.value)
    assert _snapshot(root / 'run') == before


def test_training_refuses_samplers_none_of_which_apply():
    config = configs.shrink_toy2d_for_local(table.config('rf'))
    config.eval.samplers = ('caf@1', 'caf@2')
    with pytest.raises(errors.ConfigError) as e:
        rf.check(config)
    assert str(e.value) == ("eval.samplers=('caf@1', 'caf@2'): none applies to a model of kind 'velocity', which "
                            'this method trains')
    config = _toy_config(None, None)
    config.eval.samplers = ('euler@4:edm',)  # a CAF model solves from t = 0, where the EDM grid is undefined
    with pytest.raises(errors.ConfigError, match="none applies to a model of kind 'caf'"):
        caf.check(config)


def test_a_caf_export_is_a_teacher_but_not_a_students_start(toy, tmp_path):
    root, config, params = toy
    store = table.config('generate')
    store.generate.update(teacher=str(root / 'run'), num_pairs=16, shard_size=16, batch_size=8, sampler='caf@2')
    summary = generate.generate_couplings(store, tmp_path / 'pairs')
    assert summary['complete'] and summary['mean_nfe'] == 3
    pairs = couplings.open_store(tmp_path / 'pairs').load()
    x1, nfe = caf.kind_of(config).sample(params, jnp.asarray(pairs['x0']), solvers.parse_sampler('caf@2'), eps=1e-3)
    assert int(nfe) == 3 and np.all(pairs['nfe'] == 3)
    _close(pairs['x1'], x1)

    store.generate.sampler = 'heun@2:edm'  # the EDM grid needs t > 0; CAF starts at 0
    with pytest.raises(errors.ConfigError) as e:
        generate.generate_couplings(store, tmp_path / 'edm')
    assert str(e.value) == (f"generate.sampler='heun@2:edm': does not apply to the teacher {root / 'run' / 'export'}, "
                            "a model of kind 'caf'")

    student = table.config('reflow')
    student.model = config.model
    with pytest.raises(errors.ConfigError) as e:
        training.load_model(str(root / 'run'), 'reflow.init', student)
    assert str(e.value) == (f"reflow.init: {root / 'run'} holds a model of kind 'caf'; a student starts from a "
                            "velocity field (kind 'velocity')")
