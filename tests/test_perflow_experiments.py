"""The PeRFlow experiments: perflow_digits (both claims) and perflow_cifar, their recipes and their runlocal
pipelines end to end.

perflow_digits:runlocal runs every stage but the teacher, which an export of its network at random weights
stands in for (the rf stage runs end to end in test_slimflow.py; a ddpm teacher as perflow.teacher is
test_ddpm.py's). Its `finetune` stage trains from that export (`rf.init`) on classes 0-4, the `plug`
stage adds the K = 4 student's change to it (`transfer`), and both evaluate stages report the paired
differences of the claims. perflow_cifar runs on mock CIFAR-10 (no download), its teacher stood in the
same way.
"""

import json

import jax
import numpy as np

import mock_tfds
from conftest import experiment_config, stand_in_teacher
from flowjax import checkpoint, pipeline


def test_perflow_digits_recipe():
    c = experiment_config('perflow_digits')
    assert c.stages == ('teacher', 'k4_s0', 'k1_s0', 'k4_s1', 'k1_s1', 'k4_s2', 'k1_s2', 'finetune', 'ft_s0',
                        'plug_s0', 'ft_s1', 'plug_s1', 'ft_s2', 'plug_s2', 'evaluate_windows', 'evaluate')
    k4, k1 = c.k4_s1, c.k1_s1
    # the same student budget and the same teacher step size over [0, 1] (8 per window of 4, 32 in one)
    assert k4.train.to_dict() == k1.train.to_dict() and k4.seed == 1
    assert (k4.perflow.windows, k4.perflow.teacher_sampler, k1.perflow.windows, k1.perflow.teacher_sampler) == (
        4, 'euler@8', 1, 'euler@32')
    assert k4.perflow.teacher == 'teacher' and k4.perflow.init is None and k4.perflow.parameterization == 'velocity'
    assert c.finetune.rf.init == 'teacher' and c.finetune.data.classes == (0, 1, 2, 3, 4)
    assert c.ft_s0.perflow.teacher == 'finetune'
    assert c.plug_s2.transfer.to_dict() == {'base': 'teacher', 'tuned': 'k4_s2', 'target': 'finetune', 'scale': 1.0}
    assert c.evaluate.data.classes == (0, 1, 2, 3, 4) and c.evaluate_windows.data.classes is None
    assert c.evaluate.eval.differences['plug - finetune'] == ('plug', 'finetune', 'euler@4=euler@4',
                                                              'euler@8=euler@8')
    d = experiment_config('perflow_digits', 'teacher=ddpm')
    assert d.teacher.method == 'ddpm' and d.finetune.ddpm.init == 'teacher' and 'rf' not in d.teacher
    assert (d.k4_s0.perflow.teacher_sampler, d.k4_s0.perflow.parameterization) == ('ddim@8', 'diff_eps')
    assert 'ddim@4' in d.evaluate.eval.samplers


def test_perflow_digits_runlocal(tmp_path):
    config = experiment_config('perflow_digits', 'runlocal,seeds=1')
    stand_in_teacher(config, tmp_path / 'teacher_export')
    # fewer samplers than the recipe's (each one compiles per model kind): the claims' 4 steps
    config.evaluate_windows.eval.samplers = ('euler@4',)
    config.evaluate_windows.eval.differences = {'K=4 - K=1': ('k4', 'k1', 'euler@4=euler@4')}
    config.evaluate.eval.samplers = ('euler@4',)
    config.evaluate.eval.differences = {d: (*pair[:2], 'euler@4=euler@4')
                                        for d, pair in config.evaluate.eval.differences.items()}
    pipeline.run(config, str(tmp_path / 'run'))
    run = tmp_path / 'run'

    windows = json.loads((run / 'evaluate_windows' / 'report.json').read_text())
    assert windows['k4_s0']['euler@4']['nfe'] == windows['k1_s0']['euler@4']['nfe'] == 4
    assert windows['differences']['K=4 - K=1']['euler@4']['fd_digits']['n'] == 1
    report = json.loads((run / 'report.json').read_text())  # the plug-and-play stage's, the pipeline's report
    assert {'finetune', 'plug_s0', 'ft_s0'} <= set(report)
    assert report['plug_s0']['euler@4']['nfe'] == report['finetune']['euler@4']['nfe'] == 4
    assert report['differences']['plug - finetune']['pairs'] == [['plug_s0', 'finetune']]
    assert np.isfinite(report['differences']['ft - plug']['euler@4']['fd_digits']['mean'])

    # plug = finetune + (k4 - teacher), a piecewise model; finetune started from the teacher on classes 0-4
    load = lambda stage: checkpoint.load_export(run / stage if stage != 'teacher' else tmp_path / 'teacher_export')
    (plug, meta), (tuned, _), (base, _), (target, _) = (load(s) for s in ('plug_s0', 'k4_s0', 'teacher', 'finetune'))
    assert meta['kind'] == 'piecewise' and meta['windows'] == 4 and meta['transfer']['scale'] == 1.0
    for p, a, b, c in zip(*(jax.tree.leaves(x) for x in (plug, tuned, base, target))):
        np.testing.assert_allclose(p, c + (a - b), rtol=0, atol=1e-6)
    assert json.loads((run / 'finetune' / 'export' / 'meta.json').read_text())['method'] == 'rf'


def test_perflow_cifar_recipe():
    c = experiment_config('perflow_cifar')
    assert c.stages == ('teacher', 'k4', 'k1', 'evaluate')
    t = c.k4.train
    assert (t.lr, t.weight_decay, t.warmup_steps, t.lr_final, t.grad_clip, t.steps) == (8e-5, 1e-2, 500, 1.0, 1.0,
                                                                                         100_000)
    assert (c.k4.perflow.teacher_sampler, c.k1.perflow.teacher_sampler) == ('euler@8', 'euler@32')
    assert c.teacher.model.nf == 128 and c.evaluate.eval.metric == 'fid'
    d = experiment_config('perflow_cifar', 'teacher=ddpm,steps=10')
    assert d.teacher.method == 'ddpm' and d.k1.perflow.teacher_sampler == 'ddim@32' and d.k4.train.steps == 10
    assert d.evaluate.eval.samplers[-1] == 'ddim@32'


def test_perflow_cifar_runlocal_on_mock_cifar10(tmp_path):
    with mock_tfds.mock_cifar10(num_examples=48) as data_dir:
        config = experiment_config('perflow_cifar', f'runlocal,data_dir={data_dir}')
        stand_in_teacher(config, tmp_path / 'teacher_export')
        config.stages = ('teacher', 'k4', 'evaluate')  # k1 is the same stage with one window (recipe test)
        config.evaluate.eval.models = ('teacher', 'k4')
        pipeline.run(config, str(tmp_path / 'run'))
    report = json.loads((tmp_path / 'run' / 'report.json').read_text())
    assert {'teacher', 'k4'} <= set(report) and report['k4']['euler@1']['nfe'] == 4
    meta = json.loads((tmp_path / 'run' / 'k4' / 'export' / 'meta.json').read_text())
    assert (meta['kind'], meta['windows'], meta['sample_shape']) == ('piecewise', 4, [32, 32, 3])
