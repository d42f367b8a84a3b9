"""Tests for flowjax.evaluate: toy 2D metrics and the workdir report."""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flowjax import evaluate

SAMPLERS = ('euler@1', 'euler@2', 'heun@2', 'rk45')


def _normal(seed: int, n: int = 2000, mean=(0.0, 0.0)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 2)) + np.asarray(mean)


def _shift_apply(params, x, t):
    """A closed-form 'model': the constant velocity params['shift']."""
    del t
    return jnp.broadcast_to(params['shift'], x.shape)


# --- w2 ---------------------------------------------------------------------


def test_w2_self_is_zero():
    x = _normal(0)
    assert evaluate.w2(x, x) == pytest.approx(0.0, abs=1e-9)


def test_w2_of_shift_is_shift_norm():
    x = _normal(1, n=500)
    c = np.array([0.3, -1.2])
    assert evaluate.w2(x, x + c) == pytest.approx(np.linalg.norm(c), abs=1e-6)


def test_w2_gaussians():
    assert evaluate.w2(_normal(2), _normal(3)) < 0.2
    assert evaluate.w2(_normal(4), _normal(5, mean=(3.0, 0.0))) == pytest.approx(3.0, abs=0.2)


def test_w2_raises_when_not_converged(monkeypatch):
    monkeypatch.setattr(evaluate, '_EMD_MAX_ITERS', 10)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match='did not converge'):
        warnings.simplefilter('ignore')
        evaluate.w2(_normal(17, n=200), _normal(18, n=200))


def test_w2_returns_python_float():
    assert type(evaluate.w2(_normal(6, n=10), _normal(7, n=10))) is float


# --- energy distance -------------------------------------------------------


def test_energy_zero_for_identical_sets():
    x = _normal(8)
    assert evaluate.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)


def test_energy_positive_and_increasing_with_shift():
    x, y = _normal(9, n=1000), _normal(10, n=1000)
    values = [evaluate.energy_distance(x, y + np.array([s, 0.0])) for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(v > 0 for v in values)
    assert values == sorted(values)


def test_energy_matches_naive_formula():
    x, y = _normal(11, n=50), _normal(12, n=70, mean=(1.0, 1.0))
    d = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1).mean()
    expected = 2 * d(x, y) - d(x, x) - d(y, y)
    assert evaluate.energy_distance(x, y) == pytest.approx(expected, rel=1e-10)


# --- straightness ----------------------------------------------------------


def test_straightness_constant_field_is_zero():
    c = jnp.array([1.5, -0.5])
    out = evaluate.straightness(lambda x, t: jnp.broadcast_to(c, x.shape), _normal(13, n=64))
    assert set(out) == {'straightness', 'straightness_norm'}
    assert out['straightness'] < 1e-8
    assert out['straightness_norm'] < 1e-4


def test_straightness_rotation_is_positive():
    rotate = lambda x, t: jnp.stack([-x[:, 1], x[:, 0]], axis=-1)
    out = evaluate.straightness(rotate, _normal(14, n=256), steps=100)
    assert out['straightness'] > 0.05
    assert out['straightness_norm'] > 0.05
    # Jensen: (E||d||)^2 <= E||d||^2.
    assert out['straightness_norm'] ** 2 <= out['straightness'] + 1e-9


def test_straightness_rotation_unit_circle_closed_form():
    # z(t) = R(t) z0 on [0, 1]: |v| = 1, chord c = 2 sin(1/2) along the tangent at t = 1/2, so
    # ||c - v(t)||^2 = 1 + c^2 - 2 c cos(t - 1/2), which integrates to 2 cos(1) - 1.
    rotate = lambda x, t: jnp.stack([-x[:, 1], x[:, 0]], axis=-1)
    theta = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    x0 = np.stack([np.cos(theta), np.sin(theta)], -1)
    out = evaluate.straightness(rotate, x0, steps=1000, eps=0.0)
    c = 2 * np.sin(0.5)
    t = (np.arange(10000) + 0.5) / 10000
    norm = np.sqrt(1 + c**2 - 2 * c * np.cos(t - 0.5)).mean()
    assert out['straightness'] == pytest.approx(2 * np.cos(1.0) - 1, rel=1e-2)
    assert out['straightness_norm'] == pytest.approx(norm, rel=1e-2)


# --- evaluate_models -------------------------------------------------------


def test_evaluate_models_end_to_end(tmp_path):
    shift = np.array([2.0, -1.0], np.float32)
    source = _normal(15).astype(np.float32)
    data = source + shift  # Exactly the push-forward of the constant velocity.
    data_b = _normal(16).astype(np.float32) + shift
    models = {'shift': (_shift_apply, {'shift': jnp.asarray(shift)})}

    report = evaluate.evaluate_models(models, source=source, data=data, data_b=data_b,
                                      samplers=SAMPLERS, workdir=tmp_path, title='test')
    entry = report['shift']
    expected_keys = ['euler@1', 'euler@2', 'heun@2', 'rk45', 'straightness',
                     'straightness_norm', 'w2_data', 'energy_data']
    assert list(entry) == expected_keys
    for key in SAMPLERS:
        assert set(entry[key]) == {'w2', 'energy', 'nfe'}
        assert type(entry[key]['w2']) is float and type(entry[key]['energy']) is float
        assert type(entry[key]['nfe']) is int
        # Integrating over [eps, 1] moves by (1 - eps) * shift, so w2 = eps * |shift|.
        assert entry[key]['w2'] < 1e-2
    assert entry['euler@1']['nfe'] == 1 and entry['heun@2']['nfe'] == 4
    assert entry['straightness'] < 1e-8
    assert 0.0 < entry['w2_data'] < 0.2

    on_disk = json.loads((tmp_path / 'report.json').read_text())
    assert on_disk == report
    assert (tmp_path / 'report.md').exists()
    png = tmp_path / 'samples.png'
    assert png.stat().st_size > 0
    with Image.open(png) as img:
        assert img.format == 'PNG' and img.size[0] > 100

    # A second call with another model merges into the existing report.
    models2 = {'other': (_shift_apply, {'shift': jnp.zeros(2)})}
    merged = evaluate.evaluate_models(models2, source=source, data=data, data_b=data_b,
                                      samplers=('euler@1',), workdir=tmp_path)
    assert set(merged) == {'shift', 'other'}
    assert merged['shift'] == entry
    assert merged['other']['euler@1']['w2'] == pytest.approx(np.linalg.norm(shift), abs=1e-3)
    assert json.loads((tmp_path / 'report.json').read_text()) == merged
    md = (tmp_path / 'report.md').read_text()
    assert '| shift |' in md and '| other |' in md and 'rk45' in md
    assert not list(tmp_path.glob('*.tmp'))


def test_write_report_roundtrip(tmp_path):
    report = {'m': {'euler@1': {'w2': 0.5, 'energy': 0.1, 'nfe': 1}, 'straightness': 0.0,
                    'straightness_norm': 0.0, 'w2_data': 0.05, 'energy_data': 0.001}}
    evaluate.write_report(tmp_path / 'sub', report)
    assert evaluate.read_report(tmp_path / 'sub') == report
    assert 'euler@1' in (tmp_path / 'sub' / 'report.md').read_text()
