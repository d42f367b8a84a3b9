"""fd_digits: the shipped digits classifier (accuracy, metric sanity, one-line errors) and
flowjax.evaluation.frechet against the scipy sqrtm formula of pytorch-fid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from flowjax import errors
from flowjax.evaluation import frechet
from flowjax.metrics import digits_classifier


@pytest.fixture(scope='module')
def classifier():
    module, variables = digits_classifier.load()
    return module, variables, jax.jit(module.apply), jax.jit(digits_classifier.feature_fn(module))


@pytest.fixture(scope='module')
def split():
    return digits_classifier.split()


def box_blur(x: np.ndarray) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    return sum(padded[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3)) / 9.0


def test_recorded_accuracy_on_the_test_split(classifier, split):
    _, variables, apply, _ = classifier
    _, _, x_test, y_test = split
    info = digits_classifier.info()
    assert info['test_size'] == digits_classifier.SPLIT_TEST_SIZE and info['split_seed'] == digits_classifier.SPLIT_SEED
    assert len(x_test) == 450 and np.bincount(y_test).min() >= 43  # stratified: a quarter of each class
    accuracy = np.mean(np.argmax(np.asarray(apply(variables, jnp.asarray(x_test))), axis=-1) == y_test)
    assert accuracy >= info['accuracy'] - 1e-6
    assert info['accuracy'] >= 0.97


def test_features_shape_and_sharded_jit(classifier, split):
    _, variables, _, embed = classifier
    x = jnp.asarray(split[2][:16])
    features = np.asarray(embed(variables, x))
    assert features.shape == (16, digits_classifier.FEATURES) and features.dtype == np.float32
    assert features.min() >= 0.0  # after the ReLU
    mesh = jax.make_mesh((len(jax.devices()),), ('data',))
    sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P('data')))
    np.testing.assert_allclose(np.asarray(embed(variables, sharded)), features, rtol=1e-5, atol=1e-5)


def test_fd_digits_ranks_real_above_degraded(classifier, split):
    _, variables, _, embed = classifier
    x_train, _, x_test, _ = split
    stats = lambda x: frechet.statistics(np.asarray(embed(variables, jnp.asarray(x, jnp.float32))))  # noqa: E731
    reference = stats(x_train)
    fd = lambda x: frechet.frechet_distance(*stats(x), *reference)  # noqa: E731
    noise = np.clip(np.random.default_rng(0).standard_normal(x_test.shape), -1, 1)
    floor, blurred, pure_noise = fd(x_test), fd(box_blur(x_test)), fd(noise)
    assert floor < 5.0  # measured 1.4 (train 1347 vs test 450)
    assert blurred > 20 * floor and pure_noise > 50 * floor
    assert fd(x_test[:, :, ::-1]) < 3 * floor  # flipped digits are digits to this classifier


def _pytorch_fid(mu1, sigma1, mu2, sigma2) -> float:
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def _random_statistics(rng, dim: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((dim, dim))
    return rng.standard_normal(dim), a @ a.T / dim + 0.5 * np.eye(dim)  # eigenvalues well away from 0


@pytest.mark.parametrize('dim', [1, 5, 64])
def test_frechet_distance_matches_the_sqrtm_formula(dim):
    rng = np.random.default_rng(dim)
    mu1, sigma1 = _random_statistics(rng, dim)
    mu2, sigma2 = _random_statistics(rng, dim)
    expected = _pytorch_fid(mu1, sigma1, mu2, sigma2)
    assert frechet.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_and_singular_statistics():
    rng = np.random.default_rng(0)
    mu, sigma = _random_statistics(rng, 32)
    assert frechet.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9 * np.trace(sigma))
    few = frechet.statistics(rng.standard_normal((10, 32)))  # N < D: rank-9 covariances
    other = frechet.statistics(rng.standard_normal((10, 32)) + 0.1)
    assert np.linalg.matrix_rank(few[1]) == 9
    assert frechet.frechet_distance(*few, *few) == pytest.approx(0.0, abs=1e-9)
    assert frechet.frechet_distance(*few, *other) > 0.0


def test_missing_or_corrupt_weights_are_one_line_user_errors(tmp_path):
    with pytest.raises(errors.UserError, match='missing'):
        digits_classifier.load(tmp_path / 'digits_classifier.npz')
    (tmp_path / 'garbage.npz').write_bytes(b'not a zip')
    with pytest.raises(errors.UserError, match='unreadable') as e:
        digits_classifier.load(tmp_path / 'garbage.npz')
    assert '\n' not in str(e.value)
    arrays = digits_classifier.flatten(digits_classifier.load()[1])
    arrays['params/conv1/kernel'] = arrays['params/conv1/kernel'][..., :16]
    np.savez(tmp_path / 'misshapen.npz', **arrays)
    with pytest.raises(errors.UserError, match='corrupt.*conv1/kernel'):
        digits_classifier.load(tmp_path / 'misshapen.npz')
    with pytest.raises(errors.UserError, match='corrupt.*accuracy'):
        digits_classifier.info(tmp_path / 'misshapen.npz')
