"""Toy 2D distributions: shapes, determinism, and each one's defining property."""

import jax
import ml_collections
import numpy as np
import pytest

from flowjax import errors
from flowjax.data import toy2d


def _sample(name, n=4000, **params):
    return toy2d.sample(ml_collections.ConfigDict({'name': name, **params}), jax.random.key(0), n)


@pytest.mark.parametrize('name', sorted(toy2d.DISTRIBUTIONS))
def test_shape_and_determinism(name):
    x = _sample(name)
    assert x.shape == (4000, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    np.testing.assert_array_equal(x, _sample(name))


def test_gmm_modes_sit_on_the_ring():
    x = _sample('gmm', modes=6, radius=3.0, std=0.01)
    angles = (10 * np.round(np.degrees(np.arctan2(x[:, 1], x[:, 0])) / 10)).astype(int) % 360
    assert sorted(set(angles.tolist())) == [0, 60, 120, 180, 240, 300]
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 3.0, atol=0.05)


def test_checkerboard_uses_only_dark_squares():
    x = _sample('checkerboard')
    cells = np.floor((x + 4.0) / 2.0).astype(int)
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in cells}) == 8


def test_normal_moments():
    x = _sample('normal', n=20000)
    np.testing.assert_allclose(x.mean(0), 0, atol=0.03)
    np.testing.assert_allclose(np.cov(x.T), np.eye(2), atol=0.05)


def test_unknown_distribution_and_parameter():
    with pytest.raises(errors.ConfigError, match='data.target.name'):
        _sample('circles')
    with pytest.raises(errors.ConfigError, match='data.target.radius'):
        _sample('moons', radius=2.0)


def test_batches_do_not_depend_on_the_device_count():
    from flowjax import sharding

    spec = ml_collections.ConfigDict({'name': 'moons'})
    one = toy2d.make_batches(spec, sharding.data_mesh(jax.devices()[:1]), 64, seed=3)(7)['x1']
    eight = toy2d.make_batches(spec, sharding.data_mesh(), 64, seed=3)(7)['x1']
    assert len(eight.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(one), np.asarray(eight))
