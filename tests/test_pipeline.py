"""The reflow pipeline experiment end to end, stage skipping and resume."""

import json
import logging
import pathlib
import shutil

import pytest

from conftest import experiment_config
import dataclasses

from flowjax import configs, errors, pipeline
from flowjax.methods import table, training
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
    _one_line_error(_main(EXPERIMENT, f'--workdir={tmp_path}', '--config.distill.flow.loss=l3'),
                    'flow.loss', 'l3')


def test_reference_to_a_later_stage_is_refused(tmp_path):
    config = configs.pipeline(a=table.config('reflow'), b=table.config('rf'))
    config.a.reflow.couplings = 'b'
    with pytest.raises(errors.ConfigError, match="refers to stage 'b'"):
        pipeline.run(config, str(tmp_path))


def _listing(path):
    """(relative path, mtime) of every file and directory under `path`."""
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob('*'))


def _standin_config(**overrides):
    """The runlocal reflow pipeline cut to teacher -> couplings -> evaluate, with few steps and pairs."""
    config = experiment_config('toy2d_reflow', 'runlocal')
    config.stages = ('teacher', 'couplings', 'evaluate')
    config.teacher.train.steps = 10
    config.couplings.generate.update(num_pairs=64, batch_size=64, shard_size=64, sampler='euler@4')
    config.evaluate.eval.update(models=('teacher',), samplers=('euler@2',))
    for field, value in overrides.items():
        stage, name = field.split('.')
        config[stage][name] = value
    return config


def _never(name):
    def run(cfg, workdir):
        raise AssertionError(f'{name} ran in {workdir}')

    return run


def test_stage_stands_in_for_an_existing_export(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    first, second = tmp_path / 'first', tmp_path / 'second'
    config = _standin_config()
    config.stages = ('teacher',)
    pipeline.run(config, str(first))
    teacher = first / 'teacher'
    before = _listing(teacher)

    config = _standin_config(**{'teacher.checkpoint': str(teacher)})
    results = pipeline.run(config, str(second))
    assert results['teacher'] == {'checkpoint': str(teacher)}
    assert f'stage teacher: using the export in {teacher}' in caplog.text
    assert not (second / 'teacher').exists()  # not trained: no checkpoints, metrics or stage.json
    assert _listing(teacher) == before  # nothing written into the given export
    manifest = json.loads((second / 'couplings' / 'manifest.json').read_text())
    assert manifest['teacher'] == str(teacher / 'export')  # generate records the export inside the workdir
    report = json.loads((second / 'report.json').read_text())
    assert set(report['teacher']['euler@2']) >= {'w2', 'nfe'}

    # A rerun skips every stage; the given export is read, never written.
    again = pipeline.run(config, str(second),
                         {m: dataclasses.replace(d, run=_never(m)) for m, d in table.METHODS.items()})
    assert again['couplings'] == results['couplings'] and again['teacher'] == results['teacher']
    assert _listing(teacher) == before

    # The export/ directory itself works too: later stages get it, the report keeps the stage name.
    seen = {}

    def record(cfg, workdir):
        seen[cfg.method] = cfg
        pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
        return {}

    export = teacher / 'export'
    pipeline.run(  # no 'rf' method: the stand-in is neither checked nor run
_standin_config(**{'teacher.checkpoint': str(export)}), str(tmp_path / 'third'),
                 {m: dataclasses.replace(table.METHODS[m], run=record) for m in ('generate', 'evaluate')})
    assert seen['generate'].generate.teacher == str(export)
    assert seen['evaluate'].eval.models == (f'teacher={export}',)
    training.load_model(seen['generate'].generate.teacher, 'generate.teacher')

    # Another export (here a copy with a later step) changes the fingerprints of the stages after it.
    other = tmp_path / 'other'
    shutil.copytree(export, other / 'export')
    meta = json.loads((other / 'export' / 'meta.json').read_text())
    (other / 'export' / 'meta.json').write_text(json.dumps({**meta, 'step': meta['step'] + 1}))
    seen.clear()
    pipeline.run(_standin_config(**{'teacher.checkpoint': str(other)}), str(second),
                 {m: dataclasses.replace(table.METHODS[m], run=record) for m in ('generate', 'evaluate')})
    assert set(seen) == {'generate', 'evaluate'}  # both rerun
    # The same path holding a new export does too.
    (other / 'export' / 'meta.json').write_text(json.dumps({**meta, 'step': meta['step'] + 2}))
    seen.clear()
    pipeline.run(_standin_config(**{'teacher.checkpoint': str(other)}), str(second),
                 {m: dataclasses.replace(table.METHODS[m], run=record) for m in ('generate', 'evaluate')})
    assert set(seen) == {'generate', 'evaluate'}
    assert _listing(teacher) == before


@pytest.mark.parametrize('where', ['empty', 'missing', 'no_params'])
def test_standin_without_an_export_is_a_config_error(tmp_path, where):
    given = tmp_path / 'given'
    if where != 'missing':
        (given / 'export').mkdir(parents=True)
    if where == 'no_params':
        (given / 'export' / 'meta.json').write_text('{}')
    config = _standin_config(**{'teacher.checkpoint': str(given)})
    with pytest.raises(errors.ConfigError) as e:
        pipeline.run(config, str(tmp_path / 'work'), {'generate': _never('generate'), 'evaluate': _never('evaluate')})
    message = str(e.value)
    assert '\n' not in message and message.startswith(f'teacher.checkpoint={given}: no exported model here')
    assert f'{given}/export/meta.json' in message
    assert not (tmp_path / 'work').exists()


def test_checkpoint_outside_a_pipeline_is_refused(tmp_path):
    _one_line_error(_main('--config=experiments/toy2d_rf.py:runlocal', f'--workdir={tmp_path}',
                          f'--config.checkpoint={tmp_path}'), 'checkpoint: only a pipeline stage')
    assert not any(tmp_path.iterdir())
