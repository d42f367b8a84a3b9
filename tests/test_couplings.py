"""The coupling store: shard round trip, manifest checks, and the shuffled epoch reader."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from flowjax import errors, sharding
from flowjax.data import couplings


def _manifest(n: int, shard_size: int, dtype: str = 'float32', complete: bool = True) -> dict:
    return {'version': couplings.FORMAT_VERSION, 'teacher': '/teachers/a/export', 'teacher_step': 7,
            'data': {'kind': 'toy2d'}, 'sampler': 'euler@4', 'rtol': None, 'atol': None,
            'direction': 'backward', 'seed': 0, 'num_pairs': n, 'shard_size': shard_size, 'dtype': dtype,
            'shape': [2], 't_eps': 1e-3, 'complete': complete, 'mean_nfe': 4.0 if complete else None}


def _pairs(n: int) -> dict[str, np.ndarray]:
    """Pair i is recognisable from its values: x0 = (i, -i) / 7, x1 = x0 + 0.5."""
    ids = np.arange(n)
    x0 = np.stack([ids, -ids], axis=1).astype(np.float32) / 7
    return {'x0': x0, 'x1': x0 + 0.5, 'index': ids.astype(np.int64), 'nfe': np.full(n, 4, np.int32),
            'label': (ids % 3).astype(np.int32)}


def _write_store(path, n: int, shard_size: int, dtype: str = 'float32', shards=None, complete=True) -> dict:
    manifest = _manifest(n, shard_size, dtype, complete)
    path.mkdir(parents=True, exist_ok=True)
    couplings.write_manifest(path, manifest)
    pairs = _pairs(n)
    total = couplings.num_shards(n, shard_size)
    for k in range(total) if shards is None else shards:
        lo, hi = couplings.shard_range(k, n, shard_size)
        couplings.write_shard(path, k, {name: a[lo:hi] for name, a in pairs.items()}, dtype)
    return pairs


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert '\n' not in message
    return message


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16'])
def test_round_trip(tmp_path, dtype):
    pairs = _write_store(tmp_path, n=25, shard_size=10, dtype=dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'manifest.json', 'shard-000000.npz', 'shard-000001.npz', 'shard-000002.npz']
    with np.load(tmp_path / 'shard-000002.npz') as raw:  # the last shard is short; 16-bit kinds as uint16
        assert raw['x0'].shape == (5, 2) and raw['index'].tolist() == list(range(20, 25))
        assert raw['x1'].dtype == (np.float32 if dtype == 'float32' else np.uint16)
    store = couplings.open_store(tmp_path, expect={'shape': (2,), 'dtype': dtype})
    assert store.num_pairs == 25 and store.shape == (2,) and store.manifest['mean_nfe'] == 4.0
    loaded = store.load()
    storage = couplings.DTYPES[dtype]
    assert loaded['x0'].dtype == storage
    for name in ('x0', 'x1'):
        np.testing.assert_array_equal(loaded[name], pairs[name].astype(storage))
    for name in ('index', 'nfe', 'label'):
        np.testing.assert_array_equal(loaded[name], pairs[name])
    if dtype == 'bfloat16':  # the stored values really are bfloat16 (8 bits of mantissa)
        assert not np.array_equal(loaded['x0'].astype(np.float32), pairs['x0'])
        assert loaded['x0'].dtype == ml_dtypes.bfloat16


def test_each_pair_once_per_epoch_across_two_processes(tmp_path):
    n, batch = 60, 12
    _write_store(tmp_path, n, shard_size=25)
    arrays = couplings.open_store(tmp_path).load()
    readers = [couplings.CouplingBatches(arrays, batch, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    epochs = []
    for epoch in range(3):
        steps = range(epoch * n // batch, (epoch + 1) * n // batch)
        rows = [np.concatenate([r.local_ids(s) for r in readers]) for s in steps]
        ids = np.concatenate(rows)
        assert sorted(ids.tolist()) == list(range(n)), f'epoch {epoch} does not visit every pair once'
        epochs.append(ids)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # Stateless and deterministic: a fresh reader (a resumed run) gives the same rows for a step.
    again = couplings.CouplingBatches(arrays, batch, seed=3, process_index=1, process_count=2)
    np.testing.assert_array_equal(again.local_ids(7), readers[1].local_ids(7))
    batch_7 = readers[1].local_batch(7)
    assert set(batch_7) == {'x0', 'x1', 'label'} and batch_7['x0'].dtype == np.float32
    np.testing.assert_array_equal(batch_7['x0'], arrays['x0'][readers[1].local_ids(7)])
    other_seed = couplings.CouplingBatches(arrays, batch, seed=4, process_index=0, process_count=2)
    assert not np.array_equal(other_seed.local_ids(0), readers[0].local_ids(0))


def test_batches_straddling_epochs_keep_the_stream():
    """With B not dividing N, consecutive batches still read perm_0 ++ perm_1 ++ ... in order."""
    arrays = _pairs(50)
    reader = couplings.CouplingBatches(arrays, 12, seed=0, process_count=1, process_index=0)
    stream = np.concatenate([reader.local_ids(s) for s in range(25)])  # 300 rows = 6 epochs
    for epoch in range(6):
        np.testing.assert_array_equal(stream[epoch * 50:(epoch + 1) * 50], reader.permutation(epoch))


def test_make_batches_gives_sharded_float32_global_arrays(tmp_path):
    arrays = _write_store(tmp_path, n=40, shard_size=16, dtype='bfloat16')
    mesh = sharding.data_mesh()
    batches = couplings.make_batches(tmp_path, mesh, batch_size=16, seed=1, expect={'shape': [2]})
    batch = batches(3)
    reader = couplings.CouplingBatches(couplings.open_store(tmp_path).load(), 16, seed=1)
    ids = reader.local_ids(3)
    assert batch['x0'].shape == (16, 2) and batch['x0'].dtype == np.float32
    assert batch['x0'].sharding.is_equivalent_to(sharding.batch_sharded(mesh), 2)
    assert len(batch['x1'].addressable_shards) == jax.device_count()
    expected = arrays['x1'][ids].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(batch['x1']), expected)
    np.testing.assert_array_equal(np.asarray(batch['label']), arrays['label'][ids])


def test_manifest_mismatch_is_refused_in_one_line(tmp_path):
    stored = _manifest(10, 5)
    couplings.check_manifest(tmp_path, stored, {**stored, 'complete': False, 'mean_nfe': None})
    with pytest.raises(errors.UserError) as excinfo:
        couplings.check_manifest(tmp_path, stored, {**stored, 'shape': (3,)})
    message = _one_line(excinfo)
    assert str(tmp_path) in message and 'shape=[2]' in message and 'shape=[3]' in message
    _write_store(tmp_path, 10, 5)
    with pytest.raises(errors.UserError) as excinfo:
        couplings.open_store(tmp_path, expect={'shape': [3]})
    assert 'shape=[2]' in _one_line(excinfo) and 'expected shape=[3]' in str(excinfo.value)


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'wrong_rows'])
def test_damaged_shard_is_named(tmp_path, damage):
    _write_store(tmp_path, n=30, shard_size=10)
    bad = tmp_path / 'shard-000001.npz'
    if damage == 'truncate':
        bad.write_bytes(bad.read_bytes()[:200])
    elif damage == 'garbage':
        bad.write_bytes(b'not a zip file at all')
    else:  # a well-formed file holding another shard's pairs
        bad.write_bytes((tmp_path / 'shard-000002.npz').read_bytes())
    for read in (couplings.Store.load, couplings.Store.columns):  # the full load and the streaming reader's open
        with pytest.raises(errors.UserError) as excinfo:
            read(couplings.open_store(tmp_path))
        message = _one_line(excinfo)
        assert 'shard-000001.npz' in message and 'rerun the generate stage' in message


def test_incomplete_or_missing_store_is_refused(tmp_path):
    with pytest.raises(errors.UserError, match='does not exist'):
        couplings.open_store(tmp_path / 'nowhere')
    with pytest.raises(errors.UserError, match='manifest.json is missing'):
        couplings.open_store(tmp_path)
    _write_store(tmp_path, n=40, shard_size=10, shards=[0, 2], complete=False)
    (tmp_path / 'shard-000001.npz.tmp-123').write_bytes(b'half written')  # never counts as a shard
    with pytest.raises(errors.UserError) as excinfo:
        couplings.open_store(tmp_path)
    assert '2 of 4 shards present, rerun the generate stage' in _one_line(excinfo)
    # A manifest marked complete whose shards were later deleted is refused too.
    manifest = json.loads((tmp_path / 'manifest.json').read_text())
    couplings.write_manifest(tmp_path, {**manifest, 'complete': True})
    with pytest.raises(errors.UserError, match='2 of 4 shards present'):
        couplings.open_store(tmp_path)



def _second_store(path, n: int, num_classes: int = 3, shape=(2,)) -> dict[str, np.ndarray]:
    """A store told apart from `_pairs` by its values: x0 = (i + 100) / 7, x1 = x0 - 9; labels iff num_classes."""
    ids = np.arange(n)
    x0 = np.broadcast_to((ids[:, None] + 100.0) / 7, (n, *shape)).astype(np.float32)
    pairs = {'x0': x0, 'x1': x0 - 9, 'index': ids.astype(np.int64), 'nfe': np.full(n, 4, np.int32)}
    if num_classes:
        pairs['label'] = (ids % num_classes).astype(np.int32)
    path.mkdir(parents=True)
    couplings.write_manifest(path, {**_manifest(n, n), 'direction': 'forward', 'shape': list(shape),
                                    'num_classes': num_classes})
    couplings.write_shard(path, 0, pairs, 'float32')
    return pairs


def test_mixed_reader_draws_the_configured_rows_from_each_store():
    """m = 3 of every batch of 12 from the second store, each store in its own per-epoch order."""
    main, second = _pairs(60), _pairs(15)
    second['x1'] = second['x0'] - 9
    whole = couplings.MixedCouplingBatches(main, second, 12, 3, seed=5, process_index=0, process_count=1)
    halves = [couplings.MixedCouplingBatches(main, second, 12, 3, seed=5, process_index=p, process_count=2)
              for p in (0, 1)]
    mains, seconds = [], []
    for step in range(15):  # 3 epochs of the second store, 15 * 9 / 60 = 2.25 of the main one
        which, ids = whole.global_ids(step)
        assert which.tolist() == [0] * 9 + [1] * 3
        split = [h.local_ids(step) for h in halves]  # two processes read the one-process batch
        np.testing.assert_array_equal(np.concatenate([w for w, _ in split]), which)
        np.testing.assert_array_equal(np.concatenate([i for _, i in split]), ids)
        mains.append(ids[:9])
        seconds.append(ids[9:])
        batch = whole.local_batch(step)
        assert set(batch) == {'x0', 'x1', 'label'} and batch['x0'].dtype == np.float32
        np.testing.assert_array_equal(batch['x1'], np.concatenate([main['x1'][ids[:9]], second['x1'][ids[9:]]]))
        np.testing.assert_array_equal(batch['label'], np.concatenate([main['label'][ids[:9]],
                                                                      second['label'][ids[9:]]]))
    mains, seconds = np.concatenate(mains), np.concatenate(seconds)
    epochs = [seconds[e * 15:(e + 1) * 15] for e in range(3)]
    assert all(sorted(e.tolist()) == list(range(15)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert all(sorted(mains[e * 60:(e + 1) * 60].tolist()) == list(range(60)) for e in range(2))
    # The main store reads as a plain reader of batch B - m would; the second has permutations of its own.
    plain = couplings.CouplingBatches(main, 9, seed=5, process_index=0, process_count=1)
    np.testing.assert_array_equal(mains[:27], np.concatenate([plain.local_ids(s) for s in range(3)]))
    alone = couplings.CouplingBatches(second, 3, seed=5, process_index=0, process_count=1)
    assert not np.array_equal(epochs[0], alone.permutation(0))
    # Stateless: a fresh reader (a resumed run) gives the same batch for a step; another seed another.
    again = couplings.MixedCouplingBatches(main, second, 12, 3, seed=5, process_index=1, process_count=2)
    np.testing.assert_array_equal(again.local_batch(11)['x0'], halves[1].local_batch(11)['x0'])
    other = couplings.MixedCouplingBatches(main, second, 12, 3, seed=6, process_index=0, process_count=1)
    assert not np.array_equal(other.global_ids(0)[1], whole.global_ids(0)[1])


def test_make_mixed_batches_and_layout_refusals(tmp_path):
    _write_store(tmp_path / 'main', n=40, shard_size=16)  # labels i % 3
    manifest = couplings.read_manifest(tmp_path / 'main')
    couplings.write_manifest(tmp_path / 'main', {**manifest, 'num_classes': 3})
    _second_store(tmp_path / 'second', n=20)
    mesh = sharding.data_mesh()
    batches = couplings.make_mixed_batches(tmp_path / 'main', tmp_path / 'second', 4, mesh, 16, seed=2,
                                           expect={'shape': [2]})
    batch = batches(5)
    assert set(batch) == {'x0', 'x1', 'label'} and batch['x0'].shape == (16, 2)
    assert batch['x0'].sharding.is_equivalent_to(sharding.batch_sharded(mesh), 2)
    assert len(batch['x1'].addressable_shards) == jax.device_count()
    reader = couplings.MixedCouplingBatches(couplings.open_store(tmp_path / 'main').load(),
                                            couplings.open_store(tmp_path / 'second').load(), 16, 4, seed=2)
    for name, value in reader.local_batch(5).items():
        np.testing.assert_array_equal(np.asarray(batch[name]), value, err_msg=name)
    x0, x1 = np.asarray(batch['x0']), np.asarray(batch['x1'])
    assert np.isclose(x1, x0 - 9).all(axis=1).tolist() == [False] * 12 + [True] * 4  # the second store's 4
    _second_store(tmp_path / 'unlabelled', n=20, num_classes=0)
    with pytest.raises(errors.UserError) as excinfo:
        couplings.make_mixed_batches(tmp_path / 'main', tmp_path / 'unlabelled', 4, mesh, 16, seed=2)
    message = _one_line(excinfo)
    assert 'unlabelled' in message and "'num_classes': 0" in message and 'same shape and labels' in message
    _second_store(tmp_path / 'wide', n=20, shape=(3,))
    with pytest.raises(errors.UserError, match=r"'shape': \[3\]"):
        couplings.make_mixed_batches(tmp_path / 'main', tmp_path / 'wide', 4, mesh, 16, seed=2)
