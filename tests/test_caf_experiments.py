"""The CAF experiments: caf_toy2d, caf_digits and caf_cifar, their recipes and their runlocal
pipelines end to end.

caf_toy2d:runlocal (data=moons) runs whole. The image pipelines run with their teacher and 2-RF
stages stood in (`<stage>.checkpoint`) by one export of the teacher's network at random weights:
those stages are rf and reflow, run end to end elsewhere (test_slimflow.py: digits_reflow and the
CIFAR pipelines), and compiling CAF's two U-Nets takes most of a test already. The couplings, the
CAF stage (its velocity network widened from the teacher) and the evaluation run as configured
(caf_cifar on mock CIFAR-10, no download).
"""

import json

import numpy as np

import mock_tfds
from conftest import experiment_config, stand_in_teacher
from flowjax import pipeline

MODELS = ('teacher', 'reflow', 'caf')


def _check_run(workdir):
    """The report scores the three models, CAF's caf@1 at NFE 2 (v0, then one step), the export is a
    CAF model, the samples figure is there; both CAF networks logged finite losses."""
    report = json.loads((workdir / 'report.json').read_text())
    assert set(MODELS) <= set(report)
    assert report['caf']['caf@1']['nfe'] == 2
    # two networks of the 2-RF student's architecture, each input layer widened for the velocity slot
    assert 2 * report['reflow']['params'] < report['caf']['params'] < 2.1 * report['reflow']['params']
    meta = json.loads((workdir / 'caf' / 'export' / 'meta.json').read_text())
    assert meta['kind'] == 'caf' and meta['h'] == 1.5 and meta['ivc'] is True
    assert meta['flow']['time'] == 'grid'
    assert (workdir / 'samples.png').stat().st_size > 0
    for network in ('velocity', 'acceleration'):
        logged = [json.loads(line) for line in (workdir / 'caf' / network / 'metrics.jsonl').read_text().splitlines()]
        assert logged and all(np.isfinite(m['loss']) for m in logged), network
    return report


def _stand_in_teacher(config, path):
    """A random-weight export of the teacher stage's network as the teacher and the 2-RF student of the
    pipeline `config` (conftest.stand_in_teacher); evaluates euler@1 and caf@1 only."""
    config.reflow.checkpoint = stand_in_teacher(config, path)
    config.evaluate.eval.samplers = ('euler@1', 'caf@1')  # every model needs one sampler of its kind


def _same_budget(config):
    """CAF trains on the 2-RF stage's couplings, init, model and train section (the same steps)."""
    caf, reflow = config.caf, config.reflow
    assert (caf.caf.couplings, caf.caf.init) == (reflow.reflow.couplings, reflow.reflow.init) == ('couplings',
                                                                                                   'teacher')
    assert caf.train.to_dict() == reflow.train.to_dict() and caf.model.to_dict() == reflow.model.to_dict()
    assert caf.flow.time == 'grid' and caf.flow.grid_points == 1000 and caf.caf.velocity_steps is None
    assert tuple(config.evaluate.eval.models) == MODELS


def test_caf_toy2d_moons_runlocal(tmp_path):
    config = experiment_config('caf_toy2d', 'runlocal,data=moons')
    assert config.stages == ('teacher', 'couplings', 'reflow', 'caf', 'evaluate')
    config.evaluate.eval.samplers = ('euler@1', 'caf@1', 'caf@2')
    pipeline.run(config, str(tmp_path))
    report = _check_run(tmp_path)
    assert report['caf']['caf@2']['nfe'] == 3 and report['caf']['caf@1']['w2'] > 0
    assert report['caf']['euler@1']['nfe'] == 2  # Euler on dx/dt = v0 + t a: one more NFE for v0
    assert report['teacher']['euler@1']['nfe'] == report['reflow']['euler@1']['nfe'] == 1
    assert 'caf@1' not in report['teacher']
    assert report['couplings']['pairs'] == 512
    for model, n1 in (('reflow', 'euler@1'), ('caf', 'caf@1')):  # reconstruction and preservation at N = 1 (and 2)
        assert report[model][n1]['reconstruction_mse'] >= 0 and report[model][n1]['preservation_mse'] >= 0
    assert (report['caf']['caf@1']['reconstruction_nfe'], report['caf']['caf@2']['reconstruction_nfe']) == (3, 5)


def test_caf_toy2d_gmm_recipe(tmp_path):
    """The default data (a 4-mode mixture to the 8-mode ring), checked stage by stage without running."""
    config = experiment_config('caf_toy2d', 'runlocal')
    for stage in config.stages:
        assert config[stage].data.source.name == 'gmm' and config[stage].data.target.name == '8gaussians'
    _same_budget(config)
    assert (config.caf.caf.h, config.caf.caf.ivc) == (1.5, True)
    assert tuple(config.evaluate.eval.samplers) == ('euler@1', 'euler@2', 'euler@4', 'caf@1', 'caf@2', 'caf@4',
                                                    'rk45')
    plan = pipeline.plan(config, str(tmp_path))
    assert plan.configs['caf'].caf.couplings == str(tmp_path / 'couplings')
    other = experiment_config('caf_toy2d', 'data=moons,h=2.0,ivc=false,seed=3,steps=100')
    assert (other.caf.caf.h, other.caf.caf.ivc, other.caf.seed, other.caf.train.steps) == (2.0, False, 3, 100)
    assert other.reflow.train.steps == 100 and other.caf.data.source.name == 'normal'


def test_caf_digits_runlocal(tmp_path):
    config = experiment_config('caf_digits', 'runlocal')
    _same_budget(config)
    assert tuple(config.evaluate.eval.samplers) == ('euler@1', 'euler@2', 'euler@4', 'caf@1', 'caf@2', 'caf@4',
                                                    'euler@8')
    full = experiment_config('caf_digits')
    assert full.evaluate.eval.samplers[-1] == 'euler@32' and full.caf.model.to_dict() == full.teacher.model.to_dict()
    assert full.caf.train.steps == experiment_config('digits_reflow').reflow.train.steps
    _stand_in_teacher(config, tmp_path / 'teacher_export')
    pipeline.run(config, str(tmp_path / 'run'))
    report = _check_run(tmp_path / 'run')
    assert report['caf']['caf@1']['fd_digits'] > 0 and report['teacher']['straightness'] >= 0
    cell = report['caf']['caf@1']
    assert np.isfinite(cell['reconstruction_psnr']) and cell['preservation_nfe'] == 2
    assert report['couplings']['pairs'] == 64


def test_caf_cifar_recipe():
    c = experiment_config('caf_cifar')
    _same_budget(c)
    train = c.caf.train
    assert (train.lr, train.weight_decay, train.ema_decay, train.ema_warmup, train.grad_clip, train.batch_size,
            train.steps) == (1e-4, 1e-5, 0.9999, False, 0.0, 1280, 400_000)
    assert c.caf.caf.h == 1.5 and c.couplings.generate.num_pairs == 1_000_000 and c.teacher.model.nf == 128
    assert c.caf.flow.loss == c.reflow.flow.loss == 'pseudo_huber'  # no VGG16 weights given
    assert (c.evaluate.eval.metric, c.evaluate.eval.num_samples) == ('fid', 50_000)
    c = experiment_config('caf_cifar', 'vgg=vgg16.pth,inception=inception.pth,batch=1024,steps=10')
    assert c.caf.flow.loss == 'lpips_huber' and c.caf.lpips.to_dict() == {
        'vgg_weights': 'vgg16.pth', 'head_weights': None, 'resize': 224, 'pool': 'avg'}
    assert c.evaluate.eval.inception_weights == 'inception.pth'
    assert (c.caf.train.batch_size, c.caf.train.steps, c.reflow.train.steps) == (1024, 10, 10)


def test_caf_cifar_runlocal_on_mock_cifar10(tmp_path):
    with mock_tfds.mock_cifar10(num_examples=48) as data_dir:
        config = experiment_config('caf_cifar', f'runlocal,data_dir={data_dir}')
        _same_budget(config)
        assert config.caf.train.weight_decay == 1e-5 and config.caf.data.image.dataset == 'cifar10'
        _stand_in_teacher(config, tmp_path / 'teacher_export')
        pipeline.run(config, str(tmp_path / 'run'))
    report = _check_run(tmp_path / 'run')
    cell = report['caf']['caf@1']  # runlocal scores no FID; PSNR of 8 reconstructions and stored pairs
    assert 'fid' not in cell and (cell['nfe'], cell['reconstruction_nfe'], cell['preservation_nfe']) == (2, 3, 2)
    assert all(np.isfinite(cell[k]) for k in ('reconstruction_psnr', 'preservation_psnr'))
    meta = json.loads((tmp_path / 'run' / 'caf' / 'export' / 'meta.json').read_text())
    assert meta['sample_shape'] == [32, 32, 3]


def test_caf_ablation_runlocal(tmp_path):
    """Two seeds of 2-RF and CAF on one teacher's couplings: the groups and the paired differences of caf@N
    against euler@N (the same steps) and euler@(N+1) (the same NFE)."""
    config = experiment_config('caf_ablation', 'runlocal,data=moons,seeds=2,arms=reflow+caf')
    assert config.stages == ('teacher', 'couplings', 'reflow_s0', 'reflow_s1', 'caf_s0', 'caf_s1', 'evaluate')
    assert config.caf_s1.seed == 1 and config.caf_s1.train.to_dict() == config.reflow_s1.train.to_dict()
    full = experiment_config('caf_ablation', 'data=gmm')
    assert {g for g in full.evaluate.eval.groups} == {'reflow', 'caf', 'caf_h1', 'caf_h2', 'caf_noivc'}
    assert 'caf_h1' not in experiment_config('caf_ablation', 'data=digits').evaluate.eval.groups  # h arms: toy only
    config.evaluate.eval.samplers = ('euler@1', 'euler@2', 'caf@1')
    config.evaluate.eval.differences = {'caf - reflow': ('caf', 'reflow', 'caf@1=euler@1', 'caf@1=euler@2')}
    pipeline.run(config, str(tmp_path))
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['groups']['caf']['models'] == ['caf_s0', 'caf_s1']
    diff = report['differences']['caf - reflow']
    assert diff['pairs'] == [['caf_s0', 'reflow_s0'], ['caf_s1', 'reflow_s1']]
    for key in ('caf@1 - euler@1', 'caf@1 - euler@2'):
        assert set(diff[key]) == {'w2', 'energy', 'reconstruction_mse', 'preservation_mse'}, key
        assert diff[key]['w2']['n'] == 2
    expected = np.mean([report[f'caf_s{s}']['caf@1']['w2'] - report[f'reflow_s{s}']['euler@1']['w2'] for s in (0, 1)])
    np.testing.assert_allclose(diff['caf@1 - euler@1']['w2']['mean'], expected)
