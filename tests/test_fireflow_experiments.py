"""fireflow_digits: its recipe, and its runlocal pipeline end to end (a class-conditional teacher with the null
label, its couplings with classifier-free guidance, a labelled 2-RF student trained with label dropout,
inversion, editing, a guided evaluation). (fireflow_toy2d runs in test_invert.py.)"""

import json

import numpy as np

from conftest import experiment_config, stand_in_teacher
from flowjax import checkpoint, pipeline
from flowjax.data import couplings


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
    """Every stage but the teacher, which a random-weight export of its class-conditional network (with the
    null label) stands in for; its couplings and the evaluation use guidance 2 (the recipe's are 1). The 2-RF
    student trains on the labelled couplings with label dropout."""
    config = experiment_config('fireflow_digits', 'runlocal')
    stand_in_teacher(config, tmp_path / 'teacher_export', 'teacher_s0')
    config.couplings_s0.generate.guidance = 2.0
    config.evaluate.eval.guidance = 2.0
    run = tmp_path / 'run'
    pipeline.run(config, str(run))

    params, meta = checkpoint.load_export(run / 'reflow_s0')
    assert (meta['model']['num_classes'], meta['model']['label_dropout']) == (10, 0.1)
    assert params['params']['label_embed']['embedding'].shape[0] == 11  # the null label's row
    store = couplings.open_store(run / 'couplings_s0')
    assert store.manifest['guidance'] == 2.0 and store.manifest['mean_nfe'] == 16  # euler@8, two calls a step
    labels = store.load()['label']
    assert labels.shape == (64,) and len(np.unique(labels)) > 3

    inversion = json.loads((run / 'invert' / 'inversion.json').read_text())
    assert list(inversion) == ['analytic', 'teacher_s0', 'reflow_s0', 'differences']
    for name in ('analytic', 'teacher_s0', 'reflow_s0'):
        cells = inversion[name]
        assert [cells[k]['nfe'] for k in ('euler@3', 'fireflow@2', 'midpoint@1')] == [6, 6, 4]
        assert all(np.isfinite(cell['rmse']) and cell['psnr'] > 0 for cell in cells.values())
    analytic = inversion['analytic']
    assert analytic['fireflow@2']['rmse'] < analytic['euler@3']['rmse']  # the same NFE
    assert inversion['differences']['analytic']['fireflow@2 - euler@3']['n'] == 16
    assert (run / 'invert' / 'inversion.png').exists()

    edit = json.loads((run / 'edit_s0' / 'edit.json').read_text())['results']['fireflow@2']
    assert [edit[g]['nfe'] for g in ('1', '2')] == [6, 9]  # inversion 3, regeneration 3 (guided: 6)
    assert (run / 'edit_s0' / 'edit.png').exists()
    report = json.loads((run / 'report.json').read_text())
    for name in ('teacher_s0', 'reflow_s0'):  # guidance 2: two calls an evaluation
        assert report[name]['fireflow@4']['nfe'] == 10
        assert report[name]['guidance'] == 2.0
