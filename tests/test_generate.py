"""The coupling-generation pass: device-count independence, resume, directions, refusals."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowjax import checkpoint, errors, generate, models
from flowjax.data import couplings, toy2d
from flowjax.flows import solvers
from flowjax.methods import table


def _export_teacher(path, seed: int) -> None:
    """A random MLP made into a non-trivial, smooth teacher: the zero-initialised output layer gets
    random weights (v != 0) and the time input is damped (the sinusoidal embedding spins fast in t)."""
    model = ml_collections.ConfigDict({'name': 'mlp', 'features': (32, 32), 'time_dim': 16, 'dropout': 0.0})
    params = models.build(model).init(jax.random.key(seed), jnp.zeros((1, 2)), jnp.zeros((1,)))
    layers = params['params']
    layers['out']['kernel'] = 0.5 * jax.random.normal(jax.random.key(seed + 1), layers['out']['kernel'].shape)
    layers['time_in']['kernel'] = 0.01 * layers['time_in']['kernel']
    meta = {'method': 'rf', 'model': model.to_dict(), 'sample_shape': [2], 'step': 20, 'seed': seed,
            'flow': {'t_eps': 1e-3}}
    checkpoint.export(path, params, meta)


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp('teachers')
    for name, seed in (('a', 0), ('b', 10)):
        _export_teacher(root / name, seed)
    return root


@pytest.fixture
def config(teachers):
    config = table.config('generate')
    config.generate.teacher = str(teachers / 'a')  # the workdir; the export inside it is found
    config.generate.num_pairs = 50
    config.generate.shard_size = 10
    config.generate.batch_size = 8
    config.generate.sampler = 'euler@4'
    return config


def _stored(path) -> dict[str, np.ndarray]:
    return couplings.open_store(path).load()


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _teacher(teachers, name='a'):
    params, meta = checkpoint.load_export(teachers / name)
    return models.apply_fn(models.build(ml_collections.ConfigDict(meta['model']))), params


def test_one_and_eight_devices_write_identical_pairs(config, teachers, tmp_path):
    """rk45 per pair: steps and NFE of a pair do not depend on its batch, batch size or devices.
    Holds bit for bit on CPU: each device runs the same per-example program on its rows."""
    with config.unlocked():
        config.generate.sampler = 'rk45'
        config.generate.num_pairs = 44  # shards of 10, 10, 10, 10, 4; batches padded to 8 / 16
    one = generate.generate_couplings(config, tmp_path / 'one', devices=jax.devices()[:1])
    with config.unlocked():
        config.generate.batch_size = 16
    eight = generate.generate_couplings(config, tmp_path / 'eight')
    assert one['complete'] and eight['complete'] and one['mean_nfe'] == eight['mean_nfe']
    a, b = _stored(tmp_path / 'one'), _stored(tmp_path / 'eight')
    _assert_same(a, b)
    assert len(np.unique(a['nfe'])) > 3 and np.all((a['nfe'] - 1) % 6 == 0)  # adaptive, per pair
    assert couplings.open_store(tmp_path / 'one').manifest['mean_nfe'] == pytest.approx(a['nfe'].mean())
    # Pair 13's noise drawn on its own is the stored x0; its x1 is the teacher's flow of it (float32 rk45
    # at rtol 1e-5 is accurate to about 1e-3 here, so a tight solve is the reference, not a bitwise one).
    apply, params = _teacher(teachers)
    key = generate.start_key(config.seed, 'backward')
    x0 = toy2d.source_sampler(config.data.source)(jax.random.fold_in(key, 13), (1, 2))
    x1, _ = solvers.sample(lambda x, t: apply(params, x, t), x0, solvers.parse_sampler('rk45', rtol=1e-8, atol=1e-8))
    np.testing.assert_array_equal(a['x0'][13], np.asarray(x0)[0])
    np.testing.assert_allclose(a['x1'][13], np.asarray(x1)[0], atol=2e-3)


def test_interrupted_pass_resumes_to_the_uninterrupted_store(config, tmp_path):
    full = generate.generate_couplings(config, tmp_path / 'full')
    assert full == {**full, 'num_pairs': 50, 'mean_nfe': 4.0, 'shards': 5, 'new_shards': 5, 'complete': True}
    with config.unlocked():
        config.generate.max_new_shards = 2
    part = generate.generate_couplings(config, tmp_path / 'split')
    assert part['new_shards'] == 2 and not part['complete'] and part['mean_nfe'] is None
    assert not json.loads((tmp_path / 'split' / 'manifest.json').read_text())['complete']
    with pytest.raises(errors.UserError, match='2 of 5 shards present'):
        couplings.open_store(tmp_path / 'split')
    with config.unlocked():
        config.generate.max_new_shards = None
    rest = generate.generate_couplings(config, tmp_path / 'split')
    assert rest['new_shards'] == 3 and rest['complete'] and rest['mean_nfe'] == 4.0
    split = _stored(tmp_path / 'split')
    assert split['index'].tolist() == list(range(50)) and np.all(split['nfe'] == 4)
    _assert_same(split, _stored(tmp_path / 'full'))
    # Complete: a rerun writes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'split').iterdir()}
    assert generate.generate_couplings(config, tmp_path / 'split')['new_shards'] == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'split').iterdir()}


def test_two_processes_split_the_shards(config, tmp_path):
    """Process p owns shards k % 2 == p; process 0 completes the store once all exist."""
    first = generate.generate_couplings(config, tmp_path, process_index=0, process_count=2)
    assert first['new_shards'] == 3 and not first['complete']
    assert sorted(p.name for p in tmp_path.glob('shard-*')) == [f'shard-00000{k}.npz' for k in (0, 2, 4)]
    assert generate.generate_couplings(config, tmp_path, process_index=1, process_count=2)['new_shards'] == 2
    last = generate.generate_couplings(config, tmp_path, process_index=0, process_count=2)
    assert last['new_shards'] == 0 and last['complete']
    generate.generate_couplings(config, tmp_path / 'single')
    _assert_same(_stored(tmp_path), _stored(tmp_path / 'single'))


def test_forward_pairs_invert_real_data(config, teachers, tmp_path):
    with config.unlocked():
        config.generate.direction = 'forward'
        config.generate.sampler = 'rk45'
        config.generate.num_pairs = 16
        config.generate.rtol = config.generate.atol = 1e-6  # at 1e-5 the round trip is only good to 1e-2
    generate.generate_couplings(config, tmp_path)
    pairs = _stored(tmp_path)
    key = generate.start_key(config.seed, 'forward')
    data = toy2d.distribution(config.data.target, 'data.target')
    np.testing.assert_array_equal(pairs['x1'][5], np.asarray(data(jax.random.fold_in(key, 5), 1))[0])
    apply, params = _teacher(teachers)
    x1, _ = solvers.sample(lambda x, t: apply(params, x, t), jnp.asarray(pairs['x0']),
                           solvers.parse_sampler('rk45', rtol=1e-8, atol=1e-8), eps=1e-3)
    assert np.abs(pairs['x0'] - pairs['x1']).mean() > 1.0  # the teacher moves points far
    np.testing.assert_allclose(np.asarray(x1), pairs['x1'], atol=2e-3)


def test_bfloat16_store_holds_the_rounded_float32_pairs(config, tmp_path):
    with config.unlocked():
        config.generate.num_pairs = 20
    generate.generate_couplings(config, tmp_path / 'f32')
    with config.unlocked():
        config.generate.dtype = 'bfloat16'
    generate.generate_couplings(config, tmp_path / 'bf16')
    full, half = _stored(tmp_path / 'f32'), _stored(tmp_path / 'bf16')
    assert couplings.open_store(tmp_path / 'bf16').manifest['dtype'] == 'bfloat16'
    np.testing.assert_array_equal(half['x1'], full['x1'].astype(half['x1'].dtype))


def test_store_of_another_request_is_refused(config, teachers, tmp_path):
    with config.unlocked():
        config.generate.num_pairs = 20
        config.generate.max_new_shards = 1
    generate.generate_couplings(config, tmp_path)
    with config.unlocked():
        config.generate.teacher = str(teachers / 'b' / 'export')
    with pytest.raises(errors.UserError) as excinfo:
        generate.generate_couplings(config, tmp_path)
    message = str(excinfo.value)
    assert '\n' not in message and str(tmp_path) in message and 'teacher=' in message
    assert str(teachers / 'a' / 'export') in message and str(teachers / 'b' / 'export') in message
    manifest = json.loads((tmp_path / 'manifest.json').read_text())
    couplings.write_manifest(tmp_path, {**manifest, 'shape': [3]})
    with config.unlocked():
        config.generate.teacher = str(teachers / 'a' / 'export')  # the same teacher, named by its export dir
    with pytest.raises(errors.UserError, match=r'shape=\[3\] but this run asks for shape=\[2\]'):
        generate.generate_couplings(config, tmp_path)
    assert sorted(p.name for p in tmp_path.glob('shard-*')) == ['shard-000000.npz']


@pytest.mark.parametrize('field, value, expected', [
    ('teacher', None, 'generate.teacher: an export directory'),
    ('teacher', '/nowhere/at/all', 'generate.teacher: cannot load /nowhere/at/all'),
    ('num_pairs', 0, 'generate.num_pairs=0: must be an integer >= 1'),
    ('shard_size', 0, 'generate.shard_size=0'),
    ('batch_size', 12, r'generate.batch_size=12: must be a positive multiple of the device count \(8\)'),
    ('sampler', 'euler', "generate.sampler: sampler 'euler': fixed-step solvers need '@N' steps"),
    ('direction', 'sideways', 'generate.direction=.sideways.: expected one of backward, forward'),
    ('dtype', 'int8', 'generate.dtype=.int8.: expected one of float32, bfloat16, float16'),
    ('model_dtype', 'float16', r'generate.model_dtype=.float16.: expected one of float32, bfloat16 \(or unset'),
    ('model_dtype', 'bfloat16', r"generate.model_dtype='bfloat16': the teacher's model \(mlp\) has no dtype setting"),
])
def test_bad_config_is_one_line(config, tmp_path, field, value, expected):
    with config.unlocked():
        config.generate[field] = value
    with pytest.raises(errors.ConfigError, match=expected) as excinfo:
        generate.generate_couplings(config, tmp_path)
    assert '\n' not in str(excinfo.value)
    assert not (tmp_path / 'manifest.json').exists()


def test_exports_load_from_relative_paths(teachers, monkeypatch):
    """A stage or `eval.models` may name an export relative to the working directory."""
    monkeypatch.chdir(teachers)
    relative, _ = checkpoint.load_export('a')
    absolute, _ = checkpoint.load_export(teachers / 'a')
    for x, y in zip(jax.tree.leaves(relative), jax.tree.leaves(absolute)):
        np.testing.assert_array_equal(x, y)
