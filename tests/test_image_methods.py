"""Every method on images: recipes, class labels, LPIPS. (The digits and CIFAR experiments run end to end
in test_slimflow.py, whose SlimFlow pipelines reuse their teachers.)"""

import json

import numpy as np
import pytest

from conftest import experiment_config, random_export
from flowjax import errors, generate
from flowjax.methods import distill, rf, table, training
from flowjax.metrics import lpips


def test_rf_cifar_recipe():
    c = experiment_config('rf_cifar')
    assert (c.model.nf, tuple(c.model.ch_mult), c.model.num_res_blocks, tuple(c.model.attn_resolutions),
            c.model.dropout) == (128, (1, 2, 2, 2), 4, (16,), 0.15)
    assert (c.train.lr, c.train.warmup_steps, c.train.grad_clip, c.train.batch_size, c.train.ema_decay) == (
        2e-4, 5000, 1.0, 128, 0.999999)
    assert c.data.flip and c.eval.metric == 'fid'
    assert experiment_config('rf_cifar', 'bf16').model.dtype == 'bfloat16'


def _digits(method, **fields):
    c = table.for_method(experiment_config('digits_reflow', 'runlocal').teacher, method)
    c.train.steps = 4
    c.eval.samplers = ()
    c.model.update(fields)
    return c


def test_class_conditional_training_needs_labelled_images(tmp_path):
    """num_classes > 0 on images without labels: refused in one line. (Training on the digit labels, labelled
    couplings, a labelled 2-RF student and evaluation run in test_fireflow_experiments.py.)"""
    unlabelled = _digits('rf', num_classes=10)
    unlabelled.data.image = {'name': 'npz', 'path': str(_npz_without_labels(tmp_path))}
    with pytest.raises(errors.UserError, match='num_classes=10.*no labels'):
        rf.run(unlabelled, str(tmp_path / 'unlabelled'))


def _npz_without_labels(tmp_path):
    path = tmp_path / 'plain.npz'
    np.savez(path, images=np.zeros((16, 8, 8), np.uint8))
    return path


def test_distill_with_lpips(tmp_path, monkeypatch):
    """flow.loss='lpips' in distill trains through the LPIPS network (random VGG weights stand in for the file)."""
    vgg, heads = lpips.random_torch_state_dicts(0)
    variables = lpips.params_from_torch(vgg, heads)

    def load(config):
        return lpips.distance_fn(lpips.LPIPS(resize=config.lpips.resize, pool=config.lpips.pool)), variables

    monkeypatch.setattr(training, 'load_perceptual', load)
    random_export(_digits('rf'), tmp_path / 'teacher')  # a teacher at random weights (rf training: test_slimflow)
    pairs = _digits('generate')
    pairs.generate.update(teacher=str(tmp_path / 'teacher'), num_pairs=32, batch_size=16, shard_size=32,
                          sampler='euler@2')
    generate.run(pairs, str(tmp_path / 'pairs'))

    student = _digits('distill')
    student.distill.update(couplings=str(tmp_path / 'pairs'), init=str(tmp_path / 'teacher'))
    student.flow.loss = 'lpips'
    student.lpips.update(resize=16, pool='avg')
    distill.run(student, str(tmp_path / 'distill'))
    logged = [json.loads(line) for line in (tmp_path / 'distill' / 'metrics.jsonl').read_text().splitlines()]
    assert all(np.isfinite(m['loss']) and m['loss'] > 0 for m in logged)

    student.lpips.resize = None  # 8x8 digits are too small for VGG16's four pools
    with pytest.raises(errors.ConfigError, match='at least 16x16'):
        distill.check(student)


def test_lpips_without_weights_is_one_line(tmp_path):
    student = _digits('distill')
    student.distill.update(couplings=str(tmp_path), init=str(tmp_path))
    student.flow.loss = 'lpips'
    student.lpips.resize = 64
    with pytest.raises(errors.UserError) as e:
        distill.check(student)
    assert '\n' not in str(e.value) and 'vgg16-397923af.pth' in str(e.value)
