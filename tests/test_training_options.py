"""rfpp and Simple ReFlow options end to end: the digits experiments' runlocal pipelines on one
shared teacher (rfpp_cifar:runlocal runs in test_slimflow.py, on its CIFAR teacher)."""

import json

import numpy as np
import pytest

from conftest import experiment_config
from flowjax import pipeline
from flowjax.methods import rf, training
from flowjax.metrics import lpips


@pytest.fixture(scope='module')
def digits_teacher(tmp_path_factory):
    """digits_reflow:runlocal's teacher, trained once for the pipelines here."""
    path = tmp_path_factory.mktemp('digits_teacher')
    rf.run(experiment_config('digits_reflow', 'runlocal').teacher, str(path))
    return str(path)


def _logged(path):
    return [json.loads(line) for line in (path / 'metrics.jsonl').read_text().splitlines()]


def test_rfpp_digits_runlocal(digits_teacher, tmp_path):
    config = experiment_config('rfpp_digits', 'runlocal')
    assert config.stages == ('teacher', 'couplings', 'reflow', 'rfpp', 'evaluate')
    config.teacher.checkpoint = digits_teacher
    config.stages = ('teacher', 'couplings', 'rfpp', 'evaluate')  # the plain reflow arm is digits_reflow's
    config.evaluate.eval.models = ('teacher', 'rfpp')
    pipeline.run(config, str(tmp_path))
    report = json.loads((tmp_path / 'report.json').read_text())
    for model in ('teacher', 'rfpp'):
        assert report[model]['euler@1']['nfe'] == 1 and report[model]['euler@1']['fd_digits'] > 0
    assert 'loss_unweighted' in _logged(tmp_path / 'rfpp')[0]  # pseudo-Huber reports its raw mean


def test_rfpp_digits_lpips_huber_trains(digits_teacher, tmp_path, monkeypatch):
    """rfpp_digits:lpips (LPIPS-Huber, VGG16 with average pooling); random VGG weights stand in for the file."""
    vgg, heads = lpips.random_torch_state_dicts(0)
    variables = lpips.params_from_torch(vgg, heads)
    monkeypatch.setattr(training, 'check_lpips', lambda config: None)
    monkeypatch.setattr(training, 'load_perceptual', lambda config: (
        lpips.distance_fn(lpips.LPIPS(resize=config.lpips.resize, pool=config.lpips.pool)), variables))
    config = experiment_config('rfpp_digits', 'runlocal,lpips')
    config.teacher.checkpoint = digits_teacher
    config.stages = ('teacher', 'couplings', 'rfpp')
    config.rfpp.train.steps = 4
    pipeline.run(config, str(tmp_path))
    logged = _logged(tmp_path / 'rfpp')
    assert all(np.isfinite(m['loss']) and m['loss_lpips'] > 0 and m['loss_huber'] > 0 for m in logged)


def test_simple_reflow_digits_runlocal(digits_teacher, tmp_path):
    config = experiment_config('simple_reflow_digits', 'runlocal')
    assert (config.teacher.model.dropout, config.simple.model.dropout) == (0.1, 0.0)
    config.teacher.checkpoint = digits_teacher  # a teacher of dropout 0: the students start from it all the same
    config.stages = ('teacher', 'couplings', 'forward_pairs', 'simple', 'evaluate')
    config.evaluate.eval.models = ('teacher', 'simple')
    pipeline.run(config, str(tmp_path))
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['simple']['heun@4:edm']['nfe'] == 8 and report['simple']['heun@4:edm']['fd_digits'] > 0
    logged = _logged(tmp_path / 'simple')
    assert all(m['loss'] == pytest.approx(1.0) for m in logged)  # L / stopgrad(L) per sample
    assert all(m['loss_unweighted'] > 0 for m in logged)
    forward = json.loads((tmp_path / 'forward_pairs' / 'manifest.json').read_text())
    assert forward['direction'] == 'forward' and forward['num_pairs'] == config.couplings.generate.num_pairs


def test_reflow_options_ablation_runlocal(tmp_path):
    """reflow_options:runlocal, one seed per arm: every arm's group and its paired difference to 2-RF."""
    config = experiment_config('reflow_options', 'runlocal,seeds=1')
    for stage in config.stages[2:-1]:
        config[stage].train.steps = 8
    pipeline.run(config, str(tmp_path))
    report = json.loads((tmp_path / 'report.json').read_text())
    arms = ('reflow', 'u_shaped', 'pseudo_huber', 'normalized', 'exp10', 'forward_backward')
    assert set(report['groups']) == set(arms)
    for arm in arms[1:]:
        diff = report['differences'][f'{arm} - reflow']
        assert diff['pairs'] == [[f'{arm}_s0', 'reflow_s0']] and diff['euler@1']['w2']['n'] == 1
    assert '## Paired differences' in (tmp_path / 'report.md').read_text()
