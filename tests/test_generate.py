"""The coupling-generation pass: device-count independence, resume, directions, refusals."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowjax import checkpoint, errors, generate, models
from flowjax.data import couplings, images, toy2d
from flowjax.flows import solvers
from flowjax.methods import table


def _export_teacher(path, seed: int) -> None:
    """A random MLP made into a non-trivial, smooth teacher: the zero-initialised output layer gets
    random weights (v != 0) and the time input is damped (the sinusoidal embedding spins fast in t)."""
    model = ml_collections.ConfigDict({'name': 'mlp', 'features': (32, 32), 'time_dim': 16, 'dropout': 0.0})
    params = models.build(model).init(jax.random.key(seed), jnp.zeros((1, 2)), jnp.zeros((1,)))
    layers = params['params']
    layers['out']['kernel'] = 0.5 * jax.random.normal(jax.random.key(seed + 1), layers['out']['kernel'].shape)
    layers['time_in']['kernel'] = 0.01 * layers['time_in']['kernel']
    meta = {'method': 'rf', 'model': model.to_dict(), 'sample_shape': [2], 'step': 20, 'seed': seed,
            'flow': {'t_eps': 1e-3}}
    checkpoint.export(path, params, meta)


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp('teachers')
    for name, seed in (('a', 0), ('b', 10)):
        _export_teacher(root / name, seed)
    return root


@pytest.fixture
def config(teachers):
    config = table.config('generate')
    config.generate.teacher = str(teachers / 'a')  # the workdir; the export inside it is found
    config.generate.num_pairs = 50
    config.generate.shard_size = 10
    config.generate.batch_size = 8
    config.generate.sampler = 'euler@4'
    return config


def _stored(path) -> dict[str, np.ndarray]:
    return couplings.open_store(path).load()


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _teacher(teachers, name='a'):
    params, meta = checkpoint.load_export(teachers / name)
    return models.apply_fn(models.build(ml_collections.ConfigDict(meta['model']))), params


def test_one_and_eight_devices_write_identical_pairs(config, teachers, tmp_path):
    """rk45 per pair: steps and NFE of a pair do not depend on its batch, batch size or devices.
    Holds bit for bit on CPU: each device runs the same per-example program on its rows."""
    with config.unlocked():
        config.generate.sampler = 'rk45'
        config.generate.num_pairs = 44  # shards of 10, 10, 10, 10, 4; batches padded to 8 / 16
    one = generate.generate_couplings(config, tmp_path / 'one', devices=jax.devices()[:1])
    with config.unlocked():
        config.generate.batch_size = 16
    eight = generate.generate_couplings(config, tmp_path / 'eight')
    assert one['complete'] and eight['complete'] and one['mean_nfe'] == eight['mean_nfe']
    a, b = _stored(tmp_path / 'one'), _stored(tmp_path / 'eight')
    _assert_same(a, b)
    assert len(np.unique(a['nfe'])) > 3 and np.all((a['nfe'] - 1) % 6 == 0)  # adaptive, per pair
    assert couplings.open_store(tmp_path / 'one').manifest['mean_nfe'] == pytest.approx(a['nfe'].mean())
    # Pair 13's noise drawn on its own is the stored x0; its x1 is the teacher's flow of it (float32 rk45
    # at rtol 1e-5 is accurate to about 1e-3 here, so a tight solve is the reference, not a bitwise one).
    apply, params = _teacher(teachers)
    key = generate.start_key(config.seed, 'backward')
    x0 = toy2d.source_sampler(config.data.source)(jax.random.fold_in(key, 13), (1, 2))
    x1, _ = solvers.sample(lambda x, t: apply(params, x, t), x0, solvers.parse_sampler('rk45', rtol=1e-8, atol=1e-8))
    np.testing.assert_array_equal(a['x0'][13], np.asarray(x0)[0])
    np.testing.assert_allclose(a['x1'][13], np.asarray(x1)[0], atol=2e-3)


def test_interrupted_pass_resumes_to_the_uninterrupted_store(config, tmp_path):
    full = generate.generate_couplings(config, tmp_path / 'full')
    assert full == {**full, 'num_pairs': 50, 'mean_nfe': 4.0, 'shards': 5, 'new_shards': 5, 'complete': True}
    with config.unlocked():
        config.generate.max_new_shards = 2
    part = generate.generate_couplings(config, tmp_path / 'split')
    assert part['new_shards'] == 2 and not part['complete'] and part['mean_nfe'] is None
    assert not json.loads((tmp_path / 'split' / 'manifest.json').read_text())['complete']
    with pytest.raises(errors.UserError, match='2 of 5 shards present'):
        couplings.open_store(tmp_path / 'split')
    with config.unlocked():
        config.generate.max_new_shards = None
    rest = generate.generate_couplings(config, tmp_path / 'split')
    assert rest['new_shards'] == 3 and rest['complete'] and rest['mean_nfe'] == 4.0
    split = _stored(tmp_path / 'split')
    assert split['index'].tolist() == list(range(50)) and np.all(split['nfe'] == 4)
    _assert_same(split, _stored(tmp_path / 'full'))
    # Complete: a rerun writes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'split').iterdir()}
    assert generate.generate_couplings(config, tmp_path / 'split')['new_shards'] == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'split').iterdir()}


def test_two_processes_split_the_shards(config, tmp_path):
    """Process p owns shards k % 2 == p; process 0 completes the store once all exist."""
    first = generate.generate_couplings(config, tmp_path, process_index=0, process_count=2)
    assert first['new_shards'] == 3 and not first['complete']
    assert sorted(p.name for p in tmp_path.glob('shard-*')) == [f'shard-00000{k}.npz' for k in (0, 2, 4)]
    assert generate.generate_couplings(config, tmp_path, process_index=1, process_count=2)['new_shards'] == 2
    last = generate.generate_couplings(config, tmp_path, process_index=0, process_count=2)
    assert last['new_shards'] == 0 and last['complete']
    generate.generate_couplings(config, tmp_path / 'single')
    _assert_same(_stored(tmp_path), _stored(tmp_path / 'single'))


def test_forward_pairs_invert_real_data(config, teachers, tmp_path):
    with config.unlocked():
        config.generate.direction = 'forward'
        config.generate.sampler = 'rk45'
        config.generate.num_pairs = 16
        config.generate.rtol = config.generate.atol = 1e-6  # at 1e-5 the round trip is only good to 1e-2
    generate.generate_couplings(config, tmp_path)
    pairs = _stored(tmp_path)
    key = generate.start_key(config.seed, 'forward')
    data = toy2d.distribution(config.data.target, 'data.target')
    np.testing.assert_array_equal(pairs['x1'][5], np.asarray(data(jax.random.fold_in(key, 5), 1))[0])
    apply, params = _teacher(teachers)
    x1, _ = solvers.sample(lambda x, t: apply(params, x, t), jnp.asarray(pairs['x0']),
                           solvers.parse_sampler('rk45', rtol=1e-8, atol=1e-8), eps=1e-3)
    assert np.abs(pairs['x0'] - pairs['x1']).mean() > 1.0  # the teacher moves points far
    np.testing.assert_allclose(np.asarray(x1), pairs['x1'], atol=2e-3)


def test_bfloat16_store_holds_the_rounded_float32_pairs(config, tmp_path):
    with config.unlocked():
        config.generate.num_pairs = 20
    generate.generate_couplings(config, tmp_path / 'f32')
    with config.unlocked():
        config.generate.dtype = 'bfloat16'
    generate.generate_couplings(config, tmp_path / 'bf16')
    full, half = _stored(tmp_path / 'f32'), _stored(tmp_path / 'bf16')
    assert couplings.open_store(tmp_path / 'bf16').manifest['dtype'] == 'bfloat16'
    np.testing.assert_array_equal(half['x1'], full['x1'].astype(half['x1'].dtype))


def test_store_of_another_request_is_refused(config, teachers, tmp_path):
    with config.unlocked():
        config.generate.num_pairs = 20
        config.generate.max_new_shards = 1
    generate.generate_couplings(config, tmp_path)
    with config.unlocked():
        config.generate.teacher = str(teachers / 'b' / 'export')
    with pytest.raises(errors.UserError) as excinfo:
        generate.generate_couplings(config, tmp_path)
    message = str(excinfo.value)
    assert '\n' not in message and str(tmp_path) in message and 'teacher=' in message
    assert str(teachers / 'a' / 'export') in message and str(teachers / 'b' / 'export') in message
    manifest = json.loads((tmp_path / 'manifest.json').read_text())
    couplings.write_manifest(tmp_path, {**manifest, 'shape': [3]})
    with config.unlocked():
        config.generate.teacher = str(teachers / 'a' / 'export')  # the same teacher, named by its export dir
    with pytest.raises(errors.UserError, match=r'shape=\[3\] but this run asks for shape=\[2\]'):
        generate.generate_couplings(config, tmp_path)
    assert sorted(p.name for p in tmp_path.glob('shard-*')) == ['shard-000000.npz']


@pytest.mark.parametrize('field, value, expected', [
    ('teacher', None, 'generate.teacher: an export directory'),
    ('teacher', '/nowhere/at/all', 'generate.teacher: cannot load /nowhere/at/all'),
    ('num_pairs', 0, 'generate.num_pairs=0: must be an integer >= 1'),
    ('shard_size', 0, 'generate.shard_size=0'),
    ('batch_size', 12, r'generate.batch_size=12: must be a positive multiple of the device count \(8\)'),
    ('sampler', 'euler', "generate.sampler: sampler 'euler': fixed-step solvers need '@N' steps"),
    ('direction', 'sideways', 'generate.direction=.sideways.: expected one of backward, forward'),
    ('dtype', 'int8', 'generate.dtype=.int8.: expected one of float32, bfloat16, float16'),
    ('model_dtype', 'float16', r'generate.model_dtype=.float16.: expected one of float32, bfloat16 \(or unset'),
    ('model_dtype', 'bfloat16', r"generate.model_dtype='bfloat16': the teacher's model \(mlp\) has no dtype setting"),
])
def test_bad_config_is_one_line(config, tmp_path, field, value, expected):
    with config.unlocked():
        config.generate[field] = value
    with pytest.raises(errors.ConfigError, match=expected) as excinfo:
        generate.generate_couplings(config, tmp_path)
    assert '\n' not in str(excinfo.value)
    assert not (tmp_path / 'manifest.json').exists()


def test_exports_load_from_relative_paths(teachers, monkeypatch):
    """A stage or `eval.models` may name an export relative to the working directory."""
    monkeypatch.chdir(teachers)
    relative, _ = checkpoint.load_export('a')
    absolute, _ = checkpoint.load_export(teachers / 'a')
    for x, y in zip(jax.tree.leaves(relative), jax.tree.leaves(absolute)):
        np.testing.assert_array_equal(x, y)


# Forward pairs of images: real digits inverted by a small random NCSN++ teacher.
DIGITS_TEACHER = {'name': 'ncsnpp', 'nf': 4, 'ch_mult': (1, 2), 'num_res_blocks': 1, 'attn_resolutions': (),
                  'dropout': 0.0, 'init_scale': 1.0}  # init_scale 1: non-zero output layers, so v != 0


def _export_image_teacher(path, seed: int, num_classes: int = 0, shape=(8, 8, 1)) -> None:
    """A random NCSN++ as a smooth teacher: its time embedding's first layer damped (999 t spins fast)."""
    model = ml_collections.ConfigDict({**DIGITS_TEACHER, 'num_classes': num_classes})
    label = (jnp.zeros((1,), jnp.int32),) if num_classes else ()
    params = models.build(model).init(jax.random.key(seed), jnp.zeros((1, *shape)), jnp.zeros((1,)), *label)
    params['params']['temb_0']['kernel'] = 0.01 * params['params']['temb_0']['kernel']
    meta = {'method': 'rf', 'model': model.to_dict(), 'sample_shape': list(shape), 'step': 1, 'seed': seed,
            'flow': {'t_eps': 1e-3}}
    checkpoint.export(path, params, meta)


@pytest.fixture(scope='module')
def image_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp('image_teachers')
    _export_image_teacher(root / 'plain', 0)
    _export_image_teacher(root / 'labelled', 1, num_classes=10)
    return root


@pytest.fixture
def image_config(image_teachers):
    config = table.config('generate')
    config.data.kind = 'image'
    config.data.image = {'name': 'digits'}
    config.data.flip = True  # never applied to forward pairs: x1 is the image as stored
    config.generate.update(teacher=str(image_teachers / 'plain'), direction='forward', num_pairs=20,
                           shard_size=8, batch_size=8, sampler='euler@4')
    return config


def _digits_rows(config, count: int) -> np.ndarray:
    return generate.data_rows(config.seed, np.arange(count), len(images.digits()[0]))


def test_data_rows_use_every_image_once_per_epoch():
    rows = generate.data_rows(3, np.arange(15), 5)
    epochs = rows.reshape(3, 5)
    assert all(sorted(e.tolist()) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # a fresh permutation per epoch
    np.testing.assert_array_equal(generate.data_rows(3, np.array([13, 2, 7]), 5), rows[[13, 2, 7]])
    assert not np.array_equal(generate.data_rows(4, np.arange(15), 5), rows)


def test_forward_image_pairs_start_at_real_images_and_invert_the_teacher(image_config, image_teachers, tmp_path):
    with image_config.unlocked():
        image_config.generate.update(sampler='rk45', num_pairs=16, rtol=1e-6, atol=1e-6)
    generate.generate_couplings(image_config, tmp_path)
    store = couplings.open_store(tmp_path)
    assert store.manifest['direction'] == 'forward' and store.manifest['data'] == {
        'kind': 'image', 'shape': [8, 8, 1], 'image': {'name': 'digits'}, 'num_images': 1797}
    pairs = store.load()
    assert 'label' not in pairs and (tmp_path / 'couplings.png').exists()
    np.testing.assert_array_equal(pairs['x1'], images.digits()[0][_digits_rows(image_config, 16)])
    # The teacher run forward from the stored noise gives back the real images (rk45 at 1e-6 per pair,
    # against a solve at 1e-8: about 4e-3 apart where the pairs move 0.7 on average).
    apply, params = _teacher(image_teachers, 'plain')
    x1, _ = solvers.sample(lambda x, t: apply(params, x, t), jnp.asarray(pairs['x0']),
                           solvers.parse_sampler('rk45', rtol=1e-8, atol=1e-8), eps=1e-3)
    assert np.abs(pairs['x0'] - pairs['x1']).mean() > 0.3
    np.testing.assert_allclose(np.asarray(x1), pairs['x1'], atol=1e-2)


def test_forward_image_pairs_on_one_and_eight_devices_and_resumed(image_config, tmp_path):
    """Bit for bit with the same rows per device (here 1): XLA's CPU convolutions, unlike the MLP's
    matmuls, round the last bits differently for another number of rows (pairs 1e-6 apart)."""
    with image_config.unlocked():
        image_config.generate.batch_size = 1
    generate.generate_couplings(image_config, tmp_path / 'one', devices=jax.devices()[:1])
    with image_config.unlocked():
        image_config.generate.update(batch_size=8, max_new_shards=1)
    part = generate.generate_couplings(image_config, tmp_path / 'eight')
    assert part['new_shards'] == 1 and not part['complete']
    with image_config.unlocked():
        image_config.generate.max_new_shards = None
    rest = generate.generate_couplings(image_config, tmp_path / 'eight')
    assert rest['new_shards'] == 2 and rest['complete']
    one, eight = _stored(tmp_path / 'one'), _stored(tmp_path / 'eight')
    _assert_same(one, eight)
    np.testing.assert_array_equal(one['x1'], images.digits()[0][_digits_rows(image_config, 20)])
    assert np.all(one['nfe'] == 4) and one['index'].tolist() == list(range(20))


def test_class_conditional_forward_pairs_take_the_true_labels(image_config, image_teachers, tmp_path):
    with image_config.unlocked():
        image_config.generate.update(teacher=str(image_teachers / 'labelled'), num_pairs=12, sampler='euler@2')
    generate.generate_couplings(image_config, tmp_path)
    pairs = _stored(tmp_path)
    digits, labels = images.digits()
    rows = _digits_rows(image_config, 12)
    np.testing.assert_array_equal(pairs['label'], labels[rows])
    np.testing.assert_array_equal(pairs['x1'], digits[rows])
    # The inversion was conditioned on those labels: redone with them it matches, with others it does not.
    apply, params = _teacher(image_teachers, 'labelled')
    sampler = solvers.parse_sampler('euler@2')
    invert = lambda label: np.asarray(solvers.invert(lambda x, t: apply(params, x, t, label=label),
                                                     jnp.asarray(pairs['x1']), sampler, eps=1e-3)[0])
    np.testing.assert_allclose(invert(jnp.asarray(labels[rows])), pairs['x0'], atol=1e-5)
    assert np.abs(invert(jnp.asarray((labels[rows] + 1) % 10)) - pairs['x0']).max() > 1e-3


def test_forward_pairs_of_a_tfds_dataset_with_its_labels_over_two_epochs(image_config, tmp_path):
    """12 images, 16 pairs: pairs 12..15 start a second epoch, in a fresh order; labels come with the rows."""
    import mock_tfds  # Imported here: tfds loads slowly.

    _export_image_teacher(tmp_path / 'teacher', 2, num_classes=10, shape=(32, 32, 3))
    with mock_tfds.mock_cifar10(num_examples=12) as data_dir, image_config.unlocked():
        image_config.data.image = {'name': 'tfds', 'dataset': 'cifar10', 'split': 'train', 'data_dir': data_dir}
        image_config.generate.update(teacher=str(tmp_path / 'teacher'), num_pairs=16, sampler='euler@1')
        generate.generate_couplings(image_config, tmp_path / 'pairs')
        source, labels = images.load(image_config.data.image)
        rows = generate.data_rows(image_config.seed, np.arange(16), 12)
        pairs = _stored(tmp_path / 'pairs')
        np.testing.assert_array_equal(pairs['x1'], source.take(rows))
        np.testing.assert_array_equal(pairs['label'], labels[rows])
    assert sorted(rows[:12].tolist()) == list(range(12)) and len(set(rows[12:].tolist())) == 4
    manifest = couplings.open_store(tmp_path / 'pairs').manifest
    assert manifest['data']['num_images'] == 12 and manifest['data']['image']['dataset'] == 'cifar10'


def test_forward_image_store_of_another_dataset_is_refused(image_config, image_teachers, tmp_path):
    with image_config.unlocked():
        image_config.generate.max_new_shards = 1
    generate.generate_couplings(image_config, tmp_path / 'pairs')
    other = tmp_path / 'other.npz'
    np.savez(other, images=np.zeros((30, 8, 8), np.uint8))
    with image_config.unlocked():
        image_config.data.image = {'name': 'npz', 'path': str(other)}
    with pytest.raises(errors.UserError) as excinfo:
        generate.generate_couplings(image_config, tmp_path / 'pairs')
    message = str(excinfo.value)
    assert '\n' not in message and 'coupling store was made with data=' in message and 'npz' in message
    assert sorted(p.name for p in (tmp_path / 'pairs').glob('shard-*')) == ['shard-000000.npz']
    # Unlabelled images cannot give a class-conditional teacher its labels.
    with image_config.unlocked():
        image_config.generate.teacher = str(image_teachers / 'labelled')
    with pytest.raises(errors.UserError, match=r'num_classes=10\) needs labelled images.*has no labels'):
        generate.generate_couplings(image_config, tmp_path / 'unlabelled')
    assert not (tmp_path / 'unlabelled').exists()
    # Backward image pairs record only the shape, as before.
    with image_config.unlocked():
        image_config.generate.update(teacher=str(image_teachers / 'plain'), direction='backward', num_pairs=8,
                                     sampler='euler@1')
    generate.generate_couplings(image_config, tmp_path / 'backward')
    assert couplings.open_store(tmp_path / 'backward').manifest['data'] == {'kind': 'image', 'shape': [8, 8, 1]}
