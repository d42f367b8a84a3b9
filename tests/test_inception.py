"""FID Inception: equal to pytorch-fid on random weights (fixture made by
scripts/fixtures/make_inception_fixture.py), torch weight files, one-line errors."""

import pathlib

import jax
import numpy as np
import pytest

from flowjax import errors
from flowjax.metrics import inception, torch_weights

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
# The fixture's features are O(1) (mean ~0.25, max ~2.7), like the real network's, so an absolute bound is also
# ~1e-4 relative to their scale. The reference is float64 torch, ours float32 (measured max error ~1e-6).
TOLERANCE = 1e-4
SUBSET = ('Conv2d_1a_3x3.conv.weight', 'Mixed_5b.branch1x1.bn.running_var', 'fc.bias')


@pytest.fixture(scope='module')
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / 'inception_fixture.npz') as z:
        return dict(z)


@pytest.fixture(scope='module')
def state_dict(reference) -> dict[str, np.ndarray]:
    state_dict = inception.random_torch_state_dict(int(reference['seed']))
    fingerprint = np.array([[np.sum(v, dtype=np.float64), np.sum(np.square(v, dtype=np.float64))]
                            for _, v in sorted(state_dict.items())])
    np.testing.assert_allclose(fingerprint, reference['weights_fingerprint'], rtol=1e-12,
                               err_msg='random_torch_state_dict differs from the one that made the fixture')
    return state_dict


def test_torch_names_and_shapes():
    shapes = inception.torch_shapes()
    assert len(shapes) == 5 * 94 + 2  # 94 BasicConv2d (conv + 4 BatchNorm tensors) and the classifier
    assert shapes['Conv2d_1a_3x3.conv.weight'] == (32, 3, 3, 3)
    assert shapes['Mixed_6e.branch7x7dbl_5.conv.weight'] == (192, 192, 1, 7)
    assert shapes['Mixed_7c.branch3x3dbl_3b.conv.weight'] == (384, 384, 3, 1)
    assert sum(np.prod(s) for s in shapes.values()) == 23_885_392  # pytorch-fid's FID Inception, fc included


def test_matches_pytorch_fid(reference, state_dict):
    features = jax.jit(inception.feature_fn(inception.FIDInception()))
    variables = inception.params_from_torch(state_dict)
    for name in ('small', 'large'):  # 32x32 is upsampled, 350x300 downsampled to 299x299
        images = reference[f'images_{name}'] / np.float32(127.5) - 1  # torch was fed images / 255 = (x + 1) / 2
        ours = np.asarray(features(variables, images))
        expected = reference[f'features_{name}']
        assert ours.shape == expected.shape == (2, 2048) and ours.dtype == np.float32
        error = np.abs(ours - expected).max()
        assert error <= TOLERANCE, f'{name}: max abs error {error:.2e} (features max {expected.max():.2f})'


def test_gray_images_are_repeated_to_rgb():
    gray = np.random.default_rng(0).uniform(-1, 1, (2, 20, 24, 1)).astype(np.float32)
    resized = np.asarray(inception.preprocess(gray))
    assert resized.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(resized, np.asarray(inception.preprocess(np.repeat(gray, 3, axis=-1))))
    assert np.abs(resized).max() <= 1.0  # bilinear weights are convex


@pytest.mark.parametrize('name', ['inception_subset_zip.pth', 'inception_subset_legacy.pth'])
def test_torch_weight_files(name, state_dict):
    loaded = torch_weights.load_state_dict(str(FIXTURES / name), 'eval.inception_weights')
    assert set(loaded) == {*SUBSET, 'Conv2d_1a_3x3.bn.num_batches_tracked'}
    for key in SUBSET:
        assert loaded[key].dtype == np.float32
        np.testing.assert_array_equal(loaded[key], state_dict[key])
    assert loaded['Conv2d_1a_3x3.bn.num_batches_tracked'].dtype == np.int64
    assert loaded['Conv2d_1a_3x3.bn.num_batches_tracked'].shape == ()


def test_load_incomplete_file_names_the_missing_key():
    with pytest.raises(errors.UserError, match=r"^eval.inception_weights: .*missing key 'Conv2d_1a_3x3.bn.weight'$"):
        inception.load(str(FIXTURES / 'inception_subset_zip.pth'))


@pytest.mark.parametrize('path', ['', None, 'no/such/pt_inception.pth'])
def test_load_without_weights_says_where_to_get_them(path):
    with pytest.raises(errors.UserError) as info:
        inception.load(path, 'eval.inception_weights')
    message = str(info.value)
    assert '\n' not in message and message.startswith('eval.inception_weights: ')
    assert 'pt_inception-2015-12-05-6726825d.pth' in message and inception.WEIGHTS_URL in message


def test_params_from_torch_checks_keys_and_shapes(state_dict):
    missing = {k: v for k, v in state_dict.items() if k != 'Mixed_6c.branch7x7dbl_4.bn.running_var'}
    with pytest.raises(errors.UserError, match="missing key 'Mixed_6c.branch7x7dbl_4.bn.running_var'"):
        inception.params_from_torch(missing)
    with pytest.raises(errors.UserError, match="unexpected key 'AuxLogits.fc.weight'"):
        inception.params_from_torch({**state_dict, 'AuxLogits.fc.weight': np.zeros((1000, 768), np.float32)})
    with pytest.raises(errors.UserError, match=r"'Mixed_7c.branch_pool.conv.weight' has shape \(192, 2048\)"):
        inception.params_from_torch({**state_dict, 'Mixed_7c.branch_pool.conv.weight': np.zeros((192, 2048))})
    counters = {k.replace('running_var', 'num_batches_tracked'): np.array(0) for k in state_dict if 'running_var' in k}
    variables = inception.params_from_torch({**state_dict, **counters})  # torch's BatchNorm step counters are fine
    assert variables['params']['Mixed_5b']['branch1x1']['kernel'].shape == (1, 1, 192, 64)
