"""SlimFlow: beta schedules, paired flips, the annealed and flow-guided losses, the three experiments."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import mock_tfds
from conftest import experiment_config
from flowjax import configs, errors, models, pipeline, sharding
from flowjax.data import couplings
from flowjax.flows import losses, schedules
from flowjax.flows import objective
from flowjax.methods import rf, slimflow_distill, slimflow_reflow, table, training
from flowjax.metrics import lpips
from test_main import _main, _one_line_error


def _schedule(**fields):
    return schedules.from_config(ml_collections.ConfigDict(fields), 'slimflow_reflow.beta')


def test_schedules():
    linear = _schedule(schedule='linear', steps=100, value=0.0)
    assert [linear(k) for k in (0, 25, 100, 500)] == [1.0, 0.75, 0.0, 0.0]
    expo = _schedule(schedule='exponential', steps=100)
    assert expo(0) == 1.0 and math.isclose(expo(100), math.exp(-1)) and math.isclose(expo(300), math.exp(-3))
    cosine = _schedule(schedule='cosine', steps=100)
    assert cosine(0) == 1.0 and math.isclose(cosine(50), 0.5) and cosine(100) == 0.0 and cosine(1000) == 0.0
    constant = _schedule(schedule='constant', steps=1, value=0.3)
    assert constant(0) == constant(10**6) == 0.3


@pytest.mark.parametrize('fields, message', [
    ({'schedule': 'warmup_300000', 'steps': 10}, r"beta.schedule='warmup_300000': expected one of linear"),
    ({'schedule': 'linear', 'steps': 0}, r'beta.steps=0: must be an integer >= 1'),
    ({'schedule': 'linear', 'steps': 2.5}, r'beta.steps=2.5'),
    ({'schedule': 'constant', 'steps': 1, 'value': 1.5}, r'beta.value=1.5: must be a number in \[0, 1\]'),
    ({'schedule': 'linear', 'steps': 1, 'width': 3}, r'beta.width: unknown field'),
])
def test_schedule_errors(fields, message):
    with pytest.raises(errors.ConfigError, match=message) as e:
        _schedule(**fields)
    assert '\n' not in str(e.value)


def _image_pairs(n=12):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(n, 4, 5, 2)).astype(np.float32)
    return {'x0': x0, 'x1': x0 * 2 + 1, 'index': np.arange(n)}


def test_paired_flips_flip_x0_with_its_x1():
    arrays = _image_pairs()
    plain = couplings.CouplingBatches(arrays, 8, seed=5, process_index=0, process_count=1)
    flipped = couplings.CouplingBatches(arrays, 8, seed=5, flip=True, process_index=0, process_count=1,
                                        per_step={'beta': lambda step: 1.0 / (step + 1)})
    seen = set()
    for step in range(4):
        a, b = plain.local_batch(step), flipped.local_batch(step)
        mirrored = np.all(b['x0'] == a['x0'][:, :, ::-1], axis=(1, 2, 3))
        same = np.all(b['x0'] == a['x0'], axis=(1, 2, 3))
        assert np.all(mirrored | same)
        np.testing.assert_array_equal(b['x1'], b['x0'] * 2 + 1)  # the pair stays a pair
        np.testing.assert_array_equal(b['beta'], np.full(8, 1.0 / (step + 1), np.float32))
        seen |= set(mirrored.tolist())
    assert seen == {True, False}
    # Two processes read the same flips as one.
    halves = [couplings.CouplingBatches(arrays, 8, seed=5, flip=True, process_index=p, process_count=2).local_batch(3)
              for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h['x0'] for h in halves]), flipped.local_batch(3)['x0'])


def _ctx(teacher=None, source=None):
    module = models.build(ml_collections.ConfigDict({'name': 'mlp', 'features': (16,), 'time_dim': 8,
                                                     'dropout': 0.0}))
    params = module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
    ctx = training.Context(apply=models.apply_fn(module), source=source or (lambda k, s: jax.random.normal(k, s)))
    if teacher is not None:
        t_params = module.init(jax.random.key(teacher), jnp.zeros((1, 2)), jnp.zeros((1,)))
        ctx = ctx.replace(teacher_apply=ctx.apply, teacher_params=t_params)
    return ctx, params


def _toy_batch(beta, n=32):
    x0 = jax.random.normal(jax.random.key(1), (n, 2))
    return {'x0': x0, 'x1': x0 + 3.0, 'beta': jnp.full((n,), beta)}


def test_annealed_loss_at_the_ends_of_the_schedule():
    ctx, params = _ctx()
    rng = jax.random.key(7)
    k_eps, k_rf = jax.random.split(rng)
    batch = _toy_batch(0.0)
    loss, metrics = slimflow_reflow.annealed_loss_fn(params, batch, rng, ctx)
    reflow_loss, _ = rf.loss_fn(params, {'x0': batch['x0'], 'x1': batch['x1']}, k_rf, ctx)
    assert loss == reflow_loss and metrics['beta'] == 0.0  # b = 0: reflow on the stored pairs
    batch = _toy_batch(1.0)
    loss, _ = slimflow_reflow.annealed_loss_fn(params, batch, rng, ctx)
    fresh = ctx.source(k_eps, batch['x0'].shape)  # b = 1: the stored noise is replaced (1-RF)
    assert np.isclose(loss, rf.loss_fn(params, {'x0': fresh, 'x1': batch['x1']}, k_rf, ctx)[0])
    half, _ = slimflow_reflow.annealed_loss_fn(params, _toy_batch(0.6), rng, ctx)
    mixed = 0.8 * batch['x0'] + 0.6 * fresh
    assert np.isclose(half, rf.loss_fn(params, {'x0': mixed, 'x1': batch['x1']}, k_rf, ctx)[0])


@pytest.mark.parametrize('distance', ['l2', 'pseudo_huber'])
def test_guided_loss_matches_the_formula_and_its_stop_gradients(distance):
    """L_d + lambda L_2step, the gradient flowing only through v_s(x0) and v_s(z) in `z + v`."""
    ctx, params = _ctx(teacher=3)
    lam, t_range = 0.7, (0.2, 0.8)
    ctx = ctx.replace(options=slimflow_distill.Options(guidance=lam, t_range=t_range),
                      flow=objective.Flow(loss=distance))
    batch = _toy_batch(0.0)
    rng = jax.random.key(11)
    k_z, k_t, _ = jax.random.split(rng, 3)
    n = batch['x0'].shape[0]
    z = ctx.source(k_z, batch['x0'].shape)
    t = jax.random.uniform(k_t, (n,), minval=0.2, maxval=0.8)
    eps = jnp.full((n,), 1e-3)
    v_z = ctx.apply(params, z, eps)
    x_t = z + t[:, None] * v_z
    x_hat = x_t + (1 - t[:, None]) * ctx.apply(ctx.teacher_params, x_t, t)
    d = losses.PER_EXAMPLE[distance]

    def reference(p):  # x_hat held fixed: no gradient through the teacher or through x_t'
        l_d = jnp.mean(d(batch['x0'] + ctx.apply(p, batch['x0'], eps), batch['x1'], None))
        return l_d + lam * jnp.mean(d(z + ctx.apply(p, z, eps), x_hat, None))

    (loss, metrics), grads = jax.value_and_grad(slimflow_distill.guided_loss_fn, has_aux=True)(params, batch, rng, ctx)
    want, want_grads = jax.value_and_grad(reference)(params)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics['loss_distill'] + lam * metrics['loss_2step'], loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    assert t.min() >= 0.2 and t.max() <= 0.8

    # guidance 0: plain one-step distillation, D(x0 + v(x0, eps), x1)
    unguided = ctx.replace(options=slimflow_distill.Options(guidance=0.0, t_range=t_range))
    plain, _ = slimflow_distill.guided_loss_fn(params, batch, rng, unguided)
    np.testing.assert_allclose(plain, jnp.mean(d(batch['x0'] + ctx.apply(params, batch['x0'], eps), batch['x1'],
                                                 None)), rtol=1e-6)


def _toy_stage(method):
    c = experiment_config('slimflow_toy2d', 'runlocal')
    return c[{'slimflow_reflow': 'annealed', 'slimflow_distill': 'distilled'}[method]]


@pytest.mark.parametrize('method, field, value, message', [
    ('slimflow_reflow', 'slimflow_reflow.couplings', None, 'slimflow_reflow.couplings: a coupling store'),
    ('slimflow_reflow', 'slimflow_reflow.flip_pairs', True, "flip_pairs=True: paired horizontal flips need"),
    ('slimflow_reflow', 'data.source', {'name': 'gmm'}, 'annealing reflow mixes in standard normal noise'),
    ('slimflow_distill', 'slimflow_distill.init', None, 'slimflow_distill.init: the annealed student'),
    ('slimflow_distill', 'slimflow_distill.guidance', -1.0, 'guidance=-1.0: must be a number >= 0'),
    ('slimflow_distill', 'slimflow_distill.t_range', (0.8, 0.2), 't_range=(0.8, 0.2): expected (lo, hi)'),
    ('slimflow_distill', 'flow.loss', 'lpips', "flow.loss='lpips': LPIPS compares images, it needs data.kind='image'"),
    ('slimflow_distill', 'flow.loss', 'l1', "flow.loss='l1': expected one of l2, pseudo_huber, lpips_huber, lpips"),
])
def test_config_errors(method, field, value, message):
    c = _toy_stage(method)
    if method == 'slimflow_distill':
        c.slimflow_distill.init = 'annealed'
    section, name = field.split('.')
    c[section][name] = value
    check = table.METHODS[method].check
    with pytest.raises(errors.ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')) as e:
        check(c)
    assert '\n' not in str(e.value)


def test_slimflow_toy2d_runlocal_end_to_end(tmp_path):
    result = _main('--config=experiments/slimflow_toy2d.py:runlocal', f'--workdir={tmp_path}')
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['annealed']['params'] == report['distilled']['params'] < report['teacher']['params'] / 2
    assert report['distilled']['euler@1']['w2'] > 0 and report['distilled']['euler@1']['nfe'] == 1
    logged = [json.loads(line) for line in (tmp_path / 'annealed' / 'metrics.jsonl').read_text().splitlines()]
    assert logged[0]['beta'] > logged[-1]['beta'] and logged[-1]['beta'] == 0.0  # W = half the steps
    logged = [json.loads(line) for line in (tmp_path / 'distilled' / 'metrics.jsonl').read_text().splitlines()]
    assert all(m['loss_2step'] > 0 and np.isclose(m['loss'], m['loss_distill'] + m['loss_2step']) for m in logged)
    assert '| params |' in (tmp_path / 'report.md').read_text()


def test_ablation_pipeline_shape():
    config = experiment_config('slimflow_toy2d', 'runlocal,ablation,seeds=2')
    assert config.stages == ('teacher', 'couplings', 'plain_s0', 'annealed_s0', 'unguided_s0', 'guided_s0',
                             'plain_s1', 'annealed_s1', 'unguided_s1', 'guided_s1', 'evaluate')
    assert config.plain_s1.seed == config.annealed_s1.seed == config.guided_s1.seed == 1
    assert config.plain_s0.slimflow_reflow.beta.to_dict() == {'schedule': 'constant', 'steps': 20, 'value': 0.0}
    assert config.annealed_s0.slimflow_reflow.beta.schedule == 'linear'
    assert (config.unguided_s1.slimflow_distill.guidance, config.guided_s1.slimflow_distill.guidance) == (0.0, 1.0)
    assert config.guided_s1.slimflow_distill.init == 'annealed_s1'
    # Apart from what each arm changes, the arms of one seed are the same run.
    plain, annealed = config.plain_s0.to_dict(), config.annealed_s0.to_dict()
    plain['slimflow_reflow']['beta'] = annealed['slimflow_reflow']['beta']
    assert plain == annealed
    assert dict(config.evaluate.eval.groups) == {
        group: (f'{prefix}_s0', f'{prefix}_s1') for group, prefix in configs.SLIMFLOW_ABLATION.items()}


def test_slimflow_toy2d_ablation_runlocal(tmp_path):
    """Two seeds of each arm, trained a few steps, summarised as groups in the report."""
    config = experiment_config('slimflow_toy2d', 'runlocal,ablation,seeds=2')
    for stage in config.stages[2:-1]:
        config[stage].train.steps = 8
        if config[stage].method == 'slimflow_reflow':
            config[stage].slimflow_reflow.beta.steps = 4
    config.teacher.train.steps = 8
    config.evaluate.eval.samplers = ('euler@1',)
    pipeline.run(config, str(tmp_path))
    report = json.loads((tmp_path / 'report.json').read_text())
    for group, prefix in configs.SLIMFLOW_ABLATION.items():
        stats = report['groups'][group]
        values = [report[f'{prefix}_s{s}']['euler@1']['w2'] for s in (0, 1)]
        assert stats['models'] == [f'{prefix}_s0', f'{prefix}_s1']
        assert np.isclose(stats['euler@1']['w2']['mean'], np.mean(values))
        assert np.isclose(stats['euler@1']['w2']['std'], np.std(values, ddof=1))
    assert '## Groups' in (tmp_path / 'report.md').read_text()


def test_digits_reflow_runlocal_end_to_end(tmp_path):
    """digits_reflow:runlocal. (slimflow_digits:runlocal on a teacher given as `teacher.checkpoint` runs in
    tests/test_torch_ncsnpp.py, on a teacher imported from PyTorch.)"""
    reflow_dir = tmp_path / 'digits_reflow'
    result = _main('--config=experiments/digits_reflow.py:runlocal', f'--workdir={reflow_dir}')
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((reflow_dir / 'report.json').read_text())
    for model in ('teacher', 'reflow', 'distill'):
        for key in ('euler@1', 'euler@2', 'euler@4', 'euler@8'):
            assert report[model][key]['fd_digits'] > 0 and report[model][key]['nfe'] == int(key[6:])
        assert report[model]['fd_digits_data'] > 0 and report[model]['straightness'] >= 0
    assert report['couplings']['pairs'] == 64
    for name in ('report.md', 'samples.png', 'couplings/couplings.png', 'evaluate/fd_digits_stats_'):
        matches = list(reflow_dir.glob(name + '*'))
        assert matches and matches[0].stat().st_size > 0, name


def test_slimflow_digits_recipe():
    c = experiment_config('slimflow_digits')
    assert c.stages == ('teacher', 'couplings', 'annealed', 'distilled', 'evaluate')
    reflow_recipe = experiment_config('digits_reflow')
    assert c.teacher.to_dict() == reflow_recipe.teacher.to_dict()  # the digits_reflow teacher, reusable
    assert c.annealed.model.nf == 8 and c.annealed.slimflow_reflow.beta.steps == c.annealed.train.steps // 2
    assert c.distilled.slimflow_distill.init == 'annealed' and c.distilled.slimflow_distill.guidance == 1.0
    assert c.annealed.data.flip and c.annealed.slimflow_reflow.flip_pairs is None  # images: paired flips on


@pytest.mark.parametrize('size, params', [('3.4M', 3.437), ('7.0M', 6.990), ('15.7M', 15.707), ('27.9', 27.906)])
def test_slimflow_cifar_student_sizes(size, params):
    c = experiment_config('slimflow_cifar', f'size={size}')
    module = models.build(c.annealed.model)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
    assert round(sum(x.size for x in jax.tree.leaves(shapes)) / 1e6, 3) == params
    assert c.distilled.model.to_dict() == c.annealed.model.to_dict()


def test_slimflow_cifar_recipe():
    c = experiment_config('slimflow_cifar')
    s, d = c.annealed, c.distilled
    assert s.slimflow_reflow.beta.to_dict() == {'schedule': 'linear', 'steps': 300_000, 'value': 0.0}
    assert (s.train.batch_size, s.train.lr, s.train.ema_decay, s.model.dropout) == (128, 2e-4, 0.999999, 0.15)
    assert (d.flow.loss, d.lpips.resize, d.slimflow_distill.guidance) == ('lpips', 64, 1.0)
    assert tuple(d.slimflow_distill.t_range) == (0.2, 0.8) and d.train.lr == 2e-4
    assert c.teacher.model.nf == 128 and c.couplings.generate.num_pairs == 1_000_000
    assert c.evaluate.eval.metric == 'fid' and c.evaluate.eval.num_samples == 50_000
    with pytest.raises(ValueError, match="size='10M': expected one of 3.4M, 7.0M, 15.7M, 27.9M"):
        experiment_config('slimflow_cifar', 'size=10M')


def test_rf_cifar_then_slimflow_cifar_runlocal_on_mock_cifar10(tmp_path, monkeypatch):
    """rf_cifar:runlocal on mock CIFAR-10, then slimflow_cifar:runlocal and rfpp_cifar:runlocal with
    it as the teacher; random VGG16 weights stand in for the LPIPS file."""
    vgg, heads = lpips.random_torch_state_dicts(0)
    variables = lpips.params_from_torch(vgg, heads)
    monkeypatch.setattr(training, 'load_perceptual', lambda config: (
        lpips.distance_fn(lpips.LPIPS(resize=config.lpips.resize, pool=config.lpips.pool)), variables))
    with mock_tfds.mock_cifar10(num_examples=48) as data_dir:
        config = experiment_config('rf_cifar', 'runlocal')
        assert config.model.nf == 8 and config.data.image.dataset == 'cifar10'
        config.data.image.data_dir = data_dir
        report = rf.run(config, str(tmp_path / 'rf_cifar'))
        assert report['rf_cifar']['euler@1'] == {'nfe': 1} and report['rf_cifar']['straightness'] > 0
        meta = json.loads((tmp_path / 'rf_cifar' / 'export' / 'meta.json').read_text())
        assert meta['sample_shape'] == [32, 32, 3]
        assert (tmp_path / 'rf_cifar' / 'samples.png').exists()

        config = experiment_config('slimflow_cifar', f'runlocal,data_dir={data_dir}')
        assert config.distilled.flow.loss == 'lpips'
        config.teacher.checkpoint = str(tmp_path / 'rf_cifar')
        pipeline.run(config, str(tmp_path / 'slimflow'))

        rfpp = experiment_config('rfpp_cifar', f'runlocal,data_dir={data_dir}')  # the same teacher
        assert (rfpp.student.flow.loss, rfpp.student.flow.time, rfpp.student.lpips.pool) == ('lpips_huber',
                                                                                            'u_shaped', 'avg')
        rfpp.teacher.checkpoint = str(tmp_path / 'rf_cifar')
        pipeline.run(rfpp, str(tmp_path / 'rfpp'))
    logged = [json.loads(line) for line in (tmp_path / 'rfpp' / 'student' / 'metrics.jsonl').read_text().splitlines()]
    assert all(np.isfinite(m['loss']) and m['loss_lpips'] > 0 and m['loss_huber'] > 0 for m in logged)
    assert json.loads((tmp_path / 'rfpp' / 'report.json').read_text())['student']['euler@1'] == {'nfe': 1}
    report = json.loads((tmp_path / 'slimflow' / 'report.json').read_text())
    assert report['distilled']['euler@1'] == {'nfe': 1}
    assert report['distilled']['params'] < report['teacher']['params']
    logged = [json.loads(line) for line in
              (tmp_path / 'slimflow' / 'distilled' / 'metrics.jsonl').read_text().splitlines()]
    assert all(np.isfinite(m['loss']) and m['loss_2step'] > 0 for m in logged)
    assert couplings.open_store(tmp_path / 'slimflow' / 'couplings').num_pairs == 48
    assert sharding.data_mesh().size == 8


def test_bad_experiment_argument_is_one_line(tmp_path):
    result = _main('--config=experiments/slimflow_cifar.py:size=12M', f'--workdir={tmp_path}')
    _one_line_error(result, 'slimflow_cifar.py', 'size=12M: expected one of 3.4M, 7.0M, 15.7M, 27.9M')
    assert 'Traceback' not in result.stderr and not list(tmp_path.iterdir())
