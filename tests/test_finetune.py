"""Fine-tuning (docs/methods.md, Rectified flow (1-RF)): `rf.init` starts training from an export's
weights; `data.classes` restricts labelled images to some classes for every reader; both leave
the identity of configs that do not use them as it was (old checkpoints resume)."""

import json

import jax
import ml_collections
import numpy as np
import pytest

import mock_tfds
from conftest import experiment_config
from flowjax import checkpoint, errors, generate, sharding, train
from flowjax.data import datasets, images
from flowjax.methods import method as method_lib, rf, table
from flowjax.models import kinds


def test_rf_init_starts_from_the_export(tmp_path):
    config = experiment_config('toy2d_rf', 'runlocal')
    kind = kinds.from_config(config)
    given = kind.init(jax.random.key(7), (2,))
    checkpoint.export(tmp_path / 'given', given, train.export_meta(config, kind, (2,), 40))
    # One step at a vanishing rate, EMA decay 0 (the EMA is the params): the export is the init.
    config.train.update(steps=1, lr=1e-30, ema_decay=0.0, checkpoint_every=1, log_every=1)
    config.eval.samplers = ()
    config.rf.init = str(tmp_path / 'given')
    rf.run(config, str(tmp_path / 'tuned'))
    params, _ = checkpoint.load_export(tmp_path / 'tuned')
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(given), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-25)
    config.rf.init = None
    rf.run(config, str(tmp_path / 'fresh'))
    fresh, _ = checkpoint.load_export(tmp_path / 'fresh')
    assert not np.allclose(jax.tree.leaves(fresh)[1], jax.tree.leaves(given)[1])


def test_later_fields_keep_old_identities():
    """A checkpoint's config from before the LATER_FIELDS (rf.init, data.classes, eval.guidance,
    generate.guidance) still matches a config not using them; one that uses them does not."""
    for name in ('rf', 'reflow', 'generate'):
        method = table.METHODS[name]
        config = table.config(name)
        current = method.identity(config)
        assert 'classes' not in current['data'] and 'rf' not in current
        assert 'guidance' not in current.get('eval', {}) and 'guidance' not in current.get('generate', {})
        saved = json.loads(config.to_json())
        for field in method_lib.LATER_FIELDS:
            section, key = field.split('.')
            saved.get(section, {}).pop(key, None)
        saved.pop('rf', None)
        assert checkpoint.config_difference(saved, current, method.default_identity()) is None
        config.data.classes = (1, 2)
        assert checkpoint.config_difference(saved, method.identity(config), method.default_identity()) == 'data.classes'
        config.data.classes = None
        section = 'generate' if name == 'generate' else 'eval'  # eval fields are resumable changes
        config[section].guidance = 2.0
        assert checkpoint.config_difference(saved, method.identity(config), method.default_identity()) == (
            'generate.guidance' if name == 'generate' else None)
    config = table.config('rf')
    config.rf.init = 'teacher'
    assert table.METHODS['rf'].identity(config)['rf'] == {'init': 'teacher'}


def _digits(classes=None):
    config = experiment_config('digits_reflow', 'runlocal').teacher
    config.data.classes = classes
    return config


def test_data_classes_every_reader_sees_only_those_classes():
    config = _digits((3, 7))
    x, y = datasets.load_images(config)
    all_x, all_y = datasets.load_images(_digits())
    assert set(np.unique(y)) == {3, 7} and len(x) == len(y) == np.isin(all_y, (3, 7)).sum()
    np.testing.assert_array_equal(x, all_x[np.isin(all_y, (3, 7))])
    assert datasets.num_images(config) == len(x) and datasets.image_spec(config)['classes'] == [3, 7]
    config.model.num_classes = 10  # labels ride along in the batches
    batches = datasets.make_batches(config, sharding.data_mesh(), 16, seed=0)
    seen = np.concatenate([np.asarray(batches(step)['label']) for step in range(30)])
    assert set(np.unique(seen)) == {3, 7}
    rows, labels = datasets.read_rows(config, np.arange(len(x)), labels=True)
    assert set(np.unique(labels)) == {3, 7} and len(rows) == len(x)
    # forward pairs read their x1 through the same subset
    endpoints = generate._image_endpoints(config, 'forward')
    assert endpoints.spec['image']['classes'] == [3, 7] and endpoints.spec['num_images'] == len(x)
    assert set(np.unique(endpoints.read(np.arange(50), True)[1])) == {3, 7}


def test_data_classes_on_a_source_on_disk(tmp_path):
    mock_tfds.write_fake_dataset(tmp_path, 'cifar10', num_examples=40)
    spec = ml_collections.ConfigDict({'name': 'tfds', 'dataset': 'cifar10', 'data_dir': str(tmp_path)})
    config = _digits((1, 2))
    config.data.image = spec
    x, y = datasets.load_images(config)
    full_x, full_y = images.load(spec)
    keep = np.flatnonzero(np.isin(full_y[np.arange(len(full_x))], (1, 2)))
    assert isinstance(x, images.Subset) and len(x) == len(keep) == len(y)
    np.testing.assert_array_equal(x.take(np.arange(len(x))), full_x.take(keep))
    batch = images.ImageBatches(x, y, 8, seed=0, flip=False, process_index=0, process_count=1).local_batch(0)
    assert set(np.unique(batch['label'])) <= {1, 2}


@pytest.mark.parametrize('classes, match', [
    ((0, 12), r'data.classes=\(0, 12\): no image of data.image .* has label 12 \(labels 0..9\)'),
    ('unlabelled', r'data.classes=\(0,\): the images of data.image .* have no labels'),
])
def test_data_classes_load_errors(tmp_path, classes, match):
    config = _digits((0,) if classes == 'unlabelled' else classes)
    if classes == 'unlabelled':
        np.savez(tmp_path / 'a.npz', images=np.zeros((4, 8, 8), np.uint8))
        config.data.image = {'name': 'npz', 'path': str(tmp_path / 'a.npz')}
    with pytest.raises(errors.UserError, match=match) as e:
        datasets.load_images(config)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('value, match', [
    ((1.5,), 'expected None'), ((1, 1), 'expected None'), ((), 'expected None'), ((-1,), 'expected None'),
    (('a',), 'expected None'), ((True,), 'expected None'),
])
def test_data_classes_static_errors(value, match):
    config = ml_collections.ConfigDict(_digits().to_dict())
    config.data.classes = value
    with pytest.raises(errors.ConfigError, match=match):
        datasets.check(config)
    toy = table.config('rf')
    toy.data.classes = (0,)
    with pytest.raises(errors.ConfigError, match=r"data.classes=\(0,\): class subsets need labelled images"):
        datasets.check(toy)
