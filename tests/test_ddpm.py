"""The diffusion teacher (docs/methods.md, Diffusion teacher (ddpm)): the ddim@N solver, the ddpm kind
against its probability-flow ODE and an exact Gaussian eps, the loss, a toy run on 1 and 8 devices,
fine-tuning from an export, the export as a teacher, and the ddpm_toy2d:runlocal experiment.

Bad command-line input for ddpm is in test_bad_input.py (rows under `# ddpm`).
"""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import experiment_config
from flowjax import checkpoint, configs, errors, evaluate, generate, sharding, train
from flowjax.data import couplings
from flowjax.flows import diffusion, objective, solvers
from flowjax.methods import ddpm, perflow, reflow, table, training
from flowjax.models import kinds

MLP = {'name': 'mlp', 'features': (16, 16), 'time_dim': 16, 'dropout': 0.0}


def _normal(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _random_eps(kind, seed: int, out: float = 0.1):
    """Random eps-network params: every leaf N(0, 0.5^2) (on the host), the time input damped (the
    sinusoidal embedding of 1000 t spins fast) and the output layer scaled by `out`, no bias: the
    probability-flow ODE magnifies eps by up to sigma / alpha = 156 at t = 0, and a large output feeds back."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: kind.init(key, (2,)), jax.random.key(0))
    params = jax.tree.map(lambda x: jnp.asarray(0.5 * rng.normal(size=x.shape), jnp.float32), shapes)
    params['params']['time_in']['kernel'] = 0.01 * params['params']['time_in']['kernel']
    params['params']['out'] = {'kernel': out * params['params']['out']['kernel'],
                               'bias': jnp.zeros_like(params['params']['out']['bias'])}
    return params


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _relative(x, ref) -> float:
    return float(jnp.abs(x - ref).max() / jnp.abs(ref).max())


# ---------------------------------------------------------------- the ddim@N solver and which kinds take it


def test_ddim_parses_and_refuses_other_fields():
    sampler = solvers.parse_sampler('ddim@8')
    assert (sampler.key, sampler.nfe_per_step, sampler.solver.nfe) == ('ddim@8', 1, 8)
    assert solvers.parse_sampler('ddim@4:edm=3').key == 'ddim@4:edm=3'
    x = jnp.ones((3, 2))
    for field in (lambda x, t: x, solvers.Accelerated(x, lambda x, t: x)):
        with pytest.raises(ValueError) as e:
            solvers.solve(field, x, sampler, t0=0.0, t1=1.0)
        assert str(e.value) == ("sampler 'ddim@N' steps an eps-prediction diffusion model (kind 'ddpm'); a velocity "
                                'field takes euler, heun, midpoint or rk45')
    with pytest.raises(ValueError, match="'caf@N' steps a constant-acceleration model"):
        solvers.solve(solvers.EpsField(lambda x, t: x, diffusion.VP()), x, solvers.parse_sampler('caf@2'),
                      t0=0.0, t1=1.0)


def test_which_kinds_take_which_samplers():
    velocity = kinds.VelocityFunction(lambda params, x, t, dropout_rng=None, label=None: x)
    constant = kinds.ConstantAcceleration.from_model_config(MLP, channels=2)
    model = kinds.Diffusion.from_model_config(MLP)
    for spec, expected in (('ddim@4', (False, False, True)), ('euler@3', (True, True, True)),
                           ('rk45', (True, True, True)), ('caf@2', (False, True, False)),
                           ('heun@2:edm', (True, False, False)), ('ddim@4:edm', (False, False, False))):
        sampler = solvers.parse_sampler(spec)
        assert (velocity.supports(sampler), constant.supports(sampler), model.supports(sampler)) == expected, spec


def test_the_kind_records_and_reads_its_meta():
    kind = kinds.Diffusion.from_model_config(MLP, schedule='cosine', timesteps=50)
    assert kind.meta() == {'kind': 'ddpm', 'model': json.loads(kind.model), 'schedule': 'cosine', 'timesteps': 50}
    assert kinds.from_meta(kind.meta()) == kind and hash(kinds.from_meta(kind.meta())) == hash(kind)
    assert kind.process == diffusion.VP('cosine', 50) and kind.start(0.3) == 0.0
    assert kinds.Diffusion.from_model_config(MLP) != kinds.VelocityField.from_model_config(MLP)


# -------------------------------------------- (a) DDIM of a random eps network against its probability-flow ODE


@pytest.fixture(scope='module')
def random_model():
    """(kind, params, x0, x1): a random eps network of the default schedule (linear, T = 1000), noise x0 and
    its probability-flow solution x1 by rk45 (rtol = atol = 1e-6)."""
    kind = kinds.Diffusion.from_model_config(MLP)
    params, x0 = _random_eps(kind, 0), _normal(1, (64, 2))
    x1, nfe = kind.sample(params, x0, solvers.parse_sampler('rk45', rtol=1e-6, atol=1e-6), eps=1e-3)
    assert np.isfinite(np.asarray(x1)).all() and int(nfe) > 100
    return kind, params, x0, x1


def test_ddim_converges_to_the_probability_flow_ode(random_model):
    """DDIM is a first-order integrator of dx/dt = alpha' x1_hat + sigma' eps: its error against the rk45
    solution falls about 4x per 4x steps, to 1e-3 of the samples' size at N = 4096 (a fine Euler solve
    agrees as closely)."""
    kind, params, x0, x1 = random_model
    assert float(jnp.abs(x1 - x0).max()) > 10  # the network moves the samples
    errors_ = []
    for n in (64, 256, 1024, 4096):
        x, nfe = kind.sample(params, x0, solvers.parse_sampler(f'ddim@{n}'), eps=1e-3)
        assert int(nfe) == n
        errors_.append(_relative(x, x1))
    assert all(b < a / 2.5 for a, b in zip(errors_, errors_[1:])), errors_
    assert errors_[-1] < 1e-3 and errors_[0] > 1e-2, errors_
    x, nfe = kind.sample(params, x0, solvers.parse_sampler('euler@16384'), eps=1e-3)
    assert _relative(x, x1) < 1e-3 and int(nfe) == 16384


def test_ddim_per_example_windows_are_the_scalar_solves(random_model):
    kind, params, x0, _ = random_model
    sampler = solvers.parse_sampler('ddim@5')
    t0, t1 = jnp.array([0.0, 0.2, 1.0, 0.9, 0.5]), jnp.array([1.0, 0.7, 0.0, 0.3, 0.5])
    solve = jax.jit(lambda x, t0, t1: kind.solve(params, x, sampler, t0=t0, t1=t1))
    x, nfe = solve(x0[:5], t0, t1)
    assert int(nfe) == 5
    for i in range(5):  # 0-d times: the scalar path
        one, _ = solve(x0[i:i + 1], t0[i], t1[i])
        _close(x[i:i + 1], one, 1e-4)
    _close(x[4], x0[4])  # an empty window


def test_ddim_inversion_then_sampling_round_trips(random_model):
    """kind.reconstruct (invert from 1 to 0, sample back, 2N NFE): the round trip's error shrinks with N."""
    kind, params, _, _ = random_model
    x1 = _normal(2, (64, 2))
    gaps = []
    for n in (16, 256):
        again, nfe = kind.reconstruct(params, x1, solvers.parse_sampler(f'ddim@{n}'), eps=1e-3)
        assert int(nfe) == 2 * n
        gaps.append(float(jnp.abs(again - x1).max()))
    assert gaps[1] < gaps[0] / 4 and gaps[1] < 0.1, gaps


# ---------------------------------------- (b, c) the exact eps of Gaussian data: DDIM maps noise to the data


@dataclasses.dataclass(frozen=True)
class GaussianDDPM(kinds.Diffusion):
    """The exact eps of data N(mu, s^2) per dimension (params {'mu', 's'}): x_t ~ N(alpha mu, alpha^2 s^2 +
    sigma^2), so E[eps | x_t] = (x - alpha mu) sigma / (alpha^2 s^2 + sigma^2)."""

    @property
    def apply(self):
        def apply(params, x, t, dropout_rng=None, label=None):
            alpha, sigma = (c[:, None] for c in self.process.coefficients(t))
            return (x - alpha * params['mu']) * sigma / (alpha ** 2 * params['s'] ** 2 + sigma ** 2)

        return apply


GAUSSIAN = {'mu': jnp.array([2.0, -1.0]), 's': jnp.array([0.5, 1.5])}


def _exact_map(kind):
    """The probability-flow map of Gaussian data, affine per dimension: x1 = mu + s (x0 - alpha_0 mu) / std_0
    with std_0^2 = alpha_0^2 s^2 + sigma_0^2 at t = 0; and its inverse."""
    mu, s = GAUSSIAN['mu'], GAUSSIAN['s']
    alpha, sigma = (float(c) for c in kind.process.coefficients(jnp.zeros(())))
    std = np.sqrt(alpha ** 2 * s ** 2 + sigma ** 2)
    return (lambda x0: mu + s * (x0 - alpha * mu) / std), (lambda x1: alpha * mu + std * (x1 - mu) / s)


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_exact_eps_maps_noise_to_the_gaussian_data(schedule):
    """DDIM approaches the exact map (first order) and its samples of N(0, I) noise have the data's mean and
    standard deviation."""
    kind = GaussianDDPM('{}', schedule=schedule, timesteps=1000)
    forward, _ = _exact_map(kind)
    x0 = _normal(3, (4096, 2))
    gaps = []
    for n in (16, 64, 256):
        x, nfe = kind.sample(GAUSSIAN, x0, solvers.parse_sampler(f'ddim@{n}'), eps=1e-3)
        assert int(nfe) == n
        gaps.append(float(jnp.abs(x - forward(x0)).max()))
    assert gaps[2] < gaps[1] / 3 < gaps[0] / 9 and gaps[2] < 0.05, gaps
    np.testing.assert_allclose(jnp.mean(x, 0), GAUSSIAN['mu'], atol=0.02)
    np.testing.assert_allclose(jnp.std(x, 0), GAUSSIAN['s'], rtol=0.02)


def test_exact_eps_inverts_the_data_to_noise_and_back():
    kind = GaussianDDPM('{}')
    _, inverse = _exact_map(kind)
    x1 = GAUSSIAN['mu'] + GAUSSIAN['s'] * _normal(4, (4096, 2))
    sampler = solvers.parse_sampler('ddim@256')
    z, nfe = kind.invert(GAUSSIAN, x1, sampler, eps=1e-3)
    assert int(nfe) == 256 and float(jnp.abs(z - inverse(x1)).max()) < 0.05
    np.testing.assert_allclose(jnp.std(z, 0), 1.0, rtol=0.05)
    again, nfe = kind.reconstruct(GAUSSIAN, x1, sampler, eps=1e-3)
    assert int(nfe) == 512 and float(jnp.abs(again - x1).max()) < 0.1


# ------------------------------------------------------------------------------------------ (d) the loss


def _no_source(key, shape):
    raise AssertionError('ddpm draws its own standard normal eps, not data.source')


def _context(kind, loss):
    return training.Context(apply=kind.apply, source=_no_source, flow=objective.Flow(loss=loss),
                            options=ddpm.Options(kind=kind),
                            perceptual=lambda _, x, y: jnp.sum(jnp.abs(x - y), axis=-1))  # stands in for LPIPS


def test_draw_gives_integer_steps_uniformly_and_standard_normal_noise():
    x1 = jnp.zeros((20000, 2))
    t, eps, _ = ddpm.draw(jax.random.key(0), x1, 10)
    assert t.dtype == jnp.float32 and eps.shape == x1.shape
    k = (1.0 - np.asarray(t, np.float64)) * 10
    np.testing.assert_allclose(k, np.round(k), atol=1e-5)
    counts = np.bincount(np.round(k).astype(int), minlength=11)
    assert counts[0] == 0 and np.all(np.abs(counts[1:] - 2000) < 5 * np.sqrt(2000)), counts
    assert abs(float(jnp.mean(eps))) < 0.02 and abs(float(jnp.std(eps)) - 1.0) < 0.02


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('loss', ['l2', 'lpips_huber'])
def test_loss_is_the_formula(loss, schedule):
    """x_t = sqrt(abar_k) x1 + sqrt(1 - abar_k) eps with abar_k = prod_{j <= k} (1 - beta_j), the loss of
    eps_hat(x_t, 1 - k / T) against eps; LPIPS-Huber compares x1_hat = (x_t - sqrt(1 - abar_k) eps_hat) /
    sqrt(abar_k) with x1 and leaves the Huber term unweighted."""
    kind = kinds.Diffusion.from_model_config(MLP, schedule=schedule, timesteps=1000)
    params = _random_eps(kind, 5, out=1.0)
    x1, rng = _normal(6, (8, 2)), jax.random.key(7)
    got, _ = ddpm.loss_fn(params, {'x1': x1}, rng, _context(kind, loss))

    t, eps, _ = ddpm.draw(rng, x1, 1000)
    k = np.round((1.0 - np.asarray(t, np.float64)) * 1000).astype(int)
    abar = np.cumprod(1.0 - diffusion.betas(schedule, 1000))[k - 1][:, None]
    x_t = np.sqrt(abar) * x1 + np.sqrt(1 - abar) * eps
    eps_hat = kind.apply(params, jnp.asarray(x_t, jnp.float32), t)
    if loss == 'l2':
        expected = jnp.mean((eps_hat - eps) ** 2)
    else:
        c = 0.00054 * 2
        huber = (jnp.sqrt(jnp.sum((eps_hat - eps) ** 2, -1) + c * c) - c) / 2
        x1_hat = (x_t - np.sqrt(1 - abar) * eps_hat) / np.sqrt(abar)
        expected = jnp.mean(huber + jnp.sum(jnp.abs(x1_hat - x1), -1))
    _close(got, expected, 1e-4)


# ------------------------------------------------------------------------------------------ config checks


def _toy_config() -> ml_collections.ConfigDict:
    """method ddpm at the runlocal toy sizes, 8 steps, no evaluation."""
    c = configs.shrink_toy2d_for_local(table.config('ddpm'))
    c.train.update(steps=8, warmup_steps=2, log_every=4, checkpoint_every=100)
    c.eval.samplers = ()
    return c


@pytest.mark.parametrize('field, value, message', [
    ('ddpm.schedule', 'quadratic', "ddpm.schedule='quadratic': expected one of linear, cosine"),
    ('ddpm.schedule', 3, 'ddpm.schedule=3: expected one of linear, cosine'),
    ('ddpm.timesteps', 1, 'ddpm.timesteps=1: must be an integer >= 2 (the diffusion steps T)'),
    ('ddpm.timesteps', True, 'ddpm.timesteps=True: must be an integer >= 2'),
    ('ddpm.timesteps', 2.5, 'ddpm.timesteps=2.5: must be an integer >= 2'),
    ('ddpm.init', 5, 'ddpm.init=5: expected a ddpm export directory or stage name (or None)'),
    ('flow.time', 'u_shaped', "flow.time='u_shaped': ddpm draws its own times, k uniform in {1..T} and t = 1 - k / T"),
    ('eval.samplers', ('caf@1', 'heun@2:edm'), "eval.samplers=('caf@1', 'heun@2:edm'): none applies to a model of "
                                              "kind 'ddpm', which this method trains"),
])
def test_check_refuses_bad_fields_in_one_line(field, value, message):
    config = _toy_config()
    section, name = field.split('.')
    config[section] = ml_collections.ConfigDict({**config[section].to_dict(), name: value})  # untyped, as code sets it
    with pytest.raises(errors.ConfigError) as e:
        ddpm.check(config)
    assert str(e.value).startswith(message) and '\n' not in str(e.value), str(e.value)


def test_check_accepts_ddim_and_gives_the_kind():
    config = _toy_config()
    config.update(eval=ml_collections.ConfigDict({**config.eval.to_dict(), 'samplers': ('ddim@4',)}))
    assert ddpm.check(config).kind == kinds.Diffusion.from_model_config(config.model)


# ------------------------------------------------------------------- (e, f) a toy run, its export as a teacher


def _unevaluated(config):
    config = copy.deepcopy(config)
    config.eval.samplers = ()
    return config


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """The ddpm_toy2d:runlocal run on 8 devices, evaluated: (root, config, params of its export)."""
    root = tmp_path_factory.mktemp('ddpm')
    config = experiment_config('ddpm_toy2d', 'runlocal')
    assert jax.device_count() == 8
    table.METHODS[config.method].run(config, str(root / 'run'))
    return root, config, checkpoint.load_export(root / 'run')[0]


def test_ddpm_toy2d_runlocal(toy):
    """The experiment's runlocal: a ddpm export, scored with DDIM at 1, 4, 16 steps, Euler and rk45."""
    root, config, params = toy
    assert config.method == 'ddpm' and tuple(config.eval.samplers) == (
        'ddim@1', 'ddim@4', 'ddim@16', 'euler@16', 'rk45')
    _, meta = checkpoint.load_export(root / 'run')
    assert (meta['method'], meta['kind'], meta['schedule'], meta['timesteps'], meta['step']) == (
        'ddpm', 'ddpm', 'linear', 1000, config.train.steps)
    assert kinds.from_meta(meta) == ddpm.kind_of(config)
    logged = [json.loads(line) for line in (root / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert logged and all(np.isfinite(m['loss']) for m in logged)
    assert float(jnp.abs(params['params']['out']['kernel']).max()) > 0  # trained away from the zero output layer
    report = json.loads((root / 'run' / 'report.json').read_text())['ddpm']
    for n in (1, 4, 16):
        assert report[f'ddim@{n}']['nfe'] == n and report[f'ddim@{n}']['w2'] > 0
    assert report['euler@16']['nfe'] == 16 and report['rk45']['nfe'] > 16
    assert np.isfinite(report['straightness']) and (root / 'run' / 'samples.png').stat().st_size > 0


def test_one_device_gives_the_eight_device_export(toy, tmp_path, monkeypatch):
    _, config, params = toy
    config = _unevaluated(config)
    every = sharding.data_mesh
    monkeypatch.setattr(sharding, 'data_mesh', lambda devices=None: every(devices or jax.devices()[:1]))
    ddpm.run(config, str(tmp_path))
    one, _ = checkpoint.load_export(tmp_path)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the gradient all-reduce sums in another order


def test_init_fine_tunes_a_ddpm_export_of_the_same_network_and_schedule(toy, tmp_path, monkeypatch):
    """ddpm.init hands the export's weights to the training loop as its start (train.train starts from
    init_params: test_reflow.py); any other export is refused in one line before anything is written."""
    root, config, params = toy
    tuned = _unevaluated(config)
    tuned.ddpm.init = str(root / 'run')
    fitted = {}
    monkeypatch.setattr(training, 'fit', lambda *args, **kwargs: fitted.update(kwargs) or {})
    ddpm.run(tuned, str(tmp_path / 'tuned'))
    assert fitted['kind'] == ddpm.kind_of(config) and fitted['loss_fn'] is ddpm.loss_fn
    for a, b in zip(jax.tree.leaves(fitted['init_params']), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    monkeypatch.undo()

    def refused(change, message):
        other = _unevaluated(config)
        other.ddpm.init = str(root / 'run')
        change(other)
        with pytest.raises(errors.ConfigError) as e:
            ddpm.run(other, str(tmp_path / 'refused'))
        assert str(e.value).startswith(message) and '\n' not in str(e.value), str(e.value)
        assert not (tmp_path / 'refused').exists()

    run = root / 'run'
    refused(lambda c: c.ddpm.update(timesteps=500), f"ddpm.init: {run} was trained with schedule='linear', "
            "timesteps=1000; this run has ddpm.schedule='linear', ddpm.timesteps=500")
    refused(lambda c: c.ddpm.update(schedule='cosine'), f"ddpm.init: {run} was trained with schedule='linear', "
            "timesteps=1000; this run has ddpm.schedule='cosine', ddpm.timesteps=1000")
    refused(lambda c: c.model.update(features=(8,)), f'ddpm.init: the model exported in {run} (')
    velocity = kinds.VelocityField.from_model_config(config.model)
    checkpoint.export(tmp_path / 'velocity', params, train.export_meta(table.config('rf'), velocity, (2,), 1))
    refused(lambda c: c.ddpm.update(init=str(tmp_path / 'velocity')),
            f"ddpm.init: {tmp_path / 'velocity'} holds a model of kind 'velocity'; a ddpm run starts from a ddpm "
            "export (kind 'ddpm')")
    refused(lambda c: c.ddpm.update(init=str(tmp_path / 'nothing')),
            f'ddpm.init: {tmp_path / "nothing"}: no exported model here (expected meta.json and params/')


def test_a_ddpm_export_is_a_teacher_but_not_a_students_start(toy, tmp_path):
    """generate.teacher (ddim@4 couplings are the kind's samples), reflow.online_teacher, and refused as
    reflow.init (a student starts from a velocity field)."""
    root, config, params = toy
    store = table.config('generate')
    store.generate.update(teacher=str(root / 'run'), num_pairs=16, shard_size=16, batch_size=8, sampler='ddim@4')
    summary = generate.generate_couplings(store, tmp_path / 'pairs')
    assert summary['complete'] and summary['mean_nfe'] == 4
    pairs = couplings.open_store(tmp_path / 'pairs').load()
    x1, nfe = ddpm.kind_of(config).sample(params, jnp.asarray(pairs['x0']), solvers.parse_sampler('ddim@4'), eps=0.1)
    assert int(nfe) == 4 and np.all(pairs['nfe'] == 4)
    _close(pairs['x1'], x1, 1e-4)

    student = table.for_method(config, 'reflow')
    student.reflow.update(online_teacher=str(root / 'run'), online_sampler='ddim@4')
    student.train.steps = 2
    student.eval.samplers = ()
    reflow.run(student, str(tmp_path / 'online'))
    _, meta = checkpoint.load_export(tmp_path / 'online')
    assert meta['kind'] == 'velocity' and meta['step'] == 2

    with pytest.raises(errors.ConfigError) as e:
        training.load_model(str(root / 'run'), 'reflow.init', student)
    assert str(e.value) == (f"reflow.init: {root / 'run'} holds a model of kind 'ddpm'; a student starts from a "
                            "velocity field (kind 'velocity')")


def test_a_ddpm_export_is_a_perflow_teacher(toy, tmp_path, parameterization='diff_eps'):
    """perflow.teacher: a PeRFlow student of the ddpm teacher (its windows' pairs solved with ddim@2, the VP
    process noising data to each window's start) starts from the teacher's eps weights and exports a
    piecewise model with the teacher's VP process, which samples with euler@4 (NFE 4, finite)."""
    root, config, params = toy
    student = table.for_method(config, 'perflow')
    student.perflow.update(teacher=str(root / 'run'), teacher_sampler='ddim@2', parameterization=parameterization)
    student.train.update(steps=2, lr=1e-30, ema_decay=0.0)  # one tiny step: the export is the teacher's weights
    student.eval.samplers = ('euler@4',)
    perflow.run(student, str(tmp_path / 'perflow'))
    got, meta = checkpoint.load_export(tmp_path / 'perflow')
    assert (meta['kind'], meta['parameterization'], meta['process']) == (
        'piecewise', parameterization, {'name': 'vp', 'schedule': 'linear', 'timesteps': 1000})
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    kind = kinds.from_meta(meta)
    x, nfe = kind.sample(got, _normal(3, (16, 2)), solvers.parse_sampler('euler@4'), eps=1e-3)
    assert int(nfe) == 4 and np.isfinite(np.asarray(x)).all()
    assert (tmp_path / 'perflow' / 'report.json').exists()


def test_an_evaluate_stage_scores_a_ddpm_export_beside_a_velocity_field(toy, tmp_path):
    """eval.models with a ddpm export and a velocity field: ddim@4 applies to the ddpm model only (NFE 4),
    euler@4 to both; the ddpm model's straightness is measured on its path from t = 0."""
    root, config, params = toy
    velocity = kinds.VelocityField.from_model_config(config.model)
    checkpoint.export(tmp_path / 'velocity', params, train.export_meta(table.config('rf'), velocity, (2,), 1))
    stage = table.config('evaluate')
    stage.eval.update(models=(f"ddpm={root / 'run'}", f"rf={tmp_path / 'velocity'}"), samplers=('ddim@4', 'euler@4'),
                      num_samples=128, straightness_steps=8, trajectories=4)
    result = evaluate.run(stage, str(tmp_path / 'eval'))
    assert {'ddim@4', 'euler@4'} <= set(result['ddpm']) and 'ddim@4' not in result['rf']
    assert result['ddpm']['ddim@4']['nfe'] == result['ddpm']['euler@4']['nfe'] == result['rf']['euler@4']['nfe'] == 4
    assert all(np.isfinite(result['ddpm'][key]['w2']) for key in ('ddim@4', 'euler@4'))
    assert np.isfinite(result['ddpm']['straightness'])
