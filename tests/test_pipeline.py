"""The reflow pipeline experiment end to end, stage skipping and resume."""

import json

import pytest

from flowjax import configs, errors, pipeline
from test_main import _main, _one_line_error

EXPERIMENT = '--config=experiments/toy2d_reflow.py:runlocal'
STAGES = ('teacher', 'couplings', 'reflow', 'distill', 'evaluate')


def _skipped(stderr):
    return {s for s in STAGES if f'stage {s}: finished earlier, skipped' in stderr}


def test_toy2d_reflow_runlocal_end_to_end_and_resume(tmp_path):
    result = _main(EXPERIMENT, f'--workdir={tmp_path}')
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / 'report.json').read_text())
    for model in ('teacher', 'reflow', 'distill'):
        for key in ('euler@1', 'euler@2', 'euler@4', 'rk45'):
            assert set(report[model][key]) >= {'w2', 'energy', 'nfe'}
        assert report[model]['straightness'] >= 0
    assert report['couplings']['pairs'] == 512 and report['couplings']['mean_nfe'] > 6
    assert (tmp_path / 'report.md').exists() and (tmp_path / 'samples.png').exists()
    for stage in STAGES:
        assert (tmp_path / stage / 'stage.json').exists(), stage
    assert (tmp_path / 'couplings' / 'manifest.json').exists()

    # A rerun skips every finished stage and reports the same numbers.
    again = _main(EXPERIMENT, f'--workdir={tmp_path}')
    assert again.returncode == 0, again.stderr[-3000:]
    assert _skipped(again.stderr) == set(STAGES)
    assert json.loads((tmp_path / 'report.json').read_text()) == report

    # A crash after the reflow stage: only the stages after it run again, with the same result.
    for stage in ('distill', 'evaluate'):
        (tmp_path / stage / 'stage.json').unlink()
    resumed = _main(EXPERIMENT, f'--workdir={tmp_path}')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _skipped(resumed.stderr) == {'teacher', 'couplings', 'reflow'}
    assert json.loads((tmp_path / 'report.json').read_text()) == report

    # Changing a stage reruns it and every stage that reads it, not the ones before.
    longer = _main(EXPERIMENT, f'--workdir={tmp_path}', '--config.distill.train.steps=50')
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert _skipped(longer.stderr) == {'teacher', 'couplings', 'reflow'}
    assert json.loads((tmp_path / 'report.json').read_text())['distill'] != report['distill']


def test_stage_errors_are_one_line(tmp_path):
    _one_line_error(_main(EXPERIMENT, f'--workdir={tmp_path}', '--config.reflow.reflow.couplings=nowhere'),
                    'nowhere')
    _one_line_error(_main(EXPERIMENT, f'--workdir={tmp_path}', '--config.teacher.method=rff'),
                    'teacher.method', 'rff')
    _one_line_error(_main(EXPERIMENT, f'--workdir={tmp_path}', '--config.distill.distill.loss=l3'),
                    'distill.loss', 'l3')


def test_reference_to_a_later_stage_is_refused(tmp_path):
    config = configs.pipeline(a=configs.base(), b=configs.base())
    config.a.reflow.couplings = 'b'
    config.a.method = 'reflow'
    with pytest.raises(errors.ConfigError, match="refers to stage 'b'"):
        pipeline.run(config, str(tmp_path), {'reflow': None, 'rf': None})
