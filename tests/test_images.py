"""Image datasets: sources, one-line errors, and stateless sharded batches with flips."""

import io

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import mock_tfds
from flowjax import errors, sharding
from flowjax.data import images, tfds_images


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert '\n' not in message
    return message


def _ids(n: int, h: int = 4, w: int = 5) -> np.ndarray:
    """Image i holds i in its left column and a negative ramp elsewhere: its max is i, flips show."""
    x = np.tile(np.linspace(-0.9, -0.1, w, dtype=np.float32), (n, h, 1))[..., None]
    x[:, :, 0, 0] = np.arange(n, dtype=np.float32)[:, None]
    return x


def test_digits():
    x, y = images.digits()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert y.dtype == np.int32 and set(np.unique(y)) == set(range(10))


def test_npz_round_trip(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (6, 4, 3), np.uint8)
    raw[0, 0, 0], raw[0, 0, 1] = 0, 255
    np.savez(tmp_path / 'a.npz', images=raw, labels=np.arange(6))
    x, y = images.load_npz(str(tmp_path / 'a.npz'))
    assert x.shape == (6, 4, 3, 1) and x.dtype == np.float32
    np.testing.assert_allclose((x[..., 0] + 1) * 127.5, raw, atol=1e-4)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(y, np.arange(6))
    assert y.dtype == np.int32
    np.savez(tmp_path / 'b.npz', pixels=np.zeros((2, 3, 3, 3), np.uint8))
    x, y = images.load(ml_collections.ConfigDict({'name': 'npz', 'path': str(tmp_path / 'b.npz')}))
    assert x.shape == (2, 3, 3, 3) and y is None


@pytest.mark.parametrize('arrays, match', [
    (None, 'no such .npz'),
    ({'images': np.zeros((2, 3), np.uint8)}, 'has shape'),
    ({'images': np.zeros((2, 3, 3), np.float32)}, 'dtype float32'),
    ({'images': np.zeros((2, 3, 3), np.uint8), 'labels': np.arange(3)}, 'labels'),
])
def test_npz_errors(tmp_path, arrays, match):
    if arrays is not None:
        np.savez(tmp_path / 'a.npz', **arrays)
    with pytest.raises(errors.UserError, match=match) as excinfo:
        images.load_npz(str(tmp_path / 'a.npz'))
    _one_line(excinfo)


def _png(path, size, mode='RGB', value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_folder(tmp_path):
    _png(tmp_path / 'b.png', (6, 4), 'RGB', (255, 0, 0))
    _png(tmp_path / 'a.png', (6, 4), 'L', 0)
    _png(tmp_path / 'sub' / 'c.jpg', (6, 4), 'RGB', (0, 0, 255))
    (tmp_path / 'notes.txt').write_text('not an image')
    x, y = images.load_folder(str(tmp_path))
    assert x.shape == (3, 4, 6, 3) and y is None
    np.testing.assert_array_equal(x[0], -1.0)  # a.png: grayscale, broadcast to RGB.
    np.testing.assert_array_equal(x[1, ..., 0], 1.0)  # b.png: red, sorted after a.png.
    x, _ = images.load(ml_collections.ConfigDict({'name': 'folder', 'path': str(tmp_path), 'size': 3}))
    assert x.shape == (3, 3, 3, 3)
    _png(tmp_path / 'd.png', (5, 5), 'RGB')
    with pytest.raises(errors.UserError, match='differs') as excinfo:
        images.load_folder(str(tmp_path))
    _one_line(excinfo)
    assert images.load_folder(str(tmp_path), size=2)[0].shape == (4, 2, 2, 3)


def test_folder_gray_and_errors(tmp_path):
    _png(tmp_path / 'g' / 'a.png', (3, 3), 'L', 255)
    assert images.load_folder(str(tmp_path / 'g'))[0].shape == (1, 3, 3, 1)
    (tmp_path / 'empty').mkdir()
    for path, match in ((tmp_path / 'missing', 'no such image folder'), (tmp_path / 'empty', 'no images')):
        with pytest.raises(errors.UserError, match=match) as excinfo:
            images.load_folder(str(path))
        _one_line(excinfo)


@pytest.mark.parametrize('spec, match', [
    ({'name': 'mnist'}, r'data\.image\.name'),
    ({'name': 'digits', 'size': 8}, r'data\.image\.size'),
    ({'name': 'npz'}, r'data\.image\.path'),
])
def test_load_config_errors(spec, match):
    with pytest.raises(errors.ConfigError, match=match) as excinfo:
        images.load(ml_collections.ConfigDict(spec))
    _one_line(excinfo)


def test_batches_mesh_independent_and_sharded():
    x = _ids(37)
    labels = np.arange(37, dtype=np.int32)
    one = images.make_batches(x, labels, sharding.data_mesh(jax.devices()[:1]), 16, seed=3)
    eight = images.make_batches(x, labels, sharding.data_mesh(), 16, seed=3)
    for step in (0, 2, 7):
        a, b = one(step), eight(step)
        assert b['x1'].shape == (16, 4, 5, 1) and b['x1'].dtype == np.float32 and b['label'].dtype == np.int32
        assert len(b['x1'].sharding.device_set) == 8 and b['x1'].addressable_shards[0].data.shape[0] == 2
        for name in ('x1', 'label'):
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
        np.testing.assert_array_equal(np.asarray(b['x1']).max(axis=(1, 2, 3)), np.asarray(b['label']))


def test_epochs_across_processes():
    n, batch = 24, 8  # Three global batches per epoch.
    readers = [images.ImageBatches(_ids(n), None, batch, seed=5, process_index=p, process_count=2) for p in (0, 1)]
    for epoch in range(2):
        seen = np.concatenate([r.local_ids(s) for s in range(3 * epoch, 3 * epoch + 3) for r in readers])
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    assert not np.array_equal(readers[0].local_ids(0), readers[0].local_ids(3))
    single = images.ImageBatches(_ids(n), None, batch, seed=5, process_index=0, process_count=1)
    for step in range(4):
        joint = [r.local_batch(step)['x1'] for r in readers]
        np.testing.assert_array_equal(np.concatenate(joint), single.local_batch(step)['x1'])


def test_flip():
    x = _ids(50)
    reader = images.ImageBatches(x, None, 40, seed=1, process_index=0, process_count=1)
    plain = images.ImageBatches(x, None, 40, seed=1, flip=False, process_index=0, process_count=1)
    counts = []
    for step in range(5):
        ids, flips, out = reader.local_ids(step), reader.local_flips(step), reader.local_batch(step)['x1']
        np.testing.assert_array_equal(out[~flips], x[ids[~flips]])
        np.testing.assert_array_equal(out[flips], x[ids[flips]][:, :, ::-1])
        np.testing.assert_array_equal(out, reader.local_batch(step)['x1'])
        np.testing.assert_array_equal(plain.local_batch(step)['x1'], x[ids])
        counts.append(flips.sum())
    assert 0.35 < np.mean(counts) / 40 < 0.65
    other = images.ImageBatches(x, None, 40, seed=2, process_index=0, process_count=1)
    assert not np.array_equal(other.local_flips(0), reader.local_flips(0))


# tfds sources: real array_record files written without TensorFlow (mock_tfds), and tfds' mock data.

@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
    """A data_dir with fake cifar10 (40 train images), imagenet_resized/64x64 and downsampled_imagenet/64x64."""
    data_dir = tmp_path_factory.mktemp('tfds')
    mock_tfds.write_fake_dataset(data_dir, 'cifar10', num_examples=40)
    for name in ('imagenet_resized/64x64', 'downsampled_imagenet/64x64'):
        mock_tfds.write_fake_dataset(data_dir, name, num_examples=6, splits=('train',))
    return str(data_dir)


def _tfds(data_dir, dataset='cifar10', **params):
    return images.load(ml_collections.ConfigDict({'name': 'tfds', 'dataset': dataset, 'data_dir': data_dir, **params}))


def test_tfds_cifar10(tfds_dir):
    x, y = _tfds(tfds_dir)
    assert isinstance(x, tfds_images.TfdsImages) and len(x) == 40 and x.shape == (32, 32, 3)
    batch = x.take(np.array([3, 0, 39, 3]))
    assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0 and batch.min() < -0.99 and batch.max() > 0.99
    np.testing.assert_array_equal(batch[0], batch[3])
    labels = y[np.arange(40)]
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() <= 9 and len(np.unique(labels)) > 3
    assert len(y) == y.size == 40 and y.max() == 9 and x.num_classes == 10
    np.testing.assert_array_equal(y[35:], labels[35:])
    images_, labels_ = x.read(np.arange(40), labels=True)
    np.testing.assert_array_equal(labels_, labels)
    # The same pixels and labels as tfds' own decoding of the records.
    reference = tfds.data_source('cifar10', split='train', data_dir=tfds_dir, download=False)
    for i in (0, 17, 39):
        np.testing.assert_array_equal(x.read_uint8([i])[0], reference[i]['image'])
        np.testing.assert_array_equal(images_[i], images.ArrayImages(
            reference[i]['image'][None].astype(np.float32) / 127.5 - 1.0).take([0])[0])
        assert labels[i] == reference[i]['label']
    test, _ = _tfds(tfds_dir, split='test[:10]')
    assert len(test) == 10


def test_tfds_imagenet_64(tfds_dir):
    x, y = _tfds(tfds_dir, 'imagenet_resized/64x64')
    assert x.shape == (64, 64, 3) and len(x) == 6 and y.max() == 999 and y[np.arange(6)].max() <= 999
    x, y = _tfds(tfds_dir, 'downsampled_imagenet/64x64')  # No label feature: no labels.
    assert x.shape == (64, 64, 3) and y is None and x.labels is None
    assert x.take(np.arange(6)).shape == (6, 64, 64, 3)
    with pytest.raises(errors.UserError, match='no labels') as excinfo:
        x.read(np.arange(2), labels=True)
    _one_line(excinfo)


def test_tfds_mock_data():
    """tfds.testing.mock_data serves data_source without files (random examples) and without TensorFlow."""
    with tfds.testing.mock_data(num_examples=24):
        x, y = images.load(ml_collections.ConfigDict({'name': 'tfds', 'dataset': 'cifar10'}))
        assert len(x) == 24 and x.shape == (32, 32, 3) and y.max() == 9
        out, labels = x.read(np.arange(24), labels=True)
        assert out.dtype == np.float32 and -1.0 <= out.min() and out.max() <= 1.0
        assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() <= 9
        batch = images.ImageBatches(x, y, 8, seed=0, process_index=0, process_count=1).local_batch(1)
        assert batch['x1'].shape == (8, 32, 32, 3) and batch['label'].shape == (8,)


def test_tfds_batches_deterministic_and_per_process(tfds_dir):
    x, y = _tfds(tfds_dir)
    one = [images.ImageBatches(x, y, 16, seed=4, process_index=0, process_count=1) for _ in range(2)]
    two = [images.ImageBatches(x, y, 16, seed=4, process_index=p, process_count=2) for p in (0, 1)]
    for step in (0, 1, 5):
        a, b = one[0].local_batch(step), one[1].local_batch(step)
        assert a['x1'].shape == (16, 32, 32, 3) and a['label'].dtype == np.int32
        for name in ('x1', 'label'):
            np.testing.assert_array_equal(a[name], b[name])
            np.testing.assert_array_equal(np.concatenate([r.local_batch(step)[name] for r in two]), a[name])
    assert not np.array_equal(one[0].local_batch(0)['x1'], one[0].local_batch(1)['x1'])
    # Rows, labels and flips as for the same images in memory.
    memory = images.ImageBatches(x.take(np.arange(len(x))), y[np.arange(len(x))], 16, seed=4,
                                 process_index=0, process_count=1)
    for step in range(4):
        a, b = one[0].local_batch(step), memory.local_batch(step)
        np.testing.assert_array_equal(one[0].local_flips(step), memory.local_flips(step))
        for name in ('x1', 'label'):
            np.testing.assert_array_equal(a[name], b[name])
    unlabeled = images.ImageBatches(x, None, 16, seed=4, process_index=0, process_count=1).local_batch(0)
    assert set(unlabeled) == {'x1'}


def test_tfds_make_batches_prefetched(tfds_dir):
    x, y = _tfds(tfds_dir)
    mesh = sharding.data_mesh()
    ahead = images.make_batches(x, y, mesh, 16, seed=2)
    plain = images.make_batches(x, y, mesh, 16, seed=2, prefetch=0)
    for step in (0, 1, 2, 7, 8, 3):  # In order, then jumps (a resumed run).
        a, b = ahead(step), plain(step)
        assert a['x1'].shape == (16, 32, 32, 3) and len(a['x1'].sharding.device_set) == 8
        for name in ('x1', 'label'):
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_tfds_errors(tfds_dir, tmp_path):
    cases = [
        ({'dataset': 'cifar10', 'data_dir': str(tmp_path / 'empty')},
         r"'cifar10' is not prepared in .*empty.*tfds build cifar10 --file_format=array_record"),
        ({'dataset': 'cifar10', 'data_dir': tfds_dir, 'split': 'validation'}, 'Unknown split'),
        ({'dataset': 'no_such_dataset', 'data_dir': tfds_dir}, 'no_such_dataset'),
        ({'dataset': 'imagenet_resized/65x65', 'data_dir': tfds_dir}, '65x65'),
        ({'dataset': 'cifar10', 'data_dir': tfds_dir, 'image_key': 'pixels'}, "no feature 'pixels'"),
    ]
    for params, match in cases:
        with pytest.raises(errors.UserError, match=match) as excinfo:
            images.load(ml_collections.ConfigDict({'name': 'tfds', **params}))
        _one_line(excinfo)
    mock_tfds.write_fake_dataset(tmp_path / 'tfrecord', 'cifar10', num_examples=2, file_format='tfrecord')
    with pytest.raises(errors.UserError, match="tfrecord format.*file_format='array_record'") as excinfo:
        _tfds(str(tmp_path / 'tfrecord'))
    _one_line(excinfo)


@pytest.mark.parametrize('spec, match', [
    ({'name': 'tfds'}, r'data\.image\.dataset: required'),
    ({'name': 'tfds', 'dataset': 'cifar10', 'size': 32}, r'data\.image\.size: not a parameter'),
])
def test_tfds_config_errors(spec, match):
    with pytest.raises(errors.ConfigError, match=match) as excinfo:
        images.load(ml_collections.ConfigDict(spec))
    _one_line(excinfo)


def test_mock_cifar10_is_the_default_data_dir():
    with mock_tfds.mock_cifar10(num_examples=12) as data_dir:
        x, y = images.load(ml_collections.ConfigDict({'name': 'tfds', 'dataset': 'cifar10', 'split': 'train'}))
        assert len(x) == 12 and x.shape == (32, 32, 3) and y.max() == 9
        assert len(_tfds(data_dir, split='test')[0]) == 12


@pytest.mark.parametrize('mode, channels', [('RGB', 3), ('L', 1), ('RGBA', 4), ('L', 3)])
def test_decode_image(mode, channels):
    """PNG bytes -> uint8 (H, W, C), through OpenCV where installed, else Pillow: the same pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, len(mode)), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if mode == 'L' else pixels, mode).save(buf, format='png')
    out = tfds_images._decode_image(buf.getvalue(), channels)
    assert out.shape == (5, 7, channels) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(pixels, channels // len(mode), axis=-1))
