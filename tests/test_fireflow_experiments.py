"""fireflow_digits: its recipe, and its runlocal pipeline end to end (a class-conditional teacher trained with
label dropout, labelled couplings, a labelled 2-RF student, inversion, editing, evaluation), then the same
teacher's couplings and evaluation with classifier-free guidance. (fireflow_toy2d runs in test_invert.py.)"""

import copy
import json

import numpy as np

from conftest import experiment_config
from flowjax import checkpoint, evaluate, generate, pipeline
from flowjax.data import couplings
from flowjax.methods import table


def test_fireflow_digits_recipe():
    c = experiment_config('fireflow_digits')
    assert c.stages == ('teacher_s0', 'couplings_s0', 'reflow_s0', 'teacher_s1', 'couplings_s1', 'reflow_s1',
                        'teacher_s2', 'couplings_s2', 'reflow_s2', 'invert', 'edit_s0', 'edit_s1', 'edit_s2', 'evaluate')
    recipe = experiment_config('digits_reflow')
    teacher = c.teacher_s1
    assert (teacher.seed, teacher.model.num_classes, teacher.model.label_dropout) == (1, 10, 0.1)
    assert teacher.train.to_dict() == recipe.teacher.train.to_dict()  # digits_reflow's recipe, conditional
    assert c.reflow_s1.reflow.couplings == 'couplings_s1' and c.reflow_s1.reflow.init == 'teacher_s1'
    assert c.invert.invert.models == ('analytic', 'teacher_s0', 'reflow_s0', 'teacher_s1', 'reflow_s1', 'teacher_s2',
                                      'reflow_s2')
    specs = c.invert.invert.samplers
    for n in (4, 8, 16, 32):  # FireFlow beside Euler at equal NFE, midpoint at about equal and at twice the NFE
        assert {f'euler@{n + 1}', f'fireflow@{n}', f'midpoint@{n // 2}', f'midpoint@{n}', f'rf_solver@{n}'} <= set(specs)
        assert f'fireflow@{n}=midpoint@{n // 2}' in c.invert.invert.differences
    assert (c.edit_s2.edit.model, c.edit_s2.edit.samplers, c.edit_s2.edit.guidance) == (
        'teacher_s2', ('euler@8', 'midpoint@8', 'fireflow@8'), (1.0, 2.0, 3.0))


def test_fireflow_digits_runlocal_end_to_end(tmp_path):
    config = experiment_config('fireflow_digits', 'runlocal')
    run = tmp_path / 'run'
    pipeline.run(config, str(run))

    params, meta = checkpoint.load_export(run / 'teacher_s0')
    assert (meta['model']['num_classes'], meta['model']['label_dropout']) == (10, 0.1)
    assert params['params']['label_embed']['embedding'].shape[0] == 11  # the null label's row
    labels = couplings.open_store(run / 'couplings_s0').load()['label']
    assert labels.shape == (64,) and len(np.unique(labels)) > 3

    inversion = json.loads((run / 'invert' / 'inversion.json').read_text())
    assert list(inversion) == ['analytic', 'teacher_s0', 'reflow_s0', 'differences']
    for name in ('analytic', 'teacher_s0', 'reflow_s0'):
        cells = inversion[name]
        assert [cells[k]['nfe'] for k in ('euler@3', 'fireflow@2', 'midpoint@1', 'midpoint@2', 'rf_solver@2')] == [
            6, 6, 4, 8, 8]
        assert all(np.isfinite(cell['rmse']) and cell['psnr'] > 0 for cell in cells.values())
    analytic = inversion['analytic']
    assert analytic['midpoint@2']['rmse'] < analytic['midpoint@1']['rmse'] < analytic['euler@3']['rmse']
    assert (run / 'invert' / 'inversion.png').exists()

    edit = json.loads((run / 'edit_s0' / 'edit.json').read_text())
    text = json.dumps(edit)
    assert 'fireflow@2' in text and (run / 'edit_s0' / 'edit.png').exists()
    report = json.loads((run / 'report.json').read_text())
    assert report['teacher_s0']['fireflow@4']['nfe'] == 5 and report['reflow_s0']['euler@1']['nfe'] == 1

    # the teacher's couplings and evaluation with guidance 2: the condition is each pair's label, NFE doubled
    pairs = table.for_method(config.couplings_s0, 'generate')
    pairs.generate.update(teacher=str(run / 'teacher_s0'), num_pairs=16, batch_size=16, shard_size=16,
                          sampler='euler@2', guidance=2.0)
    generate.run(pairs, str(tmp_path / 'guided'))
    manifest = couplings.open_store(tmp_path / 'guided').manifest
    assert manifest['guidance'] == 2.0 and manifest['mean_nfe'] == 4
    assert 'guidance' not in couplings.open_store(run / 'couplings_s0').manifest

    scored = copy.deepcopy(config.evaluate)
    scored.eval.update(models=(f"teacher={run / 'teacher_s0'}",), samplers=('euler@2',), guidance=2.0,
                       num_samples=64)
    guided = evaluate.run(scored, str(tmp_path / 'evaluate'))
    assert guided['teacher']['euler@2']['nfe'] == 4 and guided['teacher']['guidance'] == 2.0
