"""LPIPS: equal to the `lpips` package on random weights (fixture made by
scripts/fixtures/make_lpips_fixture.py), torch weight files, differentiability, one-line errors."""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import errors
from flowjax.metrics import lpips, torch_weights

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
# The reference is float64 torch, ours float32, distances 0.0015 .. 0.88. Measured on CPU (and on GPU when the
# fixture was made): max abs error ~6e-8, max relative error ~4e-6 (on the smallest distance), ~1e-7 elsewhere.
TOLERANCE = 1e-4  # absolute
RELATIVE = 1e-4


@pytest.fixture(scope='module')
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / 'lpips_fixture.npz') as z:
        return dict(z)


@pytest.fixture(scope='module')
def state_dicts(reference) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    vgg, heads = lpips.random_torch_state_dicts(int(reference['seed']))
    both = {**vgg, **heads}
    fingerprint = np.array([[np.sum(both[k], dtype=np.float64), np.sum(np.square(both[k], dtype=np.float64))]
                            for k in sorted(both)])
    np.testing.assert_allclose(fingerprint, reference['weights_fingerprint'], rtol=1e-12,
                               err_msg='random_torch_state_dicts differs from the one that made the fixture')
    return vgg, heads


@pytest.fixture(scope='module')
def variables(state_dicts) -> dict:
    return lpips.params_from_torch(*state_dicts)


def test_torch_names_and_shapes():
    vgg, heads = lpips.torch_shapes()
    assert len(vgg) == 26 and vgg['features.0.weight'] == (64, 3, 3, 3) and vgg['features.28.bias'] == (512,)
    assert vgg['features.10.weight'] == (256, 128, 3, 3)  # conv3_1, after two pools
    assert sum(np.prod(s) for s in vgg.values()) == 14_714_688  # torchvision vgg16().features
    assert heads == {f'lin{k}.model.1.weight': (1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}


def test_matches_lpips_package(reference, variables):
    cases = [str(c) for c in reference['cases']]
    assert cases == ['native', 'up64', 'up224', 'down64', 'avg']
    for name in cases:
        resize, pool = int(reference[f'resize_{name}']) or None, str(reference[f'pool_{name}'])
        distance = jax.jit(lpips.distance_fn(lpips.LPIPS(resize=resize, pool=pool)))
        ours = np.asarray(distance(variables, reference[f'x_{name}'], reference[f'y_{name}']))
        expected = reference[f'd_{name}']
        assert ours.shape == expected.shape and ours.dtype == np.float32
        error = np.abs(ours - expected)
        assert error.max() <= TOLERANCE, f'{name}: max abs error {error.max():.2e} (distances {expected})'
        assert (error / expected).max() <= RELATIVE, f'{name}: max rel error {(error / expected).max():.2e}'


@pytest.mark.parametrize('name', ['lpips_heads_zip.pth', 'lpips_heads_legacy.pth'])
def test_head_files(name, state_dicts):
    loaded = torch_weights.load_state_dict(str(FIXTURES / name), 'lpips.head_weights')
    heads = state_dicts[1]
    assert sorted(loaded) == sorted(heads)
    for key, value in heads.items():
        assert loaded[key].dtype == np.float32
        np.testing.assert_array_equal(loaded[key], value)


def _images(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    return x, np.clip(x + 0.3 * rng.normal(size=shape), -1, 1).astype(np.float32)


def test_zero_on_equal_images_and_finite_gradient(variables):
    distance = lpips.distance_fn(lpips.LPIPS(resize=24))
    x, y = _images((2, 16, 16, 3))
    np.testing.assert_array_equal(np.asarray(jax.jit(distance)(variables, x, x)), 0.0)
    grad = jax.jit(jax.grad(lambda a, b: distance(variables, a, b).sum()))
    for other in (y, x):  # x == y: every normalised feature difference is 0, some feature vectors are 0 too
        g = np.asarray(grad(x, other))
        assert g.shape == x.shape and np.isfinite(g).all()
    assert np.abs(np.asarray(grad(x, y))).max() > 0


def test_gray_and_bfloat16(variables):
    x, y = _images((2, 16, 16, 1), seed=1)
    distance = jax.jit(lpips.distance_fn(lpips.LPIPS()))
    gray = np.asarray(distance(variables, x, y))
    np.testing.assert_array_equal(gray, np.asarray(distance(variables, *(np.repeat(a, 3, -1) for a in (x, y)))))
    half = np.asarray(jax.jit(lpips.distance_fn(lpips.LPIPS(dtype=jnp.bfloat16)))(variables, x, y))
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, gray, rtol=0.05)


def test_params_from_torch_errors(state_dicts):
    vgg, heads = state_dicts
    extra = {**vgg, 'classifier.0.weight': np.zeros((2, 2), np.float32)}  # torchvision's classifier is ignored
    assert set(lpips.params_from_torch(extra, heads)['params']) == {
        *(f'features_{i}' for i, _, _ in lpips.conv_layers()), *(f'lin{k}' for k in range(5))}
    with pytest.raises(errors.UserError, match=r"^VGG16 state dict: missing key 'features.28.bias'$"):
        lpips.params_from_torch({k: v for k, v in vgg.items() if k != 'features.28.bias'}, heads)
    with pytest.raises(errors.UserError, match=r"^LPIPS head state dict: 'lin3.model.1.weight' has shape \(512,\)"):
        lpips.params_from_torch(vgg, {**heads, 'lin3.model.1.weight': heads['lin3.model.1.weight'].reshape(-1)})


def test_load_missing_vgg_file(tmp_path):
    for path in (None, str(tmp_path / 'vgg16.pth')):
        with pytest.raises(errors.UserError, match=r'^lpips.vgg_weights: .*vgg16-397923af.pth') as info:
            lpips.load(path, field='lpips.vgg_weights')
        assert '\n' not in str(info.value) and 'download.pytorch.org' in str(info.value)


def test_load_names_the_missing_key():
    heads = str(FIXTURES / 'lpips_heads_zip.pth')
    with pytest.raises(errors.UserError, match=r"^lpips.vgg_weights: .*: missing key 'features.0.weight'$"):
        lpips.load(heads, heads, field='lpips.vgg_weights')


def test_default_heads_of_an_installed_lpips(tmp_path, monkeypatch):
    package = tmp_path / 'lpips'
    (package / 'weights' / 'v0.1').mkdir(parents=True)
    (package / '__init__.py').write_text('raise ImportError("imports torch")\n')
    shutil.copy(FIXTURES / 'lpips_heads_zip.pth', package / 'weights' / 'v0.1' / 'vgg.pth')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lpips.default_head_path('x') == str(package / 'weights' / 'v0.1' / 'vgg.pth')
    heads = str(FIXTURES / 'lpips_heads_zip.pth')  # as the VGG file: the heads were found, the VGG keys are missing
    with pytest.raises(errors.UserError, match=r"^lpips.vgg_weights: .*: missing key 'features.0.weight'$"):
        lpips.load(heads, None, field='lpips.vgg_weights')


def test_no_lpips_package(monkeypatch):
    monkeypatch.setattr(lpips.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(errors.UserError, match=r'^lpips.head_weights: .*pip install lpips.*torch is not') as info:
        lpips.load(str(FIXTURES / 'lpips_heads_zip.pth'), None, field='lpips.vgg_weights')
    assert '\n' not in str(info.value)


def test_load_returns_the_configured_module(state_dicts, tmp_path, monkeypatch):
    vgg, heads = state_dicts
    files = {'vgg.pth': {**vgg, 'classifier.6.bias': np.zeros(1000, np.float32)}, 'heads.pth': heads}
    monkeypatch.setattr(lpips.torch_weights, 'load_state_dict', lambda path, field: files[pathlib.Path(path).name])
    (tmp_path / 'vgg.pth').touch()
    module, variables = lpips.load(str(tmp_path / 'vgg.pth'), str(tmp_path / 'heads.pth'), resize=64, pool='avg')
    assert (module.resize, module.pool) == (64, 'avg')
    np.testing.assert_array_equal(variables['params']['lin4'], heads['lin4.model.1.weight'].reshape(-1))
