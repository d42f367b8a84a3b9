"""Image datasets: sources, one-line errors, and stateless sharded batches with flips."""

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from flowjax import errors, sharding
from flowjax.data import images


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
