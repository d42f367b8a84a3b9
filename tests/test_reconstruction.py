"""Reconstruction and coupling preservation scores (flowjax.evaluation.fidelity): exact on analytic
flows, by hand on perturbed ones, PSNR and LPIPS on images, 1 and 8 devices, report tables, bad fields."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import experiment_config
from flowjax import configs, errors, evaluate, sharding
from flowjax.data import couplings
from flowjax.evaluation import fidelity, job, report
from flowjax.flows import solvers
from flowjax.methods import method, rf
from flowjax.metrics import lpips
from flowjax.models import kinds

EPS = 1e-3  # flow.t_eps, where sampling starts


def _constant(params, x, t, dropout_rng=None, label=None):
    """v(x, t) = params: Euler integrates it exactly, both ways."""
    return jnp.broadcast_to(params, x.shape)


def _affine(params, x, t, dropout_rng=None, label=None):
    """v(x, t) = a + b t for params (a, b): with b = 0 Euler is exact; with a = 0 its round trip misses
    by (1 - eps)^2 b / N (one function, so both models share their compiled solvers)."""
    a, b = params
    return jnp.broadcast_to(a + b * t[:, None], x.shape)


def _write_store(path, x0, x1, labels=None, shard_size=16):
    """A complete coupling store of the pairs (x0, x1[, labels]), written with the store's own writers."""
    n = len(x0)
    path.mkdir()
    for k in range(couplings.num_shards(n, shard_size)):
        lo, hi = couplings.shard_range(k, n, shard_size)
        arrays = {'x0': x0[lo:hi], 'x1': x1[lo:hi], 'index': np.arange(lo, hi), 'nfe': np.ones(hi - lo, np.int32)}
        couplings.write_shard(path, k, arrays if labels is None else {**arrays, 'label': labels[lo:hi]}, 'float32')
    couplings.write_manifest(path, {'version': couplings.FORMAT_VERSION, 'num_pairs': n, 'shard_size': shard_size,
                                    'shape': list(x0.shape[1:]), 'dtype': 'float32', 'sampler': 'euler@1',
                                    'direction': 'backward', 'mean_nfe': 1.0, 'complete': True,
                                    'num_classes': 0 if labels is None else 10})
    return str(path)


def _euler(v, x, t0, t1, steps):
    """Euler from t0 to t1 in float64 on the host: the hand computation."""
    ts = np.linspace(t0, t1, steps + 1)
    for a, b in zip(ts[:-1], ts[1:]):
        x = x + (b - a) * v(x, a)
    return x


def _caf_model(seed: int = 0) -> kinds.Model:
    """A CAF model of two small MLPs whose zero-initialised output layers get random weights (v0, a != 0)."""
    kind = kinds.ConstantAcceleration.from_model_config({'name': 'mlp', 'features': (16,), 'time_dim': 8,
                                                         'dropout': 0.0}, channels=2)
    params = jax.tree_util.tree_map(np.asarray, jax.jit(kind.init, static_argnums=1)(jax.random.key(seed), (2,)))
    for k, network in enumerate(('velocity', 'acceleration')):
        out = params[network]['params']['out']
        out['kernel'] = 0.5 * np.random.default_rng(seed + k).normal(size=out['kernel'].shape).astype(np.float32)
    return kinds.Model(kind, params)


def _toy_config(store, **eval_fields):
    c = configs.base()
    c.eval.update(samplers=('euler@1', 'euler@2'), num_samples=64, straightness_steps=4, trajectories=2,
                  reconstruction=64, preservation=64, couplings=store)  # one shape: one compile per solve
    c.eval.update(eval_fields)
    return c


def test_toy_exact_flow_and_perturbed_flow_by_hand(tmp_path):
    c = np.array([1.5, -0.5], np.float32)
    x0 = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    store = _write_store(tmp_path / 'store', x0, x0 + (1 - EPS) * c)  # what v = c carries x0 to from t = eps
    config = _toy_config(store, samplers=('euler@2', 'caf@2'))
    job.check_data(config)
    zero, caf = np.zeros_like(c), _caf_model()
    result = job.evaluate(config, tmp_path / 'eval', {'exact': (_affine, (jnp.asarray(c), jnp.asarray(zero))),
                                                      'ramp': (_affine, (jnp.asarray(zero), jnp.asarray(c))),
                                                      'caf': caf})
    held_out = job.toy.held_out_sets(config)[1].astype(np.float32)
    exact, ramp = result['exact']['euler@2'], result['ramp']['euler@2']
    assert exact['reconstruction_mse'] < 1e-12 and exact['preservation_mse'] < 1e-12
    assert exact['reconstruction_nfe'] == 4 and exact['preservation_nfe'] == 2
    # v = c t, 2 Euler steps: the inverse solve takes the steps' right ends, the forward solve their left ends.
    v = lambda x, t: c * t
    regenerated = _euler(v, _euler(v, held_out, 1.0, EPS, 2), EPS, 1.0, 2)
    expected = np.mean((regenerated - held_out) ** 2)
    assert expected == pytest.approx((1 - EPS) ** 4 * np.mean(c ** 2) / 4)
    assert ramp['reconstruction_mse'] == pytest.approx(expected, rel=1e-5)
    sampled = _euler(v, x0.astype(np.float64), EPS, 1.0, 2)
    assert ramp['preservation_mse'] == pytest.approx(np.mean((sampled - (x0 + (1 - EPS) * c)) ** 2), rel=1e-5)

    assert 'caf@2' not in result['exact']  # a velocity field has no CAF update: skipped
    for key in ('euler@2', 'caf@2'):  # CAF regenerates with the data's v0: NFE 2N + 1
        sampler = solvers.parse_sampler(key)
        regenerated, nfe = job.kind_function(caf.kind, 'reconstruct', sampler, EPS)(caf.params, held_out, None)
        cell = result['caf'][key]
        assert cell['reconstruction_nfe'] == int(nfe) == 5 and cell['preservation_nfe'] == 3
        assert cell['reconstruction_mse'] == pytest.approx(np.mean(fidelity.mse(regenerated, held_out)), rel=1e-6)
        assert cell['reconstruction_mse'] > 1e-8

    assert json.loads((tmp_path / 'eval' / 'report.json').read_text()) == result
    md = (tmp_path / 'eval' / 'report.md').read_text()
    assert '## reconstruction_mse' in md and '## preservation_mse' in md and '## reconstruction_nfe' not in md
    ramp2 = report.format_value(result['ramp']['euler@2']['reconstruction_mse'])
    assert f'| ramp | 4 | {ramp2} (4) | - |' in md  # the round trip's NFE; no caf@2 for a velocity field
    assert 'reconstruction_*: held-out real data' in md and 'Lower is better everywhere.' in md

    groups = {'a': ('ramp',), 'b': ('exact',)}
    result['groups'] = report.group_statistics(result, groups)
    result['differences'] = report.paired_differences(result, groups, {'a - b': ('a', 'b')})
    assert result['groups']['a']['euler@2']['reconstruction_nfe'] == 4
    assert result['groups']['a']['euler@2']['preservation_mse']['mean'] == result['ramp']['euler@2']['preservation_mse']
    diff = result['differences']['a - b']['euler@2']
    assert 'reconstruction_nfe' not in diff and diff['reconstruction_mse']['mean'] == pytest.approx(
        result['ramp']['euler@2']['reconstruction_mse'] - result['exact']['euler@2']['reconstruction_mse'])
    text = report.report_markdown(result)
    assert '| group | n | params | euler@2 w2 | euler@2 energy | euler@2 reconstruction_mse |' in text
    assert 'euler@2 preservation_mse' in text.split('## Paired differences')[1]


def test_psnr_and_mse_definitions():
    x = np.zeros((2, 4, 4, 1))
    y = x.copy()
    y[0] += 0.2  # 0.1 in [0, 1]: MSE 0.01, 20 dB; the second image is exact (MSE floored: 100 dB)
    np.testing.assert_allclose(fidelity.psnr(y, x), [20.0, 100.0])
    np.testing.assert_allclose(fidelity.mse(y, x), [0.04, 0.0])
    assert np.isnan(fidelity.psnr(np.full_like(x, np.nan), x)).all()


def _image_config(**eval_fields):
    c = experiment_config('digits_reflow', 'runlocal').teacher  # 8x8x1 digits
    c.eval.update(samplers=('euler@1',), metric='none', num_samples=8, batch_size=8, straightness_steps=2, grid=4)
    c.eval.update(eval_fields)
    return c


def test_image_psnr_and_lpips_with_random_vgg(tmp_path, monkeypatch):
    vgg, heads = lpips.random_torch_state_dicts(0)
    variables = lpips.params_from_torch(vgg, heads)
    module = lpips.LPIPS(resize=16)
    monkeypatch.setattr(lpips, 'from_config', lambda section: (module, variables))
    (tmp_path / 'vgg.pth').write_bytes(b'')  # exists for the static check; the stand-in never reads it
    c, d = 0.3, 0.1
    x0 = np.random.default_rng(1).uniform(-0.6, 0.6, size=(8, 8, 8, 1)).astype(np.float32)
    x1 = x0 + (1 - EPS) * c  # where v = c carries x0 from t = eps
    store = _write_store(tmp_path / 'store', x0, x1)
    config = _image_config(reconstruction=8, preservation=8, couplings=store, lpips=True)
    config.lpips.update(vgg_weights=str(tmp_path / 'vgg.pth'), resize=16)
    assert method.eval_uses_lpips(config) and 'lpips' in evaluate.METHOD.sections(config)
    job.check_data(config)
    result = job.evaluate(config, tmp_path / 'eval', {'drift': (_constant, jnp.float32(c + d))})
    drift = result['drift']['euler@1']
    # Any constant velocity regenerates exactly (PSNR at its 100 dB cap, LPIPS 0) ...
    assert drift['reconstruction_psnr'] > 80 and abs(drift['reconstruction_lpips']) < 1e-5
    assert drift['reconstruction_nfe'] == 2 and drift['preservation_nfe'] == 1
    # ... but v = c + d carries every pixel (1 - eps) d past its stored x1: (1 - eps) d / 2 in [0, 1].
    assert drift['preservation_psnr'] == pytest.approx(-20 * np.log10((1 - EPS) * d / 2), rel=1e-4)
    placed = jax.sharding.NamedSharding(sharding.data_mesh(), jax.sharding.PartitionSpec('data'))
    direct = jax.jit(lpips.distance_fn(module))(jax.device_put(variables, sharding.replicated(sharding.data_mesh())),
                                                jax.device_put(x0 + (1 - EPS) * (c + d), placed),
                                                jax.device_put(x1, placed))
    assert drift['preservation_lpips'] == pytest.approx(float(np.mean(np.asarray(direct))), rel=1e-4)
    assert drift['preservation_lpips'] > 1e-4
    md = (tmp_path / 'eval' / 'report.md').read_text()
    for table in ('reconstruction_psnr (higher is better)', 'preservation_psnr (higher is better)',
                  'reconstruction_lpips', 'preservation_lpips'):
        assert f'## {table}\n' in md
    assert 'Lower is better everywhere except psnr (higher is better).' in md


def _conditional(params, x, t, dropout_rng=None, label=None):
    """A nonlinear class-conditional velocity: what the labels and the padding of the last chunk reach."""
    return params * jnp.tanh(x) + 0.05 * label.reshape(-1, 1, 1, 1).astype(x.dtype) * t.reshape(-1, 1, 1, 1)


def test_same_scores_on_one_and_eight_devices_with_labels(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    x0 = rng.normal(size=(12, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 12).astype(np.int32)
    store = _write_store(tmp_path / 'store', x0, np.tanh(x0), labels, shard_size=5)
    config = _image_config(samplers=('euler@2',), reconstruction=12, preservation=12, couplings=store)
    models = {'m': (_conditional, jnp.float32(-0.7), 10)}
    eight = job.evaluate(config, tmp_path / 'eight', models)['m']['euler@2']
    monkeypatch.setattr(sharding, 'data_mesh', lambda devices=None: Mesh(np.asarray(jax.devices()[:1]), ('data',)))
    one = job.evaluate(config, tmp_path / 'one', models)['m']['euler@2']
    assert set(one) == {'nfe', 'reconstruction_psnr', 'reconstruction_nfe', 'preservation_psnr', 'preservation_nfe'}
    for key, value in eight.items():
        assert one[key] == pytest.approx(value, rel=1e-6), key

    def v(label):
        return lambda x, t: -0.7 * np.tanh(x) + 0.05 * label[:, None, None, None] * t

    sampled = _euler(v(labels), x0.astype(np.float64), EPS, 1.0, 2)
    assert eight['preservation_psnr'] == pytest.approx(np.mean(fidelity.psnr(sampled, np.tanh(x0))), rel=1e-5)
    real, real_labels = job.SUITES['image'].prepare(config, tmp_path / 'one').held_out(12)
    assert real_labels is not None and len(set(real_labels)) > 1
    regenerated = _euler(v(real_labels), _euler(v(real_labels), real.astype(np.float64), 1.0, EPS, 2), EPS, 1.0, 2)
    assert eight['reconstruction_psnr'] == pytest.approx(np.mean(fidelity.psnr(regenerated, real)), rel=1e-5)


def _unset(config, **fields):
    """`config.eval` with `fields` replaced whatever their type (a config built in code, not by flags)."""
    for name, value in fields.items():
        del config.eval[name]
        config.eval[name] = value
    return config


@pytest.mark.parametrize('edit, fragment', [
    (lambda c: _unset(c, reconstruction=-1), 'eval.reconstruction=-1: expected an int >= 0'),
    (lambda c: _unset(c, reconstruction=2.5), 'eval.reconstruction=2.5: expected an int >= 0'),
    (lambda c: _unset(c, preservation=True), 'eval.preservation=True: expected an int >= 0'),
    (lambda c: _unset(c, lpips='yes'), "eval.lpips='yes': expected True or False"),
    (lambda c: _unset(c, lpips=True, reconstruction=4), "eval.lpips=True: LPIPS scores images; data.kind='toy2d'"),
    (lambda c: _unset(c, reconstruction=65), 'eval.reconstruction=65: more than the 64 points of the held-out sample'),
])
def test_bad_toy_fields_are_one_line(edit, fragment):
    config = edit(_toy_config(None, reconstruction=0, preservation=0))
    with pytest.raises(errors.ConfigError) as e:
        job.check_data(config)
    assert '\n' not in str(e.value) and fragment in str(e.value)


@pytest.mark.parametrize('fields, fragment', [
    ({'lpips': True}, 'eval.lpips=True: LPIPS scores reconstructions and stored pairs; set eval.reconstruction'),
    ({'lpips': True, 'reconstruction': 4}, 'lpips.vgg_weights: LPIPS needs torchvision'),
    ({'reconstruction': 1798}, 'eval.reconstruction=1798: more than the 1797 images of data.image'),
])
def test_bad_image_fields_are_one_line(fields, fragment):
    config = _image_config(**fields)
    config.lpips.resize = 16
    with pytest.raises(errors.UserError) as e:
        job.check_data(config)
    assert '\n' not in str(e.value) and fragment in str(e.value)


def test_preservation_needs_a_store_of_enough_pairs_in_the_evaluate_method(tmp_path):
    store = _write_store(tmp_path / 'store', np.zeros((20, 2), np.float32), np.ones((20, 2), np.float32))
    config = _toy_config(None, reconstruction=0, preservation=4)
    config.method, config.eval.models = 'evaluate', ('m=somewhere',)
    with pytest.raises(errors.ConfigError, match=r'eval.preservation=4: needs eval.couplings'):
        evaluate.check(config)
    config.eval.couplings = str(tmp_path / 'not yet')  # a generate stage that has not run: checked when it is read
    evaluate.check(config)
    config.eval.update(couplings=store, preservation=21)
    with pytest.raises(errors.ConfigError, match=r'eval.preservation=21: more pairs than the 20 of the coupling store'):
        evaluate.check(config)
    config.eval.preservation = 20
    evaluate.check(config)
    assert fidelity.stored_pairs(config).inputs.shape == (20, 2)
    training = configs.base()
    training.eval.preservation = 4
    with pytest.raises(errors.ConfigError, match=r'eval.preservation=4: only the evaluate method'):
        rf.check(training)


def test_lpips_section_read_only_with_eval_lpips():
    config = _image_config()
    assert 'lpips' not in rf.METHOD.sections(config) and 'lpips' not in evaluate.METHOD.sections(config)
    config.eval.update(lpips=True, reconstruction=4)
    assert 'lpips' in rf.METHOD.sections(config) and 'lpips' in evaluate.METHOD.sections(config)
    config.eval.samplers = ()  # nothing is evaluated: LPIPS is not read
    assert 'lpips' not in rf.METHOD.sections(config)
    defaults = configs.base().eval
    assert (defaults.reconstruction, defaults.preservation, defaults.lpips) == (0, 0, False)
