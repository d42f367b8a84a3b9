"""Reflow and distill as single methods: stored pairs, online pairs, and their config checks."""

import json

import jax
import numpy as np
import pytest

from flowjax import checkpoint, errors, generate, pipeline
from flowjax.data import couplings
from flowjax.methods import distill, reflow, rf, table

from conftest import experiment_config


@pytest.fixture(scope='module')
def teacher_and_pairs(tmp_path_factory):
    """A tiny 1-RF teacher and 256 of its couplings (euler@8), shared by the tests here."""
    root = tmp_path_factory.mktemp('reflow')
    config = experiment_config('toy2d_rf', 'runlocal')
    config.train.steps = 20
    config.eval.samplers = ()
    rf.run(config, str(root / 'teacher'))
    config = table.for_method(config, 'generate')
    config.generate.teacher = str(root / 'teacher')
    config.generate.num_pairs = 256
    config.generate.batch_size = 128
    config.generate.shard_size = 128
    config.generate.sampler = 'euler@8'
    generate.run(config, str(root / 'pairs'))
    return config, root


def _student(config, method, **section):
    config = table.for_method(config, method)
    config.train.steps = 6
    for key, value in section.items():
        config['flow' if key == 'loss' else method][key] = value
    return config


def test_reflow_on_stored_pairs_starts_from_the_teacher(teacher_and_pairs, tmp_path):
    config, root = teacher_and_pairs
    config = _student(config, 'reflow', couplings=str(root / 'pairs'), init=str(root / 'teacher'))
    config.train.lr = 1e-12  # practically no update: the student must still be the teacher
    reflow.run(config, str(tmp_path))
    student, _ = checkpoint.load_export(tmp_path)
    teacher, _ = checkpoint.load_export(root / 'teacher')
    for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(teacher)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    losses = [json.loads(line)['loss'] for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert all(np.isfinite(losses))


def test_reflow_trains_on_a_mix_of_backward_and_forward_pairs(teacher_and_pairs, tmp_path, monkeypatch):
    """reflow.mix_fraction = 0.25 of each batch of 64 from a forward store: 16 of its pairs, 48 backward."""
    config, root = teacher_and_pairs
    forward = table.for_method(config, 'generate')
    forward.generate.update(direction='forward', num_pairs=128)
    generate.run(forward, str(tmp_path / 'forward'))
    seen = []
    make = couplings.make_mixed_batches

    def spy(*args, **kwargs):
        batches = make(*args, **kwargs)
        return lambda step: seen.append(batches(step)) or seen[-1]

    monkeypatch.setattr(couplings, 'make_mixed_batches', spy)
    config = _student(config, 'reflow', couplings=str(root / 'pairs'), mix_couplings=str(tmp_path / 'forward'),
                      mix_fraction=0.25, init=str(root / 'teacher'))
    reflow.run(config, str(tmp_path / 'student'))
    assert checkpoint.is_exported(tmp_path / 'student') and seen
    losses = [json.loads(line)['loss'] for line in (tmp_path / 'student' / 'metrics.jsonl').read_text().splitlines()]
    assert all(np.isfinite(losses))
    backward, pairs = couplings.open_store(root / 'pairs').load(), couplings.open_store(tmp_path / 'forward').load()
    x1 = np.asarray(seen[0]['x1'])
    from_forward = (x1[:, None] == pairs['x1'][None]).all(axis=-1).any(axis=1)
    from_backward = (x1[:, None] == backward['x1'][None]).all(axis=-1).any(axis=1)
    assert from_forward.tolist() == [False] * 48 + [True] * 16 and from_backward[:48].all()


def test_online_reflow_trains(teacher_and_pairs, tmp_path):
    config, root = teacher_and_pairs
    config = _student(config, 'reflow', online_teacher=str(root / 'teacher'), online_sampler='euler@4')
    reflow.run(config, str(tmp_path))
    assert checkpoint.is_exported(tmp_path)


def test_distill_k_steps_trains(teacher_and_pairs, tmp_path):
    config, root = teacher_and_pairs
    config = _student(config, 'distill', couplings=str(root / 'pairs'), init=str(root / 'teacher'), k=4,
                      loss='pseudo_huber')
    distill.run(config, str(tmp_path))
    assert checkpoint.is_exported(tmp_path)


@pytest.mark.parametrize('method, section, message', [
    ('reflow', {}, 'reflow.couplings'),
    ('reflow', {'couplings': 'PAIRS', 'online_teacher': 'TEACHER'}, 'set one, not both'),
    ('reflow', {'online_teacher': 'TEACHER', 'online_sampler': 'rk45'}, 'fixed-step'),
    ('reflow', {'couplings': 'PAIRS', 'init': 'nowhere'}, 'nowhere'),
    ('reflow', {'couplings': 'PAIRS', 'mix_couplings': 'PAIRS', 'mix_fraction': 1.5},
     r'reflow.mix_fraction=1.5: must be a number in \[0, 1\]'),
    ('reflow', {'couplings': 'PAIRS', 'mix_fraction': 0.5}, 'mix_fraction=0.5: needs reflow.mix_couplings'),
    ('reflow', {'couplings': 'PAIRS', 'mix_couplings': 'PAIRS'}, r'reflow.mix_couplings=.*set reflow.mix_fraction'),
    ('reflow', {'couplings': 'PAIRS', 'mix_couplings': 'PAIRS', 'mix_fraction': 0.005}, 'gives 0 of train.batch_size'),
    ('reflow', {'couplings': 'PAIRS', 'mix_couplings': 'PAIRS', 'mix_fraction': 0.995}, 'gives 64 of'),
    ('reflow', {'online_teacher': 'TEACHER', 'mix_couplings': 'PAIRS', 'mix_fraction': 0.5}, 'online'),
    ('reflow', {'couplings': 'PAIRS', 'mix_couplings': 'nowhere', 'mix_fraction': 0.5}, 'nowhere'),
    ('distill', {'couplings': 'PAIRS', 'init': 'TEACHER', 'k': 0}, 'distill.k=0'),
    ('distill', {'couplings': 'PAIRS', 'init': 'TEACHER', 'loss': 'l7'}, 'flow.loss'),
    ('distill', {'couplings': 'PAIRS'}, 'distill.init'),
])
def test_config_errors(teacher_and_pairs, tmp_path, method, section, message):
    config, root = teacher_and_pairs
    paths = {'PAIRS': str(root / 'pairs'), 'TEACHER': str(root / 'teacher')}
    config = _student(config, method, **{k: paths.get(v, v) for k, v in section.items()})
    with pytest.raises(errors.UserError, match=message):
        {'reflow': reflow.run, 'distill': distill.run}[method](config, str(tmp_path))


def test_student_shape_must_match_init(teacher_and_pairs, tmp_path):
    config, root = teacher_and_pairs
    config = _student(config, 'reflow', couplings=str(root / 'pairs'), init=str(root / 'teacher'))
    config.model.features = (8,)
    with pytest.raises(errors.ConfigError, match='differs from model'):
        reflow.run(config, str(tmp_path))


def test_mix_couplings_may_name_a_stage(tmp_path):
    config = experiment_config('toy2d_reflow', 'runlocal')
    before = pipeline.plan(config, str(tmp_path)).fingerprints['reflow']
    config.reflow.reflow.update(mix_couplings='couplings', mix_fraction=0.5)
    plan = pipeline.plan(config, str(tmp_path))
    assert plan.configs['reflow'].reflow.mix_couplings == str(tmp_path / 'couplings')
    assert plan.fingerprints['reflow'] != before
