"""PeRFlow (docs/methods.md, PeRFlow): the window arithmetic, the piecewise kind's windowed sampler
(boundaries, NFE, step split, inversion), the three parameterisations' targets against DDIM and the
line, the loss against its formula, refusals, a toy run on 1 and 8 devices, a piecewise export as a
teacher and in evaluation, and the perflow_toy2d:runlocal pipeline.

Bad command-line input for PeRFlow is in test_bad_input.py (rows under `# PeRFlow`).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import experiment_config
from flowjax import checkpoint, configs, errors, evaluate, generate, pipeline, sharding, train
from flowjax.data import couplings
from flowjax.flows import diffusion, objective, solvers, windows
from flowjax.methods import perflow, table, training
from flowjax.models import kinds

MLP = {'name': 'mlp', 'features': (16, 16), 'time_dim': 16, 'dropout': 0.0}
A = jnp.array([[-0.4, 0.9], [-0.7, 0.2]])  # the analytic flows' dx/dt = A x + b
B = jnp.array([0.3, -0.5])


def _normal(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _affine(params, x, t, dropout_rng=None, label=None):
    return x @ params['A'].T + params['b']


PARAMS = {'A': A, 'b': B}


@dataclasses.dataclass(frozen=True)
class AnalyticPiecewise(kinds.Piecewise):
    """A piecewise kind whose 'network' is the function `fn(params, x, t)`."""

    fn: object = _affine

    @property
    def apply(self):
        return self.fn


def _kind(windows_=4, parameterization='velocity', process=diffusion.Linear(), fn=_affine):
    return AnalyticPiecewise('{}', windows_, parameterization, process, fn=fn)


# ------------------------------------------------------------------ window arithmetic


def test_window_of_grid_times_is_exact_at_the_boundaries():
    for k_windows, points in ((4, 1000), (4, 10), (3, 1000), (7, 7), (1, 5), (16, 1000)):
        k = np.arange(points)
        w = np.asarray(windows.window_of(jnp.asarray(k), k_windows, points))
        np.testing.assert_array_equal(w, (k * k_windows) // points)
        t = np.asarray(windows.grid_time(jnp.asarray(k), points))
        s, e = (np.asarray(a) for a in windows.window_bounds(jnp.asarray(w), k_windows))
        np.testing.assert_array_equal(t, (k / points).astype(np.float32))
        assert np.all(s <= t) and np.all(t < e), (k_windows, points)  # half-open, holding its start
        assert set(w) == set(range(k_windows))  # every window has times (points >= windows)
    k = jnp.array([0, 249, 250, 499, 500, 750, 999])
    np.testing.assert_array_equal(windows.window_of(k, 4, 1000), [0, 0, 1, 1, 2, 3, 3])  # k = 250: t = 1/4 starts w 1


def test_step_split_raises_n_to_k_and_gives_the_remainder_to_the_first_windows():
    assert windows.split_steps(1, 4) == (1, 1, 1, 1)
    assert windows.split_steps(4, 4) == (1, 1, 1, 1)
    assert windows.split_steps(6, 4) == (2, 2, 1, 1)
    assert windows.split_steps(9, 4) == (3, 2, 2, 2)
    assert windows.split_steps(7, 1) == (7,)
    assert windows.bounds(4) == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]


# ------------------------------------------------------------------ the windowed sampler


def _window_solve(x, sampler_name, steps, windows_):
    """The per-window solves chained by hand: [(x at each boundary)] from t = 0 to 1."""
    states = [x]
    for (s, e), n in zip(windows.bounds(windows_), steps):
        x, _ = solvers.solve(lambda y, t: _affine(PARAMS, y, t), x, solvers.parse_sampler(f'{sampler_name}@{n}'),
                             t0=s, t1=e)
        states.append(x)
    return states


@pytest.mark.parametrize('n', [1, 4, 6, 9])
def test_windowed_euler_hits_every_boundary_and_counts_nfe(n):
    kind, x0 = _kind(), _normal(0, (5, 2))
    steps = windows.split_steps(n, 4)
    expected = _window_solve(x0, 'euler', steps, 4)
    x1, nfe = kind.sample(PARAMS, x0, solvers.parse_sampler(f'euler@{n}'), eps=0.3)  # eps unused: starts at 0
    _close(x1, expected[-1])
    assert int(nfe) == max(n, 4)
    xs, vs = kind.path(PARAMS, x0, n, eps=1e-3)  # the Euler path: its states at the boundaries are the same
    assert xs.shape == (max(n, 4) + 1, 5, 2) and vs.shape == (max(n, 4), 5, 2)
    _close(xs[np.cumsum((0,) + steps)], jnp.stack(expected))
    assert kind.start(0.3) == 0.0


def test_the_time_grid_contains_every_window_start():
    """The times the velocity is called at by euler@6 over 4 windows: 2, 2, 1, 1 steps, each window's own grid."""
    seen = []

    def recording(params, x, t, dropout_rng=None, label=None):
        jax.debug.callback(lambda tt: seen.append(float(np.asarray(tt)[0])), t, ordered=True)
        return _affine(params, x, t)

    kind = _kind(fn=recording)
    kind.sample(PARAMS, _normal(1, (3, 2)), solvers.parse_sampler('euler@6'), eps=1e-3)[0].block_until_ready()
    assert seen == [0.0, 0.125, 0.25, 0.375, 0.5, 0.75]
    seen.clear()
    kind.sample(PARAMS, _normal(1, (3, 2)), solvers.parse_sampler('heun@5'), eps=1e-3)[0].block_until_ready()
    # heun: both ends of each step, each window solved on its own (its end evaluated with its own velocity)
    assert seen == [0.0, 0.125, 0.125, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0]


def test_heun_and_rk45_per_window():
    kind, x0 = _kind(), _normal(2, (5, 2))
    x1, nfe = kind.sample(PARAMS, x0, solvers.parse_sampler('heun@6'), eps=1e-3)
    _close(x1, _window_solve(x0, 'heun', (2, 2, 1, 1), 4)[-1])
    assert int(nfe) == 12
    x1, nfe = jax.jit(lambda x: kind.sample(PARAMS, x, solvers.parse_sampler('rk45'), eps=1e-3))(x0)
    exact = jax.scipy.linalg.expm(A)  # x(1) of dx/dt = A x + b
    _close(x1, x0 @ exact.T + jnp.linalg.solve(A, (exact - jnp.eye(2)) @ B), 1e-4)
    assert int(nfe) >= 4 * 7 and (int(nfe) - 4) % 6 == 0  # four solves of 6 steps + 1 each


@pytest.mark.parametrize('parameterization', ['velocity', 'ddim_eps', 'diff_eps'])
def test_inversion_walks_the_windows_backwards_and_round_trips(parameterization):
    process = diffusion.Linear() if parameterization == 'velocity' else diffusion.VP()
    # an eps 'network' 0.3 x - 0.1 t: each window's (lam, eta) makes its velocity differ
    fn = _affine if parameterization == 'velocity' else (lambda p, x, t, dropout_rng=None, label=None:
                                                          0.3 * x - 0.1 * t[:, None])
    kind, x1 = _kind(4, parameterization, process, fn), _normal(3, (6, 2))
    sampler = solvers.parse_sampler('heun@1024')  # 256 steps a window: the eps windows' fields are stiff near s

    @jax.jit
    def run(x):
        z, nfe = kind.invert(PARAMS, x, sampler, eps=1e-3)
        states = [x]  # each backward window solve by hand, data to noise
        for s, e in reversed(windows.bounds(4)):
            states.append(solvers.solve(kind.window_velocity(PARAMS, s, e), states[-1],
                                        solvers.parse_sampler('heun@256'), t0=e, t1=s)[0])
        return z, nfe, kind.sample(PARAMS, z, sampler, eps=1e-3), states[-1]

    z, nfe, (back, nfe_back), by_hand = run(x1)
    _close(z, by_hand, 1e-6)
    _close(back, x1, 1e-3)
    assert int(nfe) == int(nfe_back) == 2048


def test_which_samplers_a_piecewise_model_takes():
    kind = kinds.Piecewise.from_model_config(MLP)
    for spec, ok in (('euler@3', True), ('heun@2', True), ('midpoint@5', True), ('rk45', True), ('caf@2', False),
                     ('euler@4:edm', False)):
        assert kind.supports(solvers.parse_sampler(spec)) == ok, spec


# ------------------------------------------------------------------ parameterisations


def _window_batch(seed: int, k_windows: int = 4):
    """(s, e, z_s, z_e) of per-example windows: every window of K twice."""
    w = jnp.tile(jnp.arange(k_windows), 2)
    s, e = windows.window_bounds(w, k_windows)
    return s, e, _normal(seed, (len(w), 3)), _normal(seed + 1, (len(w), 3))


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_ddim_eps_target_makes_one_ddim_jump_land_on_z_e(schedule):
    process = diffusion.VP(schedule)
    kind = kinds.Piecewise.from_model_config(MLP, parameterization='ddim_eps', process=process)
    s, e, z_s, z_e = _window_batch(4)
    eps = kind.target(z_s, z_e, s, e)
    # float32 tolerance: lam = a_e / a_s multiplies z_s's rounding (about 1e4 in the cosine schedule's first window)
    lam = np.asarray(kind.window_coefficients(s, e)[0])[:, None]
    error = np.abs(np.asarray(diffusion.ddim_step(process, z_s, eps, s, e)) - np.asarray(z_e))
    assert np.all(error <= 1e-6 * (1 + lam) * 10), (error.max(), lam.max())


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_diff_eps_target_reconstructs_the_window_start(schedule):
    process = diffusion.VP(schedule)
    kind = kinds.Piecewise.from_model_config(MLP, parameterization='diff_eps', process=process)
    s, e, z_s, z_e = _window_batch(6)
    eps = kind.target(z_s, z_e, s, e)
    g = (process.coefficients(s)[0] / process.coefficients(e)[0])[:, None]
    _close(g * z_e + jnp.sqrt(1 - g * g) * eps, z_s, 1e-5)
    _close(eps, (z_s - g * z_e) / jnp.sqrt(1 - g * g), 1e-4)  # the reference's form of the target


@pytest.mark.parametrize('parameterization', ['ddim_eps', 'diff_eps'])
def test_the_eps_velocity_of_the_target_is_the_line_at_every_t(parameterization):
    kind = kinds.Piecewise.from_model_config(MLP, parameterization=parameterization, process=diffusion.VP())
    s, e, z_s, z_e = _window_batch(8)
    lam, eta = kind.window_coefficients(s, e)
    eps = kind.target(z_s, z_e, s, e)
    line = windows.line_velocity(z_s, z_e, s, e)
    for fraction in (0.0, 0.3, 0.75, 1.0):  # t = s .. e, the end included
        t = s + fraction * (e - s)
        x = windows.line_point(z_s, z_e, s, e, t)
        _close(windows.eps_velocity(x, eps, t, s, e, lam, eta), line, 2e-4)


def test_eps_parameterisations_need_a_vp_process():
    with pytest.raises(ValueError, match="parameterization='ddim_eps' needs a VP process, got 'linear'"):
        kinds.Piecewise.from_model_config(MLP, parameterization='ddim_eps')


def test_piecewise_meta_round_trips():
    for kind in (kinds.Piecewise.from_model_config(MLP, windows=3),
                 kinds.Piecewise.from_model_config(MLP, windows=2, parameterization='diff_eps',
                                                   process=diffusion.VP('cosine', 500))):
        meta = json.loads(json.dumps(kind.meta()))
        assert meta['kind'] == 'piecewise' and kinds.from_meta(meta) == kind


# ------------------------------------------------------------------ the loss


@dataclasses.dataclass(frozen=True)
class _Options:
    windows: int
    grid_points: int
    teacher_sampler: solvers.Sampler
    kind: kinds.Piecewise


@pytest.mark.parametrize('parameterization', ['velocity', 'ddim_eps'])
def test_the_loss_is_the_formula(parameterization):
    """The loss with an affine teacher (its per-window Euler solve written out) against a hand computation."""
    k_windows, points, n_teacher = 4, 10, 3
    process = diffusion.Linear() if parameterization == 'velocity' else diffusion.VP()
    student = kinds.Piecewise.from_model_config(MLP, windows=k_windows, parameterization=parameterization,
                                                process=process)
    params = jax.tree.map(lambda p: 0.3 * _normal(p.size, p.shape),
                          jax.eval_shape(lambda k: student.init(k, (2,)), jax.random.key(0)))
    teacher = kinds.VelocityFunction(_affine)
    options = _Options(k_windows, points, solvers.parse_sampler(f'euler@{n_teacher}'), student)
    source = lambda key, shape: jax.random.normal(key, shape)  # noqa: E731
    ctx = training.Context(apply=student.apply, source=source, flow=objective.Flow(), options=options,
                           teacher_kind=teacher, teacher_params=PARAMS)
    x1, rng = _normal(9, (16, 2)), jax.random.key(3)
    loss, _ = perflow.loss_fn(params, {'x1': x1}, rng, ctx)

    k_t, k_eps, _ = jax.random.split(rng, 3)  # the loss's draws
    k = np.asarray(jax.random.randint(k_t, (16,), 0, points))
    eps = np.asarray(source(k_eps, x1.shape), np.float64)
    t, w = k / points, (k * k_windows) // points
    s, e = w / k_windows, (w + 1) / k_windows
    a_s, sig_s = (np.asarray(c, np.float64) for c in process.coefficients(jnp.asarray(s, jnp.float32)))
    z_s = a_s[:, None] * np.asarray(x1, np.float64) + sig_s[:, None] * eps
    z_e, h = z_s.copy(), (e - s)[:, None] / n_teacher
    for _ in range(n_teacher):
        z_e = z_e + h * (z_e @ np.asarray(A, np.float64).T + np.asarray(B, np.float64))
    z_t = z_s + (z_e - z_s) * ((t - s) / (e - s))[:, None]
    if parameterization == 'velocity':
        target = (z_e - z_s) / (e - s)[:, None]
    else:
        a_e, sig_e = (np.asarray(c, np.float64) for c in process.coefficients(jnp.asarray(e, jnp.float32)))
        lam = a_e / a_s
        target = (z_e - lam[:, None] * z_s) / (sig_e - lam * sig_s)[:, None]
    pred = np.asarray(student.apply(params, jnp.asarray(z_t, jnp.float32), jnp.asarray(t, jnp.float32)), np.float64)
    assert len(set(w)) > 1
    _close(loss, np.mean((pred - target) ** 2), 1e-4)


# ------------------------------------------------------------------ checks and a toy run


def _toy_config(teacher) -> ml_collections.ConfigDict:
    """method perflow at the runlocal toy sizes, 8 steps, no evaluation."""
    c = configs.shrink_toy2d_for_local(table.config('perflow'))
    c.model = ml_collections.ConfigDict(MLP)
    c.train.update(steps=8, warmup_steps=2, log_every=4, checkpoint_every=100)
    c.eval.samplers = ()
    c.perflow.update(teacher=teacher and str(teacher), teacher_sampler='euler@2', grid_points=100)
    return c


@pytest.mark.parametrize('field, value, message', [
    ('perflow.teacher', None, 'perflow.teacher: a teacher export directory (or pipeline stage name) is required'),
    ('perflow.windows', 0, 'perflow.windows=0: must be an integer >= 1'),
    ('perflow.windows', 2.0, 'perflow.windows=2.0: must be an integer >= 1'),
    ('perflow.grid_points', 3, 'perflow.grid_points=3: must be an integer >= perflow.windows (4)'),
    ('perflow.teacher_sampler', 'rk45', "perflow.teacher_sampler='rk45': the teacher solves every window with a "
                                        'fixed-step sampler'),
    ('perflow.teacher_sampler', 'eulr@2', "perflow.teacher_sampler: sampler 'eulr@2': unknown solver 'eulr'"),
    ('perflow.parameterization', 'x0', "perflow.parameterization='x0': expected one of velocity, ddim_eps, diff_eps"),
    ('flow.time', 'grid', "flow.time='grid': perflow draws its own times"),
])
def test_check_refuses_bad_fields_in_one_line(field, value, message):
    config = _toy_config('teacher')
    section, name = field.split('.')
    config[section] = ml_collections.ConfigDict({**config[section].to_dict(), name: value})
    with pytest.raises(errors.ConfigError) as e:
        perflow.check(config)
    assert str(e.value).startswith(message) and '\n' not in str(e.value), str(e.value)


def _randomized(params, seed: int, scale: float = 0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32), params)


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """A random velocity teacher of the toy model, a CAF export, and the perflow run on 8 devices."""
    root = tmp_path_factory.mktemp('perflow')
    config = _toy_config(root / 'teacher')
    teacher = kinds.VelocityField.from_model_config(config.model)
    params = _randomized(jax.eval_shape(lambda k: teacher.init(k, (2,)), jax.random.key(0)), 4)
    checkpoint.export(root / 'teacher', params, train.export_meta(table.config('rf'), teacher, (2,), 1))
    model = kinds.ConstantAcceleration.from_model_config(MLP, channels=2)
    shapes = jax.eval_shape(lambda k: model.init(k, (2,)), jax.random.key(0))
    checkpoint.export(root / 'caf', jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                      train.export_meta(table.config('caf'), model, (2,), 1))
    assert jax.device_count() == 8
    perflow.run(config, str(root / 'run'))
    return root, config, checkpoint.load_export(root / 'run')[0]


def test_toy_run_exports_a_piecewise_model_started_from_the_teacher(toy):
    root, config, params = toy
    _, meta = checkpoint.load_export(root / 'run')
    assert meta['kind'] == 'piecewise' and meta['windows'] == 4 and meta['parameterization'] == 'velocity'
    assert meta['process'] == {'name': 'linear'} and meta['step'] == 8
    teacher = checkpoint.load_export(root / 'teacher')[0]
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(teacher))]
    assert 0 < max(moved) < 0.1  # 8 small steps away from the teacher's weights
    logged = [json.loads(line) for line in (root / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert logged and all(np.isfinite(m['loss']) for m in logged)


def test_one_device_gives_the_eight_device_export(toy, tmp_path, monkeypatch):
    root, config, params = toy
    every = sharding.data_mesh
    monkeypatch.setattr(sharding, 'data_mesh', lambda devices=None: every(devices or jax.devices()[:1]))
    perflow.run(config, str(tmp_path))
    one, _ = checkpoint.load_export(tmp_path)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the gradient all-reduce sums in another order


@pytest.mark.parametrize('change, message', [
    ({'teacher': 'caf'}, "perflow.teacher: {root}/caf holds a model of kind 'caf'; PeRFlow needs a teacher with a "
                         'noising process and window solves'),
    ({'teacher': 'run'}, "perflow.teacher: {root}/run holds a model of kind 'piecewise'; PeRFlow needs a teacher"),
    ({'parameterization': 'ddim_eps'}, "perflow.parameterization='ddim_eps': needs a VP (ddpm) teacher; the teacher "
                                       "{root}/teacher (kind 'velocity') has a linear process"),
    ({'teacher_sampler': 'caf@2'}, "perflow.teacher_sampler='caf@2': does not apply to the teacher {root}/teacher, "
                                   "a model of kind 'velocity'"),
    ({'init': 'caf'}, "perflow.init: {root}/caf holds a model of kind 'caf'; the student starts from one network"),
])
def test_run_refuses_teachers_and_starts_that_do_not_fit(toy, tmp_path, change, message):
    root, config, _ = toy
    config = ml_collections.ConfigDict(config.to_dict())
    for field, value in change.items():
        config.perflow[field] = str(root / value) if field in ('teacher', 'init') else value
    with pytest.raises(errors.ConfigError) as e:
        perflow.run(config, str(tmp_path / 'new'))
    assert str(e.value).startswith(message.format(root=root)) and '\n' not in str(e.value), str(e.value)
    assert not (tmp_path / 'new').exists()


def test_a_piecewise_export_is_a_teacher_and_is_evaluated(toy, tmp_path):
    root, config, params = toy
    kind = kinds.from_meta(checkpoint.load_export(root / 'run')[1])
    store = table.config('generate')
    store.generate.update(teacher=str(root / 'run'), num_pairs=16, shard_size=16, batch_size=8, sampler='euler@2')
    summary = generate.generate_couplings(store, tmp_path / 'pairs')
    assert summary['complete'] and summary['mean_nfe'] == 4  # euler@2 raised to the 4 windows
    pairs = couplings.open_store(tmp_path / 'pairs').load()
    x1, _ = kind.sample(params, jnp.asarray(pairs['x0']), solvers.parse_sampler('euler@2'), eps=1e-3)
    _close(pairs['x1'], x1)

    config = configs.base()
    config.method = 'evaluate'
    config.eval.update(models=(f'student={root / "run"}', f'teacher={root / "teacher"}'),
                       samplers=('euler@6', 'euler@4:edm'), num_samples=64, straightness_steps=8,
                       reconstruction=8)
    result = evaluate.run(ml_collections.ConfigDict(json.loads(config.to_json())), str(tmp_path / 'eval'))
    assert result['student']['euler@6']['nfe'] == 6
    assert result['student']['euler@6']['reconstruction_nfe'] == 12
    assert 'euler@4:edm' not in result['student'] and 'euler@4:edm' in result['teacher']
    assert np.isfinite(result['student']['straightness'])


# ------------------------------------------------------------------ the experiment


def test_perflow_toy2d_recipe():
    config = experiment_config('perflow_toy2d')
    assert config.stages == ('teacher', 'perflow_k4', 'perflow_k1', 'evaluate')
    k4, k1 = config.perflow_k4, config.perflow_k1
    assert (k4.perflow.windows, k4.perflow.teacher_sampler) == (4, 'euler@8')
    assert (k1.perflow.windows, k1.perflow.teacher_sampler) == (1, 'euler@32')
    assert k4.model.to_dict() == k1.model.to_dict() == config.teacher.model.to_dict()
    assert k4.train.to_dict() == k1.train.to_dict()


def test_perflow_toy2d_runlocal(tmp_path):
    config = experiment_config('perflow_toy2d', 'runlocal')
    config.evaluate.eval.samplers = ('euler@1', 'euler@8')
    for stage in ('teacher', 'perflow_k4', 'perflow_k1'):
        config[stage].train.steps = 20
    pipeline.run(config, str(tmp_path))
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['teacher']['euler@1']['nfe'] == report['perflow_k1']['euler@1']['nfe'] == 1
    assert report['perflow_k4']['euler@1']['nfe'] == 4 and report['perflow_k4']['euler@8']['nfe'] == 8
    for name in ('perflow_k4', 'perflow_k1'):
        meta = json.loads((tmp_path / name / 'export' / 'meta.json').read_text())
        assert meta['kind'] == 'piecewise' and meta['windows'] == (4 if name == 'perflow_k4' else 1)
        assert np.isfinite(report[name]['euler@8']['w2'])
