"""Tests for the toy 2D metrics, straightness, the evaluation job and the workdir report
(flowjax.evaluation), and for the `evaluate` method (flowjax.evaluate)."""

import itertools
import json
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from flowjax import configs, errors, evaluate
from flowjax.evaluation import job, report, straightness, toy
import test_writers
from test_generate import _export_teacher

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
    assert toy.w2(x, x) == pytest.approx(0.0, abs=1e-9)


def test_w2_of_shift_is_shift_norm():
    x = _normal(1, n=500)
    c = np.array([0.3, -1.2])
    assert toy.w2(x, x + c) == pytest.approx(np.linalg.norm(c), abs=1e-6)


def test_w2_gaussians():
    assert toy.w2(_normal(2), _normal(3)) < 0.2
    assert toy.w2(_normal(4), _normal(5, mean=(3.0, 0.0))) == pytest.approx(3.0, abs=0.2)


def test_w2_is_the_best_permutation():
    """Against every permutation of 6 points: the assignment is the optimum, W2^2 its mean cost."""
    x, y = _normal(19, n=6), _normal(20, n=6, mean=(0.5, 0.0))
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    best = min(cost[np.arange(6), list(p)].mean() for p in itertools.permutations(range(6)))
    assert toy.w2(x, y) == pytest.approx(math.sqrt(best), rel=1e-12)


def test_w2_refuses_unequal_sizes():
    with pytest.raises(ValueError, match='equal size'):
        toy.w2(_normal(21, n=10), _normal(22, n=11))


def test_point_cloud_suite_refuses_unequal_sizes():
    with pytest.raises(errors.UserError, match='source, data and data_b have 10, 10 and 9 points'):
        toy.PointCloudSuite(_normal(23, n=10), _normal(24, n=10), _normal(25, n=9))


def test_w2_returns_python_float():
    assert type(toy.w2(_normal(6, n=10), _normal(7, n=10))) is float


# --- energy distance -------------------------------------------------------


def test_energy_zero_for_identical_sets():
    x = _normal(8)
    assert toy.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)


def test_energy_positive_and_increasing_with_shift():
    x, y = _normal(9, n=1000), _normal(10, n=1000)
    values = [toy.energy_distance(x, y + np.array([s, 0.0])) for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(v > 0 for v in values)
    assert values == sorted(values)


def test_energy_matches_naive_formula():
    x, y = _normal(11, n=50), _normal(12, n=70, mean=(1.0, 1.0))
    d = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1).mean()
    expected = 2 * d(x, y) - d(x, x) - d(y, y)
    assert toy.energy_distance(x, y) == pytest.approx(expected, rel=1e-10)


# --- straightness ----------------------------------------------------------


def test_straightness_constant_field_is_zero():
    c = jnp.array([1.5, -0.5])
    out = straightness.straightness(lambda x, t: jnp.broadcast_to(c, x.shape), _normal(13, n=64))
    assert set(out) == {'straightness', 'straightness_norm'}
    assert out['straightness'] < 1e-8
    assert out['straightness_norm'] < 1e-4


def test_straightness_rotation_is_positive():
    rotate = lambda x, t: jnp.stack([-x[:, 1], x[:, 0]], axis=-1)
    out = straightness.straightness(rotate, _normal(14, n=256), steps=100)
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
    out = straightness.straightness(rotate, x0, steps=1000, eps=0.0)
    c = 2 * np.sin(0.5)
    t = (np.arange(10000) + 0.5) / 10000
    norm = np.sqrt(1 + c**2 - 2 * c * np.cos(t - 0.5)).mean()
    assert out['straightness'] == pytest.approx(2 * np.cos(1.0) - 1, rel=1e-2)
    assert out['straightness_norm'] == pytest.approx(norm, rel=1e-2)


# --- job.evaluate_models ---------------------------------------------------


def test_evaluate_models_end_to_end(tmp_path):
    shift = np.array([2.0, -1.0], np.float32)
    source = _normal(15).astype(np.float32)
    data = source + shift  # Exactly the push-forward of the constant velocity.
    data_b = _normal(16).astype(np.float32) + shift
    models = {'shift': (_shift_apply, {'shift': jnp.asarray(shift)})}

    result = job.evaluate_models(models, source=source, data=data, data_b=data_b,
                                 samplers=SAMPLERS, workdir=tmp_path, title='test')
    entry = result['shift']
    expected_keys = ['params', 'euler@1', 'euler@2', 'heun@2', 'rk45', 'straightness',
                     'straightness_norm', 'w2_data', 'energy_data']
    assert list(entry) == expected_keys
    assert entry['params'] == 2 and type(entry['params']) is int
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
    assert on_disk == result
    assert (tmp_path / 'report.md').exists()
    png = tmp_path / 'samples.png'
    assert png.stat().st_size > 0
    with Image.open(png) as img:
        assert img.format == 'PNG' and img.size[0] > 100
        size = img.size
    shown = [v.image for e in test_writers.read_events(tmp_path / 'tensorboard') for v in e.summary.value]
    assert [(i.width, i.height) for i in shown] == [size]  # the figure, as an image in TensorBoard

    # A second call with another model merges into the existing report.
    models2 = {'other': (_shift_apply, {'shift': jnp.zeros(2)})}
    merged = job.evaluate_models(models2, source=source, data=data, data_b=data_b,
                                 samplers=('euler@1',), workdir=tmp_path)
    assert set(merged) == {'shift', 'other'}
    assert merged['shift'] == entry
    assert merged['other']['euler@1']['w2'] == pytest.approx(np.linalg.norm(shift), abs=1e-3)
    assert json.loads((tmp_path / 'report.json').read_text()) == merged
    md = (tmp_path / 'report.md').read_text()
    assert '| shift | 2 |' in md and '| other | 2 |' in md and 'rk45' in md
    assert '| model | params | euler@1 |' in md
    assert not list(tmp_path.glob('*.tmp'))


def test_write_report_roundtrip(tmp_path):
    result = {'m': {'euler@1': {'w2': 0.5, 'energy': 0.1, 'nfe': 1}, 'straightness': 0.0,
                    'straightness_norm': 0.0, 'w2_data': 0.05, 'energy_data': 0.001}}
    report.write_report(tmp_path / 'sub', result)
    assert report.read_report(tmp_path / 'sub') == result
    assert 'euler@1' in (tmp_path / 'sub' / 'report.md').read_text()


# --- parameter count -------------------------------------------------------


def test_parameter_count():
    params = {'a': {'kernel': jnp.zeros((3, 4)), 'bias': np.zeros(4)}, 'b': [jnp.float32(1.0), np.ones((2, 2, 2))]}
    assert job.parameter_count(params) == 12 + 4 + 1 + 8
    assert type(job.parameter_count(params)) is int
    assert job.parameter_count({}) == 0


@pytest.mark.parametrize('n, text', [(0, '0'), (512, '512'), (999, '999'), (1234, '1.23k'), (190_000, '190k'),
                                     (999_999, '1M'), (27_912_345, '27.9M'), (1_500_000_000, '1.5B')])
def test_format_count(n, text):
    assert report.format_count(n) == text


# --- groups ------------------------------------------------------------------


def _entry(w2_1, w2_4, straight, params=100, nfe_rk45=20):
    return {'params': params, 'euler@1': {'w2': w2_1, 'energy': 0.5, 'nfe': 1},
            'euler@4': {'w2': w2_4, 'energy': 0.25, 'nfe': 4}, 'rk45': {'w2': 0.1, 'energy': 0.0, 'nfe': nfe_rk45},
            'straightness': straight, 'straightness_norm': 0.5, 'w2_data': 0.05, 'energy_data': 0.001}


def test_group_statistics_by_hand():
    result = {'s0': _entry(1.0, 0.5, 0.1), 's1': _entry(2.0, None, 0.3, nfe_rk45=26),
              's2': _entry(4.0, 0.7, 0.2), 'solo': _entry(3.0, 0.4, 0.6, params=7),
              'big': _entry(3.0, 0.4, 0.6, params=8), 'couplings': {'pairs': 4}}
    groups = report.group_statistics(result, {'seeds': ('s0', 's1', 's2'), 'one': ['solo'],
                                                'mixed': ('solo', 'big')})
    assert set(groups) == {'seeds', 'one', 'mixed'}
    seeds = groups['seeds']
    assert seeds['models'] == ['s0', 's1', 's2'] and seeds['params'] == 100
    w2 = seeds['euler@1']['w2']
    assert w2 == {'mean': pytest.approx(7 / 3), 'std': pytest.approx(np.std([1, 2, 4], ddof=1)),
                  'min': 1.0, 'max': 4.0, 'n': 3}
    assert w2['std'] == pytest.approx(1.527525, rel=1e-6)
    # A failed (None) score is counted and left out.
    assert seeds['euler@4']['w2'] == {'mean': pytest.approx(0.6), 'std': pytest.approx(np.std([0.5, 0.7], ddof=1)),
                                      'min': 0.5, 'max': 0.7, 'n': 2, 'failed': 1}
    assert seeds['euler@1']['energy'] == {'mean': 0.5, 'std': 0.0, 'min': 0.5, 'max': 0.5, 'n': 3}
    assert seeds['euler@1']['nfe'] == 1 and seeds['euler@4']['nfe'] == 4 and 'nfe' not in seeds['rk45']
    assert seeds['straightness']['mean'] == pytest.approx(0.2) and seeds['straightness']['std'] == pytest.approx(0.1)
    assert 'straightness_norm' in seeds
    assert not {'w2_data', 'energy_data'} & set(seeds)
    # n = 1: std 0; params differing within a group are left out.
    assert groups['one']['euler@1']['w2'] == {'mean': 3.0, 'std': 0.0, 'min': 3.0, 'max': 3.0, 'n': 1}
    assert groups['one']['params'] == 7 and 'params' not in groups['mixed']
    json.dumps(groups, allow_nan=False)

    # Every member failed: no statistics, all counted.
    result['s0']['euler@4']['w2'] = result['s2']['euler@4']['w2'] = None
    failed = report.group_statistics(result, {'seeds': ('s0', 's1', 's2')})['seeds']['euler@4']['w2']
    assert failed == {'mean': None, 'std': None, 'min': None, 'max': None, 'n': 0, 'failed': 3}


def test_groups_markdown_table():
    result = {'s0': _entry(1.0, 0.5, 0.1), 's1': _entry(2.0, None, 0.3)}
    result['groups'] = report.group_statistics(result, {'plain reflow': ('s0', 's1')})
    md = report.report_markdown(result)
    assert '## Groups' in md and '| plain reflow |' not in md.split('## Groups')[0]
    header = next(line for line in md.split('## Groups')[1].splitlines() if line.startswith('| group'))
    assert header.startswith('| group | n | params | euler@1 w2 | euler@1 energy | euler@4 w2 |')
    assert header.endswith('| straightness | straightness_norm |')
    assert '| plain reflow | 2 | 100 | 1.5 ± 0.71 | 0.5 ± 0 | 0.5 ± 0 (1 failed) |' in md


def test_groups_config_roundtrip_and_lock():
    config = configs.base()
    assert not config.eval.groups
    config.eval.groups = {'plain reflow': ('plain_s0', 'plain_s1'), 'anneal': ('anneal_s0',)}
    config.lock()
    config.eval.groups.anneal = ('anneal_s0', 'anneal_s1')
    copied = ml_collections.ConfigDict(json.loads(config.to_json()))
    assert copied.eval.groups.to_dict() == {'plain reflow': ['plain_s0', 'plain_s1'],
                                            'anneal': ['anneal_s0', 'anneal_s1']}
    with pytest.raises(KeyError):
        config.eval.groups['typo'] = ('plain_s0',)


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp('exports')
    for name, seed in (('s0', 0), ('s1', 10), ('other', 20)):
        _export_teacher(root / name, seed)
    return root


def _evaluate_config(exports, groups):
    config = configs.base()
    config.method = 'evaluate'
    config.eval.models = (str(exports / 's0'), str(exports / 's1'), f'solo={exports / "other"}')
    config.eval.samplers = ('euler@1', 'euler@2')
    config.eval.num_samples = 128
    config.eval.straightness_steps = 8
    config.eval.trajectories = 4
    config.eval.groups = groups
    return ml_collections.ConfigDict(json.loads(config.to_json()))  # as a pipeline stage copies it: lists


def test_evaluate_method_groups_end_to_end(exports, tmp_path):
    config = _evaluate_config(exports, {'seeds': ('s0', 's1'), 'one': ('solo',)})
    result = evaluate.run(config, str(tmp_path))
    assert set(result) == {'s0', 's1', 'solo', 'groups'}
    assert json.loads((tmp_path / 'report.json').read_text()) == result
    count = result['s0']['params']
    assert count > 1000 and result['s1']['params'] == result['solo']['params'] == count
    seeds = result['groups']['seeds']
    assert seeds['models'] == ['s0', 's1'] and seeds['params'] == count
    for key in ('euler@1', 'euler@2'):
        assert seeds[key]['nfe'] == result['s0'][key]['nfe']
        for metric in ('w2', 'energy'):
            values = [result[m][key][metric] for m in ('s0', 's1')]
            assert seeds[key][metric] == {'mean': pytest.approx(np.mean(values)),
                                          'std': pytest.approx(np.std(values, ddof=1)),
                                          'min': min(values), 'max': max(values), 'n': 2}
    values = [result[m]['straightness'] for m in ('s0', 's1')]
    assert seeds['straightness']['mean'] == pytest.approx(np.mean(values))
    assert seeds['straightness']['std'] == pytest.approx(np.std(values, ddof=1))
    assert result['groups']['one']['euler@1']['w2']['std'] == 0.0
    md = (tmp_path / 'report.md').read_text()
    groups_md = md.split('## Groups')[1]
    assert f'| seeds | 2 | {report.format_count(count)} |' in groups_md and '| one | 1 |' in groups_md
    assert '| group | n | params | euler@1 w2 | euler@1 energy | euler@2 w2 |' in groups_md

    # Evaluating again without groups drops the earlier groups from the report.
    config.eval.groups = {}
    again = evaluate.run(config, str(tmp_path))
    assert 'groups' not in again and again['s0'] == result['s0']
    assert 'groups' not in json.loads((tmp_path / 'report.json').read_text())
    assert '## Groups' not in (tmp_path / 'report.md').read_text()


@pytest.mark.parametrize('groups, fragment', [
    ({'seeds': ('s0', 's9')}, "eval.groups.seeds: 's9' is not a model of eval.models (s0, s1, solo)"),
    ({'seeds': ()}, 'eval.groups.seeds=(): expected a non-empty tuple of model labels (s0, s1, solo)'),
    ({'seeds': 's0'}, "eval.groups.seeds='s0': expected a non-empty tuple"),
    ({'seeds': ('s0', 's0')}, "eval.groups.seeds: 's0' is listed twice"),
    ({'seeds': {'a': 's0', 'b': 's1'}}, "eval.groups.seeds={'a': 's0', 'b': 's1'}: expected a non-empty tuple"),
])
def test_bad_groups_are_one_line(exports, groups, fragment):
    config = configs.base()
    config.method = 'evaluate'
    config.eval.models = (str(exports / 's0'), str(exports / 's1'), f'solo={exports / "other"}')
    config.eval.groups = groups
    with pytest.raises(errors.ConfigError) as e:
        evaluate.check(config)
    assert '\n' not in str(e.value) and fragment in str(e.value)


def test_paired_differences_pair_the_ith_models():
    cell = lambda w2, nfe=1: {'w2': w2, 'nfe': nfe}
    scores = {'a0': (1.0, 0.5), 'a1': (2.0, 0.25), 'a2': (None, 0.5), 'b0': (1.5, 1.0), 'b1': (2.0, 1.0),
              'b2': (3.0, 1.0)}
    merged = {name: {'params': 10, 'euler@1': cell(w2), 'straightness': s, 'w2_data': 0.1}
              for name, (w2, s) in scores.items()}
    groups = {'a': ('a0', 'a1', 'a2'), 'b': ('b0', 'b1', 'b2')}
    out = report.paired_differences(merged, groups, {'a - b': ('a', 'b')})['a - b']
    assert out['pairs'] == [['a0', 'b0'], ['a1', 'b1'], ['a2', 'b2']]
    w2 = out['euler@1']['w2']  # the pair with a failed score is left out and counted
    assert (w2['n'], w2['failed'], w2['mean'], w2['min'], w2['max']) == (2, 1, -0.25, -0.5, 0.0)
    s = out['straightness']
    np.testing.assert_allclose([s['mean'], s['std']], [-0.5833333, np.std([-0.5, -0.75, -0.5], ddof=1)])
    np.testing.assert_allclose(s['t'], s['mean'] / (s['std'] / np.sqrt(3)))
    assert 'w2_data' not in out and 'params' not in out and 'nfe' not in out['euler@1']
    text = report.report_markdown({**merged, 'groups': report.group_statistics(merged, groups),
                                   'differences': {'a - b': out}})
    assert '## Paired differences' in text and '| a - b | 3 |' in text


def test_paired_differences_between_named_columns():
    # CAF's caf@N against 2-RF's euler@N: a's column key_a paired with b's key_b, stored as 'key_a - key_b'.
    merged = {'a0': {'caf@1': {'w2': 1.0, 'nfe': 2}, 'euler@1': {'w2': 9.0, 'nfe': 1}},
              'a1': {'caf@1': {'w2': 2.0, 'nfe': 2}, 'euler@1': {'w2': 9.0, 'nfe': 1}},
              'b0': {'euler@1': {'w2': 1.5, 'nfe': 1}}, 'b1': {'euler@1': {'w2': 3.0, 'nfe': 1}}}
    groups = {'a': ('a0', 'a1'), 'b': ('b0', 'b1')}
    out = report.paired_differences(merged, groups, {'d': ('a', 'b', 'caf@1=euler@1')})['d']
    assert set(out) == {'pairs', 'caf@1 - euler@1'}  # only the named columns
    np.testing.assert_allclose([out['caf@1 - euler@1']['w2']['mean'], out['caf@1 - euler@1']['w2']['std']],
                               [-0.75, np.std([-0.5, -1.0], ddof=1)])
    same = report.paired_differences(merged, groups, {'d': ('a', 'a', 'caf@1=caf@1')})['d']
    assert same['caf@1']['w2']['mean'] == 0.0
    # a model in place of group_b: every a_i against that one model
    one = report.paired_differences(merged, groups, {'d': ('a', 'b1', 'caf@1=euler@1')})['d']
    assert one['pairs'] == [['a0', 'b1'], ['a1', 'b1']] and one['caf@1 - euler@1']['w2']['mean'] == -1.5


@pytest.mark.parametrize('differences, fragment', [
    ({'d': ('seeds', 'nope')}, "eval.differences.d: 'nope' is neither a group of eval.groups (one, seeds) nor a model"),
    ({'d': ('nope', 'seeds')}, "eval.differences.d: 'nope' is not a group of eval.groups (one, seeds)"),
    ({'d': ('seeds',)}, "eval.differences.d=('seeds',): expected (group_a, group_b"),
    ({'d': ('seeds', 'one')}, "groups 'seeds' and 'one' have 2 and 1 models"),
    ({'d': ('seeds', 'seeds', 'euler@1=caf@9')}, "eval.differences.d: column pair 'euler@1=caf@9': expected "
                                                 "'key_a=key_b' with both keys samplers of eval.samplers"),
])
def test_bad_differences_are_one_line(exports, differences, fragment):
    config = configs.base()
    config.method = 'evaluate'
    config.eval.models = (str(exports / 's0'), str(exports / 's1'), f'solo={exports / "other"}')
    config.eval.groups = {'seeds': ('s0', 's1'), 'one': ('solo',)}
    config.eval.differences = differences
    with pytest.raises(errors.ConfigError) as e:
        evaluate.check(config)
    assert '\n' not in str(e.value) and fragment in str(e.value)
