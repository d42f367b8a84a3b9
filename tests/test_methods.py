"""The method table, stage-naming fields, stage identities and model kinds."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from ml_collections import config_dict

import mock_tfds
from conftest import ROOT, experiment_config
from flowjax import checkpoint, configs, errors, pipeline, train
from flowjax.methods import method, table, training
from flowjax.models import kinds
from test_main import _main, _one_line_error

PIPELINES = sorted(p.stem for p in (ROOT / 'experiments').glob('*.py')
                   if experiment_config(p.stem, 'runlocal').method == 'pipeline')


def _strings(tree, prefix=''):
    """(dotted field, string) for every string in a config tree, tuple entries included."""
    for key, value in tree.items():
        field = f'{prefix}{key}'
        if isinstance(value, dict):
            yield from _strings(value, field + '.')
        elif isinstance(value, (list, tuple)):
            yield from ((field, v) for v in value if isinstance(v, str))
        elif isinstance(value, str):
            yield field, value


@pytest.mark.parametrize('name', PIPELINES)
def test_no_stage_name_is_left_unresolved(name, tmp_path, monkeypatch):
    """Every field of every shipped pipeline that names an earlier stage is declared by its method:
    after planning, no stage config still holds a stage name where a path belongs."""
    monkeypatch.setattr(training, 'check_lpips', lambda config: None)  # no VGG16 weights file here
    with mock_tfds.mock_cifar10(num_examples=8) as data_dir:  # the CIFAR experiments' data
        config = experiment_config(name, f'runlocal,data_dir={data_dir}' if 'cifar' in name else 'runlocal')
        planned = pipeline.plan(config, str(tmp_path))
    stages = set(config.stages)
    for stage, cfg in planned.configs.items():
        for field, value in _strings(json.loads(cfg.to_json())):
            labels = field in ('method', 'name') or field.startswith(('eval.groups.', 'eval.differences.',
                                                                       'compare.methods.'))
            if not labels:  # groups, differences and compare's methods name models of the report and stages
                assert value not in stages, f'{name}: {stage}.{field}={value!r} still names a stage'


def test_an_undeclared_stage_naming_field_is_refused(tmp_path):
    def section():
        c = ml_collections.ConfigDict()
        c.source = config_dict.placeholder(str)
        return c

    fake = method.Method(name='fake', run=lambda config, workdir: {}, check=lambda config: None, section=section)
    methods = {**table.METHODS, 'fake': fake}
    teacher = table.config('rf')
    student = table.config('rf')
    student.method = 'fake'
    student.fake = section()
    student.fake.source = 'teacher'
    config = configs.pipeline(teacher=teacher, student=student)
    with pytest.raises(errors.ConfigError, match="student.fake.source='teacher' names a stage, but method 'fake'"):
        pipeline.plan(config, str(tmp_path), methods)
    declared = {**methods, 'fake': dataclasses.replace(fake, references=('fake.source',))}
    plan = pipeline.plan(config, str(tmp_path), declared)
    assert plan.configs['student'].fake.source == str(tmp_path / 'teacher')


def test_every_method_declares_a_consistent_section():
    for name, m in table.METHODS.items():
        defaults = m.defaults()
        assert defaults.method == name
        for field in m.references:
            section, key = field.split('.')
            assert key in defaults[section], f'{name}: reference {field} is not a field'
        assert set(m.sections(defaults)) <= set(defaults.keys())
    base = set(configs.base().keys())
    assert not base & set(table.METHODS), 'a method section in configs.base()'


def test_a_stage_identity_covers_only_what_it_reads(tmp_path):
    config = experiment_config('toy2d_reflow', 'runlocal')
    before = pipeline.plan(config, str(tmp_path)).fingerprints
    config.couplings.train.steps = 7  # the coupling pass reads no training section
    config.couplings.model.features = (3,)
    config.teacher.lpips.pool = 'avg'  # an l2 teacher does not read the LPIPS section
    assert pipeline.plan(config, str(tmp_path)).fingerprints == before
    config.couplings.generate.num_pairs = 100
    after = pipeline.plan(config, str(tmp_path)).fingerprints
    assert after['teacher'] == before['teacher'] and after['couplings'] != before['couplings']
    assert after['reflow'] != before['reflow']  # it reads the couplings


def test_another_methods_field_is_an_unknown_field(tmp_path):
    _one_line_error(_main('--config=experiments/toy2d_reflow.py:runlocal', f'--workdir={tmp_path}',
                          '--config.teacher.distill.k=2'), 'distill')
    assert not (tmp_path / 'teacher').exists()


def test_exports_record_their_kind_and_old_exports_load(tmp_path):
    config = table.config('rf')
    kind = kinds.from_config(config)
    params = kind.init(jax.random.key(0), (2,))
    meta = train.export_meta(config, kind, (2,), 1)
    assert meta['kind'] == 'velocity' and meta['model']['name'] == 'mlp'
    checkpoint.export(tmp_path / 'new', params, meta)
    old = {k: v for k, v in meta.items() if k != 'kind'}  # an export written before kinds
    checkpoint.export(tmp_path / 'old', params, old)
    for path in ('new', 'old'):
        model = training.load_model(str(tmp_path / path), 'reflow.init', config)
        assert model.kind == kind
        x = jnp.ones((4, 2))
        np.testing.assert_array_equal(model.kind.velocity(model.params)(x, jnp.full((4,), 0.5)),
                                      kind.apply(params, x, jnp.full((4,), 0.5)))
    pathlib.Path(tmp_path / 'new' / 'export' / 'meta.json').write_text(json.dumps({**meta, 'kind': 'caff'}))
    with pytest.raises(errors.UserError, match="model kind 'caff' is unknown"):
        training.load_model(str(tmp_path / 'new'), 'reflow.init')


def test_a_student_may_train_with_other_dropout(tmp_path):
    config = table.config('rf')
    kind = kinds.from_config(config)
    checkpoint.export(tmp_path, kind.init(jax.random.key(0), (2,)), train.export_meta(config, kind, (2,), 1))
    config.model.dropout = 0.1  # Simple ReFlow: the student's dropout set apart from the teacher's
    training.load_model(str(tmp_path), 'reflow.init', config)
    config.model.features = (8,)
    with pytest.raises(errors.ConfigError, match='differs from model'):
        training.load_model(str(tmp_path), 'reflow.init', config)
