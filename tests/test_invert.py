"""Method 'invert' (docs/methods.md, Inversion (method invert)): the analytic Gaussian flow against its exact
map, the job on toy points and on 8x8 digit images (class-conditional too), 1 and 8 devices, bad values of
every field, and the fireflow_toy2d:runlocal pipeline end to end."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import experiment_config
from flowjax import checkpoint, errors, pipeline, sharding, train
from flowjax.evaluation import fidelity, job
from flowjax.flows import solvers
from flowjax.methods import invert, table
from flowjax.metrics import lpips
from flowjax.models import kinds

TINY_NCSNPP = {'name': 'ncsnpp', 'nf': 8, 'ch_mult': (1,), 'num_res_blocks': 1, 'attn_resolutions': (),
               'dropout': 0.0}


def _params(d=3, seed=0):
    rng = np.random.default_rng(seed)
    return {'mu': rng.normal(size=d).astype(np.float32), 's': rng.uniform(0.3, 2.0, d).astype(np.float32)}


def test_analytic_velocity_is_the_time_derivative_of_its_exact_map():
    p = _params()
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    for a in (0.05, 0.4, 0.9):
        h = 1e-2
        ahead, back = invert.analytic_map(p, x, a, a + h), invert.analytic_map(p, x, a, a - h)
        np.testing.assert_allclose((ahead - back) / (2 * h), invert.analytic_velocity(p, x, jnp.full((5,), a)),
                                   rtol=2e-3, atol=2e-3)
        # sigma_t' = (t s^2 - (1 - t)) / sigma_t, the rate the velocity is built from
        ds = (invert.analytic_sigma(a + h, p['s']) - invert.analytic_sigma(a - h, p['s'])) / (2 * h)
        np.testing.assert_allclose(ds, (a * p['s'] ** 2 - (1 - a)) / invert.analytic_sigma(a, p['s']), rtol=2e-3)
    # the marginal's std: x_t of independent x0 ~ N(0, I), x1 ~ N(mu, s^2) has std sigma_t
    np.testing.assert_allclose(invert.analytic_sigma(0.3, p['s']) ** 2, 0.7 ** 2 + 0.09 * p['s'] ** 2, rtol=1e-6)


def test_analytic_exact_inversion_and_solvers_reconstruct():
    p = _params()
    x1 = (p['mu'] + p['s'] * np.random.default_rng(2).normal(size=(64, 3))).astype(np.float32)
    np.testing.assert_allclose(invert.exact_noise(p, x1, 0.0), (x1 - p['mu']) / p['s'], rtol=1e-5, atol=1e-6)
    z = invert.exact_noise(p, x1, 1e-3)
    np.testing.assert_allclose(invert.analytic_map(p, z, 1e-3, 1.0), x1, rtol=1e-5, atol=1e-5)  # the identity
    kind = invert.ANALYTIC_KIND
    for spec in ('rk45', 'midpoint@64'):  # rk45 at rtol = atol = 1e-6 (its default 1e-5 leaves 2e-4 here)
        sampler = solvers.parse_sampler(spec, rtol=1e-6, atol=1e-6)
        x, _ = kind.reconstruct(p, jnp.asarray(x1), sampler, eps=1e-3)
        np.testing.assert_allclose(x, x1, atol=2e-5)
        zz, _ = kind.invert(p, jnp.asarray(x1), sampler, eps=1e-3)
        np.testing.assert_allclose(zz, z, atol=5e-5)
    np.testing.assert_allclose(invert.analytic_params(np.ones((4, 2)))['s'], invert.MIN_STD)  # floored


def _export(path, model, shape, seed=0):
    """An export of network config `model` at random weights (only its kind and shape matter here)."""
    config = table.config('rf')
    config.model = model
    kind = kinds.from_config(config)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda leaf: (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype),
                          jax.eval_shape(lambda key: kind.init(key, shape), jax.random.key(0)))
    checkpoint.export(path, params, train.export_meta(config, kind, shape, 0))
    return str(path)


def _toy(**fields):
    c = table.config('invert')
    c.eval.num_samples = 64
    c.invert.update({'count': 48, 'samplers': ('euler@4', 'midpoint@2', 'heun@3'), **fields})
    return c


def test_invert_toy(tmp_path):
    teacher = _export(tmp_path / 'teacher', {'name': 'mlp', 'features': (16,), 'time_dim': 8, 'dropout': 0.0}, (2,))
    config = _toy(models=('analytic', f'mlp={teacher}'), differences=('heun@3=euler@4',))
    out = invert.run(config, str(tmp_path / 'run'))
    assert set(out) == {'analytic', 'mlp', 'differences'}
    paired = out.pop('differences')
    assert set(paired) == {'analytic', 'mlp'} and paired['analytic']['heun@3 - euler@4']['mean'] == pytest.approx(
        out['analytic']['heun@3']['rmse'] - out['analytic']['euler@4']['rmse'])
    assert paired['analytic']['heun@3 - euler@4']['t'] < 0 and paired['analytic']['heun@3 - euler@4']['n'] == 48
    for name, entry in out.items():
        for spec, cell in entry.items():
            nfe = solvers.parse_sampler(spec).solver.nfe
            assert cell['nfe'] == 2 * cell['invert_nfe'] == 2 * nfe, (name, spec)
            assert cell['rmse'] ** 2 <= cell['mse'] * (1 + 1e-6)  # mean of sqrt <= sqrt of mean
            assert 'psnr' not in cell and 'lpips' not in cell
    assert set(out['analytic']['midpoint@2']) == {'nfe', 'invert_nfe', 'rmse', 'rmse_std', 'mse', 'noise_rmse'}
    assert 'noise_rmse' not in out['mlp']['euler@4']
    assert out['analytic']['heun@3']['rmse'] < out['analytic']['euler@4']['rmse']
    report = json.loads((tmp_path / 'run' / 'inversion.json').read_text())
    assert report == json.loads(json.dumps({**out, 'differences': paired}))
    md = (tmp_path / 'run' / 'inversion.md').read_text()
    cell = out['analytic']['euler@4']
    assert f"| analytic | {cell['rmse']:.4g} (8) |" in md and '## noise_rmse' in md and '## psnr' not in md
    assert '## Paired differences (rmse)' in md and '| model | heun@3 - euler@4 |' in md
    assert not (tmp_path / 'run' / 'inversion.png').exists()
    # a second run with another model keeps the first run's entries
    again = invert.run(_toy(models=('other=' + teacher,), samplers=('euler@1',)), str(tmp_path / 'run'))
    assert set(again) == {'analytic', 'mlp', 'other', 'differences'} and again['mlp'] == out['mlp']
    assert again['differences'] == json.loads(json.dumps(paired))  # the earlier run's, kept


def _digits(tmp_path, **fields):
    c = table.for_method(experiment_config('digits_reflow', 'runlocal').teacher, 'invert')
    c.eval.batch_size = 16
    c.invert.update({'count': 20, 'grid': 4, **fields})
    return c


@pytest.fixture(scope='module')
def digit_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp('digit_exports')
    return {'plain': _export(root / 'plain', TINY_NCSNPP, (8, 8, 1)),
            'cond': _export(root / 'cond', {**TINY_NCSNPP, 'num_classes': 10, 'label_dropout': 0.1}, (8, 8, 1), 1),
            'no_null': _export(root / 'no_null', {**TINY_NCSNPP, 'num_classes': 10}, (8, 8, 1))}


def test_invert_digit_images_with_labels(digit_exports, tmp_path):
    config = _digits(tmp_path, models=('analytic', f"cond={digit_exports['cond']}"), samplers=('euler@2',))
    out = invert.run(config, str(tmp_path / 'run'))
    for name, entry in out.items():
        assert set(entry) == {'euler@2'}
        for cell in entry.values():
            assert cell['nfe'] == 2 * cell['invert_nfe'] == 4
            assert {'rmse', 'rmse_std', 'mse', 'psnr'} <= set(cell) and 'lpips' not in cell
    assert all((tmp_path / 'run' / f).exists() for f in invert.FILES)

    # the per-example scores, recomputed on one device: rmse in uint8 units is 127.5 sqrt(mse) per image
    suite = invert._suite(config, tmp_path / 'run')
    x1, labels = suite.held_out(20)
    assert labels is not None and labels.shape == (20,)
    params, meta = checkpoint.load_export(digit_exports['cond'])
    kind = kinds.from_meta(meta)
    x, _ = job.kind_function(kind, 'reconstruct', solvers.parse_sampler('euler@2'), config.flow.t_eps)(
        params, jnp.asarray(x1), jnp.asarray(labels))
    per = fidelity.rmse(np.asarray(x), x1, fidelity.UINT8_SCALE)
    np.testing.assert_allclose(per, 127.5 * np.sqrt(fidelity.mse(np.asarray(x), x1)))
    cell = out['cond']['euler@2']
    np.testing.assert_allclose(cell['rmse'], per.mean(), rtol=1e-4)
    # the errors are float rounding (about 1e-4 in uint8 units): their spread over 8 devices and on one agrees
    # to about 0.2% (on some CPUs), not to the mean's 1e-4; the mean of their squares (about 1.6e-10), weighted
    # to the largest, to about 1.2e-4 on an AVX-512 CPU
    np.testing.assert_allclose(cell['rmse_std'], per.std(), rtol=1e-2)
    np.testing.assert_allclose(cell['mse'], fidelity.mse(np.asarray(x), x1).mean(), rtol=1e-3)
    # guidance: the class-conditional model's calls double, the others are unguided; a class-conditional model
    # without a null label is refused
    guided = invert.run(_digits(tmp_path, models=('analytic', f"cond={digit_exports['cond']}"),
                                samplers=('euler@2',), guidance=2.0, grid=0), str(tmp_path / 'guided'))
    assert guided['cond']['euler@2']['nfe'] == 8 and guided['analytic']['euler@2']['nfe'] == 4
    assert not (tmp_path / 'guided' / 'inversion.png').exists()
    with pytest.raises(errors.UserError, match=r"invert.guidance=2: model 'no_null' .* has no null label"):
        invert.run(_digits(tmp_path, models=(f"no_null={digit_exports['no_null']}",), samplers=('euler@1',),
                           guidance=2.0), str(tmp_path / 'refused'))


def test_one_and_eight_devices_agree_lpips_included(digit_exports, tmp_path, monkeypatch):
    vgg, heads = lpips.random_torch_state_dicts(0)
    module, variables = lpips.LPIPS(resize=16), lpips.params_from_torch(vgg, heads)
    monkeypatch.setattr(lpips, 'from_config', lambda section: (module, variables))
    (tmp_path / 'vgg.pth').write_bytes(b'')  # exists for the static check; the stand-in never reads it
    config = _digits(tmp_path, models=('analytic', f"plain={digit_exports['plain']}"), samplers=('euler@2',),
                     grid=0)
    config.eval.lpips = True
    config.lpips.update(vgg_weights=str(tmp_path / 'vgg.pth'), resize=16)
    assert invert.METHOD.sections(config) == ('data', 'flow', 'eval', 'lpips', 'invert')
    eight = invert.run(config, str(tmp_path / 'eight'))
    assert all(entry['euler@2']['lpips'] >= 0 for entry in eight.values())
    every = sharding.data_mesh
    monkeypatch.setattr(sharding, 'data_mesh', lambda devices=None: every(devices or jax.devices()[:1]))
    assert sharding.data_mesh().devices.size == 1
    one = invert.run(config, str(tmp_path / 'one'))
    for name in eight:
        assert set(one[name]['euler@2']) == set(eight[name]['euler@2'])
        for key, value in eight[name]['euler@2'].items():
            np.testing.assert_allclose(one[name]['euler@2'][key], value, rtol=1e-4, atol=1e-6, err_msg=f'{name} {key}')


@pytest.mark.parametrize('field, value, match', [
    ('models', (), r"invert.models=\(\): expected a non-empty tuple"),
    ('models', ('',), r"invert.models=\('',\): expected a non-empty tuple"),
    ('models', 'analytic', r"invert.models='analytic': expected a non-empty tuple"),
    ('models', ('analytic', 'analytic'), "label 'analytic' is listed twice"),
    ('samplers', (), r'invert.samplers=\(\): expected a non-empty tuple'),
    ('samplers', ('eulr@4',), "invert.samplers: .*unknown solver 'eulr'"),
    ('count', 0, r'invert.count=0: expected an int >= 1'),
    ('count', 2.5, r'invert.count=2.5: expected an int >= 1'),
    ('count', 65, r'invert.count=65: more than the 64 points'),
    ('guidance', -1.0, r'invert.guidance=-1.0: expected a guidance scale'),
    ('guidance', 'big', r"invert.guidance='big': expected a guidance scale"),
    ('grid', -1, r'invert.grid=-1: expected an int >= 0'),
    ('grid', 1.5, r'invert.grid=1.5: expected an int >= 0'),
    ('differences', ('euler@4',), r"invert.differences: 'euler@4': expected 'key_a=key_b'"),
    ('differences', ('euler@4=euler@9',), r"'euler@4=euler@9': .*\(euler@4, midpoint@2, heun@3\)"),
    ('differences', ('euler@4=euler@4',), r"invert.differences: 'euler@4=euler@4': .*two different keys"),
    ('differences', 'euler@4=heun@3', r"invert.differences='euler@4=heun@3': expected a tuple"),
    ('models', ('differences=/x',), r"invert.models: the label 'differences' is the report's section"),
])
def test_bad_values(field, value, match):
    config = _toy(models=('analytic',))
    config.invert = ml_collections.ConfigDict({**config.invert.to_dict(), field: value})  # any type
    with pytest.raises(errors.ConfigError, match=match):
        invert.check(config)


def test_no_sampler_applies_and_bad_lpips(tmp_path):
    with pytest.raises(errors.UserError, match=r"invert analytic: none of invert.samplers \(caf@1\) applies"):
        invert.run(_toy(models=('analytic',), samplers=('caf@1',)), str(tmp_path))
    config = _toy(models=('analytic',))
    config.eval.lpips = True
    with pytest.raises(errors.ConfigError, match="eval.lpips=True: LPIPS scores images"):
        invert.check(config)
    # the stage's identity: its own section, data, flow and eval; lpips only with eval.lpips on images
    assert invert.METHOD.sections(_toy()) == ('data', 'flow', 'eval', 'invert')


def test_fireflow_toy2d_runlocal(tmp_path):
    config = experiment_config('fireflow_toy2d', 'runlocal')
    assert config.stages == ('teacher', 'couplings', 'reflow', 'invert')
    specs = config.invert.invert.samplers
    assert specs == ('euler@5', 'fireflow@4', 'midpoint@2', 'midpoint@4', 'rf_solver@4')
    assert {'euler@33', 'fireflow@32', 'midpoint@16', 'midpoint@32', 'rf_solver@32'} <= set(
        experiment_config('fireflow_toy2d').invert.invert.samplers)
    config.invert.invert.count = 128
    pipeline.run(config, str(tmp_path))
    report = json.loads((tmp_path / 'invert' / 'inversion.json').read_text())
    assert list(report) == ['analytic', 'teacher', 'reflow', 'differences']
    for name in ('analytic', 'teacher', 'reflow'):
        assert list(report[name]) == list(specs)
        assert list(report['differences'][name]) == [p.replace('=', ' - ') for p in config.invert.invert.differences]
    analytic = report['analytic']
    assert analytic['midpoint@4']['rmse'] < analytic['midpoint@2']['rmse'] / 3
    assert analytic['midpoint@4']['noise_rmse'] < analytic['midpoint@2']['noise_rmse']
    assert analytic['fireflow@4']['rmse'] < analytic['euler@5']['rmse'] / 3  # the same NFE
    assert [analytic[k]['nfe'] for k in specs[:5]] == [10, 10, 8, 16, 16]  # euler@5, fireflow@4, midpoint@2, @4, rf_solver@4
    assert analytic['fireflow@4']['invert_nfe'] == 5 and analytic['midpoint@4']['nfe'] == 16
    stats = report['differences']['analytic']['fireflow@4 - euler@5']
    assert stats['n'] == 128
    assert stats['mean'] == pytest.approx(analytic['fireflow@4']['rmse'] - analytic['euler@5']['rmse'])
    stage = json.loads((tmp_path / 'invert' / 'stage.json').read_text())
    assert stage['result'] == report
    print((tmp_path / 'invert' / 'inversion.md').read_text())
