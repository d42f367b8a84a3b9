"""Image evaluation: Frechet metrics per model and sampler, cached reference statistics, grids."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from conftest import experiment_config
from flowjax import errors, evaluate
from flowjax.data import datasets
from flowjax.evaluation import frechet, images, job, report


def _config(**eval_fields):
    c = experiment_config('digits_reflow', 'runlocal').teacher
    c.eval.samplers = ('euler@1', 'euler@2')
    c.eval.update(eval_fields)
    return c


def _projection_metric(calls):
    """A cheap stand-in for a feature network: a fixed random projection of the pixels."""

    def load(config):
        calls.append(config.eval.metric)
        w = jax.random.normal(jax.random.key(3), (64, 12)) / 8.0
        return (lambda v, x: jnp.tanh(x.reshape(len(x), -1) @ v['w'])), {'w': w}

    return load


def _shrink(params, x, t, dropout_rng=None):
    """A 'model' whose flow contracts towards 0; params is a scalar rate."""
    return -params * x


def test_fid_report_cache_floor_and_grid(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(images.METRICS, 'fid', _projection_metric(calls))
    weights = tmp_path / 'weights.pth'  # exists, so the static check passes; the stand-in never reads it
    weights.write_bytes(b'')
    config = _config(metric='fid', num_samples=200, batch_size=64, inception_weights=str(weights))
    models = {'still': (_shrink, jnp.float32(0.0)), 'shrunk': (_shrink, jnp.float32(0.9))}
    result = job.evaluate(config, tmp_path, models)
    for name in models:
        for key in ('euler@1', 'euler@2'):
            assert set(result[name][key]) == {'fid', 'nfe'}
        assert result[name]['euler@2']['nfe'] == 2
        assert result[name]['fid_data'] >= 0 and result[name]['straightness'] >= 0
        assert result[name]['params'] == 1  # a scalar rate
    # Noise (the identity flow) is far from digits; the real-data floor is far below it.
    assert result['still']['euler@1']['fid'] > 10 * result['still']['fid_data']
    stats = list(tmp_path.glob('fid_stats_*.npz'))
    assert len(stats) == 1 and (tmp_path / 'samples.png').stat().st_size > 1000
    assert '## fid' in (tmp_path / 'report.md').read_text()
    assert json.loads((tmp_path / 'report.json').read_text()) == result

    # The cached statistics equal those of all 1797 digits and are reused by a second evaluation.
    mu, sigma = images.reference_statistics(config, epath.Path(tmp_path), images.Embedder(config, _mesh()))
    data, _ = datasets.load_images(config)
    w = jax.random.normal(jax.random.key(3), (64, 12)) / 8.0
    both = np.concatenate([data, data[:, :, ::-1]])  # data.flip: the mirror images count too
    direct = frechet.statistics(np.tanh(both.reshape(len(both), -1) @ np.asarray(w, np.float64)))
    np.testing.assert_allclose(mu, direct[0], atol=1e-5)
    np.testing.assert_allclose(sigma, direct[1], atol=1e-5)
    stats[0].write_bytes(b'')  # a second evaluation must read the cache, not recompute (an empty file fails)
    with pytest.raises(Exception):
        job.evaluate(config, tmp_path, models)


def _mesh():
    from flowjax import sharding

    return sharding.data_mesh()


def test_metric_none_reports_nfe_and_grid(tmp_path):
    config = _config(metric='none', num_samples=64, batch_size=32)
    result = job.evaluate(config, tmp_path, {'m': (_shrink, jnp.float32(0.5))})
    assert result['m']['euler@1'] == {'nfe': 1} and 'straightness' in result['m']
    assert result['m']['params'] == 1
    assert (tmp_path / 'samples.png').exists()


def test_group_statistics_of_image_entries():
    def entry(fd, straightness):
        return {'params': 1_234_567, 'euler@1': {'fd_digits': fd, 'nfe': 1}, 'straightness': straightness,
                'straightness_norm': 1.0, 'fd_digits_data': 0.5}

    result = {'a': entry(10.0, 0.2), 'b': entry(14.0, 0.4), 'c': entry(None, 0.3)}
    result['groups'] = report.group_statistics(result, {'g': ('a', 'b', 'c')})
    g = result['groups']['g']
    assert g['euler@1'] == {'fd_digits': {'mean': 12.0, 'std': pytest.approx(2 ** 1.5), 'min': 10.0, 'max': 14.0,
                                          'n': 2, 'failed': 1}, 'nfe': 1}
    assert g['straightness']['mean'] == pytest.approx(0.3) and g['straightness']['std'] == pytest.approx(0.1)
    assert g['params'] == 1_234_567 and 'fd_digits_data' not in g
    md = report.report_markdown(result)
    assert '| model | params | euler@1 |' in md and '| a | 1.23M | 10 (1) |' in md
    assert '| g | 3 | 1.23M | 12 ± 2.8 (1 failed) | 0.3 ± 0.1 | 1 ± 0 |' in md


def test_fid_without_weights_is_one_line(tmp_path):
    config = _config(metric='fid')
    with pytest.raises(errors.UserError) as e:
        evaluate.check_data(config)
    message = str(e.value)
    assert '\n' not in message and 'eval.inception_weights' in message and 'pt_inception' in message


@pytest.mark.parametrize('field, value, fragment', [
    ('metric', 'kid', "eval.metric='kid'"),
    ('batch_size', 12, 'eval.batch_size=12'),
    ('grid', 0, 'eval.grid=0'),
])
def test_bad_eval_fields(field, value, fragment):
    with pytest.raises(errors.ConfigError, match=fragment):
        evaluate.check_data(_config(**{field: value}))


def test_grid_layout():
    x = np.stack([np.full((3, 2, 1), v, np.float32) for v in (-1.0, 0.0, 1.0, 1.0, -1.0)])
    g = images.grid(x, columns=3)
    assert g.shape == (2 * 4 - 1, 3 * 3 - 1, 1) and g.dtype == np.uint8
    assert g[0, 0, 0] == 0 and g[0, 3, 0] == 128 and g[4, 3, 0] == 0 and g[3, 0, 0] == 255


@pytest.mark.parametrize('edit, fragment', [
    (lambda c: c.data.update(kind='video'), "data.kind='video'"),
    (lambda c: c.data.__delitem__('image'), "data.image: data.kind='image' needs an image source"),
    (lambda c: c.data.update(source={'name': 'gmm'}), "images use {'name': 'normal'} noise"),
    (lambda c: c.data.image.update(name='imagenet'), "data.image.name: unknown image source 'imagenet'"),
])
def test_bad_image_data_is_one_line(edit, fragment):
    config = _config()
    edit(config)
    with pytest.raises(errors.ConfigError) as e:
        datasets.check(config)
    assert '\n' not in str(e.value) and fragment in str(e.value)
